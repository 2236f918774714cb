"""Compressors whose payload is a dense array: `identity` and `cast`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src.base import Compressor, Granularity


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity(Compressor):
  """Sends the array as it is (the uncompressed, full-precision baseline)."""

  deviation = "none"
  unbiased = True
  summable = True
  randomness = "none"
  sends_every_entry = True

  def encode(self, x, key=None):
    del key
    return {"values": x}

  def decode(self, payload, like, key=None):
    del key
    return payload["values"].astype(like.dtype).reshape(like.shape)

  def residual(self, x, payload, key=None):
    """Nothing is left behind: zeros, without computing x − x (a leaf-sized temporary)."""
    del payload, key
    return jnp.zeros_like(x)

  def wire_bits(self, shape, dtype):
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize * 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cast(Compressor):
  """Sends the array cast to a narrower float dtype (round to nearest).

  Pointwise relative error: every element within the wire dtype's normal range is rounded with
  relative error at most the unit roundoff u (2⁻⁸ for bfloat16, 2⁻¹¹ for float16), so
  ‖C(x) − x‖² ≤ u²‖x‖². Values below the smallest normal (or, for float16, above 65504) fall
  outside that bound: float16 underflows to zero and overflows to inf.

  Summable: sums of cast payloads travel by `psum`. Note that XLA:CPU promotes bfloat16
  collectives (all-reduce and all-gather) to float32, so on CPU the bytes measured from HLO for
  bf16 payloads are those of float32; GPU (NCCL) and TPU communicate in the narrow type.
  """

  dtype: Any = jnp.bfloat16

  deviation = "pointwise"
  unbiased = False
  summable = True
  randomness = "none"
  sends_every_entry = True

  def __post_init__(self):
    super().__post_init__()
    try:
      dt = jnp.dtype(self.dtype)
    except TypeError as e:
      raise TypeError(f"cast(dtype=...) needs a floating dtype, got {self.dtype!r}.") from e
    if not jnp.issubdtype(dt, jnp.floating):
      raise TypeError(f"cast(dtype=...) needs a floating dtype, got {dt}.")
    if jax.dtypes.canonicalize_dtype(dt) != dt:
      raise ValueError(
        f"cast(dtype={dt}) cannot be sent: JAX would produce "
        f"{jax.dtypes.canonicalize_dtype(dt)} (enable jax_enable_x64 for {dt})."
      )
    object.__setattr__(self, "dtype", dt)

  def encode(self, x, key=None):
    del key
    return {"values": x.astype(self.dtype)}

  def decode(self, payload, like, key=None):
    del key
    values = payload["values"]
    target = jnp.dtype(like.dtype)
    if jnp.finfo(target).max < jnp.finfo(self.dtype).max:
      # E.g. float16 65504 rounds to bfloat16 65536: clamp, rather than overflow to inf.
      limit = jnp.finfo(target).max
      values = jnp.clip(values.astype(jnp.float32), -limit, limit)
    return values.astype(target).reshape(like.shape)

  def wire_bits(self, shape, dtype):
    del dtype
    return int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize * 8

  def q_squared(self, size):
    del size
    return float(jnp.finfo(self.dtype).eps / 2) ** 2


def identity(*, granularity: Granularity = "leaf") -> Identity:
  """The identity compressor: full precision, for baselines.

  Args:
    granularity: "leaf" or "model" (no difference in values; "model" sends one flat vector).

  Returns:
    An `Identity` compressor.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.identity()
    >>> c.compress(jnp.array([1.0, -2.0]))
    Array([ 1., -2.], dtype=float32)
  """
  return Identity(granularity=granularity)


def cast(dtype: Any = jnp.bfloat16, *, granularity: Granularity = "leaf") -> Cast:
  """Casts to a narrower float type on the wire (bf16 / fp16 communication).

  Args:
    dtype: the wire dtype, e.g. `jnp.bfloat16` (default) or `jnp.float16`.
    granularity: "leaf" or "model".

  Returns:
    A `Cast` compressor.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors.cast(jnp.bfloat16)
    >>> c.wire_bits((1000,), jnp.float32)
    16000
  """
  return Cast(dtype=dtype, granularity=granularity)
