"""Small collectives of side information: sums of scalars, agreement flags."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compams_jax._src.axis import AxisName, _names, num_workers, varying_axes


def sum_over_workers(values: Any, *, axis_name: AxisName | None) -> Any:
  """Σ_i values_i over workers by one `psum` (for small side information such as scalars)."""
  if axis_name is None:
    return values
  num_workers(axis_name)
  return jax.lax.psum(values, axis_name)


def all_workers(flag: jax.Array, axis_name: AxisName | None) -> jax.Array:
  """True iff `flag` is true on every worker (one small collective).

  Inside `jax.shard_map` the flag is also reduced over any other manual axis it varies along
  (the shards of a model sharded inside each worker), so every device agrees.
  """
  if axis_name is None:
    return flag
  num_workers(axis_name)
  names = _names(axis_name)
  names = names + tuple(sorted(varying_axes(flag) - set(names)))
  return jax.lax.pmin(flag.astype(jnp.int32), names) > 0


def mean_over(values: Any, axes: AxisName) -> Any:
  """The mean of `values` over mesh axes inside one worker (e.g. the shards of a sharded model:
  a small all-reduce on the fast links, never over the worker axis)."""
  return jax.lax.pmean(values, axes)


def all_of_worker(flag: jax.Array, worker_axes: AxisName | None) -> jax.Array:
  """True iff `flag` is true on every device of this worker: reduced over the manual axes it
  varies along besides the worker axes (the shards of a model sharded inside a worker); no
  collective when it varies along none."""
  workers = set() if worker_axes is None else set(_names(worker_axes))
  inside = tuple(sorted(varying_axes(flag) - workers))
  if not inside:
    return flag
  return jax.lax.pmin(flag.astype(jnp.int32), inside) > 0


def agree(value: jax.Array, axis_name: AxisName | None) -> jax.Array:
  """True iff `value` (a small integer, e.g. a fingerprint) is the same on every worker, and on
  every device of each worker (two small collectives: a pmin and a pmax)."""
  if axis_name is None:
    return jnp.ones([], jnp.bool_)
  num_workers(axis_name)
  same = jax.lax.pmin(value, axis_name) == jax.lax.pmax(value, axis_name)
  return all_of_worker(same, axis_name)
