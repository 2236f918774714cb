"""Resizing per-worker optimizer state to another number of workers (elastic resume)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src.workers import is_per_worker


def _regroup(x: Any, num_workers: int) -> Any:
  """(n_old, ...) → (num_workers, ...) with the same sum over the leading axis.

  Growing pads with zero residuals; shrinking adds worker i's residual to worker i mod n_new.
  """
  x = jnp.asarray(np.asarray(x))  # a host-side regrouping (checkpoint restore), any sharding
  n_old = x.shape[0]
  if num_workers >= n_old:
    return jnp.concatenate([x, jnp.zeros((num_workers - n_old,) + x.shape[1:], x.dtype)])
  groups = -(-n_old // num_workers)
  padded = jnp.concatenate([x, jnp.zeros((groups * num_workers - n_old,) + x.shape[1:], x.dtype)])
  return padded.reshape((groups, num_workers) + x.shape[1:]).sum(axis=0).astype(x.dtype)


def resize_workers(opt_state: Any, num_workers: int) -> Any:
  """Redistributes an optimizer state (global view) to a different number of workers.

  Per-worker state whose marker declares `sum_invariant` (error-feedback residuals of
  `error_feedback`/`comp_ams`, `powersgd` and 1-bit Adam: what the averages still owe) is
  regrouped so that its SUM over workers — what the next averages see — is preserved: a grown
  run gives the new workers zero residuals, a shrunk one adds worker i's residual to worker
  i mod n. Replicated state (AMSGrad moments, counters) is kept as it is. Per-worker state with
  no such invariant — predictive encoder reconstructions (the receivers' average must stay the
  mean of the senders'), worker momentum, the two-phase server residuals (tied to the chunk
  layout) — is refused with a ValueError that names it.

  Args:
    opt_state: the optimizer state in its global view (per-worker leaves stacked on axis 0).
    num_workers: the new number of workers.

  Returns:
    The state with every per-worker leaf's leading axis of size `num_workers`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.comp_ams(1e-3, cj.compressors.top_k(0.5))
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> state = state[0]._replace(residual=state[0].residual.replace({"w": jnp.arange(8.0).reshape(4, 2)}))
    >>> cj.sharding.resize_workers((state,), 2)[0].residual.value["w"]
    Array([[ 4.,  6.],
           [ 8., 10.]], dtype=float32)
  """
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f"num_workers must be a positive int, got {num_workers!r}.")

  markers = [x for x in jax.tree.leaves(opt_state, is_leaf=is_per_worker) if is_per_worker(x)]
  for node in markers:
    if not node.sum_invariant:
      raise ValueError(
        f"cannot resume {node.what} on a different number of workers: they have no sum to "
        "preserve. Resume with the original worker count."
      )

  def visit(node):
    if not is_per_worker(node):
      return node
    return node.replace(jax.tree.map(lambda x: _regroup(x, num_workers), node.value))

  return jax.tree.map(visit, opt_state, is_leaf=is_per_worker)
