"""A dense warm-up before compressed communication."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.tree import encode_tree
from compams_jax._src.validate import check_axis_name
from compams_jax.compressors import identity
from compams_jax.wire import gather_average, gather_chunks, scatter_mean


class DenseWarmupState(NamedTuple):
  """State of `dense_warmup`.

  Attributes:
    count: steps taken (replicated).
    inner_state: the wrapped transformation's state (untouched during the warm-up).
  """

  count: jax.Array
  inner_state: Any


def dense_warmup(
  inner: optax.GradientTransformation,
  steps: int,
  *,
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
) -> optax.GradientTransformation:
  """The dense average of the gradients for the first `steps` steps, then `inner`.

  During the warm-up every worker sends its full-precision gradient (one psum; on a
  hierarchical mesh the same dense reduce-scatter / all-gather as `inner`) and `inner`'s state
  (error residuals, predictive encoders) stays as initialised. The phase is a `lax.cond` on the
  replicated step count, so all workers enter the same collectives; the compiled step holds
  both phases (`cj.wire_bytes` counts both).

  Args:
    inner: the compressed averaging transform, e.g. `cj.error_feedback(...)`.
    steps: W, the number of dense steps.
    axis_name: the worker axis (as for `inner`).
    dense_axis_name: the fast axis of a hierarchical mesh (as for `inner`).

  Returns:
    An `optax.GradientTransformation` whose state is a `DenseWarmupState`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.dense_warmup(cj.error_feedback(cj.compressors.top_k(0.5)), 1)
    >>> g = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
    >>> s = tx.init(g)
    >>> u, s = tx.update(g, s)   # dense
    >>> u["w"]
    Array([1., 2., 3., 4.], dtype=float32)
    >>> tx.update(g, s)[0]["w"]  # compressed
    Array([0., 0., 3., 4.], dtype=float32)
  """
  check_axis_name(axis_name)
  check_axis_name(dense_axis_name, "dense_axis_name")
  if isinstance(steps, bool) or (
    isinstance(steps, (int, float)) and (steps < 0 or steps != int(steps))
  ):
    raise ValueError(f"dense_warmup steps must be a non-negative int, got {steps!r}.")
  dense = identity()

  def init_fn(params):
    return DenseWarmupState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update_fn(updates, state, params=None):
    def warm(updates, inner_state):
      value = scatter_mean(updates, dense_axis_name)
      mean = gather_average(dense, encode_tree(dense, value), value, axis_name=axis_name)
      return gather_chunks(mean, updates, dense_axis_name), inner_state

    def compressed(updates, inner_state):
      return inner.update(updates, inner_state, params)

    out, inner_state = jax.lax.cond(
      state.count < steps, warm, compressed, updates, state.inner_state
    )
    return out, DenseWarmupState(count=optax.safe_increment(state.count), inner_state=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
