"""The per-worker marker: which optimizer-state leaves belong to one worker, and what they allow."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerWorker:
  """Wraps optimizer state that differs from worker to worker (error residuals, encoder state).

  Every array inside carries a leading worker axis. Inside the mapped function (or with one
  worker) that axis has size 1; in the global view of a `jax.shard_map` over the data axis it
  has size n, so `state.residual.value["w"][i]` is worker i's residual. State outside a
  `PerWorker` is replicated: identical on every worker.

  Inside an update built with `local_update`, a transform sees `value` parameter-shaped (this
  worker's arrays, `local=True`); the worker axis is dropped and restored in that one place.
  `cj.sharding.worker_state(state, i)` is worker i's view of a global state.

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
    local: True while a transform's update sees `value` without the worker axis.
    shard_specs: for parameter-shaped state of parameters sharded over other mesh axes, one
      PartitionSpec per leaf (set by `cj.sharding.init`): compression follows them where the
      arrays' types carry no sharding (auto mesh axes).
    per_device: None, or how state that is not parameter-shaped is computed from each
      device's own shards of the parameters: "groups" (one array per group of leaves sharded
      alike, flattened together: the two-phase server residuals) or "leaves" (one array per
      leaf: the hierarchical chunk residuals). On parameters sharded over other mesh axes each
      array's last axis is split over its group's or leaf's axes (`cj.sharding.state_specs`),
      every device holding its own part.
  """

  value: Any
  what: str = dataclasses.field(default="per-worker state", metadata={"static": True})
  sum_invariant: bool = dataclasses.field(default=False, metadata={"static": True})
  params_like: bool = dataclasses.field(default=True, metadata={"static": True})
  local: bool = dataclasses.field(default=False, metadata={"static": True})
  shard_specs: Any = dataclasses.field(default=None, metadata={"static": True})
  per_device: str | None = dataclasses.field(default=None, metadata={"static": True})

  def replace(self, value: Any) -> PerWorker:
    """The same marker around other arrays."""
    return dataclasses.replace(self, value=value)


def per_worker_zeros(tree: Any, dtype: Any = None, **marker: Any) -> PerWorker:
  """A `PerWorker` of zeros shaped like `tree` with the leading worker axis of size 1."""
  return PerWorker(
    jax.tree.map(lambda x: jnp.zeros((1,) + tuple(x.shape), dtype or x.dtype), tree), **marker
  )


def is_per_worker(x: Any) -> bool:
  return isinstance(x, PerWorker)


def strip(node: Any) -> Any:
  """A `PerWorker` seen locally: its arrays without the leading worker axis."""
  if not is_per_worker(node) or node.local:
    return node
  value = jax.tree.map(lambda x: x[0], node.value)
  return dataclasses.replace(node, value=value, local=True)


def restore(node: Any) -> Any:
  """Inverse of `strip`."""
  if not is_per_worker(node) or not node.local:
    return node
  value = jax.tree.map(lambda x: x[None], node.value)
  return dataclasses.replace(node, value=value, local=False)


def local_update(update_fn):
  """`update_fn` seeing every `PerWorker` of its state parameter-shaped (this worker's arrays).

  The one place where the leading worker axis of size 1 (the local view inside the mapped
  function) is dropped before a transform's update and restored after it. A transform that
  calls other transforms' updates on parts of its state (`cj.diloco`) strips only its own
  `PerWorker` with `strip` / `restore`: the others do it themselves.
  """

  def wrapped(updates, state, params=None):
    local = jax.tree.map(strip, state, is_leaf=is_per_worker)
    out, new_state = update_fn(updates, local, params)
    return out, jax.tree.map(restore, new_state, is_leaf=is_per_worker)

  return wrapped


def worker_state(state: Any, i: int) -> Any:
  """Worker i's view of a state: every `PerWorker` value without the leading worker axis.

  On the global state (`cj.sharding.init`, `cj.data_parallel_step`) row i belongs to worker i;
  on `tx.init(params)` there is one worker, i = 0.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.error_feedback(cj.compressors.top_k(0.5))
    >>> state = tx.init({"w": jnp.zeros(4)})
    >>> cj.sharding.worker_state(state, 0).residual.value["w"].shape
    (4,)
  """

  def row(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.spec and sharding.spec[0]:
      # The worker axis is sharded over the mesh: replicate it first (explicit axes refuse
      # an index into a sharded dimension).
      spec = jax.sharding.PartitionSpec(None, *sharding.spec[1:])
      x = jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, spec))
    return x[i]

  def view(node):
    return node.replace(jax.tree.map(row, node.value)) if is_per_worker(node) else node

  return jax.tree.map(view, state, is_leaf=is_per_worker)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GlobalParams:
  """The synchronized parameters θ of a local-SGD method (`cj.diloco`): replicated state.

  Workers train their own copies of the parameters between synchronizations; after one, every
  worker restarts from θ. The marker declares it, so the step helper (and `cj.apply_updates`)
  can set every worker's parameters to θ exactly: params + (θ − params) is not θ bit for bit.

  Attributes:
    value: θ, a pytree like the parameters.
    fresh: True when the last update synchronized (a replicated bool scalar).
  """

  value: Any
  fresh: jax.Array


def is_global_params(x: Any) -> bool:
  return isinstance(x, GlobalParams)


def find_global_params(state: Any) -> GlobalParams | None:
  """The `GlobalParams` of a state, or None; more than one is an error."""
  found = [x for x in jax.tree.leaves(state, is_leaf=is_global_params) if is_global_params(x)]
  if len(found) > 1:
    raise ValueError(
      f"the optimizer state holds {len(found)} sets of synchronized parameters (cj.diloco "
      "nested in cj.diloco?); one local-SGD method per optimizer."
    )
  return found[0] if found else None


def synchronized_params(opt_state: Any) -> Any:
  """θ, the synchronized parameters of a local-SGD optimizer's state (`cj.diloco`), or None.

  Evaluate a local-SGD run on these: between syncs every worker's own parameters differ.

  Examples:
    >>> import jax.numpy as jnp, optax, compams_jax as cj
    >>> tx = cj.diloco(optax.sgd(0.1), sync_every=2, axis_name=None)
    >>> cj.synchronized_params(tx.init({"w": jnp.ones(2)}))["w"]
    Array([1., 1.], dtype=float32)
    >>> cj.synchronized_params(optax.adam(0.1).init({"w": jnp.ones(2)})) is None
    True
  """
  found = find_global_params(opt_state)
  return None if found is None else found.value


def apply_updates(params: Any, updates: Any, opt_state: Any) -> Any:
  """`optax.apply_updates`, then the synchronized parameters where the last update synced.

  For optimizers without synchronized parameters this is `optax.apply_updates`.

  Args:
    params: this worker's parameters.
    updates: the optimizer's updates.
    opt_state: the optimizer's new state (returned with `updates`).

  Returns:
    The new parameters: after a synchronization of `cj.diloco`, exactly θ on every worker.

  Examples:
    >>> import jax.numpy as jnp, optax, compams_jax as cj
    >>> tx = cj.diloco(optax.sgd(0.1), sync_every=2, axis_name=None)
    >>> p = {"w": jnp.array([1.0, -3.0])}
    >>> s = tx.init(p)
    >>> for _ in range(2):
    ...   u, s = tx.update({"w": jnp.array([1.0, 1.0])}, s, p)
    ...   p = cj.apply_updates(p, u, s)
    >>> [round(float(x), 3) for x in p["w"]]  # θ after a sync: 1 − 0.7·(0.2 + 0.9·0.2)
    [0.734, -3.266]
    >>> bool((p["w"] == s.params.value["w"]).all())  # exactly θ
    True
  """
  new = optax.apply_updates(params, updates)
  synced = find_global_params(opt_state)
  if synced is None:
    return new
  return jax.tree.map(lambda g, p: jnp.where(synced.fresh, g.astype(p.dtype), p), synced.value, new)
