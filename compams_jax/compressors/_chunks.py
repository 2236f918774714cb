"""Chunk layouts of an array (SparseLoCo's and DeMo's chunking) and scatter-adds over workers.

A matrix (rows, cols) is cut into 2-D chunks of (r, c), r the largest divisor of rows that is
≤ the side and c likewise for cols; an array of more than two dimensions is first read as the
matrix (prod(shape[:-1]), shape[-1]); a vector of d entries into 1-D chunks of the largest
divisor of d ≤ its own side (a scalar: one chunk of 1). Chunks are numbered row-major over the
grid of chunks, entries row-major inside a chunk (the chunk-local index).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from compams_jax._src import bucket


@functools.lru_cache(maxsize=4096)
def largest_divisor(n: int, limit: int) -> int:
  """The largest divisor of n that is ≤ limit (1 for n ≤ 1)."""
  for s in range(min(n, limit), 1, -1):
    if n % s == 0:
      return s
  return 1


@functools.lru_cache(maxsize=4096)
def divisors_up_to(n: int, limit: int) -> tuple[int, ...]:
  """Every divisor of n that is ≤ limit (every chunk size an array of n entries can get)."""
  return tuple(s for s in range(1, min(n, limit) + 1) if n % s == 0)


@dataclasses.dataclass(frozen=True)
class Layout:
  """An array read as a (rows, cols) matrix cut into (r, c) chunks (a vector: rows = r = 1).

  Attributes:
    rows: rows of the matrix view.
    cols: columns of the matrix view.
    r: rows of a chunk (divides rows).
    c: columns of a chunk (divides cols).
  """

  rows: int
  cols: int
  r: int
  c: int

  @property
  def size(self) -> int:
    return self.rows * self.cols

  @property
  def m(self) -> int:
    """Entries per chunk."""
    return self.r * self.c

  @property
  def grid(self) -> tuple[int, int]:
    """Chunks along the rows and along the columns."""
    return self.rows // self.r, self.cols // self.c

  @property
  def num_chunks(self) -> int:
    return self.grid[0] * self.grid[1]

  def blocks(self, x: jax.Array) -> jax.Array:
    """x viewed as (rows/r, r, cols/c, c) (a reshape, no copy)."""
    (a, b) = self.grid
    return x.reshape(a, self.r, b, self.c)

  def chunks(self, x: jax.Array) -> jax.Array:
    """x as (num_chunks, m): one chunk a row, its entries row-major."""
    return self.from_blocks(self.blocks(x))

  def from_blocks(self, x4: jax.Array) -> jax.Array:
    """A (rows/r, r, cols/c, c) array as (num_chunks, m)."""
    return x4.transpose(0, 2, 1, 3).reshape(self.num_chunks, self.m)

  def to_blocks(self, y: jax.Array) -> jax.Array:
    """Inverse of `from_blocks`: (num_chunks, m) → (rows/r, r, cols/c, c)."""
    (a, b) = self.grid
    return y.reshape(a, b, self.r, self.c).transpose(0, 2, 1, 3)

  def flat_index(self, local: jax.Array) -> jax.Array:
    """(num_chunks, k) chunk-local indices → int32 indices into the array raveled row-major."""
    local = local.astype(jnp.int32)
    chunk = jnp.arange(self.num_chunks, dtype=jnp.int32)[:, None]
    br, bc = chunk // self.grid[1], chunk % self.grid[1]
    ir, ic = local // self.c, local % self.c
    return (br * self.r + ir) * self.cols + bc * self.c + ic

  def chunk_index(self, local: jax.Array) -> jax.Array:
    """(num_chunks, k) chunk-local indices → int32 indices into the (num_chunks·m) chunk layout."""
    chunk = jnp.arange(self.num_chunks, dtype=jnp.int32)[:, None]
    return chunk * self.m + local.astype(jnp.int32)


def layout(shape: tuple[int, ...], side: int, vector_side: int) -> Layout:
  """The chunk layout of an array of this shape.

  Args:
    shape: the array's shape.
    side: the largest chunk side along each dimension of a matrix.
    vector_side: the largest chunk of a vector (or scalar).

  Returns:
    The `Layout`; an empty array gets a layout with no chunks.
  """
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  if size == 0:
    return Layout(rows=1, cols=0, r=1, c=1)
  if len(shape) <= 1:
    return Layout(rows=1, cols=size, r=1, c=largest_divisor(size, vector_side))
  rows, cols = size // shape[-1], shape[-1]
  return Layout(rows, cols, largest_divisor(rows, side), largest_divisor(cols, side))


def scatter_add_rows(
  payloads: Any, size: int, entries: Callable[[Any], tuple[jax.Array, jax.Array]]
) -> jax.Array:
  """Σ_i scatter(entries(payload_i)) into one float32 buffer of `size`, one worker at a time.

  `entries(payload)` gives (indices, values) of one worker, its indices distinct. Payloads are
  stacked along a leading worker axis or `bucket.Rows`; memory stays O(size + one payload)
  whatever the number of workers (a loop carrying the buffer, which starts from worker 0's
  scatter so that it carries the payloads' device-variance types inside shard_map).
  """
  rows = bucket.rows(payloads)

  def add(buf, payload):
    idx, vals = entries(payload)
    return buf.at[idx].add(vals.astype(jnp.float32), unique_indices=True)

  total = add(jnp.zeros((size,), jnp.float32), rows[0])
  if rows.n == 1:
    return total
  return jax.lax.fori_loop(1, rows.n, lambda i, buf: add(buf, rows[i]), total)
