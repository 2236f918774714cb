"""Optimizer state under `jax.shard_map`: partition specs, sharded `init`, the bytes one step
sends (from compiled HLO), and resizing per-worker state to another worker count."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from compams_jax.transforms import (
  ErrorFeedbackState,
  PerWorker,
  PowerSGDState,
  PredictiveState,
  WorkerMomentumState,
)
from compams_jax.wire import CollectiveBytes, collective_bytes


def _is_per_worker(x: Any) -> bool:
  return isinstance(x, PerWorker)


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
  collectives run over `axis_name` only. (State not shaped like the parameters, such as the
  two-phase server residual or PowerSGD's factors, is not covered on such meshes.)

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
    >>> cj.sharding.state_specs(state, "data")[0].residual
    PerWorker(value={'w': P('data',)})
  """
  if (params is None) != (param_specs is None):
    raise ValueError("state_specs: pass both params and param_specs, or neither.")
  if params is None:

    def spec(node):
      if _is_per_worker(node):
        return PerWorker(jax.tree.map(lambda _: P(axis_name), node.value))
      return P()

    return jax.tree.map(spec, opt_state, is_leaf=_is_per_worker)

  treedef = jax.tree.structure(params)
  shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
  spec_leaves = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  if len(spec_leaves) != len(shapes):
    raise ValueError(f"state_specs: {len(spec_leaves)} param_specs for {len(shapes)} params.")

  def like_params(node, drop_leading: bool) -> bool:
    try:
      if jax.tree.structure(node) != treedef:
        return False
    except Exception:  # pylint: disable=broad-except
      return False
    got = [tuple(x.shape)[1:] if drop_leading else tuple(x.shape) for x in jax.tree.leaves(node)]
    return got == shapes

  def param_like(node, prefix: tuple) -> Any:
    return jax.tree.unflatten(treedef, [P(*prefix, *s) for s in spec_leaves])

  def walk(node, per_worker: bool) -> Any:
    prefix = (axis_name,) if per_worker else ()
    if node is None:
      return None
    if like_params(node, drop_leading=per_worker):
      return param_like(node, prefix)
    if _is_per_worker(node):
      return PerWorker(walk(node.value, True))
    if isinstance(node, (list, tuple, dict)) or hasattr(node, "_fields"):
      children, sub = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
      return jax.tree_util.tree_unflatten(sub, [walk(c, per_worker) for c in children])
    return P(*prefix)

  return walk(opt_state, False)


def init(
  tx: optax.GradientTransformation, params: Any, *, mesh: jax.sharding.Mesh, axis_name: str
) -> Any:
  """Initialises `tx`'s state for every worker of `mesh`'s `axis_name` (global view).

  Per-worker leaves come out stacked along a leading axis of size n (sharded over the axis);
  the rest replicated. `params` must be replicated over the data axis.

  Args:
    tx: the optimizer.
    params: the (replicated) parameters.
    mesh: the device mesh.
    axis_name: the mesh axis indexing workers.

  Returns:
    The optimizer state, sharded as `state_specs(state, axis_name)` says.

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> tx = cj.comp_ams(1e-3, cj.compressors.top_k(0.1), axis_name="data")
    >>> state = cj.sharding.init(tx, {"w": jnp.zeros(4)}, mesh=mesh, axis_name="data")
    >>> state[0].residual.value["w"].shape == (jax.device_count(), 4)
    True
  """
  specs = state_specs(jax.eval_shape(tx.init, params), axis_name)
  param_specs = jax.tree.map(lambda _: P(), params)
  return jax.jit(
    jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,), out_specs=specs, check_vma=False)
  )(params)


def step_bytes(
  tx: optax.GradientTransformation, params: Any, *, mesh: jax.sharding.Mesh, axis_name: str
) -> CollectiveBytes:
  """What one optimizer step sends per device, read from its compiled HLO; nothing is allocated.

  Compiles `tx.update` followed by `optax.apply_updates` under `jax.shard_map` over `axis_name`
  (one gradient per worker, replicated parameters, state sharded as `state_specs` says) from
  abstract shapes only, so it works for models too large to instantiate on this host.

  Args:
    tx: the optimizer.
    params: the parameters, or their shapes (`jax.ShapeDtypeStruct`s).
    mesh: the device mesh.
    axis_name: the mesh axis indexing workers.

  Returns:
    The `cj.CollectiveBytes` of the compiled step (`.total`: bytes per device per step).

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    >>> params = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    >>> tx = cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name="data")
    >>> cj.sharding.step_bytes(tx, params, mesh=mesh, axis_name="data").total  # 1000 sign bits + f32 scale
    129
  """
  n = mesh.shape[axis_name]
  state = jax.eval_shape(lambda p: init(tx, p, mesh=mesh, axis_name=axis_name), params)
  specs = state_specs(state, axis_name)

  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P(axis_name)), out_specs=(P(), specs)
  )
  def step(p, s, g):
    updates, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, updates), s

  def shape(x, lead, spec):
    return jax.ShapeDtypeStruct(lead + tuple(x.shape), x.dtype, sharding=NamedSharding(mesh, spec))

  return collective_bytes(
    jax.jit(step),
    jax.tree.map(lambda x: shape(x, (), P()), params),
    jax.tree.map(lambda x, sp: shape(x, (), sp), state, specs),
    jax.tree.map(lambda x: shape(x, (n,), P(axis_name)), params),
  )


def _regroup(x: Any, num_workers: int) -> Any:
  """(n_old, ...) → (num_workers, ...) with the same sum over the leading axis.

  Growing pads with zero residuals; shrinking adds worker i's residual to worker i mod n_new.
  """
  x = jnp.asarray(x)
  n_old = x.shape[0]
  if num_workers >= n_old:
    return jnp.concatenate([x, jnp.zeros((num_workers - n_old,) + x.shape[1:], x.dtype)])
  groups = -(-n_old // num_workers)
  padded = jnp.concatenate([x, jnp.zeros((groups * num_workers - n_old,) + x.shape[1:], x.dtype)])
  return padded.reshape((groups, num_workers) + x.shape[1:]).sum(axis=0).astype(x.dtype)


def resize_workers(opt_state: Any, num_workers: int) -> Any:
  """Redistributes an optimizer state (global view) to a different number of workers.

  Error-feedback residuals (of `error_feedback`/`comp_ams` with the gather topology and of
  `powersgd`) are what the average still owes; they are regrouped so that their SUM over
  workers — what the next averages see — is preserved: a grown run gives the new workers zero
  residuals, a shrunk one adds worker i's residual to worker i mod n. Replicated state (AMSGrad
  moments, counters) is kept as it is. Per-worker state with no such invariant — predictive
  encoder reconstructions (the receivers' average must stay the mean of the senders'), worker
  momentum, the two-phase server residuals (tied to the chunk layout) — is refused with a
  ValueError.

  Args:
    opt_state: the optimizer state in its global view (per-worker leaves stacked on axis 0).
    num_workers: the new number of workers.

  Returns:
    The state with every per-worker leaf's leading axis of size `num_workers`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.comp_ams(1e-3, cj.compressors.top_k(0.5))
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> state = state[0]._replace(residual=cj.PerWorker({"w": jnp.arange(8.0).reshape(4, 2)}))
    >>> cj.sharding.resize_workers((state,), 2)[0].residual.value["w"]
    Array([[ 4.,  6.],
           [ 8., 10.]], dtype=float32)
  """
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f"num_workers must be a positive int, got {num_workers!r}.")
  refuse = {
    PredictiveState: "predictive encoder reconstructions",
    WorkerMomentumState: "per-worker momentum",
  }

  def is_node(x):
    return isinstance(x, (ErrorFeedbackState, PowerSGDState, PerWorker, *refuse))

  def visit(node):
    if isinstance(node, tuple(refuse)):
      raise ValueError(
        f"cannot resume {type(node).__name__} on a different number of workers: "
        f"its {refuse[type(node)]} have no sum to preserve. Resume with the "
        "original worker count."
      )
    if isinstance(node, ErrorFeedbackState) and node.server_residual is not None:
      raise ValueError(
        "cannot resume the two-phase topology on a different number of workers: "
        "its server residuals belong to the chunk layout of the old count."
      )
    if isinstance(node, (ErrorFeedbackState, PowerSGDState)):
      return node._replace(
        residual=PerWorker(jax.tree.map(lambda x: _regroup(x, num_workers), node.residual.value))
      )
    if isinstance(node, PerWorker):
      raise ValueError(
        "cannot redistribute per-worker state of an unknown transformation to a "
        "different number of workers."
      )
    return node

  return jax.tree.map(visit, opt_state, is_leaf=is_node)
