"""Applying a `Compressor` to a pytree: per leaf, or to the whole model flattened into one vector."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src import bucket
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


def _signature(x: Any) -> tuple:
  return tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(x))


def per_leaf(fn, likes: list[Any], *columns: list[Any], group: bool = True) -> list[Any]:
  """[fn(likes[i], *(c[i] for c in columns)) for each leaf i], compiled once per leaf shape.

  With `group`, leaves of one shape and dtype (a transformer's layers) run as ONE `lax.map`
  over their stacked arguments instead of one copy of the compressor's program per leaf:
  compile time grows with the number of distinct shapes, not of leaves, at the price of the
  stacked arguments in memory. Compressors declare which they want
  (`Compressor.compile_once_per_shape`).
  """
  if not group:
    return [fn(like, *(c[i] for c in columns)) for i, like in enumerate(likes)]
  groups: dict[tuple, list[int]] = {}
  for i, like in enumerate(likes):
    sig = (tuple(like.shape), str(like.dtype)) + tuple(_signature(c[i]) for c in columns)
    groups.setdefault(sig, []).append(i)
  out: list[Any] = [None] * len(likes)
  for idx in groups.values():
    if len(idx) == 1:
      i = idx[0]
      out[i] = fn(likes[i], *(c[i] for c in columns))
      continue
    stacked = tuple(
      None if c[idx[0]] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *[c[i] for i in idx])
      for c in columns
    )
    like = likes[idx[0]]
    results = jax.lax.map(lambda args: fn(like, *args), stacked)
    for j, i in enumerate(idx):
      out[i] = jax.tree.map(lambda r, j=j: r[j], results)
  return out


def _leaves_and_keys(tree: Any, key: jax.Array | None):
  leaves = jax.tree.leaves(tree)
  return leaves, _leaf_keys(key, len(leaves))


def encode_tree(compressor: Compressor, tree: Any, key: jax.Array | None = None) -> Payload:
  """Encodes a pytree: a list of per-leaf payloads, or one payload for the flattened model."""
  leaves, keys = _leaves_and_keys(tree, key)
  if compressor.granularity == "model":
    if not leaves:
      return []
    return [compressor.encode(flatten_tree(tree), key)]
  return per_leaf(
    lambda like, x, k: compressor.encode(x, k),
    leaves,
    leaves,
    keys,
    group=compressor.compile_once_per_shape,
  )


def _decode_with(compressor, fn, payload, like_tree, key):
  leaves, treedef = jax.tree.flatten(like_tree)
  if compressor.granularity == "model":
    if not leaves:
      return like_tree
    return _unflatten(fn(payload[0], _flat_like(leaves), key), like_tree)
  specs = [jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in leaves]
  keys = _leaf_keys(key, len(leaves))
  group = compressor.compile_once_per_shape
  out = per_leaf(lambda like, p, k: fn(p, like, k), specs, payload, keys, group=group)
  return jax.tree.unflatten(treedef, out)


def decode_tree(
  compressor: Compressor, payload: Payload, like_tree: Any, key: jax.Array | None = None
) -> Any:
  """Inverse of `encode_tree`: a dense pytree shaped and typed like `like_tree`."""
  return _decode_with(compressor, compressor.decode, payload, like_tree, key)


def decode_sum_tree(
  compressor: Compressor, payloads: Payload, like_tree: Any, key: jax.Array | None = None
) -> Any:
  """Σ_i decode_tree(payloads[i]) over the workers' payloads.

  `payloads` is `encode_tree`'s list with every leaf stacked along a leading worker axis, or a
  list of `bucket.Rows` (a gathered buffer, read one worker at a time by `decode_sum`).
  Leaves grouped into one `lax.map` (`compile_once_per_shape`) take their rows stacked.
  """
  if compressor.compile_once_per_shape and compressor.granularity == "leaf":
    payloads = [p.stacked() if isinstance(p, bucket.Rows) else p for p in payloads]
  return _decode_with(compressor, compressor.decode_sum, payloads, like_tree, key)


def residual_tree(
  compressor: Compressor, payload: Payload, tree: Any, key: jax.Array | None = None
) -> Any:
  """tree − decode_tree(payload): what error feedback keeps (`Compressor.residual` per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  if compressor.granularity == "model":
    if not leaves:
      return tree
    return _unflatten(compressor.residual(flatten_tree(tree), payload[0], key), tree)
  keys = _leaf_keys(key, len(leaves))
  group = compressor.compile_once_per_shape
  out = per_leaf(
    lambda like, x, p, k: compressor.residual(x, p, k), leaves, leaves, payload, keys, group=group
  )
  return jax.tree.unflatten(treedef, out)


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
