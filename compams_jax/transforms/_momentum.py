"""Worker-local momentum: a heavy-ball trace kept by each worker before communication."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from compams_jax._src.tree import check_tree
from compams_jax._src.validate import check_axis_name, check_per_worker, check_updates
from compams_jax._src.workers import PerWorker, local_update, per_worker_zeros


class WorkerMomentumState(NamedTuple):
  """State of `worker_momentum`: each worker's momentum buffer (per worker)."""

  momentum: PerWorker


def worker_momentum(
  decay: float = 0.9, *, nesterov: bool = False, axis_name: str | None = None
) -> optax.GradientTransformation:
  """Each worker's own momentum m ← β m + g (like `optax.trace`, but marked per worker).

  Use it before a compressed average when the momentum, not the gradient, is what travels (the
  setting of Adikari & Draper). Its state is a `PerWorker`, so
  `cj.sharding.state_specs` shards it over the data axis; `optax.trace`'s state would be taken
  for replicated state.

  Args:
    decay: β.
    nesterov: emit g + β m instead of m.
    axis_name: the worker axis, if any: inside shard_map the gradients are then checked to
      vary over it (see `cj.error_feedback`).

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.worker_momentum(0.5)
    >>> g = {"w": jnp.array([1.0])}
    >>> s = tx.init(g)
    >>> _, s = tx.update(g, s)
    >>> tx.update(g, s)[0]["w"]
    Array([1.5], dtype=float32)
  """
  check_axis_name(axis_name)
  if isinstance(decay, (int, float)) and not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"worker_momentum(decay=...) must be in [0, 1), got {decay!r}.")

  def init_fn(params):
    check_tree(params)
    return WorkerMomentumState(momentum=per_worker_zeros(params, what="per-worker momentum"))

  @local_update
  def update_fn(updates, state, params=None):
    del params
    previous = state.momentum.value
    check_updates(updates, previous, "worker_momentum")
    check_per_worker(updates, state.momentum.value, (axis_name,), "worker_momentum")
    m = jax.tree.map(lambda g, m: (decay * m + g).astype(m.dtype), updates, previous)
    out = jax.tree.map(lambda g, m: g + decay * m, updates, m) if nesterov else m
    return out, WorkerMomentumState(momentum=state.momentum.replace(m))

  return optax.GradientTransformation(init_fn, update_fn)
