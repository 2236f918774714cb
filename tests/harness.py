"""Shared test harness: a jitted shard_map training step over the 1-D "data" mesh."""

import functools

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj


def problem(shapes, n, steps, seed=0):
  """Params and per-worker gradients grads[k][t] of shape (n, *leaf): a worker-specific offset
  plus per-step noise, so workers disagree."""
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = {
    k: (rng.normal(size=(1, n) + s) + rng.normal(size=(steps, n) + s)).astype(np.float32)
    for k, s in shapes.items()
  }
  return params, grads


def shard_map_step(tx, params, mesh):
  """(replicated params, initial state, step(p, s, per_worker_grads) -> (p, s)).

  `step.jitted` is the jitted shard_map function (for compile-cache checks).
  """
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data")), out_specs=(P(), specs)
  )
  def step(p, s, g):
    updates, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, updates), s

  def stepper(p, s, g):
    return step(p, s, jax.device_put(g, NamedSharding(mesh, P("data"))))

  stepper.jitted = step
  return jax.device_put(params, NamedSharding(mesh, P())), state, stepper


def run(tx, params, grads, mesh, steps):
  """Runs `steps` steps with grads[k][t] of shape (n, *leaf); returns (params, [states])."""
  p, state, step = shard_map_step(tx, params, mesh)
  states = []
  for t in range(steps):
    p, state = step(p, state, {k: v[t] for k, v in grads.items()})
    states.append(state)
  return p, states


def run_pmap(tx, params, grads, n, steps):
  """The same run under `jax.pmap`: returns (params, state), each with a leading device axis."""
  p = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + x.shape), params)
  state = jax.pmap(tx.init, axis_name="data")(p)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  step = jax.pmap(step, axis_name="data")
  for t in range(steps):
    p, state = step(p, state, {k: v[t] for k, v in grads.items()})
  return p, state


def least_squares_error(tx, mesh, steps=400, seed=3):
  """Trains w on per-worker least squares (64 rows x 20 features each) under shard_map.

  Returns ‖w − w_true‖ / ‖w_true‖ after `steps` steps of `tx` (gradients taken w.r.t. a
  device-varying copy of the replicated parameters).
  """
  n = mesh.devices.size
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, 64, 20)).astype(np.float32)
  w_true = rng.normal(size=(20,)).astype(np.float32)
  b = a @ w_true + 0.01 * rng.normal(size=(n, 64)).astype(np.float32)
  params = {"w": np.zeros(20, np.float32)}
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data"), P("data")), out_specs=(P(), specs)
  )
  def step(p, s, a, b):
    loss = lambda p: ((a[0] @ p["w"] - b[0]) ** 2).mean()
    g = jax.grad(loss)(jax.tree.map(lambda x: jax.lax.pcast(x, "data", to="varying"), p))
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  p = jax.device_put(params, NamedSharding(mesh, P()))
  for _ in range(steps):
    p, state = step(p, state, put(a), put(b))
  return float(np.linalg.norm(np.asarray(p["w"]) - w_true) / np.linalg.norm(w_true))
