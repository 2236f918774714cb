"""Predictors for predictive (innovation) coding: the coefficient ρ in p_t = ρ ⊙ x̂_{t−1}."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from compams_jax._src.axis import varying_axes
from compams_jax.wire import sum_over_workers


@dataclasses.dataclass(frozen=True)
class Predictor:
  """Base class: `coefficients(target, previous, axis_name)` returns one shared ρ per leaf.

  Every predictor here gives the SAME ρ on every worker. That is what keeps a receiver's memory
  at O(params): with p_{t,i} = ρ x̂_{t−1,i} and ρ shared, the average reconstruction obeys
  x̄_t = ρ x̄_{t−1} + (1/n) Σ_i C(u_{t,i}), so a receiver keeps only x̄, never the n individual
  x̂_i. A per-worker coefficient ρ_i would break that identity: every receiver would have to keep
  all n reconstructions (O(n·params) per device) to form Σ_i ρ_i x̂_{t−1,i}.
  """

  def coefficients(
    self, target: Any, previous: Any, axis_name: str | None, stacked: Any = None
  ) -> Any:
    """One ρ per leaf (per layer of a leaf flagged in `stacked`: shape (layers,))."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Fixed(Predictor):
  """p_t = ρ · x̂_{t−1} with a fixed ρ (e.g. the momentum β). Sends nothing extra."""

  rho: float = 0.9

  def __post_init__(self):
    if (
      not isinstance(self.rho, (int, float))
      or isinstance(self.rho, bool)
      or not math.isfinite(self.rho)
    ):
      raise ValueError(f"fixed(rho=...) must be a finite float, got {self.rho!r}.")

  def coefficients(self, target, previous, axis_name, stacked=None):
    del axis_name, stacked
    return jax.tree.map(lambda x: jnp.asarray(self.rho, jnp.float32), target)


@dataclasses.dataclass(frozen=True)
class LeastSquares(Predictor):
  """Per-leaf least-squares ρ = Σ_i⟨x_i, x̂_i⟩ / Σ_i‖x̂_i‖², shared by all workers.

  Each worker computes its two scalars per leaf from what it is about to send and from its last
  reconstruction; one `psum` of 2 float32 per leaf (counted in the wire bytes) gives every worker
  and receiver the same ρ. ρ minimises Σ_i ‖x_i − ρ x̂_i‖², so the innovation is never larger
  than the vector itself (ρ = 0 is a candidate): on uncorrelated input ρ falls to ≈ 0 and
  prediction costs nothing but the two scalars.
  """

  def coefficients(self, target, previous, axis_name, stacked=None):
    leaves, treedef = jax.tree.flatten(target)
    prev = jax.tree.leaves(previous)
    if not leaves:
      return target
    flags = stacked or (False,) * len(leaves)

    def stats_of(x, h, layered):
      # (layers, 2) for a stacked leaf (one ρ per layer), (1, 2) otherwise.
      x = x.astype(jnp.float32).reshape((x.shape[0] if layered else 1, -1))
      h = h.astype(jnp.float32).reshape(x.shape)
      return jnp.stack([jnp.sum(x * h, axis=1), jnp.sum(h * h, axis=1)], axis=1)

    stats = [stats_of(x, h, f) for x, h, f in zip(leaves, prev, flags)]
    # One psum per set of mesh axes the statistics vary along (one, unless the leaves are
    # sharded differently inside a worker): a replicated leaf's ρ then stays typed replicated.
    groups: dict[frozenset, list[int]] = {}
    for i, st in enumerate(stats):
      groups.setdefault(varying_axes(st), []).append(i)
    rho: list[Any] = [None] * len(leaves)
    for idx in groups.values():
      summed = sum_over_workers(jnp.concatenate([stats[i] for i in idx]), axis_name=axis_name)
      num, den = summed[:, 0], summed[:, 1]
      values = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
      start = 0
      for i in idx:
        m = stats[i].shape[0]
        rho[i] = values[start : start + m] if flags[i] else values[start]
        start += m
    return jax.tree.unflatten(treedef, rho)


def fixed(rho: float = 0.9) -> Fixed:
  """A fixed prediction coefficient ρ (for momentum, ρ = β is the natural choice).

  Args:
    rho: the coefficient.

  Returns:
    A `Fixed` predictor.

  Examples:
    >>> import compams_jax as cj
    >>> cj.predictors.fixed(0.9).rho
    0.9
  """
  return Fixed(rho=rho)


def least_squares() -> LeastSquares:
  """A per-leaf least-squares coefficient, shared across workers by one small `psum`.

  Returns:
    A `LeastSquares` predictor.

  Examples:
    >>> import compams_jax as cj
    >>> isinstance(cj.predictors.least_squares(), cj.predictors.Predictor)
    True
  """
  return LeastSquares()
