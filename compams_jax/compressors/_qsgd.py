"""QSGD: stochastic, unbiased quantization to `levels` magnitude levels."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from compams_jax._src.base import Compressor, Granularity
from compams_jax._src.keys import uniforms


@dataclasses.dataclass(frozen=True, kw_only=True)
class QSGD(Compressor):
  """QSGD with s levels: Q(x)_i = ‖x‖₂ · sign(x_i) · ξ_i / s, ξ_i = ⌊s|x_i|/‖x‖₂ + u_i⌋.

  u_i ~ U[0, 1) drawn privately by each worker (stochastic rounding), so E[Q(x)] = x and
  E‖Q(x) − x‖² ≤ min(d/s², √d/s)‖x‖² (Alistarh et al., Lemma 3.1).

  Payload: one signed level per entry (int8 for s ≤ 127, int16 up to 32767) and the float32 norm.

  With `bucket_size` the flattened array is quantized in consecutive buckets of that many
  entries, each with its own norm (as Alistarh et al. run QSGD: buckets of a few hundred
  entries keep q² = min(b/s², √b/s) small whatever the layer size); one float32 norm per bucket.

  Attributes:
    levels: s, the number of magnitude levels.
    bucket_size: entries per bucket, or None for one norm per leaf (or model).
  """

  levels: int = 127
  bucket_size: int | None = None

  deviation = "expected"
  unbiased = True
  summable = False
  randomness = "private"

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.levels, bool) or not isinstance(self.levels, (int, np.integer)):
      raise TypeError(f"qsgd(levels=...) must be an integer, got {self.levels!r}.")
    if not 1 <= self.levels <= 32767:
      raise ValueError(f"qsgd(levels=...) must be in [1, 32767], got {self.levels}.")
    object.__setattr__(self, "levels", int(self.levels))
    b = self.bucket_size
    if b is not None:
      if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ValueError(f"qsgd(bucket_size=...) must be a positive int or None, got {b!r}.")
      object.__setattr__(self, "bucket_size", int(b))

  def _bucket(self, d: int) -> int:
    return max(d, 1) if self.bucket_size is None else min(self.bucket_size, max(d, 1))

  @property
  def level_dtype(self):
    return np.dtype(np.int8) if self.levels <= 127 else np.dtype(np.int16)

  def encode(self, x, key=None):
    if key is None:
      raise ValueError("qsgd needs a PRNG key (the transforms derive one per worker and step).")
    flat = x.reshape(-1).astype(jnp.float32)
    if self.bucket_size is not None:
      return self._encode_buckets(flat, key)
    # ‖x‖₂ = m·‖x/m‖₂ with m = max|x|: the squares neither overflow (|x| ≳ 1e19) nor
    # underflow (|x| ≲ 1e-19) in float32. A power-of-two pre-scale keeps 1/m away from the
    # subnormal range, which XLA:CPU flushes to zero.
    peak = jnp.max(jnp.abs(flat)) if flat.size else jnp.float32(0)
    pre = jnp.where(peak >= 1, jnp.float32(2.0**-64), jnp.float32(2.0**64))
    safe_peak = jnp.where(peak > 0, peak * pre, 1.0)
    unit = (flat * pre) / safe_peak
    unit_norm = jnp.sqrt(jnp.sum(unit * unit))
    norm = peak * unit_norm
    u = uniforms(key, flat.shape)
    ratio = jnp.abs(unit) / jnp.where(unit_norm > 0, unit_norm, 1.0)
    level = jnp.floor(ratio * self.levels + u)
    level = jnp.minimum(level, self.levels) * jnp.sign(flat)
    return {"levels": level.astype(self.level_dtype), "norm": norm}

  def _encode_buckets(self, flat, key):
    """The same code on each bucket (row) of the flattened array, zero-padded to whole rows."""
    d = flat.shape[0]
    b = self._bucket(d)
    rows = -(-d // b) if d else 1
    grid = jnp.pad(flat, (0, rows * b - d)).reshape(rows, b)
    peak = jnp.max(jnp.abs(grid), axis=1, keepdims=True)
    pre = jnp.where(peak >= 1, jnp.float32(2.0**-64), jnp.float32(2.0**64))
    unit = (grid * pre) / jnp.where(peak > 0, peak * pre, 1.0)
    unit_norm = jnp.sqrt(jnp.sum(unit * unit, axis=1, keepdims=True))
    norm = (peak * unit_norm)[:, 0]
    u = jnp.pad(uniforms(key, (d,)), (0, rows * b - d)).reshape(rows, b)
    ratio = jnp.abs(unit) / jnp.where(unit_norm > 0, unit_norm, 1.0)
    level = jnp.minimum(jnp.floor(ratio * self.levels + u), self.levels) * jnp.sign(grid)
    return {"levels": level.reshape(-1)[:d].astype(self.level_dtype), "norm": norm}

  def decode(self, payload, like, key=None):
    del key
    scale = payload["norm"] / self.levels
    if self.bucket_size is not None:
      d = int(np.prod(like.shape, dtype=np.int64))
      b = self._bucket(d)
      scale = jnp.repeat(scale, b, total_repeat_length=scale.shape[0] * b)[:d]
    out = payload["levels"].astype(jnp.float32) * scale
    return out.astype(like.dtype).reshape(like.shape)

  def wire_bits(self, shape, dtype):
    del dtype
    d = int(np.prod(shape, dtype=np.int64))
    norms = 1 if self.bucket_size is None else max(1, -(-d // self._bucket(d)))
    return d * self.level_dtype.itemsize * 8 + 32 * norms

  def q_squared(self, size):
    if size == 0:
      return 0.0
    b = self._bucket(size)
    return min(b / self.levels**2, math.sqrt(b) / self.levels)


def qsgd(
  levels: int = 127, *, bucket_size: int | None = None, granularity: Granularity = "leaf"
) -> QSGD:
  """QSGD stochastic quantization (unbiased; error bounded in expectation).

  Args:
    levels: number of magnitude levels s ≥ 1 (s = 1: ternary sign·norm code).
    bucket_size: quantize consecutive buckets of this many entries, one norm each (None: one
      norm per leaf).
    granularity: "leaf" (one norm per leaf) or "model" (one norm overall).

  Returns:
    A `QSGD` compressor (needs a key; each worker draws its own).

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.qsgd(levels=4)
    >>> c.wire_bits((100,), jnp.float32)
    832

  References:
    Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
    Quantization and Encoding", NeurIPS 2017.
  """
  return QSGD(levels=levels, bucket_size=bucket_size, granularity=granularity)
