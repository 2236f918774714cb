"""A dense warm-up before compressed communication, and stages of compressed communication."""

from __future__ import annotations

from collections.abc import Sequence
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


class StagedState(NamedTuple):
  """State of `staged`.

  Attributes:
    count: steps taken (replicated).
    inner_state: the state every stage's transformation shares.
  """

  count: jax.Array
  inner_state: Any


def staged(
  transforms: Sequence[optax.GradientTransformation], boundaries: Sequence[int]
) -> optax.GradientTransformation:
  """`transforms[i]` for the steps in [boundaries[i-1], boundaries[i]), the last one after.

  The stages share ONE state (e.g. the error-feedback residual carries over from one
  compressor to the next), so every transformation must have the same state structure:
  typically the same transform with compressors of one kind and different rates, such as a
  top-k ratio annealed from 10% to 1%. The stage is a `lax.switch` on the replicated step
  count, so all workers enter the same collectives; the compiled step holds every stage.

  Args:
    transforms: the stages' transformations, first to last.
    boundaries: the step at which each stage but the last ends (increasing, one fewer than
      `transforms`).

  Returns:
    An `optax.GradientTransformation` whose state is a `StagedState`.

  Raises:
    ValueError: if the boundaries do not fit the transforms or the states differ.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> c = cj.compressors
    >>> tx = cj.staged([cj.error_feedback(c.top_k(0.5)), cj.error_feedback(c.top_k(0.25))], [1])
    >>> g = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
    >>> s = tx.init(g)
    >>> u, s = tx.update(g, s)   # top-k 50%
    >>> u["w"]
    Array([0., 0., 3., 4.], dtype=float32)
    >>> tx.update(g, s)[0]["w"]  # top-k 25% of g + residual = [2, 4, 3, 4] (ties: lower index)
    Array([0., 4., 0., 0.], dtype=float32)
  """
  transforms, boundaries = list(transforms), [int(b) for b in boundaries]
  if not transforms or len(boundaries) != len(transforms) - 1:
    raise ValueError(
      f"staged needs one boundary fewer than transforms, got {len(transforms)} transforms and "
      f"{len(boundaries)} boundaries."
    )
  if any(b <= a for a, b in zip([0, *boundaries], boundaries)):
    raise ValueError(f"staged boundaries must be positive and increasing, got {boundaries}.")

  def signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves]

  def init_fn(params):
    state = transforms[-1].init(params)
    for i, t in enumerate(transforms[:-1]):
      if signature(jax.eval_shape(t.init, params)) != signature(state):
        raise ValueError(f"staged: stage {i}'s state differs from the last stage's.")
    return StagedState(count=jnp.zeros([], jnp.int32), inner_state=state)

  def update_fn(updates, state, params=None):
    stage = sum((state.count >= b).astype(jnp.int32) for b in boundaries) if boundaries else 0
    branches = [(lambda u, s, t=t: t.update(u, s, params)) for t in transforms]
    out, inner_state = jax.lax.switch(stage, branches, updates, state.inner_state)
    return out, StagedState(count=optax.safe_increment(state.count), inner_state=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
