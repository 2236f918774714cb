"""Bytes one worker sends per step, from payload shapes."""

from __future__ import annotations

from typing import Any

import jax
import optax

from compams_jax._src.axis import recording
from compams_jax._src.base import Compressor, payload_bits
from compams_jax._src.tree import tree_wire_bits


def wire_bytes(
  tx_or_compressor: optax.GradientTransformation | Compressor, params: Any, *, num_workers: int = 1
) -> int:
  """Bytes one worker puts on the wire per step for gradients shaped like `params`.

  For a compressor this is its exact static `wire_bits` summed over the pytree. For a
  transformation (e.g. `cj.comp_ams(...)`) the update is traced abstractly (nothing is computed)
  while every compams_jax collective records the payload it would send; the result sums them.

  Args:
    tx_or_compressor: a `Compressor`, or a GradientTransformation built from compams_jax pieces.
    params: a pytree of arrays or ShapeDtypeStructs.
    num_workers: the number of workers (only the two-phase topology's payloads depend on it).

  Returns:
    Bytes per worker per step (an int; bits / 8, rounded up).

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> params = {"w": jnp.zeros((1000,))}
    >>> cj.wire_bytes(cj.compressors.top_k(0.01), params)   # 10 f32 values + 10 uint16 indices
    60
    >>> cj.wire_bytes(cj.comp_ams(1e-3, cj.compressors.top_k(0.01)), params)
    60
  """
  if isinstance(tx_or_compressor, Compressor):
    return -(-tree_wire_bits(tx_or_compressor, params) // 8)
  if not isinstance(tx_or_compressor, optax.GradientTransformation):
    raise TypeError(
      "wire_bytes expects a Compressor or an optax.GradientTransformation, got "
      f"{type(tx_or_compressor).__name__}."
    )
  tx = tx_or_compressor
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  with recording(num_workers) as rec:
    state = jax.eval_shape(tx.init, abstract)
    jax.eval_shape(lambda g, s: tx.update(g, s, g), abstract, state)
  return -(-sum(payload_bits(p) for _, p in rec.sends) // 8)
