"""Shared test harness: runs optimizers through `cj.data_parallel_step` on given per-worker
gradients, on the 1-D "data" mesh or under pmap."""

import jax.numpy as jnp
import numpy as np

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
  """Trains w on per-worker least squares (64 rows x 20 features each) with
  `cj.data_parallel_step`; returns ‖w − w_true‖ / ‖w_true‖ after `steps` steps of `tx`."""
  n = mesh.devices.size
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, 64, 20)).astype(np.float32)
  w_true = rng.normal(size=(20,)).astype(np.float32)
  b = a @ w_true + 0.01 * rng.normal(size=(n, 64)).astype(np.float32)
  loss = lambda p, batch: ((batch["a"] @ p["w"] - batch["b"]) ** 2).mean()
  dp = cj.data_parallel_step(loss, tx, mesh=mesh, axis_name="data")
  p, state = dp.init({"w": np.zeros(20, np.float32)})
  batch = {"a": a.reshape(n * 64, 20), "b": b.reshape(n * 64)}
  for _ in range(steps):
    p, state, _ = dp(p, state, batch)
  return float(np.linalg.norm(np.asarray(p["w"]) - w_true) / np.linalg.norm(w_true))
