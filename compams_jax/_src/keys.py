"""The key policy: which PRNG key a step, a worker and a receiver use."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from compams_jax._src.axis import AxisName, worker_index
from compams_jax._src.base import Compressor


def step_key(
  compressor: Compressor,
  seed: int,
  count: jax.Array,
  axis_name: AxisName | None,
  dense_axis_name: AxisName | None = None,
) -> jax.Array | None:
  """The PRNG key of one step: shared by all workers, or folded with the worker index.

  Keys are derived from (seed, step count[, worker index]), so the state holds no key and a
  resumed run draws exactly the keys it would have drawn. Private randomness folds in the
  index along `axis_name` and, on hierarchical meshes, along `dense_axis_name` too (every
  device compresses its own chunk); shared randomness is the same on every device.
  """
  if not compressor.needs_key:
    return None
  key = jax.random.fold_in(jax.random.key(seed), count)
  if compressor.randomness == "private":
    key = jax.random.fold_in(key, worker_index(axis_name))
    if dense_axis_name is not None:
      key = jax.random.fold_in(key, worker_index(dense_axis_name))
  return key


def decode_key(compressor: Compressor, key: jax.Array | None) -> jax.Array | None:
  """The key a receiver may use to decode: only a shared one (a private key stays local)."""
  return key if compressor.randomness == "shared" else None


UNIFORM_CHUNK = 1 << 20  # entries drawn per threefry call


def uniforms(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Float32 uniforms in [0, 1) of `shape` drawn from `key`: the randomness of every
  randomized compressor.

  Up to 2^20 entries this is `jax.random.uniform(key, shape)`. Larger arrays are drawn in
  chunks of 2^20 entries, chunk j from `fold_in(key, j)`, one after another (`lax.map`):
  threefry materialises several uint32 temporaries the size of its output (docs/benchmarks.md,
  section 1); chunked, they stay a few MB. Threefry, not XLA's
  RngBitGenerator: RBG's batching rule does not draw per key under `jax.vmap`, which would
  break the simulated workers' private (and shared) randomness.
  """
  size = math.prod(shape)
  if size <= UNIFORM_CHUNK:
    return jax.random.uniform(key, shape, jnp.float32)
  chunks = -(-size // UNIFORM_CHUNK)
  drawn = jax.lax.map(
    lambda j: jax.random.uniform(jax.random.fold_in(key, j), (UNIFORM_CHUNK,), jnp.float32),
    jnp.arange(chunks, dtype=jnp.uint32),
  )
  return drawn.reshape(-1)[:size].reshape(shape)
