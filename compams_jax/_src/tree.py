"""Applying a `Compressor` to a pytree: per leaf, or to the whole model flattened into one vector."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src.base import Compressor, Payload, check_float_leaf


def _leaf_keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  if key is None:
    return [None] * n
  return [jax.random.fold_in(key, i) for i in range(n)]


def _flat_like(leaves: list[Any]) -> jax.ShapeDtypeStruct:
  size = sum(int(np.prod(x.shape, dtype=np.int64)) for x in leaves)
  dtype = jnp.result_type(*[x.dtype for x in leaves]) if leaves else jnp.float32
  return jax.ShapeDtypeStruct((size,), dtype)


def _unflatten(vector: jax.Array, like_tree: Any) -> Any:
  leaves, treedef = jax.tree.flatten(like_tree)
  out, start = [], 0
  for like in leaves:
    size = int(np.prod(like.shape, dtype=np.int64))
    out.append(vector[start : start + size].reshape(like.shape).astype(like.dtype))
    start += size
  return jax.tree.unflatten(treedef, out)


def flatten_tree(tree: Any) -> jax.Array:
  """All leaves raveled and concatenated into one vector of their common (promoted) dtype."""
  leaves = jax.tree.leaves(tree)
  like = _flat_like(leaves)
  if not leaves:
    return jnp.zeros((0,), like.dtype)
  return jnp.concatenate([x.reshape(-1).astype(like.dtype) for x in leaves])


def flat_spec(tree: Any) -> jax.ShapeDtypeStruct:
  """Shape and dtype of `flatten_tree(tree)`, from shapes only."""
  return _flat_like(jax.tree.leaves(tree))


def unflatten_tree(vector: jax.Array, like_tree: Any) -> Any:
  """Inverse of `flatten_tree`: a pytree shaped and typed like `like_tree`."""
  return _unflatten(vector, like_tree)


def check_tree(tree: Any) -> None:
  """Raises TypeError if any leaf is not a real floating-point array."""
  for leaf in jax.tree.leaves(tree):
    check_float_leaf(leaf)


def encode_tree(compressor: Compressor, tree: Any, key: jax.Array | None = None) -> Payload:
  """Encodes a pytree: a list of per-leaf payloads, or one payload for the flattened model."""
  leaves = jax.tree.leaves(tree)
  if compressor.granularity == "model":
    if not leaves:
      return []
    return [compressor.encode(flatten_tree(tree), key)]
  return [compressor.encode(x, k) for x, k in zip(leaves, _leaf_keys(key, len(leaves)))]


def _decode_with(compressor, fn, payload, like_tree, key):
  leaves, treedef = jax.tree.flatten(like_tree)
  if compressor.granularity == "model":
    if not leaves:
      return like_tree
    return _unflatten(fn(payload[0], _flat_like(leaves), key), like_tree)
  out = [fn(p, like, k) for p, like, k in zip(payload, leaves, _leaf_keys(key, len(leaves)))]
  return jax.tree.unflatten(treedef, out)


def decode_tree(
  compressor: Compressor, payload: Payload, like_tree: Any, key: jax.Array | None = None
) -> Any:
  """Inverse of `encode_tree`: a dense pytree shaped and typed like `like_tree`."""
  return _decode_with(compressor, compressor.decode, payload, like_tree, key)


def decode_sum_tree(
  compressor: Compressor, payloads: Payload, like_tree: Any, key: jax.Array | None = None
) -> Any:
  """Σ_i decode_tree(payloads[i]) for payloads stacked along a leading worker axis."""
  return _decode_with(compressor, compressor.decode_sum, payloads, like_tree, key)


def tree_wire_bits(compressor: Compressor, tree: Any) -> int:
  """Exact bits one worker's payload of this pytree puts on the wire (from shapes only)."""
  leaves = jax.tree.leaves(tree)
  if compressor.granularity == "model":
    if not leaves:
      return 0
    flat = _flat_like(leaves)
    return compressor.wire_bits(flat.shape, flat.dtype)
  return sum(compressor.wire_bits(tuple(x.shape), x.dtype) for x in leaves)


def compress_tree(compressor: Compressor, tree: Any, key: jax.Array | None = None) -> Any:
  """decode_tree(encode_tree(tree)): the dense compressed pytree C(tree)."""
  return decode_tree(compressor, encode_tree(compressor, tree, key), tree, key)
