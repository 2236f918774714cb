"""Argument checks shared by the transforms."""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src.base import Compressor


def check_compressor(compressor: Any) -> Compressor:
  if not isinstance(compressor, Compressor):
    raise TypeError(
      "expected a compams_jax Compressor (e.g. cj.compressors.top_k(0.01)), got "
      f"{type(compressor).__name__}: {compressor!r}."
    )
  return compressor


def check_axis_name(axis_name: Any, what: str = "axis_name") -> Any:
  """A mesh axis name, a tuple of them, or None."""
  ok = axis_name is None or isinstance(axis_name, str)
  ok = ok or (
    isinstance(axis_name, tuple) and axis_name and all(isinstance(a, str) for a in axis_name)
  )
  if not ok:
    raise TypeError(f"{what} must be a str, a tuple of str or None, got {axis_name!r}.")
  return axis_name


def check_seed(seed: Any) -> Any:
  """A Python int, or an integer scalar array (`optax.inject_hyperparams` passes arrays)."""
  if isinstance(seed, bool):
    raise TypeError(f"seed must be an int, got {seed!r}.")
  if isinstance(seed, int):
    return seed
  dtype = getattr(seed, "dtype", None)
  if dtype is None or getattr(seed, "shape", None) != () or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"seed must be an int, got {seed!r}.")
  return seed


def check_updates(updates: Any, like: Any, name: str) -> None:
  """Raises ValueError unless `updates` has the structure and leaf shapes of `like` (the state)."""
  got, want = jax.tree.structure(updates), jax.tree.structure(like)
  if got != want:
    raise ValueError(
      f"{name}: the updates' pytree structure {got} does not match the "
      f"structure the state was initialised with, {want}."
    )
  for (path, u), l in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(like)):
    if tuple(u.shape) != tuple(l.shape):
      raise ValueError(
        f"{name}: update leaf {jax.tree_util.keystr(path)} has shape "
        f"{tuple(u.shape)}, but the state was initialised for shape "
        f"{tuple(l.shape)}."
      )


def warn_if_not_contractive(compressor: Compressor, params: Any, what: str) -> None:
  """Warns when the compressor's declared q² ≥ 1 on some leaf: error feedback (or a closed
  prediction loop) then has no contraction to rely on and can diverge (e.g. per-leaf qsgd with
  few levels on large leaves: q² = min(d/s², √d/s))."""
  if compressor.granularity == "model":
    sizes = [sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))]
  else:
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
  worst = max((q for q in (compressor.q_squared(d) for d in sizes) if q is not None), default=0)
  if worst >= 1:
    warnings.warn(
      f"{what}: {type(compressor).__name__} declares q² = {worst:.3g} ≥ 1 on the largest leaf, "
      "so it is not a contraction there and error feedback / fixed-rho prediction can "
      "diverge (docs/predictive.md). Use more levels or a smaller granularity.",
      UserWarning,
      stacklevel=3,
    )


def check_per_worker(updates: Any, state: Any, axis_names: Any, what: str) -> None:
  """Inside `jax.shard_map` (with its varying-axis types), refuses a step that would train
  silently wrong: gradients that do not vary over the workers (taken with respect to
  replicated parameters, so already summed over workers), or per-worker state that was
  initialised for one worker (`tx.init`) and passed in replicated.

  Under pmap, vmap, `check_vma=False` or one worker there are no such types and nothing is
  checked.
  """
  from compams_jax._src.axis import manual_axes_tracked, varying_axes

  names = tuple(a for a in axis_names if a is not None)
  names = tuple(n for a in names for n in ((a,) if isinstance(a, str) else a))
  if not names or not manual_axes_tracked(names):
    return
  for leaf in jax.tree.leaves(updates):
    if not set(names) <= varying_axes(leaf):
      raise ValueError(
        f"{what}: the gradients do not vary over the worker axes {names}: inside jax.shard_map "
        "the gradient of a replicated parameter is summed over all workers before the "
        "optimizer sees it, so every worker would compress the same summed gradient. "
        f"Differentiate with respect to jax.lax.pcast(params, {names!r}, to='varying'), or "
        "build the step with cj.data_parallel_step(loss_fn, tx, mesh=mesh, axis_name=...)."
      )
  for leaf in jax.tree.leaves(state):
    if not set(names) <= varying_axes(leaf):
      raise ValueError(
        f"{what}: the per-worker optimizer state is replicated over {names}: it was created "
        "by tx.init for one worker. Create it for every worker with "
        "cj.sharding.init(tx, params, mesh=mesh, axis_name=...) and pass it with "
        "cj.sharding.state_specs(state, axis_name), or use cj.data_parallel_step."
      )


def check_decay(decay: Any, name: str = "decay") -> Any:
  """A real number in [0, 1], or a float scalar array (`optax.inject_hyperparams` passes
  arrays; a concrete one is range-checked too)."""
  if isinstance(decay, bool):
    raise TypeError(f"{name} must be a float in [0, 1], got {decay!r}.")
  if not isinstance(decay, (int, float)):
    dtype = getattr(decay, "dtype", None)
    if (
      dtype is None
      or getattr(decay, "shape", None) != ()
      or not jnp.issubdtype(dtype, jnp.floating)
    ):
      raise TypeError(f"{name} must be a float in [0, 1], got {decay!r}.")
    try:
      value = float(decay)
    except jax.errors.ConcretizationTypeError:  # traced: checked where it was concrete
      return decay
  else:
    value = decay = float(decay)
  if math.isnan(value) or not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {decay!r}.")
  return decay
