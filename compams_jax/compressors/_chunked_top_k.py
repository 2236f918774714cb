"""SparseLoCo's compressor: top-k per 64×64 chunk, 12-bit chunk-local indices, 2-bit values."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src.base import Compressor
from compams_jax.compressors import _index_code as code
from compams_jax.compressors._chunks import Layout, divisors_up_to, layout, scatter_add_rows

VALUE_BITS = (2, 4, 8, None)
MAX_SIDE = 64  # a chunk holds at most 64² = 4,096 entries: its indices fit in 12 bits
SIGMAS = 3.0  # the quantizer's bins cover μ ± 3σ of the sent values


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
  """An integer in [lo, hi] (bools refused)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
  value = int(value)
  if value < lo or (hi is not None and value > hi):
    raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else '∞'}], got {value}.")
  return value


def check_value_dtype(name: str, value_dtype: Any) -> np.dtype | None:
  """None, or a floating dtype JAX can produce (float64 only with jax_enable_x64)."""
  if value_dtype is None:
    return None
  try:
    dtype = np.dtype(value_dtype)
  except TypeError as e:
    raise ValueError(f"{name} value_dtype must be a floating dtype, got {value_dtype!r}.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} value_dtype must be a floating dtype, got {value_dtype!r}.")
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(f"{name} value_dtype={dtype} needs jax_enable_x64.")
  return dtype


def to_dtype(values: jax.Array, dtype: Any) -> jax.Array:
  """values cast to `dtype`, clamped to its finite range where the wire dtype reaches further
  (float16 65504 rounded to bfloat16 is 65536: clamped, not inf)."""
  dtype = jnp.dtype(dtype)
  if jnp.finfo(dtype).max < jnp.finfo(values.dtype).max:
    limit = float(jnp.finfo(dtype).max)
    values = jnp.clip(values.astype(jnp.float32), -limit, limit)
  return values.astype(dtype)


def quantize(values: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """Codes and per-bin means of one message's values (float32), 2^bits uniform bins.

  μ and σ (the sample standard deviation, 0 for fewer than 2 values) of the values; the bins cut
  [μ − 3σ, μ + 3σ] into 2^bits equal parts, values outside go to the first or last bin, and
  each bin decodes to the mean of the values that fell in it (an empty bin's mean is 0; no code
  points to it). With σ = 0 every value is in bin 0 and decodes exactly. The statistics are
  taken on values / max|values| (squares of large values would overflow float32).
  """
  bins = 1 << bits
  v = values.astype(jnp.float32)
  count = v.shape[-1]
  top = jnp.max(jnp.abs(v))
  scale = jnp.where((top >= jnp.finfo(jnp.float32).tiny) & jnp.isfinite(top), top, 1.0)
  u = v / scale
  mu = jnp.mean(u)
  sigma = jnp.sqrt(jnp.sum(jnp.square(u - mu)) / max(count - 1, 1))
  width = 2 * SIGMAS * sigma / bins
  spread = width > 0
  t = (u - (mu - SIGMAS * sigma)) / jnp.where(spread, width, 1.0)
  codes = jnp.where(spread, jnp.clip(jnp.floor(t), 0, bins - 1), 0).astype(jnp.int32)
  sums = jnp.zeros((bins,), jnp.float32).at[codes].add(u)
  counts = jnp.zeros((bins,), jnp.float32).at[codes].add(1.0)
  table = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0) * scale
  return codes, table


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkedTopK(Compressor):
  """Top-k per chunk (SparseLoCo): chunk-local 12-bit indices, values quantized or cast.

  Chunks: a matrix (rows, cols) is cut into (r, c) chunks, r the largest divisor of rows that is
  ≤ `chunk` and c likewise for cols (768×3072 → 64×64 chunks; 50257 rows → 29-row chunks); an
  array of more dimensions is read as the matrix (prod(shape[:-1]), shape[-1]); a vector of d
  entries is cut into 1-D chunks of the largest divisor of d ≤ chunk² (a scalar: one chunk of
  1; a vector of prime size d > chunk² gets chunks of 1 and is sent whole).

  Each chunk of m entries keeps its k_m = min(m, max(1, ceil(k·m / chunk²))) largest
  magnitudes (`k` is the count of a full chunk of chunk² entries; smaller chunks keep the same
  density), ties towards the lower index (as `jax.lax.top_k`).

  Payload: "indices", the kept entries' chunk-local indices (< m ≤ 4,096), two in three bytes
  (chunk after chunk, k_m each, so the chunk is implied by the position); then, with
  `value_bits` b ∈ {2, 4, 8}, "codes" (b bits each) and "table" (the 2^b per-bin means, float32
  or `value_dtype`): one quantizer per message and leaf (see `quantize`: bins over μ ± 3σ of the
  kept values, each bin decoded to the mean of its values); with `value_bits=None`, "values" in
  `value_dtype` (default the array's dtype).

  Deviation: with `value_bits=None`, pointwise with q² = 1 − (k_m/m)(1 − u²), u the unit
  roundoff of `value_dtype` (0 for the array's own dtype): the dropped entries of a chunk have at
  most the mean square of the kept ones, and rounding a kept value errs by at most u|x_i| (for
  values inside `value_dtype`'s normal range, as for `cast`).
  `q_squared(size)` is the largest such value over the chunk sizes an array of `size` entries can
  get (its divisors ≤ chunk²). Quantized values: "unbounded" (the per-bin means are the
  projection of the kept values onto bin-wise constants, so ‖C(x) − x‖ ≤ ‖x‖, but no
  contraction is proven). Kept entries that are exact zeros (an all-zero chunk) decode to their
  bin's mean, which need not be zero.

  Attributes:
    k: entries kept per full chunk of chunk² entries.
    chunk: the largest chunk side (1 to 64).
    value_bits: 2, 4 or 8 bits per kept value (quantized), or None (values sent as they are).
    value_dtype: the dtype of the sent values (`value_bits=None`; default the array's) or of
      the per-bin means (quantized; default float32).
  """

  k: int = 64
  chunk: int = 64
  value_bits: int | None = 2
  value_dtype: Any = None

  unbiased = False
  summable = False
  randomness = "none"
  sends_every_entry = False
  compile_once_per_shape = True

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "k", check_int("chunked_top_k k", self.k, 1))
    object.__setattr__(self, "chunk", check_int("chunked_top_k chunk", self.chunk, 1, MAX_SIDE))
    if self.value_bits not in VALUE_BITS or isinstance(self.value_bits, bool):
      raise ValueError(
        f"chunked_top_k value_bits must be one of {VALUE_BITS}, got {self.value_bits!r}."
      )
    if self.value_bits is not None:
      object.__setattr__(self, "value_bits", int(self.value_bits))
    object.__setattr__(self, "value_dtype", check_value_dtype("chunked_top_k", self.value_dtype))

  @property
  def deviation(self):  # depends on value_bits
    return "pointwise" if self.value_bits is None else "unbounded"

  # ------------------------------------------------------------------ layout

  def layout(self, shape) -> Layout:
    """The chunk layout of an array of this shape."""
    return layout(shape, self.chunk, self.chunk * self.chunk)

  def kept_per_chunk(self, m: int) -> int:
    """k_m = min(m, max(1, ceil(k·m / chunk²))) entries kept of a chunk of m."""
    return min(m, max(1, -(-self.k * m // (self.chunk * self.chunk))))

  def _count(self, lay: Layout) -> int:
    return lay.num_chunks * self.kept_per_chunk(lay.m) if lay.size else 0

  def _wire_dtype(self, dtype) -> np.dtype:
    if self.value_dtype is not None:
      return self.value_dtype
    return np.dtype(dtype) if self.value_bits is None else np.dtype(np.float32)

  # ------------------------------------------------------------------ codec

  def encode(self, x, key=None):
    del key
    lay = self.layout(x.shape)
    count = self._count(lay)
    wire = self._wire_dtype(x.dtype)
    if count == 0:
      empty = {"indices": jnp.zeros((0,), jnp.uint8)}
      if self.value_bits is None:
        return {**empty, "values": jnp.zeros((0,), wire)}
      return {**empty, "codes": jnp.zeros((0,), jnp.uint8), "table": jnp.zeros((0,), wire)}
    chunks = lay.chunks(x)
    _, local = jax.lax.top_k(jnp.abs(chunks), self.kept_per_chunk(lay.m))
    values = jnp.take_along_axis(chunks, local, axis=1).reshape(-1)
    payload = {"indices": code.pack12(local.reshape(-1))}
    if self.value_bits is None:
      return {**payload, "values": values.astype(wire)}
    codes, table = quantize(values, self.value_bits)
    return {**payload, "codes": code.pack_bits(codes, self.value_bits), "table": table.astype(wire)}

  def _entries(self, payload, lay: Layout, dtype) -> tuple[jax.Array, jax.Array]:
    """(flat indices into the array, decoded values in `dtype`) of one payload."""
    count = self._count(lay)
    local = code.unpack12(payload["indices"], count).reshape(lay.num_chunks, -1)
    idx = lay.flat_index(local).reshape(-1)
    if self.value_bits is None:
      values = payload["values"]
    else:
      values = payload["table"][code.unpack_bits(payload["codes"], self.value_bits, count)]
    return idx, to_dtype(values, dtype)

  def decode(self, payload, like, key=None):
    del key
    lay = self.layout(like.shape)
    out = jnp.zeros((lay.size,), like.dtype)
    if self._count(lay):
      idx, values = self._entries(payload, lay, like.dtype)
      out = out.at[idx].set(values, unique_indices=True)
    return out.reshape(like.shape)

  def decode_sum(self, payloads, like, key=None):
    """Scatter-adds each worker's decoded values into one float32 buffer, worker by worker."""
    del key
    lay = self.layout(like.shape)
    if not self._count(lay):
      return jnp.zeros(like.shape, like.dtype)
    total = scatter_add_rows(payloads, lay.size, lambda p: self._entries(p, lay, like.dtype))
    return total.astype(like.dtype).reshape(like.shape)

  def decode_count(self, payloads, like, key=None):
    """How many workers' payloads sent each entry (float32, shaped like `like`).

    `payloads` are stacked along a leading worker axis or `bucket.Rows`; ones are scattered
    at each worker's indices, one worker at a time (whatever values were sent, zeros included).
    """
    del key
    lay = self.layout(like.shape)
    if not self._count(lay):
      return jnp.zeros(like.shape, jnp.float32)

    def ones(p):
      idx, _ = self._entries(p, lay, jnp.float32)
      return idx, jnp.ones(idx.shape, jnp.float32)

    return scatter_add_rows(payloads, lay.size, ones).reshape(like.shape)

  def residual(self, x, payload, key=None):
    """x with its decoded kept values subtracted in place (no dense decoded array)."""
    del key
    lay = self.layout(x.shape)
    if not self._count(lay):
      return x
    idx, values = self._entries(payload, lay, x.dtype)
    return x.reshape(-1).at[idx].add(-values, unique_indices=True).reshape(x.shape)

  def wire_bits(self, shape, dtype):
    count = self._count(self.layout(shape))
    if count == 0:
      return 0
    wire = self._wire_dtype(dtype).itemsize * 8
    bits = 8 * code.index_bytes(count)
    if self.value_bits is None:
      return bits + count * wire
    return bits + 8 * code.code_bytes(count, self.value_bits) + (1 << self.value_bits) * wire

  def q_squared(self, size):
    if self.value_bits is not None:
      return None
    if size == 0:
      return 0.0
    u = 0.0 if self.value_dtype is None else float(jnp.finfo(self.value_dtype).eps) / 2
    return max(
      1.0 - self.kept_per_chunk(m) / m * (1.0 - u * u)
      for m in divisors_up_to(int(size), self.chunk * self.chunk)
    )


def chunked_top_k(
  k: int = 64, *, chunk: int = 64, value_bits: int | None = 2, value_dtype: Any = None
) -> ChunkedTopK:
  """SparseLoCo's top-k per chunk with 12-bit chunk-local indices and 2-bit values.

  Each 64×64 chunk of a matrix (4,096 entries) sends its 64 largest magnitudes (1.56%) as a
  12-bit index and a 2-bit code each, plus 4 float32 bin means per leaf: 64·(12 + 2) bits per
  4,096 float32 entries, 146× fewer bytes. With `value_bits=None, value_dtype=jnp.bfloat16` and
  k=41 (1% per chunk) a kept entry costs 16 + 12 bits: 114× fewer bytes than float32.

  Args:
    k: entries kept in a full chunk of chunk² entries; a chunk of m entries keeps
      k_m = min(m, max(1, ceil(k·m / chunk²))), the same density (see `ChunkedTopK`).
    chunk: the largest chunk side, 1 to 64 (12-bit indices address at most 64² entries);
      vectors are cut into 1-D chunks of up to chunk² entries.
    value_bits: 2, 4 or 8: the kept values are quantized per leaf into 2^bits bins over μ ± 3σ,
      each decoded to its bin's mean; None: sent as `value_dtype`, unquantized.
    value_dtype: dtype of the sent values (`value_bits=None`; default the array's dtype, e.g.
      `jnp.bfloat16` to halve them) or of the per-bin means (default float32).

  Returns:
    A `ChunkedTopK` compressor.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.chunked_top_k(64, value_bits=2)
    >>> c.wire_bits((768, 3072), jnp.float32)  # 36,864 kept·(12 + 2) bits + 4 float32 means
    516224
    >>> round(768 * 3072 * 32 / 516224, 2)
    146.25
    >>> c = cj.compressors.chunked_top_k(1, chunk=2, value_bits=None)
    >>> c.compress(jnp.array([[1.0, -3.0], [2.0, 0.5]]))
    Array([[ 0., -3.],
           [ 0.,  0.]], dtype=float32)

  References:
    Sarfi, Thérien, Lidin, Belilovsky, "Communication Efficient LLM Pre-training with
    SparseLoCo", arXiv 2508.15706, 2025; Templar's tplr/compress/topk.py.
  """
  return ChunkedTopK(k=k, chunk=chunk, value_bits=value_bits, value_dtype=value_dtype)
