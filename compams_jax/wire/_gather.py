"""The gather strategy: every worker's compact payload reaches every worker (the paper's algorithm)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from compams_jax._src import bucket
from compams_jax._src.axis import AxisName, all_gather_invariant, num_workers, varying_axes
from compams_jax._src.base import Compressor
from compams_jax._src.keys import decode_key
from compams_jax._src.tree import decode_sum_tree, decode_tree
from compams_jax.wire._strategy import Wire


def gather_average(
  compressor: Compressor,
  payload: Any,
  like: Any,
  *,
  axis_name: AxisName | None,
  key: jax.Array | None = None,
  own: Any = None,
  stacked: Any = None,
) -> Any:
  """(1/n) Σ_i decode(payload_i) over the workers of `axis_name`, as a pytree like `like`.

  Summable payloads (identity, cast, shared-seed random-k) travel by one `psum` of all leaves
  (a single variadic all-reduce); all others by ONE `all_gather` of every leaf's payload
  bitcast to bytes and concatenated, after which every worker adds the n decoded payloads one
  worker at a time (`decode_sum`: O(size) memory whatever n is). The result is identical on
  every worker.

  Args:
    compressor: the compressor that produced `payload`.
    payload: this worker's payload (`encode_tree`).
    like: arrays or ShapeDtypeStructs giving the result's shapes and dtypes.
    axis_name: the worker axis, or None for a single worker.
    key: the encoding key; used to decode only if the compressor's randomness is shared.
    own: this worker's own decoded payload, if the caller has it; with one worker it is the
      result (bit-identical to the caller's).
    stacked: per-leaf flags of leaves whose axis 0 stacks layers (each layer its own block).

  Returns:
    The average of the decoded payloads, a pytree like `like`.
  """
  key = decode_key(compressor, key)
  if axis_name is None:
    return decode_tree(compressor, payload, like, key, stacked) if own is None else own
  n = num_workers(axis_name)
  if not jax.tree.leaves(like):
    return like
  if compressor.summable:
    # One psum of the whole payload pytree lowers to ONE variadic all-reduce, with no copy of
    # the leaves into a bucket first.
    total = decode_tree(compressor, jax.lax.psum(payload, axis_name), like, key, stacked)
  else:
    # One bucket per set of mesh axes the payloads vary along (one bucket unless leaves are
    # sharded differently over other mesh axes): a gathered buffer then varies exactly as its
    # leaves do. Every leaf's decode_sum reads its payloads out of its gathered buffer one
    # worker at a time: no copy of all n payloads besides the buffer itself.
    groups: dict[frozenset, list[int]] = {}
    for i, entry in enumerate(payload):
      axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(entry)))
      groups.setdefault(axes, []).append(i)
    rows: list[Any] = [None] * len(payload)
    for idx in groups.values():
      part = [payload[i] for i in idx]
      buffer = bucket.pack(part)
      gathered = None if buffer is None else all_gather_invariant(buffer, axis_name)
      for i, r in zip(idx, bucket.unpack_rows(gathered, part, n)):
        rows[i] = r
    total = decode_sum_tree(compressor, rows, like, key, stacked)
  return jax.tree.map(lambda t: (t / n).astype(t.dtype), total)


@dataclasses.dataclass(frozen=True)
class Gather(Wire):
  """Every worker's payload reaches every worker; each decodes and averages all n.

  Collectives per step: one `all_gather` of all leaves' payloads (bytes), or, for summable
  compressors, one variadic `psum` of every leaf's payload. Bytes handed over per worker: one
  payload of the whole model (`wire_bits`); received: n of them.
  """

  def average(self, compressor, payload, like, *, axis_name, key=None, own=None, stacked=None):
    """(1/n) Σ_i decode(payload_i): see `gather_average`."""
    return gather_average(
      compressor, payload, like, axis_name=axis_name, key=key, own=own, stacked=stacked
    )


def gather() -> Gather:
  """The gather strategy (the COMP-AMS paper's averaging; the default of every transform).

  Returns:
    A `Gather` strategy.

  Examples:
    >>> import compams_jax as cj
    >>> tx = cj.comp_ams(1e-3, cj.compressors.top_k(0.01), axis_name="data", wire=cj.wire.gather())
  """
  return Gather()
