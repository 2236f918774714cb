"""Bucketing: every leaf of a payload pytree in one buffer, so one collective carries them all.

Compression stays per leaf; only transport is fused. `pack` bitcasts every payload array to
bytes and concatenates them (for collectives that only move data: all_gather, all_to_all, which
JAX emits once per array). Summable payloads need no bucket: `jax.lax.psum` of a pytree is one
variadic all-reduce.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _nbytes(x: Any) -> int:
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def _to_bytes(x: jax.Array, lead: int) -> jax.Array:
  """(*lead, *shape) → (*lead, nbytes) uint8."""
  lead_shape = x.shape[:lead]
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if np.dtype(x.dtype).itemsize > 1:
    x = jax.lax.bitcast_convert_type(x, jnp.uint8)
  elif x.dtype != jnp.uint8:
    x = jax.lax.bitcast_convert_type(x, jnp.uint8)
  return x.reshape(lead_shape + (-1,))


def _from_bytes(b: jax.Array, like: Any, lead: tuple[int, ...]) -> jax.Array:
  """(*lead, nbytes) uint8 → (*lead, *like.shape) of like.dtype."""
  dtype = np.dtype(like.dtype)
  shape = tuple(like.shape)
  if dtype == np.bool_:
    return b.reshape(lead + shape).astype(jnp.bool_)
  if dtype.itemsize == 1:
    out = b if dtype == np.uint8 else jax.lax.bitcast_convert_type(b, dtype)
    return out.reshape(lead + shape)
  return jax.lax.bitcast_convert_type(b.reshape(lead + shape + (dtype.itemsize,)), dtype)


def pack(tree: Any, lead: int = 0) -> jax.Array | None:
  """All leaves of `tree` as one uint8 buffer (keeping `lead` leading axes); None if empty."""
  leaves = [x for x in jax.tree.leaves(tree) if _nbytes(x) > 0]
  if not leaves:
    return None
  parts = [_to_bytes(x, lead) for x in leaves]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=lead)


def unpack(buffer: jax.Array | None, like: Any, lead: tuple[int, ...] = ()) -> Any:
  """Inverse of `pack`: leaves shaped like `like`'s, behind the buffer's extra leading axes.

  `lead` gives those axes when there is no buffer (every leaf empty).
  """
  leaves, treedef = jax.tree.flatten(like)
  lead = lead if buffer is None else tuple(buffer.shape[:-1])
  out, start = [], 0
  for x in leaves:
    n = _nbytes(x)
    if n == 0:
      out.append(jnp.zeros(lead + tuple(x.shape), x.dtype))
      continue
    out.append(_from_bytes(buffer[..., start : start + n], x, lead))
    start += n
  return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class Rows:
  """The payloads of n workers, read one worker at a time.

  `rows[i]` is worker i's payload (a traced index is fine). Reading the rows of a gathered
  byte buffer this way slices one payload out of the buffer per read, so a loop over workers
  never copies all n payloads out of it; `stacked()` gives every row at once (leading axis n)
  for decoders that vectorise over workers and whose payloads are small (top-k).

  Attributes:
    n: number of workers.
    get: i -> worker i's payload.
    stack: () -> all payloads stacked along a leading axis.
  """

  n: int
  get: Callable[[Any], Any]
  stack: Callable[[], Any]

  def __getitem__(self, i):
    return self.get(i)

  def stacked(self) -> Any:
    return self.stack()

  def sum(self, fn: Callable[[Any], Any]) -> Any:
    """Σ_i fn(self[i]) over the rows, one row at a time: O(one result) memory whatever n is.

    The loop starts from row 0's term, so the total carries whatever types the rows give it
    (inside shard_map: varying along the axes the rows vary along).
    """
    first = fn(self[0])
    if self.n == 1:
      return first
    return jax.lax.fori_loop(1, self.n, lambda i, total: total + fn(self[i]), first)


def rows(payloads: Any) -> Rows:
  """`payloads` (stacked along a leading worker axis, or already `Rows`) as `Rows`."""
  if isinstance(payloads, Rows):
    return payloads
  n = jax.tree.leaves(payloads)[0].shape[0]
  return Rows(n, lambda i: jax.tree.map(lambda a: a[i], payloads), lambda: payloads)


def unpack_rows(buffer: jax.Array | None, like: list[Any], n: int) -> list[Rows]:
  """Per-entry `Rows` of a gathered (n, nbytes) buffer of `pack(payload)`, payload a list.

  `like` is one worker's payload: a list of per-leaf payload pytrees, packed in that order.
  """
  out, start = [], 0
  for entry in like:
    leaves, treedef = jax.tree.flatten(entry)
    spans = []
    for x in leaves:
      spans.append((start, _nbytes(x)))
      start += _nbytes(x)

    def one(i, leaves=leaves, treedef=treedef, spans=spans):
      parts = [
        jnp.zeros(tuple(x.shape), x.dtype)
        if nb == 0
        else _from_bytes(jax.lax.dynamic_slice(buffer, (i, s), (1, nb))[0], x, ())
        for x, (s, nb) in zip(leaves, spans)
      ]
      return jax.tree.unflatten(treedef, parts)

    def stack(leaves=leaves, treedef=treedef, spans=spans):
      parts = [
        jnp.zeros((n, *x.shape), x.dtype)
        if nb == 0
        else _from_bytes(buffer[:, s : s + nb], x, (n,))
        for x, (s, nb) in zip(leaves, spans)
      ]
      return jax.tree.unflatten(treedef, parts)

    out.append(Rows(n, one, stack))
  return out
