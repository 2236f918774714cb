"""Two-phase compressed all-reduce: all_to_all of compressed chunks, reduce, recompress, all_gather.

Gathering every worker's payload costs each device n payloads; past a few dozen workers that
loses to a dense ring all-reduce. Here each device receives only the n payloads of ITS chunk
(1/n of the vector), averages them, recompresses the average with its own error-feedback
residual, and all devices gather the n recompressed chunks. Per device, the bytes handed to
XLA are one full payload (all_to_all) plus one chunk payload (all_gather), whatever n is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from compams_jax._src.axis import active_recorder, effective_axis, num_workers, worker_index
from compams_jax._src.base import Compressor
from compams_jax._src.feedback import compress_with_feedback


def chunk_size(size: int, n: int) -> int:
  """Elements per chunk when a vector of `size` is split over n devices (last one padded)."""
  return max(1, math.ceil(size / n))


def _keys(key: jax.Array | None, offset: int, n: int) -> jax.Array | None:
  if key is None:
    return None
  return jax.vmap(lambda j: jax.random.fold_in(key, offset + j))(jnp.arange(n))


def _encode_chunks(compressor: Compressor, chunks: jax.Array, keys: jax.Array | None):
  if keys is None:
    return jax.vmap(lambda c: compressor.encode(c, None))(chunks)
  return jax.vmap(compressor.encode)(chunks, keys)


def _decode_chunks(compressor: Compressor, payloads, like, keys: jax.Array | None):
  if keys is None or compressor.randomness != "shared":
    return jax.vmap(lambda p: compressor.decode(p, like, None))(payloads)
  return jax.vmap(lambda p, k: compressor.decode(p, like, k))(payloads, keys)


def two_phase_average(
  compressor: Compressor,
  vector: jax.Array,
  server_residual: jax.Array,
  *,
  axis_name: str | None,
  key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Average of a per-worker flat vector over workers by a two-phase compressed all-reduce.

  Phase 1: split the vector into n chunks, compress each (chunk = block of the compressor),
  `all_to_all` so device j receives every worker's payload of chunk j, decode and average them.
  Phase 2: device j compresses its averaged chunk plus its server residual s_j (error feedback
  on the device side: s_j ← s_j + avg_j − C(avg_j + s_j)), `all_gather`s the payload, and every
  device decodes the same n chunks.

  Args:
    compressor: compresses every chunk in both phases.
    vector: this worker's float vector (already error-corrected by the caller), shape (size,).
    server_residual: this device's residual of its chunk, shape (chunk_size(size, n),).
    axis_name: the worker axis, or None (one worker: compress once, no collective).
    key: PRNG key of the step (per worker for private randomness).

  Returns:
    (average, new_server_residual, own_decoded): the average over workers (identical on every
    device), the device's new server residual, and this worker's own decoded phase-1 vector
    (what its worker-side residual must subtract).
  """
  compressor = compressor.batched()  # Chunks are encoded under vmap.
  recorder = active_recorder()
  axis = effective_axis(axis_name)
  n = num_workers(axis)
  size = vector.shape[0]
  c = chunk_size(size, n)
  padded = jnp.pad(vector, (0, n * c - size)).reshape(n, c)
  like = jax.ShapeDtypeStruct((c,), vector.dtype)
  # Phase 1 keys: chunk j uses fold_in(key, j); the server phase uses fold_in(key, n + j). With
  # shared randomness every device derives the same keys, so any device can decode any chunk.
  phase1_keys = _keys(key, 0, n)
  payloads = _encode_chunks(compressor, padded, phase1_keys)
  own = _decode_chunks(compressor, payloads, like, phase1_keys).reshape(-1)[:size]
  if recorder is not None:
    recorder.sends.append(("all_to_all", payloads))
  if axis is None:
    received = payloads
    me = 0
  else:
    received = jax.lax.all_to_all(payloads, axis, 0, 0, tiled=False)
    me = worker_index(axis)
  # `received[i]` is worker i's payload of chunk `me`; with shared randomness all used key j=me.
  mine_keys = None
  if phase1_keys is not None and compressor.randomness == "shared":
    mine_keys = jnp.broadcast_to(phase1_keys[me], (n,) + phase1_keys.shape[1:])
  chunk_avg = jnp.mean(
    _decode_chunks(compressor, received, like, mine_keys).astype(jnp.float32), axis=0
  ).astype(vector.dtype)
  server_keys = _keys(key, n, n) if key is not None else None
  if server_keys is not None and compressor.randomness == "shared":
    my_server_key = server_keys[me]
  elif server_keys is not None:
    my_server_key = jax.random.fold_in(key, 2 * n + 1)  # private: any key of this device
  else:
    my_server_key = None
  # Server-side error feedback: the same kernel as the workers', on this device's chunk.
  server_payload, _, new_server_residual = compress_with_feedback(
    compressor, chunk_avg, server_residual, my_server_key, per_leaf=False
  )
  if recorder is not None:
    recorder.sends.append(("all_gather", server_payload))
  if axis is None:  # One worker, or accounting: every chunk's payload has this shape.
    gathered = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n,) + x.shape), server_payload)
  else:
    gathered = jax.lax.all_gather(server_payload, axis, to="invarying")
  average = _decode_chunks(compressor, gathered, like, server_keys).reshape(-1)[:size]
  return average, new_server_residual, own
