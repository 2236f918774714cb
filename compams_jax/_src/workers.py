"""The per-worker marker: which optimizer-state leaves belong to one worker, and what they allow."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerWorker:
  """Wraps optimizer state that differs from worker to worker (error residuals, encoder state).

  Every array inside carries a leading worker axis. Inside the mapped function (or with one
  worker) that axis has size 1; in the global view of a `jax.shard_map` over the data axis it
  has size n, so `state.residual.value["w"][i]` is worker i's residual. State outside a
  `PerWorker` is replicated: identical on every worker.

  The marker also declares what the state allows, so that code reading a state never needs a
  table of state types (static fields, not leaves):

  Attributes:
    value: the per-worker arrays (a pytree), each with the leading worker axis.
    what: a short description, named in error messages.
    sum_invariant: True when only the sum over workers matters (error-feedback residuals: what
      the next averages still owe). `cj.sharding.resize_workers` may then regroup the workers
      with that sum preserved; otherwise it refuses to change the worker count.
    params_like: True when `value` mirrors the parameters' pytree (each leaf shaped like its
      parameter). `cj.sharding.state_specs` then gives it the parameters' partition specs
      behind the worker axis on meshes that also shard the parameters.
  """

  value: Any
  what: str = dataclasses.field(default="per-worker state", metadata={"static": True})
  sum_invariant: bool = dataclasses.field(default=False, metadata={"static": True})
  params_like: bool = dataclasses.field(default=True, metadata={"static": True})

  def replace(self, value: Any) -> PerWorker:
    """The same marker around other arrays."""
    return dataclasses.replace(self, value=value)


def per_worker_zeros(tree: Any, dtype: Any = None, **marker: Any) -> PerWorker:
  """A `PerWorker` of zeros shaped like `tree` with the leading worker axis of size 1."""
  return PerWorker(
    jax.tree.map(lambda x: jnp.zeros((1,) + tuple(x.shape), dtype or x.dtype), tree), **marker
  )


def local(state: PerWorker) -> Any:
  """This worker's arrays of a `PerWorker` (the leading axis of size 1 dropped)."""
  return jax.tree.map(lambda x: x[0], state.value)


def to_per_worker(tree: Any, like: PerWorker) -> PerWorker:
  """Wraps this worker's arrays in `like`'s marker, adding the leading worker axis of size 1."""
  return like.replace(jax.tree.map(lambda x: x[None], tree))


def is_per_worker(x: Any) -> bool:
  return isinstance(x, PerWorker)
