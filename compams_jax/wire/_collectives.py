"""Small collectives of side information: sums of scalars, agreement flags."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compams_jax._src.axis import AxisName, num_workers


def sum_over_workers(values: Any, *, axis_name: AxisName | None) -> Any:
  """Σ_i values_i over workers by one `psum` (for small side information such as scalars)."""
  if axis_name is None:
    return values
  num_workers(axis_name)
  return jax.lax.psum(values, axis_name)


def all_workers(flag: jax.Array, axis_name: AxisName | None) -> jax.Array:
  """True iff `flag` is true on every worker (one small collective)."""
  if axis_name is None:
    return flag
  num_workers(axis_name)
  return jax.lax.pmin(flag.astype(jnp.int32), axis_name) > 0


def mean_over(values: Any, axes: AxisName) -> Any:
  """The mean of `values` over mesh axes inside one worker (e.g. the shards of a sharded model:
  a small all-reduce on the fast links, never over the worker axis)."""
  return jax.lax.pmean(values, axes)
