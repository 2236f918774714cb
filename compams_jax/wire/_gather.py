"""The gather strategy: every worker's compact payload reaches every worker (the paper's algorithm)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compams_jax._src import bucket
from compams_jax._src.axis import AxisName, all_gather_invariant, num_workers, varying_axes
from compams_jax._src.base import Compressor, overrides
from compams_jax._src.keys import decode_key
from compams_jax._src.tree import (
  decode_clipped_sum_tree,
  decode_count_tree,
  decode_mean_over_senders_tree,
  decode_sum_tree,
  decode_tree,
)
from compams_jax.wire._strategy import Wire

AVERAGES = ("mean", "senders")
CLIPS = (None, "median")


def check_averaging(average: Any, clip: Any) -> None:
  """Raises ValueError for an unknown `average` or `clip` option of the gather strategy."""
  if not isinstance(average, str) or average not in AVERAGES:
    raise ValueError(f"gather(average=...) must be one of {AVERAGES}, got {average!r}.")
  if clip is not None and (not isinstance(clip, str) or clip not in CLIPS):
    raise ValueError(f"gather(clip=...) must be one of {CLIPS}, got {clip!r}.")


def gather_average(
  compressor: Compressor,
  payload: Any,
  like: Any,
  *,
  axis_name: AxisName | None,
  key: jax.Array | None = None,
  own: Any = None,
  stacked: Any = None,
  average: str = "mean",
  clip: str | None = None,
) -> Any:
  """(1/n) Σ_i decode(payload_i) over the workers of `axis_name`, as a pytree like `like`.

  Summable payloads (identity, cast, shared-seed random-k) travel by one `psum` of all leaves
  (a single variadic all-reduce); all others by ONE `all_gather` of every leaf's payload
  bitcast to bytes and concatenated, after which every worker adds the n decoded payloads one
  worker at a time (`decode_sum`: O(size) memory whatever n is). The result is identical on
  every worker.

  `average="senders"` divides, per entry, by the number of workers that sent it instead of n
  (`Compressor.decode_mean_over_senders`: Σ_i decode_i / max(1, count), or the compressor's
  own per-coefficient mean). `clip="median"` first scales each worker's decoded block (leaf,
  layer of a stacked leaf, or the model) to at most the median over the workers of their L2
  norms (`decode_clipped_sum_tree`). Either option needs every worker's payload: summable
  codes then travel by the same `all_gather` as the others (the same bytes per worker). Both
  read the gathered buffer one worker at a time: never an (n, size) array.

  Args:
    compressor: the compressor that produced `payload`.
    payload: this worker's payload (`encode_tree`).
    like: arrays or ShapeDtypeStructs giving the result's shapes and dtypes.
    axis_name: the worker axis, or None for a single worker.
    key: the encoding key; used to decode only if the compressor's randomness is shared.
    own: this worker's own decoded payload, if the caller has it; with one worker it is the
      result (bit-identical to the caller's).
    stacked: per-leaf flags of leaves whose axis 0 stacks layers (each layer its own block).
    average: "mean" (default: divide by n) or "senders" (per entry, by the number of workers
      that sent it).
    clip: None (default) or "median" (clip every worker's decoded block to the median norm).

  Returns:
    The average of the decoded payloads, a pytree like `like`.
  """
  check_averaging(average, clip)
  key = decode_key(compressor, key)
  if axis_name is None:
    # One worker: it sent every entry it decodes to, and its norm is the median.
    return decode_tree(compressor, payload, like, key, stacked) if own is None else own
  n = num_workers(axis_name)
  if not jax.tree.leaves(like):
    return like
  plain = average == "mean" and clip is None
  if compressor.summable and plain:
    # One psum of the whole payload pytree lowers to ONE variadic all-reduce, with no copy of
    # the leaves into a bucket first.
    total = decode_tree(compressor, jax.lax.psum(payload, axis_name), like, key, stacked)
    return jax.tree.map(lambda t: (t / n).astype(t.dtype), total)
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
  if plain:
    total = decode_sum_tree(compressor, rows, like, key, stacked)
    return jax.tree.map(lambda t: (t / n).astype(t.dtype), total)
  if clip is None:
    return decode_mean_over_senders_tree(compressor, rows, like, key, stacked)
  if average == "senders" and overrides(compressor, "decode_mean_over_senders"):
    raise ValueError(
      f"gather(average='senders', clip='median'): {type(compressor).__name__} averages over "
      "senders per coefficient (its own decode_mean_over_senders), which takes no per-worker "
      "scales; use one option or the other with it."
    )
  total = decode_clipped_sum_tree(compressor, rows, like, key, stacked)  # float32
  if average == "senders":
    count = decode_count_tree(compressor, rows, like, key, stacked)
    return jax.tree.map(
      lambda t, c, x: (t / jnp.maximum(c, 1.0)).astype(x.dtype), total, count, like
    )
  return jax.tree.map(lambda t, x: (t / n).astype(x.dtype), total, like)


@dataclasses.dataclass(frozen=True)
class Gather(Wire):
  """Every worker's payload reaches every worker; each decodes and averages all n.

  Collectives per step: one `all_gather` of all leaves' payloads (bytes), or, for summable
  compressors with the plain mean, one variadic `psum` of every leaf's payload. Bytes handed
  over per worker: one payload of the whole model (`wire_bits`); received: n of them.

  Attributes:
    averaging: "mean" (the exact mean (1/n) Σ_i decode_i) or "senders" (per entry, the mean
      over the workers that sent it).
    clip: None, or "median": each worker's decoded block is first clipped to the median norm.
  """

  averaging: str = "mean"
  clip: str | None = None

  def __post_init__(self):
    check_averaging(self.averaging, self.clip)

  @property
  def exact_mean(self) -> bool:
    """True for the plain mean; the averaging options change what the receivers compute."""
    return self.averaging == "mean" and self.clip is None

  def average(self, compressor, payload, like, *, axis_name, key=None, own=None, stacked=None):
    """The average of the decoded payloads this strategy computes: see `gather_average`."""
    return gather_average(
      compressor,
      payload,
      like,
      axis_name=axis_name,
      key=key,
      own=own,
      stacked=stacked,
      average=self.averaging,
      clip=self.clip,
    )


def gather(*, average: str = "mean", clip: str | None = None) -> Gather:
  """The gather strategy (the COMP-AMS paper's averaging; the default of every transform).

  Every worker's payload reaches every worker (one `all_gather`; one `psum` for summable codes
  with the plain mean), which decodes and averages them, one worker at a time (O(size) memory
  whatever n is), in the order of the workers on every device (deterministic).

  Args:
    average: "mean" (default): (1/n) Σ_i decode(payload_i), the exact mean. "senders": per
      entry, Σ_i decode(payload_i) / max(1, count), count the number of workers that sent the
      entry (`Compressor.decode_count`; a compressor may average per coefficient with its own
      `decode_mean_over_senders`): the scatter-mean of DeMo and SparseLoCo, where an entry
      only some workers sent is not shrunk by the others' zeros.
    clip: None (default) or "median": before averaging, each worker's decoded block (a leaf,
      one layer of a stacked leaf, the model with granularity "model"; on a hierarchical mesh
      or with sharded parameters, the part the device compresses) is scaled to at most the
      median over the workers of their L2 norms (Templar's per-parameter clipping): one
      worker's outlier cannot dominate the average.

  With either option the result is no longer the plain mean (`exact_mean` is False):
  predictive coding, whose receivers rebuild the senders' reconstructions from the mean,
  refuses it. The bytes on the wire do not change (summable codes are gathered instead of
  summed: the same bytes per worker, n payloads received).

  Returns:
    A `Gather` strategy.

  Examples:
    >>> import compams_jax as cj
    >>> tx = cj.comp_ams(1e-3, cj.compressors.top_k(0.01), axis_name="data", wire=cj.wire.gather())
    >>> cj.wire.gather(average="senders", clip="median").exact_mean
    False
  """
  check_averaging(average, clip)
  return Gather(averaging=average, clip=clip)
