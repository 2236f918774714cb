"""The bytes one optimizer step sends per device, read from its compiled HLO."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from compams_jax.sharding._specs import init, init_specs
from compams_jax.wire import CollectiveBytes, collective_bytes


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
    axis_name: the mesh axis indexing workers, or a tuple of axes (hierarchical meshes).

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
  return collective_bytes(compile_step(tx, params, mesh=mesh, axis_name=axis_name))


def compile_step(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  mesh: jax.sharding.Mesh,
  axis_name: str | tuple[str, ...],
) -> jax.stages.Compiled:
  """One optimizer step (`tx.update` + `optax.apply_updates`) compiled from abstract shapes.

  Every worker gets its own gradient, the parameters are replicated and the state is sharded as
  `cj.sharding.init` lays it out. Nothing is allocated, so it serves models too large for this
  host: read `.memory_analysis()` and the HLO (`cj.collective_bytes`) of the result.

  Args:
    tx: the optimizer.
    params: the parameters, or their shapes (`jax.ShapeDtypeStruct`s).
    mesh: the device mesh.
    axis_name: the mesh axis (or axes) indexing workers.

  Returns:
    The `jax.stages.Compiled` step `(params, state, grads) -> (params, state)`, grads with a
    leading axis of the workers.
  """
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  n = math.prod(mesh.shape[a] for a in names)
  specs = init_specs(tx, params, mesh=mesh, axis_name=axis_name)
  state = jax.eval_shape(lambda p: init(tx, p, mesh=mesh, axis_name=axis_name), params)

  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P(axis_name)), out_specs=(P(), specs)
  )
  def step(p, s, g):
    updates, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, updates), s

  def shape(x, lead, spec):
    return jax.ShapeDtypeStruct(lead + tuple(x.shape), x.dtype, sharding=NamedSharding(mesh, spec))

  return (
    jax.jit(step, donate_argnums=(0, 1))
    .lower(
      jax.tree.map(lambda x: shape(x, (), P()), params),
      jax.tree.map(lambda x, sp: shape(x, (), sp), state, specs),
      jax.tree.map(lambda x: shape(x, (n,), P(axis_name)), params),
    )
    .compile()
  )
