"""DeMo's compressor: top-k of the orthonormal DCT-II coefficients of each chunk."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src.base import Compressor
from compams_jax.compressors import _index_code as code
from compams_jax.compressors._chunked_top_k import MAX_SIDE, check_int, check_value_dtype, to_dtype
from compams_jax.compressors._chunks import Layout, divisors_up_to, layout, scatter_add_rows

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls on every backend (no bf16 passes)


@functools.cache
def dct_matrix(n: int) -> np.ndarray:
  """The orthonormal DCT-II matrix D (n×n float32): y = D x, x = Dᵀ y.

  D[k, j] = s_k cos(π (2j + 1) k / (2n)), s_0 = √(1/n), s_k = √(2/n) for k > 0.
  """
  k = np.arange(n)[:, None]
  j = np.arange(n)[None, :]
  d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j + 1) * k / (2 * n))
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


def transform_error(n: int) -> float:
  """A bound δ on the relative norm error of one float32 forward and inverse 2-D transform with
  sides ≤ n: four matrix products, each within γ_n·√n of exact (γ_n = n·2⁻²⁴ / (1 − n·2⁻²⁴))."""
  u = 2.0**-24
  return 4 * n * u / (1 - n * u) * math.sqrt(n)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DctTopK(Compressor):
  """Top-k of each chunk's orthonormal DCT-II coefficients (DeMo's transform and selection).

  Chunks: a matrix (rows, cols) is cut into (r, c) chunks, r the largest divisor of rows that is
  ≤ `chunk` and c likewise for cols; an array of more dimensions is read as the matrix
  (prod(shape[:-1]), shape[-1]); a vector into 1-D chunks of the largest divisor of its size
  ≤ `chunk` (as DeMo; a scalar: one chunk of 1). Each chunk X goes through the separable
  orthonormal DCT-II, Y = D_r X D_cᵀ (float32, `dct_matrix`), and keeps its k_m = min(m, k)
  largest-magnitude coefficients (ties towards the lower index).

  Payload: "values", the kept coefficients (`value_dtype`, default the array's dtype), and
  "indices", their chunk-local indices (row-major in the chunk, < m ≤ 4,096), two in three
  bytes, chunk after chunk. Decoding scatters the coefficients and applies the inverse
  transform X = D_rᵀ Y D_c; the decoding is linear, so `decode_sum` adds every worker's
  coefficients first and transforms once. `decode_mean_over_senders` is DeMo's scatter-mean:
  each coefficient averaged over the workers that sent it.

  Pointwise deviation: the transform is orthonormal, so ‖C(x) − x‖² is the energy of the
  dropped coefficients, at most 1 − k_m/m of each chunk's (plus u² of the kept ones when
  `value_dtype` rounds them, u its unit roundoff). `q_squared(size)` takes the largest such value
  over the chunk sizes an array of `size` entries can get (its divisors ≤ chunk²) and adds the
  float32 transforms' error bound δ (`transform_error`): q² = (√q₀ + δ)². Rounding to a 16-bit
  array's own dtype (its coefficients sent in it, the decoded output) adds that dtype's relative
  error on top, as it does for every code that computes its output. Limits: a chunk's
  coefficients reach its norm (the DC coefficient is √m times the chunk's mean), so float16
  coefficients of entries near float16's maximum are clamped to its range rather than sent as
  inf; and XLA:CPU flushes subnormal float32 products, so entries near float32's smallest normal
  lose more than δ.

  Attributes:
    k: coefficients kept per chunk.
    chunk: the largest chunk side (1 to 64).
    value_dtype: dtype of the sent coefficients (None: the array's dtype).
  """

  k: int = 32
  chunk: int = 64
  value_dtype: Any = None

  deviation = "pointwise"
  unbiased = False
  summable = False
  randomness = "none"
  sends_every_entry = False
  compile_once_per_shape = True

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "k", check_int("dct_top_k k", self.k, 1))
    object.__setattr__(self, "chunk", check_int("dct_top_k chunk", self.chunk, 1, MAX_SIDE))
    object.__setattr__(self, "value_dtype", check_value_dtype("dct_top_k", self.value_dtype))

  def layout(self, shape) -> Layout:
    """The chunk layout of an array of this shape."""
    return layout(shape, self.chunk, self.chunk)

  def kept_per_chunk(self, m: int) -> int:
    return min(m, self.k)

  def _count(self, lay: Layout) -> int:
    return lay.num_chunks * self.kept_per_chunk(lay.m) if lay.size else 0

  def _wire_dtype(self, dtype) -> np.dtype:
    return np.dtype(dtype) if self.value_dtype is None else self.value_dtype

  # ------------------------------------------------------------------ transforms

  def coefficients(self, x: jax.Array) -> jax.Array:
    """The (num_chunks, m) float32 DCT-II coefficients of x's chunks, row-major in a chunk."""
    lay = self.layout(x.shape)
    x4 = lay.blocks(x.astype(jnp.float32))
    if lay.c > 1:
      x4 = jnp.einsum("aibj,qj->aibq", x4, dct_matrix(lay.c), precision=_HIGHEST)
    if lay.r > 1:
      x4 = jnp.einsum("pi,aibq->apbq", dct_matrix(lay.r), x4, precision=_HIGHEST)
    return lay.from_blocks(x4)

  def inverse(self, coefficients: jax.Array, like: Any) -> jax.Array:
    """The float32 array shaped like `like` whose chunks have these DCT-II coefficients
    ((num_chunks, m) or flat)."""
    lay = self.layout(like.shape)
    y4 = lay.to_blocks(coefficients.reshape(lay.num_chunks, lay.m))
    if lay.r > 1:
      y4 = jnp.einsum("pi,apbq->aibq", dct_matrix(lay.r), y4, precision=_HIGHEST)
    if lay.c > 1:
      y4 = jnp.einsum("aibq,qj->aibj", y4, dct_matrix(lay.c), precision=_HIGHEST)
    return y4.reshape(like.shape)

  # ------------------------------------------------------------------ codec

  def encode(self, x, key=None):
    del key
    lay = self.layout(x.shape)
    count = self._count(lay)
    wire = self._wire_dtype(x.dtype)
    if count == 0:
      return {"values": jnp.zeros((0,), wire), "indices": jnp.zeros((0,), jnp.uint8)}
    coef = self.coefficients(x)
    _, local = jax.lax.top_k(jnp.abs(coef), self.kept_per_chunk(lay.m))
    values = jnp.take_along_axis(coef, local, axis=1).reshape(-1)
    return {"values": to_dtype(values, wire), "indices": code.pack12(local.reshape(-1))}

  def _entries(self, payload, lay: Layout) -> tuple[jax.Array, jax.Array]:
    """(indices into the flat coefficient layout, float32 coefficients) of one payload."""
    local = code.unpack12(payload["indices"], self._count(lay)).reshape(lay.num_chunks, -1)
    return lay.chunk_index(local).reshape(-1), payload["values"].astype(jnp.float32)

  def decode(self, payload, like, key=None):
    del key
    lay = self.layout(like.shape)
    if not self._count(lay):
      return jnp.zeros(like.shape, like.dtype)
    idx, values = self._entries(payload, lay)
    coef = jnp.zeros((lay.size,), jnp.float32).at[idx].set(values, unique_indices=True)
    return to_dtype(self.inverse(coef, like), like.dtype)

  def decode_sum(self, payloads, like, key=None):
    """Adds every worker's coefficients (one worker at a time), then one inverse transform."""
    del key
    lay = self.layout(like.shape)
    if not self._count(lay):
      return jnp.zeros(like.shape, like.dtype)
    coef = scatter_add_rows(payloads, lay.size, lambda p: self._entries(p, lay))
    return to_dtype(self.inverse(coef, like), like.dtype)

  def coefficient_count(self, payloads, like, key=None) -> jax.Array:
    """How many workers sent each coefficient: float32 (num_chunks, m), chunk-local row-major."""
    del key
    lay = self.layout(like.shape)
    if not self._count(lay):
      return jnp.zeros((lay.num_chunks, lay.m), jnp.float32)

    def ones(p):
      idx, values = self._entries(p, lay)
      return idx, jnp.ones_like(values)

    return scatter_add_rows(payloads, lay.size, ones).reshape(lay.num_chunks, lay.m)

  def decode_mean_over_senders(self, payloads, like, key=None) -> jax.Array:
    """DeMo's scatter-mean: the inverse transform of Σ_i coef_i / max(1, count), count the
    number of workers that sent each coefficient (deterministic: added in worker order).

    `payloads` are stacked along a leading worker axis or `bucket.Rows`; the result is shaped
    and typed like `like`.
    """
    del key
    lay = self.layout(like.shape)
    if not self._count(lay):
      return jnp.zeros(like.shape, like.dtype)
    total = scatter_add_rows(payloads, lay.size, lambda p: self._entries(p, lay))
    count = self.coefficient_count(payloads, like).reshape(-1)
    return to_dtype(self.inverse(total / jnp.maximum(count, 1.0), like), like.dtype)

  def wire_bits(self, shape, dtype):
    count = self._count(self.layout(shape))
    return count * self._wire_dtype(dtype).itemsize * 8 + 8 * code.index_bytes(count)

  def q_squared(self, size):
    if size == 0:
      return 0.0
    u = 0.0 if self.value_dtype is None else float(jnp.finfo(self.value_dtype).eps) / 2
    q0 = max(
      1.0 - self.kept_per_chunk(m) / m * (1.0 - u * u)
      for m in divisors_up_to(int(size), self.chunk * self.chunk)
    )
    return (math.sqrt(q0) + transform_error(self.chunk)) ** 2


def dct_top_k(k: int = 32, *, chunk: int = 64, value_dtype: Any = None) -> DctTopK:
  """DeMo's DCT-domain top-k: per chunk, the k largest orthonormal DCT-II coefficients.

  Matrices are cut into chunks of up to chunk×chunk (sides: each dimension's largest divisor
  ≤ `chunk`), vectors into 1-D chunks of up to `chunk`; each chunk sends its k largest
  coefficients (values and 12-bit chunk-local indices). With k=32 of 64×64 float32 chunks a kept
  coefficient costs 32 + 12 bits: 93× fewer bytes than float32.

  Args:
    k: coefficients kept per chunk (k_m = min(m, k) of a chunk of m).
    chunk: the largest chunk side, 1 to 64 (12-bit indices address at most 64² coefficients).
    value_dtype: dtype of the sent coefficients, e.g. `jnp.bfloat16` (None: the array's dtype).

  Returns:
    A `DctTopK` compressor.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.dct_top_k(1, chunk=4)
    >>> c.compress(jnp.array([1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.1, 1.9]))
    Array([1., 1., 1., 1., 2., 2., 2., 2.], dtype=float32)
    >>> 768 * 3072 * 32 / cj.compressors.dct_top_k(32).wire_bits((768, 3072), jnp.float32)
    93.0909090909091

  References:
    Peng, Chen, Su, Quesnelle, Kingma, Liu, "DeMo: Decoupled Momentum Optimization",
    arXiv 2411.19870; bloc97/DeMo demo.py.
  """
  return DctTopK(k=k, chunk=chunk, value_dtype=value_dtype)
