"""Shared test harness: runs optimizers through `cj.data_parallel_step` on given per-worker
gradients, on the 1-D "data" mesh or under pmap; trains least squares in one scanned program."""

import functools

import jax
import jax.numpy as jnp
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


def _linear_loss(p, g):
  """Σ_k ⟨p_k, g_k⟩: its gradient is exactly this worker's gradient g (a batch of one row)."""
  return sum(jnp.vdot(p[k], g[k][0]) for k in p)


class _Stepper:
  """step(p, s, per_worker_grads) -> (p, s) over `cj.data_parallel_step`."""

  def __init__(self, dp):
    self.dp = dp

  def __call__(self, p, s, g):
    p, s, _ = self.dp(p, s, g)
    return p, s

  @property
  def jitted(self):
    """The jitted shard_map step (for compile-cache checks)."""
    (fn,) = self.dp.__dict__["_jits"].values()
    return fn


def shard_map_step(tx, params, mesh):
  """(replicated params, initial state, step(p, s, per_worker_grads) -> (p, s)), the step built
  by `cj.data_parallel_step` with a loss whose gradient is the given per-worker gradient."""
  dp = cj.data_parallel_step(_linear_loss, tx, mesh=mesh, axis_name="data", donate=False)
  p, state = dp.init(params)
  return p, state, _Stepper(dp)


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
  dp = cj.data_parallel_step(_linear_loss, tx, mode="pmap", num_workers=n, donate=False)
  p, state = dp.init(params)
  for t in range(steps):
    p, state, _ = dp(p, state, {k: v[t] for k, v in grads.items()})
  return p, state


def least_squares_error(tx, mesh, steps=400, seed=3):
  """Trains w on per-worker least squares (64 rows x 20 features each) under `jax.shard_map`;
  returns ‖w − w_true‖ / ‖w_true‖ after `steps` steps of `tx`.

  The steps run as one jitted `lax.scan` (one compile, no per-step dispatch); each is the step
  `cj.data_parallel_step` builds: the gradient with respect to a device-varying copy of the
  replicated params (this worker's own gradient), `tx.update`, `optax.apply_updates`.
  """
  n = mesh.devices.size
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, 64, 20)).astype(np.float32)
  w_true = rng.normal(size=(20,)).astype(np.float32)
  b = a @ w_true + 0.01 * rng.normal(size=(n, 64)).astype(np.float32)
  params = {"w": np.zeros(20, np.float32)}
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  def loss(p, a, b):
    return ((a @ p["w"] - b) ** 2).mean()

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data"), P("data")), out_specs=P()
  )
  def train(p, s, a, b):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(jax.lax.pcast(p, "data", to="varying"), a[0], b[0])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (p, s), length=steps)[0][0]

  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  w = np.asarray(train(put(params, P()), state, put(a, P("data")), put(b, P("data")))["w"])
  return float(np.linalg.norm(w - w_true) / np.linalg.norm(w_true))
