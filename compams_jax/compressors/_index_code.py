"""Bit packing of small integers into uint8 arrays, on device: 12-bit indices and b-bit codes.

`pack12` / `unpack12` carry chunk-local indices (each < 4,096, so a chunk holds at most 4,096
entries): two indices in three bytes, the count padded to even with a zero index.
`pack_bits` / `unpack_bits` carry quantization codes of 1, 2, 4 or 8 bits, 8 // bits codes per
byte, the first code in the lowest bits. Every function acts on the last axis (leading axes are
batch axes) and keeps shapes static: the packed length depends only on the count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INDEX_BITS = 12
MAX_INDEX = 1 << INDEX_BITS  # indices must be < 4,096


def index_bytes(count: int) -> int:
  """Bytes of `count` packed 12-bit indices: 3 per pair, the count padded to even."""
  return 3 * ((count + 1) // 2)


def code_bytes(count: int, bits: int) -> int:
  """Bytes of `count` packed `bits`-bit codes: ceil(count·bits / 8)."""
  return -(-count * bits // 8)


def _pad_last(x: jax.Array, multiple: int) -> jax.Array:
  pad = (-x.shape[-1]) % multiple
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def pack12(indices: jax.Array) -> jax.Array:
  """Integers in [0, 4096) along the last axis → uint8, 3 bytes per pair (count padded to even).

  Pair (a, b) is stored as bytes [a & 0xFF, (a >> 8) | (b & 0xF) << 4, b >> 4].
  """
  idx = _pad_last(indices.astype(jnp.uint32), 2)
  lead = idx.shape[:-1]
  pairs = idx.reshape(lead + (-1, 2))
  a, b = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], axis=-1)
  return out.astype(jnp.uint8).reshape(lead + (-1,))


def unpack12(packed: jax.Array, count: int) -> jax.Array:
  """Inverse of `pack12`: the first `count` indices along the last axis, as int32."""
  lead = packed.shape[:-1]
  t = packed.astype(jnp.int32).reshape(lead + (-1, 3))
  a = t[..., 0] | ((t[..., 1] & 0xF) << 8)
  b = (t[..., 1] >> 4) | (t[..., 2] << 4)
  return jnp.stack([a, b], axis=-1).reshape(lead + (-1,))[..., :count]


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
  """Integers in [0, 2^bits) along the last axis → uint8, 8 // bits per byte (low bits first)."""
  if bits not in (1, 2, 4, 8):
    raise ValueError(f"pack_bits packs 1, 2, 4 or 8 bits, got {bits}.")
  per = 8 // bits
  c = _pad_last(codes.astype(jnp.uint32), per)
  lead = c.shape[:-1]
  groups = c.reshape(lead + (-1, per))
  shifts = jnp.arange(per, dtype=jnp.uint32) * bits
  return jnp.sum(groups << shifts, axis=-1, dtype=jnp.uint32).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, count: int) -> jax.Array:
  """Inverse of `pack_bits`: the first `count` codes along the last axis, as int32."""
  per = 8 // bits
  lead = packed.shape[:-1]
  shifts = jnp.arange(per, dtype=jnp.int32) * bits
  codes = (packed.astype(jnp.int32)[..., None] >> shifts) & ((1 << bits) - 1)
  return codes.reshape(lead + (-1,))[..., :count]
