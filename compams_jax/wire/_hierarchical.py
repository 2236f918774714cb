"""Hierarchical data parallelism: dense over the fast axis, compressed over the slow one.

Each leaf is flattened row-major, zero-padded to a multiple of k = |dense axis| and split into
k contiguous chunks; the device at position j of the dense axis owns chunk j. One step:
reduce-scatter MEAN over the dense axis → (the transform compresses its chunk and averages it
over the worker axis with its wire strategy) → dense all-gather over the dense axis. Leaves of
one dtype travel in one buffer: one reduce-scatter and one all-gather per step and dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src.axis import AxisName, all_gather_invariant, axis_size, varying_axes


def chunk_len(shape: tuple[int, ...], k: int) -> int:
  """Entries of the chunk one of k devices owns for a leaf of this shape."""
  return -(-math.prod(shape) // k)


def chunks_like(tree: Any, dense_axis_name: AxisName | None) -> Any:
  """ShapeDtypeStructs of the chunks this device owns (the tree itself with no dense axis)."""
  if dense_axis_name is None:
    return tree
  k = axis_size(dense_axis_name, "dense")
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((chunk_len(tuple(x.shape), k),), x.dtype), tree
  )


def _groups(leaves: list[Any]) -> dict[tuple, list[int]]:
  """Leaves bucketed into one collective: by dtype, and by the mesh axes they vary along (a
  leaf replicated over an axis never shares a buffer with one sharded over it)."""
  out: dict[tuple, list[int]] = {}
  for i, x in enumerate(leaves):
    key = (np.dtype(x.dtype).name, tuple(sorted(varying_axes(x))))
    out.setdefault(key, []).append(i)
  return out


def scatter_mean(tree: Any, dense_axis_name: AxisName | None) -> Any:
  """This device's chunk of the mean of `tree` over the dense axis (reduce-scatter MEAN)."""
  if dense_axis_name is None:
    return tree
  k = axis_size(dense_axis_name, "dense")
  leaves, treedef = jax.tree.flatten(tree)
  out: list[Any] = [None] * len(leaves)
  for idx in _groups(leaves).values():
    mats = []
    for i in idx:
      x = leaves[i].reshape(-1)
      c = chunk_len(leaves[i].shape, k)
      mats.append(jnp.pad(x, (0, k * c - x.shape[0])).reshape(k, c))
    big = mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=1)
    mine = jax.lax.psum_scatter(big, dense_axis_name, scatter_dimension=0, tiled=False)
    mine = (mine / k).astype(big.dtype)
    start = 0
    for i, m in zip(idx, mats):
      out[i] = mine[start : start + m.shape[1]]
      start += m.shape[1]
  return jax.tree.unflatten(treedef, out)


def gather_chunks(chunks: Any, like: Any, dense_axis_name: AxisName | None) -> Any:
  """The whole tree shaped like `like` from every device's chunk (dense all-gather)."""
  if dense_axis_name is None:
    return chunks
  axis_size(dense_axis_name, "dense")  # A clear error when the axis is not bound.
  leaves, treedef = jax.tree.flatten(chunks)
  likes = jax.tree.leaves(like)
  out: list[Any] = [None] * len(leaves)
  for idx in _groups(leaves).values():
    parts = [leaves[i] for i in idx]
    big = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    every = all_gather_invariant(big, dense_axis_name)  # (k, total)
    start = 0
    for i in idx:
      c = leaves[i].shape[0]
      d = math.prod(likes[i].shape)
      out[i] = every[:, start : start + c].reshape(-1)[:d].reshape(likes[i].shape)
      start += c
  return jax.tree.unflatten(treedef, out)


def own_chunks(tree: Any, dense_axis_name: AxisName | None) -> Any:
  """This device's chunks of a tree that every device of the dense axis holds (no collective).

  The same layout as `scatter_mean`: each leaf flattened, zero-padded to a multiple of k and
  split into k contiguous chunks, the device at position j of the dense axis taking chunk j.
  """
  if dense_axis_name is None:
    return tree
  k = axis_size(dense_axis_name, "dense")
  j = jax.lax.axis_index(dense_axis_name)

  def mine(x):
    c = chunk_len(x.shape, k)
    flat = jnp.pad(x.reshape(-1), (0, k * c - math.prod(x.shape)))
    return jax.lax.dynamic_slice(flat, (j * c,), (c,))

  return jax.tree.map(mine, tree)
