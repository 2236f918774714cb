"""Skipping a step on every worker when any worker's gradient is not finite."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.validate import check_axis_name
from compams_jax.wire import all_workers


class SkipNonFiniteState(NamedTuple):
  """State of `skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state (unchanged by a skipped step).
    skipped: how many steps were skipped (replicated).
    last_finite: whether the last step was applied (replicated).
  """

  inner_state: Any
  skipped: jax.Array
  last_finite: jax.Array


def skip_nonfinite(
  inner: optax.GradientTransformation, *, axis_name: str | None = None
) -> optax.GradientTransformation:
  """Skips the whole step, on every worker, if any worker's gradient has a NaN or an Inf.

  A non-finite gradient on one worker would otherwise poison that worker's error residual at
  once and, through the average, every worker's AMSGrad moments. Each worker checks its own
  gradient; one collective (a `pmin` of a flag) makes all workers agree; if any flag is false,
  the step emits zero updates and leaves the inner state (residuals, moments, counters) exactly
  as it was, and the skip is counted. Unlike `optax.apply_if_finite` alone, which decides per
  worker, the workers can never disagree. `optax.apply_if_finite` may be wrapped INSIDE it
  (under `jax.pmap`), never outside: outside, one device would skip the collectives the others
  enter (XLA:CPU aborts). Under `jax.shard_map` `apply_if_finite` does not trace (its
  `lax.cond` branches differ in device variance); this wrapper replaces it.

  Args:
    inner: the transformation to protect, e.g. `cj.comp_ams(...)`.
    axis_name: the mapped axis indexing workers, or None for one worker.

  Returns:
    An `optax.GradientTransformation` whose state is a `SkipNonFiniteState`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.skip_nonfinite(cj.comp_ams(1e-3, cj.compressors.top_k(0.5)))
    >>> p = {"w": jnp.ones(4)}
    >>> s = tx.init(p)
    >>> u, s = tx.update({"w": jnp.array([1.0, jnp.nan, 0.0, 2.0])}, s, p)
    >>> int(s.skipped), u["w"]
    (1, Array([0., 0., 0., 0.], dtype=float32))
  """
  check_axis_name(axis_name)

  def init_fn(params):
    return SkipNonFiniteState(
      inner_state=inner.init(params),
      skipped=jnp.zeros([], jnp.int32),
      last_finite=jnp.ones([], jnp.bool_),
    )

  def update_fn(updates, state, params=None):
    leaves = jax.tree.leaves(updates)
    local_ok = (
      jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
      if leaves
      else (jnp.ones([], jnp.bool_))
    )
    ok = all_workers(local_ok, axis_name)
    # Feed finite values to the inner update either way, so no NaN reaches any arithmetic.
    clean = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0), updates)
    new_updates, new_inner = inner.update(clean, state.inner_state, params)
    keep = lambda new, old: jnp.where(ok, new, old)
    out = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
    inner_state = jax.tree.map(keep, new_inner, state.inner_state)
    return out, SkipNonFiniteState(
      inner_state=inner_state, skipped=state.skipped + (~ok).astype(jnp.int32), last_finite=ok
    )

  return optax.GradientTransformation(init_fn, update_fn)
