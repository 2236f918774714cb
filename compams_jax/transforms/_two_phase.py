"""Two-phase averaging: compress n chunks, exchange, average, recompress with a server residual.

Used by the communicating transforms when their wire strategy is `cj.wire.two_phase()` (a
strategy without `exact_mean`). Worker side: the error-corrected values are flattened into one
vector, zero-padded and split into n chunks, each compressed as its own block (`ChunkCodec`,
the layout the transform's error feedback runs on). Server side, device j: the n workers'
payloads of chunk j arrive by one all_to_all; their decoded average is recompressed with j's
own server residual s_j (the error-feedback kernel: s_j ← s_j + avg_j − C(avg_j + s_j)); one
all_gather brings every device the n recompressed chunks, decoded into the output.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from compams_jax._src.base import Compressor
from compams_jax._src.feedback import RowCodec, compress_with_feedback
from compams_jax._src.shards import init_groups
from compams_jax._src.tree import flat_spec, flatten_tree, unflatten_tree
from compams_jax._src.workers import PerWorker, per_worker_zeros
from compams_jax.wire import TwoPhase, worker_index


def chunk_size(size: int, n: int) -> int:
  """Elements per chunk when a vector of `size` is split over n devices (last one padded)."""
  return max(1, math.ceil(size / n))


@dataclasses.dataclass(frozen=True)
class ChunkCodec:
  """A pytree flattened into one vector, zero-padded, split into n chunks, each its own block.

  Chunk j's payload uses fold_in(key, j): with shared randomness every device derives the same
  keys, so any device can decode any chunk.
  """

  compressor: Compressor
  n: int

  @property
  def randomness(self) -> str:
    return self.compressor.randomness

  def _rows(self, tree: Any) -> jax.Array:
    flat = flatten_tree(tree)
    c = chunk_size(flat.shape[0], self.n)
    return jnp.pad(flat, (0, self.n * c - flat.shape[0])).reshape(self.n, c)

  def encode(self, tree: Any, key: jax.Array | None) -> Any:
    return RowCodec(self.compressor).encode(self._rows(tree), key)

  def decode(self, payload: Any, like: Any, key: jax.Array | None) -> Any:
    flat = flat_spec(like)
    row = jax.ShapeDtypeStruct((self.n, chunk_size(flat.shape[0], self.n)), flat.dtype)
    decoded = RowCodec(self.compressor).decode(payload, row, key)
    return unflatten_tree(decoded.reshape(-1)[: flat.shape[0]], like)

  def residual(self, tree: Any, payload: Any, key: jax.Array | None) -> Any:
    out = RowCodec(self.compressor).residual(self._rows(tree), payload, key)
    return unflatten_tree(out.reshape(-1)[: flat_spec(tree).shape[0]], tree)


def warn_if_rows_stay_dense(compressor: Compressor, like: Any, n: int) -> None:
  """Warns when a lossy compressor's declared bits for one chunk row exceed half its dense bits
  (a lossless code is dense by choice)."""
  if compressor.deviation == "none":
    return
  flat = flat_spec(like)
  row = (chunk_size(flat.shape[0], n),)
  dense = row[0] * jnp.dtype(flat.dtype).itemsize * 8
  bits = compressor.wire_bits(row, flat.dtype)
  if bits > dense / 2:
    warnings.warn(
      f"cj.wire.two_phase() flattens the model into 1-D rows of {row[0]} entries, which "
      f"{type(compressor).__name__} codes at {bits / dense:.0%} of their dense bytes; use "
      "cj.wire.gather(), where it codes each leaf in its own shape.",
      UserWarning,
      stacklevel=4,
    )


def init(like: Any, n: int) -> PerWorker:
  """Each device's server residual: one chunk of the flattened `like` (⌈size / n⌉ entries).

  In `cj.sharding.init` on parameters sharded over other mesh axes, `like` is the device's own
  shards, flattened per group of leaves sharded alike (`spec_groups`): one residual per group
  (a tuple), each the device's own (`per_device`)."""
  leaves = jax.tree.leaves(like)
  groups = init_groups(like)

  def chunk(idx):
    flat = flat_spec([leaves[i] for i in idx])
    return jax.ShapeDtypeStruct((chunk_size(flat.shape[0], n),), flat.dtype)

  value = chunk(groups[0][1]) if len(groups) == 1 else tuple(chunk(idx) for _, idx in groups)
  return per_worker_zeros(
    value,
    what="two-phase server residuals (tied to the chunk layout of the worker count)",
    params_like=False,
    per_device="groups",
  )


def reduce_chunk(
  compressor: Compressor,
  received: Any,
  chunk: jax.ShapeDtypeStruct,
  server_residual: jax.Array,
  *,
  key: jax.Array | None,
  me: Any,
  n: int,
) -> tuple[Any, jax.Array]:
  """Device `me`'s server step: average the n received payloads of its chunk, recompress.

  Returns (the recompressed chunk's payload, the new server residual). Keys: chunk j was
  encoded with fold_in(key, j), its server payload uses fold_in(key, n + j).
  """
  shared = compressor.randomness == "shared" and key is not None
  chunk_key = jax.random.fold_in(key, me) if shared else None
  chunk_avg = (compressor.decode_sum(received, chunk, chunk_key) / n).astype(chunk.dtype)
  if shared:
    server_key = jax.random.fold_in(key, n + me)
  elif key is not None:
    server_key = jax.random.fold_in(key, 2 * n + 1)  # private: any key of this device
  else:
    server_key = None
  server = compress_with_feedback(compressor, chunk_avg, server_residual, server_key)
  return server.payload, server.residual


def decode_chunks(
  compressor: Compressor,
  gathered: Any,
  chunk: jax.ShapeDtypeStruct,
  like: Any,
  *,
  key: jax.Array | None,
  n: int,
) -> Any:
  """The output, a pytree like `like`, from the n devices' recompressed chunk payloads."""
  shared = compressor.randomness == "shared" and key is not None
  size = flat_spec(like).shape[0]
  decode_keys = RowCodec(compressor).row_keys(key, n, offset=n) if shared else None
  if decode_keys is None:
    decoded = jax.vmap(lambda p: compressor.decode(p, chunk, None))(gathered)
  else:
    decoded = jax.vmap(lambda p, k: compressor.decode(p, chunk, k))(gathered, decode_keys)
  return unflatten_tree(decoded.reshape(-1)[:size], like)


def average(
  wire: TwoPhase,
  codec: ChunkCodec,
  payload: Any,
  like: Any,
  flat_dtype: Any,
  state: PerWorker,
  *,
  key: jax.Array | None,
  axis_name: Any,
) -> tuple[Any, PerWorker]:
  """The two-phase average of the workers' `ChunkCodec` payloads, as a pytree like `like`.

  `state` is seen parameter-shaped (this device's server residual chunk).
  """
  compressor, n = codec.compressor, codec.n
  size = flat_spec(like).shape[0]
  if size == 0:
    return like, state
  c = chunk_size(size, n)
  if state.value.shape[-1] != c:
    raise ValueError(
      f"the two-phase state was initialised for chunks of {state.value.shape[-1]} entries, "
      f"but axis {axis_name!r} has {n} workers (chunks of {c}): initialise it with "
      "cj.sharding.init on the mesh it runs on, or pass cj.wire.two_phase(num_workers=n)."
    )
  chunk = jax.ShapeDtypeStruct((c,), flat_dtype)
  received = wire.exchange(payload, axis_name)  # received[i]: worker i's payload of my chunk
  me = 0 if axis_name is None else worker_index(axis_name)
  server_payload, server_residual = reduce_chunk(
    compressor, received, chunk, state.value, key=key, me=me, n=n
  )
  gathered = wire.gather(server_payload, axis_name)
  mean = decode_chunks(compressor, gathered, chunk, like, key=key, n=n)
  return mean, state.replace(server_residual)
