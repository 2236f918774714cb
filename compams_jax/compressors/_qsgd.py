"""QSGD: stochastic, unbiased quantization to `levels` magnitude levels."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src.base import Compressor, Granularity


@dataclasses.dataclass(frozen=True, kw_only=True)
class QSGD(Compressor):
  """QSGD with s levels: Q(x)_i = ‖x‖₂ · sign(x_i) · ξ_i / s, ξ_i = ⌊s|x_i|/‖x‖₂ + u_i⌋.

  u_i ~ U[0, 1) drawn privately by each worker (stochastic rounding), so E[Q(x)] = x and
  E‖Q(x) − x‖² ≤ min(d/s², √d/s)‖x‖² (Alistarh et al., Lemma 3.1).

  Payload: one signed level per entry (int8 for s ≤ 127, int16 up to 32767) and the float32 norm.
  """

  levels: int = 127

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

  @property
  def level_dtype(self):
    return np.dtype(np.int8) if self.levels <= 127 else np.dtype(np.int16)

  def encode(self, x, key=None):
    if key is None:
      raise ValueError("qsgd needs a PRNG key (the transforms derive one per worker and step).")
    flat = x.reshape(-1).astype(jnp.float32)
    # ‖x‖₂ = m·‖x/m‖₂ with m = max|x|: the squares neither overflow (|x| ≳ 1e19) nor
    # underflow (|x| ≲ 1e-19) in float32. A power-of-two pre-scale keeps 1/m away from the
    # subnormal range, which XLA:CPU flushes to zero.
    peak = jnp.max(jnp.abs(flat)) if flat.size else jnp.float32(0)
    pre = jnp.where(peak >= 1, jnp.float32(2.0**-64), jnp.float32(2.0**64))
    safe_peak = jnp.where(peak > 0, peak * pre, 1.0)
    unit = (flat * pre) / safe_peak
    unit_norm = jnp.sqrt(jnp.sum(unit * unit))
    norm = peak * unit_norm
    u = jax.random.uniform(key, flat.shape, jnp.float32)
    ratio = jnp.abs(unit) / jnp.where(unit_norm > 0, unit_norm, 1.0)
    level = jnp.floor(ratio * self.levels + u)
    level = jnp.minimum(level, self.levels) * jnp.sign(flat)
    return {"levels": level.astype(self.level_dtype), "norm": norm}

  def decode(self, payload, like, key=None):
    del key
    out = payload["levels"].astype(jnp.float32) * (payload["norm"] / self.levels)
    return out.astype(like.dtype).reshape(like.shape)

  def wire_bits(self, shape, dtype):
    del dtype
    return int(np.prod(shape, dtype=np.int64)) * self.level_dtype.itemsize * 8 + 32

  def q_squared(self, size):
    if size == 0:
      return 0.0
    return min(size / self.levels**2, math.sqrt(size) / self.levels)


def qsgd(levels: int = 127, *, granularity: Granularity = "leaf") -> QSGD:
  """QSGD stochastic quantization (unbiased; error bounded in expectation).

  Args:
    levels: number of magnitude levels s ≥ 1 (s = 1: ternary sign·norm code).
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
  return QSGD(levels=levels, granularity=granularity)
