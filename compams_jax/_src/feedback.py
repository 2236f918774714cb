"""The error-feedback kernel, used by every worker-side and server-side compression step."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from compams_jax._src.base import Compressor
from compams_jax._src.tree import decode_tree, encode_tree, residual_tree


class Compressed(NamedTuple):
  """One error-feedback step's results.

  Attributes:
    payload: what travels on the wire.
    sent: what the receivers reconstruct: C(corrected), or offset + C(corrected − offset).
    residual: corrected − sent, what the next step owes.
  """

  payload: Any
  sent: Any
  residual: Any


@dataclasses.dataclass(frozen=True)
class TreeCodec:
  """A compressor applied to a pytree as its granularity says (per leaf, or the whole model)."""

  compressor: Compressor
  stacked: tuple[bool, ...] | None = None  # per leaf: axis 0 stacks layers, each its own block

  @property
  def randomness(self) -> str:
    return self.compressor.randomness

  def encode(self, tree: Any, key: jax.Array | None) -> Any:
    return encode_tree(self.compressor, tree, key, self.stacked)

  def decode(self, payload: Any, like: Any, key: jax.Array | None) -> Any:
    return decode_tree(self.compressor, payload, like, key, self.stacked)

  def residual(self, x: Any, payload: Any, key: jax.Array | None) -> Any:
    return residual_tree(self.compressor, payload, x, key, self.stacked)


@dataclasses.dataclass(frozen=True)
class RowCodec:
  """A compressor applied to every row of a matrix on its own (row j uses fold_in(key, j))."""

  compressor: Compressor

  @property
  def randomness(self) -> str:
    return self.compressor.randomness

  def row_keys(self, key: jax.Array | None, rows: int, offset: int = 0) -> jax.Array | None:
    if key is None:
      return None
    return jax.vmap(lambda j: jax.random.fold_in(key, offset + j))(jnp.arange(rows))

  def encode(self, x: jax.Array, key: jax.Array | None) -> Any:
    # One row after another (lax.map), not vmapped: encoders may branch with lax.cond, which a
    # vmap inside shard_map cannot type.
    c = self.compressor
    keys = self.row_keys(key, x.shape[0])
    if keys is None:
      return jax.lax.map(lambda r: c.encode(r, None), x)
    return jax.lax.map(lambda rk: c.encode(*rk), (x, keys))

  def decode(self, payload: Any, like: Any, key: jax.Array | None) -> jax.Array:
    c = self.compressor
    row = jax.ShapeDtypeStruct(tuple(like.shape[1:]), like.dtype)
    keys = self.row_keys(key, like.shape[0])
    if keys is None:
      return jax.vmap(lambda p: c.decode(p, row, None))(payload)
    return jax.vmap(lambda p, k: c.decode(p, row, k))(payload, keys)

  def residual(self, x: jax.Array, payload: Any, key: jax.Array | None) -> jax.Array:
    c = self.compressor
    keys = self.row_keys(key, x.shape[0])
    if keys is None:
      return jax.lax.map(lambda a: c.residual(a[0], a[1], None), (x, payload))
    return jax.lax.map(lambda a: c.residual(*a), (x, payload, keys))


def compress_with_feedback(
  codec: Any,
  value: Any,
  residual: Any,
  key: jax.Array | None,
  *,
  offset: Any = None,
  decay: float = 1.0,
) -> Compressed:
  """corrected = value + decay·residual; send C(corrected − offset); keep corrected − sent.

  With no offset this is error feedback: sent = C(corrected). With an offset both ends can
  form (a prediction p), it is predictive coding: the innovation corrected − p is compressed
  and sent = p + C(corrected − p) is the reconstruction. Either way the residual is taken
  against what the receivers decode, so whatever the code loses (dropped entries, sign scales,
  rounding of narrow value dtypes) is owed to the next step.

  Args:
    codec: a `Compressor` (one array), a `TreeCodec` (a pytree) or a `RowCodec` (the rows of a
      matrix, each its own block).
    value: what to send, in the codec's layout.
    residual: the residual owed from the last step, structured like `value`, or None when the
      caller has already added it (or keeps none).
    key: the encoding key (see `compams_jax._src.keys`).
    offset: a prediction structured like `value` that receivers also hold, or None.
    decay: β of a decaying residual, corrected = value + β·residual (SparseLoCo's and DeMo's
      e ← β·e + Δ); 1.0 is plain error feedback. A float, or a scalar array (a hyperparameter
      `optax.inject_hyperparams` passes).

  Returns:
    A `Compressed` (payload, sent, residual).
  """
  if residual is None:
    corrected = value
  else:
    plain = isinstance(decay, (int, float)) and decay == 1.0  # an array: inject_hyperparams
    owed = residual if plain else jax.tree.map(lambda e: decay * e, residual)
    corrected = jax.tree.map(lambda v, e: v.astype(e.dtype) + e, value, owed)
  coded = corrected if offset is None else jax.tree.map(lambda c, p: c - p, corrected, offset)
  payload = codec.encode(coded, key)
  receiver_key = key if codec.randomness == "shared" else None
  decoded = codec.decode(payload, coded, receiver_key)  # computed only where a caller uses it
  if offset is None:
    return Compressed(payload, decoded, codec.residual(corrected, payload, receiver_key))
  sent = jax.tree.map(lambda p, d: p + d, offset, decoded)
  return Compressed(payload, sent, jax.tree.map(lambda c, s: c - s, corrected, sent))
