"""Worker-local Adam moments: each worker scales its own gradient before communication."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.tree import check_tree
from compams_jax._src.validate import check_axis_name, check_per_worker, check_updates
from compams_jax._src.workers import PerWorker, local_update, per_worker_zeros


class WorkerAdamState(NamedTuple):
  """State of `worker_adam`: each worker's first and second moments (per worker)."""

  mu: PerWorker
  nu: PerWorker


def worker_adam(
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  axis_name: str | None = None,
) -> optax.GradientTransformation:
  """Each worker's own Adam direction m_i / (sqrt(v_i) + ε), from its local gradients.

  No bias correction. Its state is per worker, so it may precede a compressed average (QAdam).

  Args:
    b1: β1, the first-moment decay.
    b2: β2, the second-moment decay.
    eps: ε, added outside the square root.
    axis_name: the worker axis, if any: inside shard_map the gradients are then checked to
      vary over it (see `cj.error_feedback`).

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.worker_adam(b1=0.0, b2=0.0, eps=0.0)
    >>> g = {"w": jnp.array([2.0, -3.0])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([ 1., -1.], dtype=float32)
  """

  check_axis_name(axis_name)

  def init_fn(params):
    check_tree(params)
    return WorkerAdamState(
      mu=per_worker_zeros(params, what="per-worker Adam moments"),
      nu=per_worker_zeros(params, what="per-worker Adam moments"),
    )

  @local_update
  def update_fn(updates, state, params=None):
    del params
    mu, nu = state.mu.value, state.nu.value
    check_updates(updates, mu, "worker_adam")
    check_per_worker(updates, state.mu.value, (axis_name,), "worker_adam")
    mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, mu)
    nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, nu)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return out, WorkerAdamState(mu=state.mu.replace(mu), nu=state.nu.replace(nu))

  return optax.GradientTransformation(init_fn, update_fn)
