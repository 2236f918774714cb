"""State markers: which optimizer-state leaves belong to one worker, and step keys."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from compams_jax.compressors import Compressor
from compams_jax.wire import worker_index


class PerWorker(NamedTuple):
  """Wraps optimizer state that differs from worker to worker (error residuals, encoder state).

  Every array inside carries a leading worker axis. Inside the mapped function (or with one
  worker) that axis has size 1; in the global view of a `jax.shard_map` over the data axis it
  has size n, so `state.residual.value["w"][i]` is worker i's residual. State outside a
  `PerWorker` is replicated: identical on every worker. `compams_jax.sharding.state_specs`
  derives the partition specs from this distinction.
  """

  value: Any


def per_worker_zeros(tree: Any, dtype: Any = None) -> PerWorker:
  """A `PerWorker` of zeros shaped like `tree` with the leading worker axis of size 1."""
  return PerWorker(jax.tree.map(lambda x: jnp.zeros((1,) + tuple(x.shape), dtype or x.dtype), tree))


def local(state: PerWorker) -> Any:
  """This worker's arrays of a `PerWorker` (the leading axis of size 1 dropped)."""
  return jax.tree.map(lambda x: x[0], state.value)


def to_per_worker(tree: Any) -> PerWorker:
  """Wraps this worker's arrays, adding the leading worker axis of size 1."""
  return PerWorker(jax.tree.map(lambda x: x[None], tree))


def step_key(
  compressor: Compressor, seed: int, count: jax.Array, axis_name: str | None
) -> jax.Array | None:
  """The PRNG key of one step: shared by all workers, or folded with the worker index.

  Keys are derived from (seed, step count[, worker index]), so the state holds no key and a
  resumed run draws exactly the keys it would have drawn.
  """
  if not compressor.needs_key:
    return None
  key = jax.random.fold_in(jax.random.key(seed), count)
  if compressor.randomness == "private":
    key = jax.random.fold_in(key, worker_index(axis_name))
  return key
