"""Applying a `Compressor` to a pytree: per leaf, or to the whole model flattened into one vector."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src import bucket
from compams_jax._src.base import Compressor, Payload, check_float_leaf, overrides


def _leaf_keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  if key is None:
    return [None] * n
  return [jax.random.fold_in(key, i) for i in range(n)]


def _flat_like(leaves: list[Any]) -> jax.ShapeDtypeStruct:
  size = sum(int(np.prod(x.shape, dtype=np.int64)) for x in leaves)
  dtype = jnp.result_type(*[x.dtype for x in leaves]) if leaves else jnp.float32
  return jax.ShapeDtypeStruct((size,), dtype)


def _unflatten(vector: jax.Array, like_tree: Any, cast: bool = True) -> Any:
  leaves, treedef = jax.tree.flatten(like_tree)
  out, start = [], 0
  for like in leaves:
    size = int(np.prod(like.shape, dtype=np.int64))
    piece = vector[start : start + size].reshape(like.shape)
    out.append(piece.astype(like.dtype) if cast else piece)
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


def layered(fn):
  """fn(like, *columns) applied to every layer of a leaf stacked along axis 0 (one vmap).

  Columns that are None stay None; every other column carries the layer axis first.
  """

  def apply(like, *columns):
    layer = jax.ShapeDtypeStruct(tuple(like.shape[1:]), like.dtype)
    axes = tuple(None if c is None else 0 for c in columns)
    return jax.vmap(lambda *a: fn(layer, *a), in_axes=axes)(*columns)

  return apply


def layer_keys(key: jax.Array | None, layers: int) -> jax.Array | None:
  """Layer l of a stacked leaf draws from fold_in(the leaf's key, l)."""
  if key is None:
    return None
  return jax.vmap(lambda l: jax.random.fold_in(key, l))(jnp.arange(layers))


def per_leaf(
  fn,
  likes: list[Any],
  *columns: list[Any],
  group: bool = True,
  stacked: Any = None,
  layer_fn: Any = None,
) -> list[Any]:
  """[fn(likes[i], *(c[i] for c in columns)) for each leaf i], compiled once per leaf shape.

  With `group`, leaves of one shape and dtype (a transformer's layers) run as ONE `lax.map`
  over their stacked arguments instead of one copy of the compressor's program per leaf:
  compile time grows with the number of distinct shapes, not of leaves, at the price of the
  stacked arguments in memory. Compressors declare which they want
  (`Compressor.compile_once_per_shape`). Leaves flagged in `stacked` (layers stacked along
  axis 0, e.g. by `nnx.scan`) run on their own, every layer through one vmap (`layered`) of
  `layer_fn` (default `fn`: the compressor's vmap-safe variant, `Compressor.batched()`).
  """
  out: list[Any] = [None] * len(likes)
  plain = []
  for i, like in enumerate(likes):
    if stacked is not None and stacked[i]:
      out[i] = layered(layer_fn or fn)(like, *(c[i] for c in columns))
    else:
      plain.append(i)
  if not group:
    for i in plain:
      out[i] = fn(likes[i], *(c[i] for c in columns))
    return out
  groups: dict[tuple, list[int]] = {}
  for i in plain:
    like = likes[i]
    sig = (tuple(like.shape), str(like.dtype)) + tuple(_signature(c[i]) for c in columns)
    groups.setdefault(sig, []).append(i)
  for idx in groups.values():
    if len(idx) == 1:
      i = idx[0]
      out[i] = fn(likes[i], *(c[i] for c in columns))
      continue
    stacked_args = tuple(
      None if c[idx[0]] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *[c[i] for i in idx])
      for c in columns
    )
    like = likes[idx[0]]
    results = jax.lax.map(lambda args: fn(like, *args), stacked_args)
    for j, i in enumerate(idx):
      out[i] = jax.tree.map(lambda r, j=j: r[j], results)
  return out


def _keys_for(key: jax.Array | None, leaves: list[Any], stacked: Any) -> list[Any]:
  """Per-leaf keys; a stacked leaf gets one key per layer."""
  keys = _leaf_keys(key, len(leaves))
  if stacked is None:
    return keys
  return [
    layer_keys(k, x.shape[0]) if s and k is not None else k
    for k, x, s in zip(keys, leaves, stacked)
  ]


def stacked_flags(spec: Any, tree: Any) -> tuple[bool, ...] | None:
  """One flag per leaf of `tree` from a spec: None, or a pytree prefix of `tree` of bools
  (True: the leaves below stack layers along axis 0)."""
  if spec is None:
    return None
  try:
    flags = jax.tree.leaves(
      jax.tree.map(lambda s, sub: jax.tree.map(lambda _: bool(s), sub), spec, tree)
    )
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"stacked= must be a pytree prefix of the parameters with one bool per leaf (or subtree), "
      f"e.g. {{'layers': True, 'embed': False}}: {e}"
    ) from None
  for flag, leaf in zip(flags, jax.tree.leaves(tree)):
    if flag and leaf.ndim < 1:
      raise ValueError(f"stacked=: a leaf of shape {tuple(leaf.shape)} has no layer axis.")
  return tuple(flags)


def _check_stacked(compressor: Compressor, stacked: Any) -> None:
  if stacked is not None and any(stacked) and compressor.granularity == "model":
    raise ValueError(
      "stacked layers are compressed one layer at a time, but the compressor's granularity "
      "is 'model' (one block for the whole model); use a per-leaf compressor."
    )


def encode_tree(
  compressor: Compressor, tree: Any, key: jax.Array | None = None, stacked: Any = None
) -> Payload:
  """Encodes a pytree: a list of per-leaf payloads, or one payload for the flattened model.

  `stacked` (one flag per leaf, or None) marks leaves whose axis 0 stacks layers: each layer
  is then a block of its own (one top-k budget, one sign scale per layer).
  """
  _check_stacked(compressor, stacked)
  leaves = jax.tree.leaves(tree)
  if compressor.granularity == "model":
    if not leaves:
      return []
    return [compressor.encode(flatten_tree(tree), key)]
  return per_leaf(
    lambda like, x, k: compressor.encode(x, k),
    leaves,
    leaves,
    _keys_for(key, leaves, stacked),
    group=compressor.compile_once_per_shape,
    stacked=stacked,
    layer_fn=lambda like, x, k: compressor.batched().encode(x, k),
  )


def _decode_with(compressor, fn, payload, like_tree, key, stacked=None, layer_fn=None):
  leaves, treedef = jax.tree.flatten(like_tree)
  if compressor.granularity == "model":
    if not leaves:
      return like_tree
    return _unflatten(fn(payload[0], _flat_like(leaves), key), like_tree)
  specs = [jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in leaves]
  keys = _keys_for(key, leaves, stacked)
  group = compressor.compile_once_per_shape
  out = per_leaf(
    lambda like, p, k: fn(p, like, k),
    specs,
    payload,
    keys,
    group=group,
    stacked=stacked,
    layer_fn=None if layer_fn is None else (lambda like, p, k: layer_fn(p, like, k)),
  )
  return jax.tree.unflatten(treedef, out)


def decode_tree(
  compressor: Compressor,
  payload: Payload,
  like_tree: Any,
  key: jax.Array | None = None,
  stacked: Any = None,
) -> Any:
  """Inverse of `encode_tree`: a dense pytree shaped and typed like `like_tree`."""
  return _decode_with(
    compressor, compressor.decode, payload, like_tree, key, stacked, compressor.batched().decode
  )


def _over_workers(
  compressor: Compressor,
  leaf_fn: Any,
  layer_term: Any,
  payloads: Payload,
  like_tree: Any,
  key: jax.Array | None,
  stacked: Any,
  cast: bool = True,
) -> Any:
  """A reduction over the workers' payloads, leaf by leaf (or of the flattened model).

  `leaf_fn(payloads, like, key)` reduces a leaf's payloads (stacked, or `bucket.Rows`); leaves
  of one shape run as one `lax.map` over their stacked rows when the compressor compiles once
  per shape. A leaf that stacks layers adds `layer_term(like, payload, keys)` (every layer of
  one worker's payload, one vmap) one worker at a time. `cast`: unflatten the model's result
  to the leaves' dtypes (False keeps it float32: counts).
  """
  if stacked is None or not any(stacked) or compressor.granularity == "model":
    if compressor.compile_once_per_shape and compressor.granularity == "leaf":
      payloads = [p.stacked() if isinstance(p, bucket.Rows) else p for p in payloads]
    leaves = jax.tree.leaves(like_tree)
    if compressor.granularity == "model" and leaves and not cast:
      return _unflatten(leaf_fn(payloads[0], _flat_like(leaves), key), like_tree, cast=False)
    return _decode_with(compressor, leaf_fn, payloads, like_tree, key)
  leaves, treedef = jax.tree.flatten(like_tree)
  keys = _keys_for(key, leaves, stacked)
  out: list[Any] = [None] * len(leaves)
  plain = [i for i, s in enumerate(stacked) if not s]
  for i, s in enumerate(stacked):
    if not s:
      continue
    spec = jax.ShapeDtypeStruct(tuple(leaves[i].shape), leaves[i].dtype)
    out[i] = layer_term(spec, payloads[i], keys[i])
  specs = [jax.ShapeDtypeStruct(tuple(leaves[i].shape), leaves[i].dtype) for i in plain]
  pays = [payloads[i] for i in plain]
  if compressor.compile_once_per_shape:
    pays = [p.stacked() if isinstance(p, bucket.Rows) else p for p in pays]
  sums = per_leaf(
    lambda like, p, k: leaf_fn(p, like, k),
    specs,
    pays,
    [keys[i] for i in plain],
    group=compressor.compile_once_per_shape,
  )
  for i, v in zip(plain, sums):
    out[i] = v
  return jax.tree.unflatten(treedef, out)


def _layers_decoded(compressor: Compressor):
  """(like, one worker's payload of a stacked leaf, per-layer keys) -> its layers decoded, f32."""
  batched = compressor.batched()
  return layered(lambda like, p, k: batched.decode(p, like, k).astype(jnp.float32))


def decode_sum_tree(
  compressor: Compressor,
  payloads: Payload,
  like_tree: Any,
  key: jax.Array | None = None,
  stacked: Any = None,
) -> Any:
  """Σ_i decode_tree(payloads[i]) over the workers' payloads.

  `payloads` is `encode_tree`'s list with every leaf stacked along a leading worker axis, or a
  list of `bucket.Rows` (a gathered buffer, read one worker at a time by `decode_sum`).
  Leaves grouped into one `lax.map` (`compile_once_per_shape`) take their rows stacked. A
  stacked-layer leaf adds each worker's layers, decoded by one vmap, one worker at a time.
  """
  one = _layers_decoded(compressor)

  def layer_sum(spec, payloads, keys):
    return bucket.rows(payloads).sum(lambda p: one(spec, p, keys)).astype(spec.dtype)

  return _over_workers(
    compressor, compressor.decode_sum, layer_sum, payloads, like_tree, key, stacked
  )


def _each_layer(compressor: Compressor, method: str):
  """(like, a stacked leaf's payloads, per-layer keys) -> `method` of the compressor's batched
  variant on every layer: one vmap over the layer axis of the stacked payloads (n, layers, ...)."""

  def apply(spec, payloads, keys):
    layer = jax.ShapeDtypeStruct(tuple(spec.shape[1:]), spec.dtype)
    fn = getattr(compressor.batched(), method)
    return jax.vmap(lambda p, k: fn(p, layer, k), in_axes=(1, None if keys is None else 0))(
      bucket.rows(payloads).stacked(), keys
    )

  return apply


def decode_count_tree(
  compressor: Compressor,
  payloads: Payload,
  like_tree: Any,
  key: jax.Array | None = None,
  stacked: Any = None,
) -> Any:
  """Per entry, how many workers' payloads sent it (`Compressor.decode_count`).

  A float32 pytree shaped like `like_tree`; `payloads` as in `decode_sum_tree`. A stacked-layer
  leaf counts the non-zero entries of each worker's decoded layers, one worker at a time, or
  runs the compressor's own `decode_count` on every layer (one vmap).
  """
  if overrides(compressor, "decode_count"):
    layer_count = _each_layer(compressor, "decode_count")
  else:
    one = _layers_decoded(compressor)

    def layer_count(spec, payloads, keys):
      return bucket.rows(payloads).sum(lambda p: (one(spec, p, keys) != 0).astype(jnp.float32))

  return _over_workers(
    compressor, compressor.decode_count, layer_count, payloads, like_tree, key, stacked, cast=False
  )


def decode_mean_over_senders_tree(
  compressor: Compressor,
  payloads: Payload,
  like_tree: Any,
  key: jax.Array | None = None,
  stacked: Any = None,
) -> Any:
  """Per entry, the mean of the decoded payloads over the workers that sent it.

  `Compressor.decode_mean_over_senders` per leaf (default Σ_i decode_i / max(1, count)), a
  pytree like `like_tree`; `payloads` as in `decode_sum_tree`. A stacked-layer leaf adds each
  worker's decoded layers and their non-zero entries, one worker at a time; a compressor with
  its own senders-mean (one per coefficient of a transform) or its own `decode_count` runs its
  `decode_mean_over_senders` on every layer (one vmap over the layer axis of the leaf's
  stacked payloads).
  """
  if overrides(compressor, "decode_mean_over_senders") or overrides(compressor, "decode_count"):
    layer_mean = _each_layer(compressor, "decode_mean_over_senders")
  else:
    one = _layers_decoded(compressor)

    def layer_mean(spec, payloads, keys):
      def term(p):
        x = one(spec, p, keys)
        return jnp.stack([x, (x != 0).astype(jnp.float32)])

      total, count = bucket.rows(payloads).sum(term)  # workers in order: deterministic
      return (total / jnp.maximum(count, 1.0)).astype(spec.dtype)

  return _over_workers(
    compressor, compressor.decode_mean_over_senders, layer_mean, payloads, like_tree, key, stacked
  )


def _median_clipped_sum(decode: Any, payloads: Payload, layer_axis: bool) -> jax.Array:
  """Σ_i s_i·decode(payloads[i]), s_i = min(1, median_j ‖decode_j‖ / ‖decode_i‖), in float32.

  Two passes over the rows, one worker at a time: the n norms (per layer with `layer_axis`),
  then the sum of the scaled decodes (workers 0..n−1 in order). O(one decoded array + n
  norms) memory: never an (n, size) array.
  """
  rows = bucket.rows(payloads)

  def norm(p):
    x = decode(p)
    axes = tuple(range(1 if layer_axis else 0, x.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))

  norms = jax.lax.map(lambda i: norm(rows[i]), jnp.arange(rows.n))  # (n,) or (n, layers)
  median = jnp.median(norms, axis=0)
  scales = jnp.where(norms > median, median / jnp.where(norms > 0, norms, 1.0), 1.0)

  def term(i):
    x = decode(rows[i])
    s = scales[i]
    return x * (s.reshape(s.shape + (1,) * (x.ndim - s.ndim)))

  first = term(0)
  if rows.n == 1:
    return first
  return jax.lax.fori_loop(1, rows.n, lambda i, total: total + term(i), first)


def decode_clipped_sum_tree(
  compressor: Compressor,
  payloads: Payload,
  like_tree: Any,
  key: jax.Array | None = None,
  stacked: Any = None,
) -> Any:
  """Σ_i s_i·decode_tree(payloads[i]), every worker's decoded block clipped to the median norm.

  Per block (a leaf, a layer of a stacked leaf, or the model with granularity "model"):
  s_i = min(1, m / ‖decode_i‖) with m the median (`jnp.median`) over the workers of
  ‖decode_i‖₂, the norms of the decoded payloads (Templar's per-parameter norm clipping).
  A float32 pytree shaped like `like_tree`; `payloads` as in `decode_sum_tree`. One pass over
  the rows for the norms, one for the sum: O(size) memory whatever n is.
  """
  one = _layers_decoded(compressor)

  def leaf_sum(payloads, like, key):
    return _median_clipped_sum(
      lambda p: compressor.decode(p, like, key).astype(jnp.float32), payloads, False
    )

  def layer_sum(spec, payloads, keys):
    return _median_clipped_sum(lambda p: one(spec, p, keys), payloads, True)

  return _over_workers(
    compressor, leaf_sum, layer_sum, payloads, like_tree, key, stacked, cast=False
  )


def residual_tree(
  compressor: Compressor,
  payload: Payload,
  tree: Any,
  key: jax.Array | None = None,
  stacked: Any = None,
) -> Any:
  """tree − decode_tree(payload): what error feedback keeps (`Compressor.residual` per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  if compressor.granularity == "model":
    if not leaves:
      return tree
    return _unflatten(compressor.residual(flatten_tree(tree), payload[0], key), tree)
  out = per_leaf(
    lambda like, x, p, k: compressor.residual(x, p, k),
    leaves,
    leaves,
    payload,
    _keys_for(key, leaves, stacked),
    group=compressor.compile_once_per_shape,
    stacked=stacked,
    layer_fn=lambda like, x, p, k: compressor.batched().residual(x, p, k),
  )
  return jax.tree.unflatten(treedef, out)


def tree_wire_bits(compressor: Compressor, tree: Any, stacked: Any = None) -> int:
  """Exact bits one worker's payload of this pytree puts on the wire (from shapes only)."""
  leaves = jax.tree.leaves(tree)
  if compressor.granularity == "model":
    if not leaves:
      return 0
    flat = _flat_like(leaves)
    return compressor.wire_bits(flat.shape, flat.dtype)
  flags = stacked if stacked is not None else [0] * len(leaves)
  return sum(
    x.shape[0] * compressor.wire_bits(tuple(x.shape[1:]), x.dtype)
    if s
    else compressor.wire_bits(tuple(x.shape), x.dtype)
    for x, s in zip(leaves, flags)
  )


def compress_tree(compressor: Compressor, tree: Any, key: jax.Array | None = None) -> Any:
  """decode_tree(encode_tree(tree)): the dense compressed pytree C(tree)."""
  return decode_tree(compressor, encode_tree(compressor, tree, key), tree, key)
