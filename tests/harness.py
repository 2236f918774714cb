"""Shared test harness: a jitted shard_map training step over the 1-D "data" mesh."""

import functools

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj


def shard_map_step(tx, params, mesh):
  """(replicated params, initial state, step(p, s, per_worker_grads) -> (p, s))."""
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data")),
                     out_specs=(P(), specs))
  def step(p, s, g):
    updates, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, updates), s

  put = lambda g: jax.device_put(g, NamedSharding(mesh, P("data")))
  return (jax.device_put(params, NamedSharding(mesh, P())), state,
          lambda p, s, g: step(p, s, put(g)))


def run(tx, params, grads, mesh, steps):
  """Runs `steps` steps with grads[k][t] of shape (n, *leaf); returns (params, [states])."""
  p, state, step = shard_map_step(tx, params, mesh)
  states = []
  for t in range(steps):
    p, state = step(p, state, {k: v[t] for k, v in grads.items()})
    states.append(state)
  return p, states
