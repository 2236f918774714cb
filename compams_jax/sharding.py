"""Partition specs for optimizer state under `jax.shard_map`, and a sharded `init`."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P

from compams_jax.transforms import PerWorker


def _is_per_worker(x: Any) -> bool:
  return isinstance(x, PerWorker)


def state_specs(opt_state: Any, axis_name: str) -> Any:
  """PartitionSpecs for an optimizer state: per-worker leaves sharded over `axis_name`.

  Leaves inside a `PerWorker` (error residuals, encoder state) get `P(axis_name)`: their leading
  worker axis is split over the data axis. Every other leaf (AMSGrad moments, counts, decoder
  state) is replicated, `P()`.

  Args:
    opt_state: an optimizer state, or its abstract shape (`jax.eval_shape(tx.init, params)`).
    axis_name: the mesh axis indexing workers.

  Returns:
    A pytree of `PartitionSpec`s with the structure of `opt_state`.

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name="data")
    >>> state = jax.eval_shape(tx.init, {"w": jnp.zeros(3)})
    >>> cj.sharding.state_specs(state, "data")[0].residual
    PerWorker(value={'w': P('data',)})
  """
  def spec(node):
    if _is_per_worker(node):
      return PerWorker(jax.tree.map(lambda _: P(axis_name), node.value))
    return P()
  return jax.tree.map(spec, opt_state, is_leaf=_is_per_worker)


def init(tx: optax.GradientTransformation, params: Any, *, mesh: jax.sharding.Mesh,
         axis_name: str) -> Any:
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
  return jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,), out_specs=specs,
                               check_vma=False))(params)
