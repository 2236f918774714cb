"""Sparsifiers: `top_k` (largest magnitudes) and `random_k` (shared-seed random coordinates)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src import bucket
from compams_jax._src.base import (
  Compressor,
  Granularity,
  check_ratio,
  index_dtype,
  num_kept,
)
from compams_jax._src.keys import uniforms
from compams_jax.compressors._selection import METHODS, Method, top_k_indices


def _size(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


BLOCK = 1 << 16  # Leaves larger than this send block-local 16-bit indices.


def _blocks(d: int) -> int:
  return -(-d // BLOCK)


def _count_dtype(k: int) -> np.dtype:
  """Per-block counts never exceed k (nor BLOCK)."""
  return np.dtype(np.uint16) if k < BLOCK else np.dtype(np.uint32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(Compressor):
  """Keeps the k = max(1, ceil(ratio·d)) largest-magnitude entries; zeros the rest.

  Payload: the k values (in `value_dtype`, default the array's dtype) and their indices. Leaves
  of up to 65,536 entries send flat indices in the narrowest unsigned type that addresses them
  (uint8 up to 256 entries, uint16 up to 65,536). Larger leaves are cut into blocks of 65,536:
  the kept entries are sent in index order as 16-bit offsets inside their block plus one count
  per block (uint16 while k < 65,536), so each entry's block is implied by its position. Ties
  are broken towards the lower index (as `jax.lax.top_k`).

  A narrower `value_dtype` (e.g. bfloat16) rounds the kept values; under error feedback the
  rounding error stays in the residual, which is taken against the decoded payload.

  Pointwise q-deviate with q² = 1 − k/d (for exact values; rounding adds its relative error).

  Attributes:
    ratio: fraction of entries kept, in (0, 1].
    value_dtype: dtype of the sent values (None: the array's dtype).
    method: how the k entries are found; all methods select the same set. "exact" runs
      `jax.lax.top_k` (a partial sort over the whole array; docs/benchmarks.md, section 3,
      measures it against an elementwise pass).
      "threshold" estimates the k-th largest magnitude from a sample, compacts the entries
      above it into a fixed buffer and refines exactly there, falling back to `lax.top_k` when
      the estimate misses (see `compams_jax.compressors._selection`). "auto" (default) uses
      "threshold" for 16/32-bit float leaves of at least 65,536 elements, "exact" otherwise.
  """

  ratio: float = 0.01
  value_dtype: Any = None
  method: Method = "auto"

  deviation = "pointwise"
  unbiased = False
  summable = False
  randomness = "none"
  compile_once_per_shape = True

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "ratio", check_ratio(self.ratio))
    if self.method not in METHODS:
      raise ValueError(f"top_k method must be one of {METHODS}, got {self.method!r}.")
    if self.value_dtype is not None:
      dtype = np.dtype(self.value_dtype)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"top_k value_dtype must be a floating dtype, got {self.value_dtype!r}.")
      object.__setattr__(self, "value_dtype", dtype)

  def _values_dtype(self, dtype) -> np.dtype:
    return np.dtype(dtype) if self.value_dtype is None else self.value_dtype

  def encode(self, x, key=None):
    del key
    flat = x.reshape(-1)
    d = flat.shape[0]
    k = num_kept(self.ratio, d)
    vdtype = self._values_dtype(flat.dtype)
    if k == 0:  # an empty leaf
      return {"values": flat[:0].astype(vdtype), "indices": jnp.zeros((0,), index_dtype(d))}
    idx = top_k_indices(flat, k, self.method)
    if d <= BLOCK:
      return {"values": flat[idx].astype(vdtype), "indices": idx.astype(index_dtype(d))}
    idx = jnp.sort(idx)
    counts = jnp.bincount(idx >> 16, length=_blocks(d))
    return {
      "values": flat[idx].astype(vdtype),
      "indices": (idx & (BLOCK - 1)).astype(jnp.uint16),
      "counts": counts.astype(_count_dtype(k)),
    }

  def _flat_indices(self, payload, d: int) -> jax.Array:
    idx = payload["indices"].astype(jnp.int32)
    if d <= BLOCK:
      return idx
    k = idx.shape[-1]
    block = jnp.repeat(
      jnp.arange(_blocks(d), dtype=jnp.int32),
      payload["counts"].astype(jnp.int32),
      total_repeat_length=k,
    )
    return block * BLOCK + idx

  def decode(self, payload, like, key=None):
    del key
    d = _size(like.shape)
    idx = self._flat_indices(payload, d)
    out = jnp.zeros((d,), like.dtype).at[idx].set(payload["values"].astype(like.dtype))
    return out.reshape(like.shape)

  def batched(self):
    return dataclasses.replace(self, method="exact")

  def residual(self, x, payload, key=None):
    """x with its k sent values subtracted in place (no dense decoded array)."""
    del key
    flat = x.reshape(-1)
    idx = self._flat_indices(payload, flat.shape[0])
    return flat.at[idx].add(-payload["values"].astype(flat.dtype)).reshape(x.shape)

  def decode_sum(self, payloads, like, key=None):
    """Scatter-adds every worker's values into one buffer: O(d + n·k) memory."""
    del key
    d = _size(like.shape)
    payloads = bucket.rows(payloads).stacked()  # n·k entries: small
    idx = jax.vmap(lambda p: self._flat_indices(p, d))(payloads).reshape(-1)
    vals = payloads["values"].astype(jnp.float32).reshape(-1)
    out = jnp.zeros((d,), jnp.float32).at[idx].add(vals)
    return out.astype(like.dtype).reshape(like.shape)

  def wire_bits(self, shape, dtype):
    d = _size(shape)
    k = num_kept(self.ratio, d)
    value_bits = self._values_dtype(dtype).itemsize * 8
    if d <= BLOCK:
      return k * (value_bits + index_dtype(d).itemsize * 8)
    return k * (value_bits + 16) + _blocks(d) * _count_dtype(k).itemsize * 8

  def q_squared(self, size):
    return 0.0 if size == 0 else 1.0 - num_kept(self.ratio, size) / size


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomK(Compressor):
  """Keeps k = max(1, ceil(ratio·d)) coordinates drawn uniformly without replacement; unscaled.

  All workers draw the same coordinates (the key is shared, derived from the step), so only the
  k values travel and the payloads of different workers can be summed with `psum`: the wire
  cost is k values, no indices. Unscaled random-k is biased but contracts in expectation:
  E‖C(x) − x‖² = (1 − k/d)‖x‖², the kind of bound predictive coding's analysis admits.
  """

  ratio: float = 0.01
  method: Method = "auto"

  deviation = "expected"
  unbiased = False
  summable = True
  randomness = "shared"
  compile_once_per_shape = True

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "ratio", check_ratio(self.ratio))

  def _indices(self, key, d):
    if key is None:
      raise ValueError("random_k needs a PRNG key (the transforms derive one per step).")
    k = num_kept(self.ratio, d)
    if k == d:
      return jnp.arange(d)
    # The k largest of d i.i.d. uniforms are a uniformly random k-subset; selecting them with
    # the threshold selector costs a few elementwise passes, where jax.random.choice(...,
    # replace=False) draws a full permutation (measured ~230x an elementwise pass at d = 11M).
    return top_k_indices(uniforms(key, (d,)), k, self.method)

  def batched(self):
    return dataclasses.replace(self, method="exact")

  def encode(self, x, key=None):
    flat = x.reshape(-1)
    return {"values": flat[self._indices(key, flat.shape[0])]}

  def decode(self, payload, like, key=None):
    d = _size(like.shape)
    idx = self._indices(key, d)
    out = jnp.zeros((d,), like.dtype).at[idx].set(payload["values"].astype(like.dtype))
    return out.reshape(like.shape)

  def residual(self, x, payload, key=None):
    """x with its k sent entries zeroed in place (no dense decoded array)."""
    flat = x.reshape(-1)
    idx = self._indices(key, flat.shape[0])
    sent = payload["values"].astype(flat.dtype)
    return flat.at[idx].add(-sent).reshape(x.shape)

  def decode_sum(self, payloads, like, key=None):
    summed = jnp.sum(bucket.rows(payloads).stacked()["values"].astype(jnp.float32), axis=0)
    return self.decode({"values": summed}, like, key)

  def wire_bits(self, shape, dtype):
    return num_kept(self.ratio, _size(shape)) * jnp.dtype(dtype).itemsize * 8

  def q_squared(self, size):
    return 0.0 if size == 0 else 1.0 - num_kept(self.ratio, size) / size


def top_k(
  ratio: float = 0.01,
  *,
  value_dtype: Any = None,
  granularity: Granularity = "leaf",
  method: Method = "auto",
) -> TopK:
  """Top-k sparsification (the paper's Top-k; default ratio 1%).

  Args:
    ratio: fraction of entries kept, in (0, 1]; k = max(1, ceil(ratio·d)) per leaf (or for the
      whole model with `granularity="model"`).
    value_dtype: dtype of the sent values, e.g. `jnp.bfloat16` (None: the array's dtype). With
      bfloat16 values and 16-bit indices a kept entry costs 4 bytes: ratio 0.01 sends about
      1/100 of dense float32.
    granularity: "leaf" (per layer, the paper's choice) or "model" (one global top-k).
    method: "auto" (default), "exact" or "threshold": how the entries are found (the same set
      either way; see `TopK`). "auto" takes the estimated-threshold path on leaves of 65,536
      elements and more: a few streaming passes instead of a partial sort (docs/benchmarks.md,
      section 3, measures both).

  Returns:
    A `TopK` compressor.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.top_k(0.5)
    >>> c.compress(jnp.array([0.1, -3.0, 2.0, 0.5]))
    Array([ 0., -3.,  2.,  0.], dtype=float32)

  References:
    Li, Karimi, Li, "On Distributed Adaptive Optimization with Gradient Compression", ICLR 2022.
  """
  return TopK(ratio=ratio, value_dtype=value_dtype, granularity=granularity, method=method)


def random_k(ratio: float = 0.01, *, granularity: Granularity = "leaf") -> RandomK:
  """Random-k sparsification with a seed shared by all workers, without rescaling.

  Args:
    ratio: fraction of entries kept, in (0, 1].
    granularity: "leaf" or "model".

  Returns:
    A `RandomK` compressor (needs a key; the transforms supply one per step, identical on
    every worker).

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.random_k(0.25)
    >>> int((c.compress(jnp.arange(1.0, 9.0), jax.random.key(0)) != 0).sum())
    2
  """
  return RandomK(ratio=ratio, granularity=granularity)
