"""Partition specs of an optimizer state, and its sharded initialisation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P

from compams_jax._src.shards import initialising_with, leaf_axes, spec_axes, spec_groups
from compams_jax._src.workers import is_global_params, is_per_worker


def _is_marker(x: Any) -> bool:
  return is_per_worker(x) or is_global_params(x)


def state_specs(
  opt_state: Any, axis_name: str, *, params: Any = None, param_specs: Any = None
) -> Any:
  """PartitionSpecs for an optimizer state: per-worker leaves sharded over `axis_name`.

  Leaves inside a `PerWorker` (error residuals, encoder state) get `P(axis_name)`: their leading
  worker axis is split over the data axis. Every other leaf (AMSGrad moments, counts, decoder
  state) is replicated, `P()`.

  With parameters sharded over other mesh axes (a ("data", "model") mesh: FSDP / tensor
  parallelism), pass `params` (or their shapes) and `param_specs`: every state subtree shaped
  like the parameters then follows their specs — `P(axis_name, *spec)` inside a `PerWorker`,
  `spec` outside — so compression and its state act on each device's local shard while the
  collectives run over `axis_name` only. Per-worker state reads its marker
  (`PerWorker.params_like`); replicated state mirrors the parameters when it has their pytree
  structure and leaf shapes. (Per-worker state not shaped like the parameters, such as the
  two-phase server residual, is sharded over `axis_name`, and, being each device's own
  (`PerWorker.per_device`), along its last axis over the axes that shard the parameters.)

  Args:
    opt_state: an optimizer state, or its abstract shape (`jax.eval_shape(tx.init, params)`).
    axis_name: the mesh axis indexing workers.
    params: the parameters (arrays or ShapeDtypeStructs, global shapes), with `param_specs`.
    param_specs: a pytree of PartitionSpecs for `params`.

  Returns:
    A pytree of `PartitionSpec`s with the structure of `opt_state`.

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name="data")
    >>> state = jax.eval_shape(tx.init, {"w": jnp.zeros(3)})
    >>> cj.sharding.state_specs(state, "data")[0].residual.value
    {'w': P('data',)}
  """
  if (params is None) != (param_specs is None):
    raise ValueError("state_specs: pass both params and param_specs, or neither.")
  if params is None:

    def spec(node):
      if is_per_worker(node):
        return node.replace(jax.tree.map(lambda _: P(axis_name), node.value))
      if is_global_params(node):
        return dataclasses.replace(node, value=jax.tree.map(lambda _: P(), node.value), fresh=P())
      return P()

    return jax.tree.map(spec, opt_state, is_leaf=_is_marker)

  treedef = jax.tree.structure(params)
  shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
  spec_leaves = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  if len(spec_leaves) != len(shapes):
    raise ValueError(f"state_specs: {len(spec_leaves)} param_specs for {len(shapes)} params.")

  own_axes = spec_axes(spec_leaves)  # the order per-device state is split in (`map_shards`)
  groups = spec_groups(spec_leaves)

  def with_prefix(prefix: tuple) -> Any:
    return jax.tree.unflatten(treedef, [P(*prefix, *s) for s in spec_leaves])

  def mirrors_params(node, prefix: tuple) -> bool:
    # State of optax's own transforms (AMSGrad's mu and nu, an inner optimizer's moments)
    # carries no marker; it mirrors the parameters exactly: the same pytree structure and the
    # same leaf shapes (behind the worker axis inside a PerWorker).
    if jax.tree.structure(node) != treedef:
      return False
    return [tuple(x.shape)[len(prefix) :] for x in jax.tree.leaves(node)] == shapes

  def walk(node, prefix: tuple = ()) -> Any:
    if node is None:
      return None
    if is_per_worker(node):
      if node.params_like:
        return node.replace(with_prefix((axis_name,)))
      arrays = jax.tree.leaves(node.value)
      axes = {"groups": [a for a, _ in groups], "leaves": leaf_axes(spec_leaves)}.get(
        node.per_device
      )
      if own_axes and axes is not None and len(arrays) == len(axes):
        # Each device's own, per group of leaves sharded alike or per leaf: split over its axes.
        return node.replace(
          jax.tree.unflatten(
            jax.tree.structure(node.value),
            [P(axis_name, *(None,) * (x.ndim - 2), a or None) for x, a in zip(arrays, axes)],
          )
        )
      # Other per-worker state (an inner optimizer's): its parameter-shaped parts follow the
      # parameters behind the worker axis, the rest is split over the workers only.
      return node.replace(walk(node.value, (axis_name,)))
    if is_global_params(node):
      return dataclasses.replace(node, value=with_prefix(()), fresh=P())
    if mirrors_params(node, prefix):
      return with_prefix(prefix)
    if isinstance(node, (list, tuple, dict)) or hasattr(node, "_fields"):
      children, sub = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
      return jax.tree_util.tree_unflatten(sub, [walk(c, prefix) for c in children])
    return P(*prefix)

  return walk(opt_state)


def init(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  mesh: jax.sharding.Mesh,
  axis_name: str | tuple[str, ...],
  param_specs: Any = None,
) -> Any:
  """Initialises `tx`'s state for every worker of `mesh`'s `axis_name` (global view).

  Per-worker leaves come out stacked along a leading axis of size n (sharded over the axis);
  the rest replicated. `params` must be replicated over the data axis.

  Args:
    tx: the optimizer.
    params: the (replicated) parameters.
    mesh: the device mesh.
    axis_name: the mesh axis indexing workers, or a tuple of axes (a hierarchical mesh: every
      device of ("dcn", "ici") keeps its own per-worker state).
    param_specs: the parameters' PartitionSpecs over other mesh axes (e.g. "fsdp"), or None to
      read them from the arrays' own shardings (parameters placed with `jax.device_put(params,
      shardings)`; arrays without a mesh sharding count as replicated).

  Returns:
    The optimizer state, sharded as `state_specs(state, axis_name)` says: per-worker state
    behind a leading worker axis and, on sharded parameters, sharded like them (each device's
    residual is the shape of its shard of the parameter).

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> tx = cj.comp_ams(1e-3, cj.compressors.top_k(0.1), axis_name="data")
    >>> state = cj.sharding.init(tx, {"w": jnp.zeros(4)}, mesh=mesh, axis_name="data")
    >>> state[0].residual.value["w"].shape == (jax.device_count(), 4)
    True
  """
  if param_specs is None:
    param_specs = own_specs(params, mesh)
  specs = _init_specs(tx, params, mesh, axis_name, param_specs, mark=False)
  with initialising_with(param_specs):
    state = jax.jit(
      jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,), out_specs=specs, check_vma=False)
    )(params)
  return mark_shard_specs(state, param_specs)


def mark_shard_specs(state: Any, param_specs: Any) -> Any:
  """Parameter-shaped and per-device per-worker state of sharded parameters records their specs.

  Under auto mesh axes (and in fully manual steps) the arrays' types carry no sharding for
  compression to follow; the transforms read `PerWorker.shard_specs` instead (per-device state:
  which leaves it groups).
  """
  spec_leaves = tuple(jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P)))
  if not any(entry is not None for spec in spec_leaves for entry in spec):
    return state

  def mark(node):
    if is_per_worker(node) and (node.params_like or node.per_device):
      return dataclasses.replace(node, shard_specs=spec_leaves)
    return node

  return jax.tree.map(mark, state, is_leaf=is_per_worker)


def own_specs(params: Any, mesh: Any) -> Any:
  """Each leaf's PartitionSpec from its own sharding on `mesh` (P() when it has none)."""

  def spec(x):
    if isinstance(x, jax.core.Tracer):  # e.g. under jax.eval_shape: the type's sharding
      sharding = getattr(jax.typeof(x), "sharding", None)
    else:
      sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and dict(sharding.mesh.shape) == dict(
      mesh.shape
    ):
      return sharding.spec
    return P()

  return jax.tree.map(spec, params)


def init_specs(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  mesh: Any,
  axis_name: str | tuple[str, ...],
  param_specs: Any = None,
) -> Any:
  """The partition specs `init` gives `tx`'s state, from shapes only (nothing runs).

  State sizes may depend on axis sizes (the two-phase server residual, hierarchical chunks), so
  `tx.init` is traced inside `jax.shard_map`, where the mesh axes are bound.
  """
  return _init_specs(tx, params, mesh, axis_name, param_specs, mark=True)


def _init_specs(tx, params, mesh, axis_name, param_specs, *, mark):
  replicated = param_specs is None
  if replicated:
    param_specs = jax.tree.map(lambda _: P(), params)

  def local(fn):
    return jax.shard_map(fn, mesh=mesh, in_specs=(param_specs,), out_specs=P(), check_vma=False)

  with initialising_with(param_specs):
    state = jax.eval_shape(local(tx.init), params)
  if mark:
    state = mark_shard_specs(state, param_specs)
  if replicated:
    return state_specs(state, axis_name)
  local_params = jax.eval_shape(local(lambda p: p), params)
  return state_specs(state, axis_name, params=local_params, param_specs=param_specs)
