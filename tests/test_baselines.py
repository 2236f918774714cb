"""The paper's baselines, 1-bit Adam and QAdam, against NumPy loops, on 8 simulated workers."""

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import harness, reference

SHAPES = {"dense": (12, 5), "bias": (5,)}
STEPS = 16


def _problem(n, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = {k: (rng.normal(size=(1, n) + s) + rng.normal(size=(STEPS, n) + s)).astype(np.float32)
           for k, s in SHAPES.items()}
  return params, grads


def _run(tx, params, grads, mesh):
  return harness.run(tx, params, grads, mesh, STEPS)


def test_onebit_adam_matches_numpy_reference_and_freezes_v(n_devices, mesh):
  params, grads = _problem(n_devices)
  tx = cj.onebit_adam(0.01, warmup_steps=5, axis_name="data")
  p, states = _run(tx, params, grads, mesh)
  want, want_m, want_v, want_err = reference.np_onebit_adam(params, grads, lr=0.01, warmup=5)
  for k in SHAPES:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(states[-1].mu[k], want_m[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(states[-1].nu[k], states[4].nu[k])  # frozen after warm-up
    assert not np.array_equal(states[3].nu[k], states[4].nu[k])
    np.testing.assert_allclose(np.asarray(states[-1].residual.value[k]),
                               np.stack([e[k] for e in want_err]), rtol=1e-5, atol=1e-5)


def test_onebit_adam_sends_one_bit_after_warmup(n_devices, mesh):
  params = {"w": np.zeros((256, 256), np.float32)}
  tx = cj.onebit_adam(0.01, warmup_steps=5, axis_name="data")
  # wire_bytes traces both branches of the phase switch: dense psum + 1-bit gather payload.
  assert cj.wire_bytes(tx, params) == 4 * 256 * 256 + 256 * 256 // 8 + 4


def test_qadam_matches_numpy_reference(n_devices, mesh):
  params, grads = _problem(n_devices, seed=1)
  tx = cj.qadam(0.01, cj.compressors.top_k(0.2), axis_name="data")
  p, _ = _run(tx, params, grads, mesh)
  want = reference.np_qadam(params, grads, functools.partial(reference.np_top_k, ratio=0.2),
                            lr=0.01)
  for k in SHAPES:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("name", ["onebit_adam", "qadam"])
def test_baselines_converge_on_least_squares(name, n_devices, mesh):
  rng = np.random.default_rng(3)
  a = rng.normal(size=(n_devices, 64, 20)).astype(np.float32)
  w_true = rng.normal(size=(20,)).astype(np.float32)
  b = a @ w_true + 0.01 * rng.normal(size=(n_devices, 64)).astype(np.float32)
  tx = {"onebit_adam": cj.onebit_adam(0.02, warmup_steps=50, axis_name="data"),
        "qadam": cj.qadam(0.02, cj.compressors.qsgd(16), axis_name="data")}[name]
  params = {"w": np.zeros(20, np.float32)}
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data"), P("data")),
                     out_specs=(P(), specs))
  def step(p, s, a, b):
    loss = lambda p: ((a[0] @ p["w"] - b[0]) ** 2).mean()
    g = jax.grad(loss)(jax.tree.map(lambda x: jax.lax.pcast(x, "data", to="varying"), p))
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  p = jax.device_put(params, NamedSharding(mesh, P()))
  for _ in range(400):
    p, state = step(p, state, put(a), put(b))
  assert np.linalg.norm(np.asarray(p["w"]) - w_true) < 0.05 * np.linalg.norm(w_true)
