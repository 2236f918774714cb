"""The average over workers of compressed vectors, by a collective that carries the payloads."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compams_jax._src.axis import active_recorder, effective_axis, num_workers
from compams_jax._src.base import Compressor
from compams_jax._src.keys import decode_key
from compams_jax._src.tree import decode_sum_tree, decode_tree


def average(
  compressor: Compressor,
  payload: Any,
  like: Any,
  *,
  axis_name: str | None,
  key: jax.Array | None = None,
  decoded: Any = None,
) -> Any:
  """(1/n) Σ_i decode(payload_i) over the workers of `axis_name`, as a dense pytree like `like`.

  Summable payloads (identity, cast, shared-seed random-k) travel by one `psum`; all others by
  an `all_gather` of the compact payloads (packed bits, values + narrow indices, int8 levels),
  after which every device decodes the n payloads and averages them. The result is identical
  on every device (invariant along the axis, so it may feed replicated state).

  Args:
    compressor: the compressor that produced `payload`.
    payload: this worker's payload, from `compams_jax.compressors.encode_tree`.
    like: a pytree of arrays / ShapeDtypeStructs giving the shapes and dtypes of the result.
    axis_name: the bound mapped axis to average over, or None for a single worker.
    key: the encoding key; it is used to decode only if the compressor's randomness is shared.
    decoded: this worker's own decoded payload, if the caller already has it; with a single
      worker it is the result (not decoded again, so it is bit-identical to the caller's).

  Returns:
    The average of the decoded vectors, a pytree like `like`.
  """
  recorder = active_recorder()
  if recorder is not None:
    recorder.sends.append(("psum" if compressor.summable else "all_gather", payload))
  axis_name = effective_axis(axis_name)
  key = decode_key(compressor, key)
  if axis_name is None:
    return decode_tree(compressor, payload, like, key) if decoded is None else decoded
  n = num_workers(axis_name)
  if compressor.summable:
    total = decode_tree(compressor, jax.lax.psum(payload, axis_name), like, key)
  else:
    gathered = jax.lax.all_gather(payload, axis_name, to="invarying")
    total = decode_sum_tree(compressor, gathered, like, key)
  return jax.tree.map(lambda t: (t / n).astype(t.dtype), total)


def sum_over_workers(values: Any, *, axis_name: str | None) -> Any:
  """Σ_i values_i over workers by one `psum` (for small side information such as scalars).

  Recorded as sent bytes like every other compams_jax collective.
  """
  recorder = active_recorder()
  if recorder is not None:
    recorder.sends.append(("psum", values))
  axis_name = effective_axis(axis_name)
  if axis_name is None:
    return values
  num_workers(axis_name)
  return jax.lax.psum(values, axis_name)


def all_workers(flag: jax.Array, axis_name: str | None) -> jax.Array:
  """True iff `flag` is true on every worker (one small collective)."""
  axis_name = effective_axis(axis_name)
  if axis_name is None:
    return flag
  num_workers(axis_name)
  return jax.lax.pmin(flag.astype(jnp.int32), axis_name) > 0
