"""Sign compressors: `block_sign` (one scale per leaf) and `scaled_sign` (one scale per model)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src import bucket
from compams_jax._src.base import Compressor, Granularity


@jax.custom_batching.custom_vmap
def _mean_abs(flat):
  """mean|x| in float32 in one pass: Σ|x|·(1/d). Only when Σ|x| overflows (it never exceeds
  max|x| once divided) does a second pass add Σ(|x|·(1/d)) instead, under a `lax.cond` that the
  common case never enters (scaling every term first would flush tiny values to zero)."""
  a = jnp.abs(flat.astype(jnp.float32))
  inv = jnp.float32(1.0 / a.size)
  total = jnp.sum(a)
  return jax.lax.cond(
    jnp.isfinite(total),
    lambda: total * inv,
    lambda: jnp.sum(jnp.abs(flat.astype(jnp.float32)) * inv),
  )


@_mean_abs.def_vmap
def _mean_abs_batched(axis_size, in_batched, flat):
  """Under vmap (stacked layers) a batched cond fails inside shard_map: both sums, selected."""
  del axis_size
  if not in_batched[0]:
    return _mean_abs(flat), False
  a = jnp.abs(flat.astype(jnp.float32))
  inv = jnp.float32(1.0 / a.shape[-1])
  total = jnp.sum(a, axis=-1)
  return jnp.where(jnp.isfinite(total), total * inv, jnp.sum(a * inv, axis=-1)), True


NORMS = ("l1", "l2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSign(Compressor):
  """Block-Sign: C(x_B) = sign(x_B)·s_B for each block B, one float32 scale per block.

  The block is the leaf (or the model, with `granularity="model"`), or, with `block_size`,
  consecutive runs of `block_size` entries of the flattened leaf (the last one shorter). The
  scale is s_B = ‖x_B‖₁/|B| (the paper's, `norm="l1"`), or s_B = ‖x_B‖₂/√|B| (`norm="l2"`, the
  scale of DeepSpeed's 1-bit Adam compressor).

  Payload: one bit per entry, packed 8 per uint8, and one float32 scale per block.

  One bit cannot carry sign(0) = 0: by default a zero entry is sent as +1. With the l1 scale the
  deviation is then exactly ‖C(x) − x‖² = ‖x‖² − ‖x‖₁²/d ≤ (1 − 1/d)‖x‖² per block (the paper's
  Block-Sign bound). `exact_zeros=True` sends a second bit-plane (a non-zero mask) and
  reproduces sign(0) = 0 exactly, at 2 bits per entry. With the l2 scale,
  ‖C(x) − x‖² = 2‖x‖²(1 − ‖x‖₁/(√d‖x‖₂)) ≤ 2(1 − 1/√d)‖x‖²: not a contraction for d ≥ 4.

  Pointwise q-deviate with q² = 1 − 1/b (l1) or 2(1 − 1/√b) (l2), b the largest block.

  Attributes:
    exact_zeros: send a non-zero mask so that sign(0) = 0.
    block_size: entries per block (None: the whole leaf, or model).
    norm: "l1" or "l2", the scale's norm.
  """

  exact_zeros: bool = False
  block_size: int | None = None
  norm: str = "l1"

  deviation = "pointwise"
  unbiased = False
  summable = False
  randomness = "none"
  sends_every_entry = True

  def __post_init__(self):
    super().__post_init__()
    if self.norm not in NORMS:
      raise ValueError(f"block_sign norm must be one of {NORMS}, got {self.norm!r}.")
    if self.block_size is not None:
      b = self.block_size
      if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ValueError(f"block_sign block_size must be a positive int or None, got {b!r}.")
      object.__setattr__(self, "block_size", int(b))

  def _block(self, d: int) -> int:
    return d if self.block_size is None else min(self.block_size, max(d, 1))

  def _scales(self, flat):
    """One scale per block: a scalar for one block, else a (blocks,) vector."""
    d = flat.shape[0]
    if d == 0:  # an empty leaf: one block of scale 0
      return jnp.float32(0) if self.block_size is None else jnp.zeros((1,), jnp.float32)
    if self.block_size is None and self.norm == "l1":
      return _mean_abs(flat)
    b = self._block(d)
    blocks = -(-d // b)
    rows = jnp.pad(jnp.abs(flat.astype(jnp.float32)), (0, blocks * b - d)).reshape(blocks, b)
    counts = np.full((blocks,), b, np.float32)
    counts[-1] = d - (blocks - 1) * b
    if self.norm == "l1":
      scales = jnp.sum(rows, axis=1) / counts
    else:  # ‖x‖₂/√|B| = peak·‖x/peak‖₂/√|B|: no overflow or underflow of the squares.
      peak = jnp.max(rows, axis=1)
      unit = rows / jnp.where(peak > 0, peak, 1.0)[:, None]
      scales = peak * jnp.sqrt(jnp.sum(unit * unit, axis=1) / counts)
    return scales[0] if self.block_size is None else scales

  def _expand(self, scale, length: int, d: int):
    """The per-entry scale (length entries; those past d are never used)."""
    if self.block_size is None:
      return scale
    per_entry = jnp.repeat(
      scale, self._block(d), total_repeat_length=scale.shape[-1] * self._block(d)
    )
    if per_entry.shape[0] >= length:
      return per_entry[:length]
    return jnp.pad(per_entry, (0, length - per_entry.shape[0]))

  def encode(self, x, key=None):
    del key
    flat = x.reshape(-1)
    payload = {"negative": jnp.packbits(flat < 0, bitorder="little"), "scale": self._scales(flat)}
    if self.exact_zeros:
      payload["nonzero"] = jnp.packbits(flat != 0, bitorder="little")
    return payload

  def decode(self, payload, like, key=None):
    del key
    d = int(np.prod(like.shape, dtype=np.int64))
    neg = jnp.unpackbits(payload["negative"], count=d, bitorder="little")
    signs = 1.0 - 2.0 * neg.astype(jnp.float32)
    if self.exact_zeros:
      signs = signs * jnp.unpackbits(payload["nonzero"], count=d, bitorder="little")
    return (self._expand(payload["scale"], d, d) * signs).astype(like.dtype).reshape(like.shape)

  def decode_sum(self, payloads, like, key=None):
    """Σ_i scale_i·sign_i, adding one worker's unpacked signs at a time: O(d) memory for any n.

    Each payload is unpacked whole (8⌈d/8⌉ entries) and cut to d once at the end: cutting each
    unpacked payload first is far slower on XLA:CPU when d is not a multiple of 8.
    """
    del key
    d = int(np.prod(like.shape, dtype=np.int64))
    rows = bucket.rows(payloads)
    padded = 8 * ((d + 7) // 8)

    def term(p):
      signs = 1.0 - 2.0 * jnp.unpackbits(p["negative"], bitorder="little").astype(jnp.float32)
      if self.exact_zeros:
        signs = signs * jnp.unpackbits(p["nonzero"], bitorder="little")
      scale = self._expand(p["scale"].astype(jnp.float32), padded, d)
      return scale * signs

    total = rows.sum(term)
    return total[:d].astype(like.dtype).reshape(like.shape)

  def wire_bits(self, shape, dtype):
    del dtype
    d = int(np.prod(shape, dtype=np.int64))
    planes = 2 if self.exact_zeros else 1
    blocks = 1 if self.block_size is None else max(1, -(-d // self._block(d)))
    return planes * 8 * ((d + 7) // 8) + 32 * blocks

  def q_squared(self, size):
    b = self._block(size)
    if b <= 1:
      return 0.0
    return 1.0 - 1.0 / b if self.norm == "l1" else 2.0 * (1.0 - 1.0 / math.sqrt(b))


def block_sign(
  *,
  exact_zeros: bool = False,
  block_size: int | None = None,
  norm: str = "l1",
  granularity: Granularity = "leaf",
) -> BlockSign:
  """Block-Sign compression (the paper's Block-Sign; block = layer).

  Args:
    exact_zeros: send a non-zero mask too, so that sign(0) = 0 exactly (2 bits per entry).
    block_size: entries per block, each with its own scale (e.g. 256: 1 + 32/256 bits per
      entry); None (default) for one block per leaf, as in the paper.
    norm: "l1" (default; scale ‖x_B‖₁/|B|, the paper's) or "l2" (scale ‖x_B‖₂/√|B|, the scale
      of DeepSpeed's 1-bit Adam: `block_sign(norm="l2")` is its per-tensor compressor).
    granularity: "leaf" (block = layer, the paper's choice) or "model" (one block: `scaled_sign`).

  Returns:
    A `BlockSign` compressor.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.block_sign()
    >>> c.compress(jnp.array([1.0, -2.0, 3.0, -6.0]))
    Array([ 3., -3.,  3., -3.], dtype=float32)

  References:
    Li, Karimi, Li, "On Distributed Adaptive Optimization with Gradient Compression", ICLR 2022;
    Zheng, Huang, Kwok, "Communication-efficient distributed blockwise momentum SGD with
    error-feedback", NeurIPS 2019.
  """
  return BlockSign(
    exact_zeros=exact_zeros, block_size=block_size, norm=norm, granularity=granularity
  )


def scaled_sign(*, exact_zeros: bool = False) -> BlockSign:
  """EF-signSGD's scaled sign: sign(x)·‖x‖₁/d with one scale for the whole model.

  The same code as `block_sign` with one block spanning every leaf (`granularity="model"`).

  Args:
    exact_zeros: as in `block_sign`.

  Returns:
    A `BlockSign` compressor with `granularity="model"`.

  Examples:
    >>> import compams_jax as cj
    >>> cj.compressors.scaled_sign().granularity
    'model'

  References:
    Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes", ICML 2019.
  """
  return BlockSign(exact_zeros=exact_zeros, granularity="model")
