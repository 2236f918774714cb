"""TernGrad: stochastic, unbiased ternarization to s·{−1, 0, +1} with s = max|x| per block."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src import bucket
from compams_jax._src.base import Compressor, Granularity
from compams_jax._src.keys import uniforms

_PER_BYTE = 4  # 2-bit codes per uint8
_SHIFTS = np.arange(0, 8, 2, dtype=np.uint8)  # code j of a byte sits at bits 2j, 2j + 1


def _size(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


def _unpack(packed: jax.Array) -> jax.Array:
  """float32 levels in {−1, 0, +1}, 4 per byte (the padded length, 4·len(packed))."""
  codes = (packed[..., None] >> _SHIFTS) & np.uint8(3)
  codes = codes.reshape(*packed.shape[:-1], -1)
  return (codes == 1).astype(jnp.float32) - (codes == 2).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TernGrad(Compressor):
  """TernGrad: C(x)_i = s·sign(x_i)·b_i, s = max_j |x_j|, b_i ~ Bernoulli(|x_i|/s) per block.

  Each worker draws its own b (private randomness): with u_i ~ U[0, 1), b_i = [u_i·s < |x_i|]
  (and b_i = 1 where |x_i| = s), so E[C(x)] = x. The expected error is exactly
  E‖C(x) − x‖² = Σ_i |x_i|(s − |x_i|) = s‖x‖₁ − ‖x‖², and s‖x‖₁/‖x‖² ≤ (1 + √d)/2 (equality
  for one entry s and d − 1 entries s/(1 + √d)), so E‖C(x) − x‖² ≤ q²‖x‖² with the tight
  q² = (√d − 1)/2: below 1 only for blocks of fewer than 9 entries. Like QSGD with one level
  (which scales by ‖x‖₂ instead of max|x|), it is not a contraction on layer-sized blocks.

  Payload: the ternary levels as 2-bit codes (0 → 0, 1 → +1, 2 → −1) packed 4 per uint8, and
  the float32 scale s. A zero block sends s = 0 and decodes to zeros; a non-finite input gives
  a non-finite scale and decodes to a non-finite block (nothing is silently dropped).
  """

  deviation = "expected"
  unbiased = True
  summable = False
  randomness = "private"
  sends_every_entry = False

  def encode(self, x, key=None):
    if key is None:
      raise ValueError("terngrad needs a PRNG key (the transforms derive one per worker and step).")
    flat = x.reshape(-1).astype(jnp.float32)
    d = flat.shape[0]
    a = jnp.abs(flat)
    scale = jnp.max(a) if d else jnp.float32(0)
    u = uniforms(key, (d,))
    # u·s < |x| has probability |x|/s; a product, not |x|/s (XLA:CPU divides as a·(1/b)), so a
    # NumPy reference with the same uniforms reproduces it bit for bit. The max entry is always
    # sent; zeros (also a zero block) never are.
    sent = (a > 0) & ((u * scale < a) | (a >= scale))
    codes = jnp.where(sent, jnp.where(flat < 0, 2, 1), 0).astype(jnp.uint8)
    codes = jnp.pad(codes, (0, (-d) % _PER_BYTE)).reshape(-1, _PER_BYTE)
    packed = jnp.sum(codes << _SHIFTS, axis=1, dtype=jnp.uint8)
    return {"levels": packed, "scale": scale}

  def decode(self, payload, like, key=None):
    del key
    d = _size(like.shape)
    levels = _unpack(payload["levels"])[:d]
    return (payload["scale"] * levels).astype(like.dtype).reshape(like.shape)

  def decode_sum(self, payloads, like, key=None):
    """Σ_i scale_i·levels_i, adding one worker's unpacked levels at a time: O(d) memory for any n.

    Each payload is unpacked whole (4⌈d/4⌉ entries) and cut to d once at the end.
    """
    del key
    d = _size(like.shape)
    rows = bucket.rows(payloads)

    total = rows.sum(lambda p: p["scale"].astype(jnp.float32) * _unpack(p["levels"]))
    return total[:d].astype(like.dtype).reshape(like.shape)

  def wire_bits(self, shape, dtype):
    del dtype
    return 8 * -(-_size(shape) // _PER_BYTE) + 32

  def q_squared(self, size):
    return 0.0 if size <= 1 else (math.sqrt(size) - 1.0) / 2.0


def terngrad(*, granularity: Granularity = "leaf") -> TernGrad:
  """TernGrad stochastic ternarization (unbiased; error bounded in expectation).

  Args:
    granularity: "leaf" (one scale max|x| per layer, the paper's layer-wise ternarizing) or
      "model" (one scale for the whole model).

  Returns:
    A `TernGrad` compressor (needs a key; each worker draws its own).

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.terngrad()
    >>> c.wire_bits((100,), jnp.float32)
    232
    >>> c.compress(jnp.array([0.0, -2.0, 0.0]), jax.random.key(0))
    Array([ 0., -2.,  0.], dtype=float32)

  References:
    Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce Communication in
    Distributed Deep Learning", NeurIPS 2017.
  """
  return TernGrad(granularity=granularity)
