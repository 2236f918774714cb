"""The paper's baselines, 1-bit Adam and QAdam, against NumPy loops, on 8 simulated workers."""

import functools

import numpy as np
import pytest

import compams_jax as cj
from tests import harness, reference

SHAPES = {"dense": (12, 5), "bias": (5,)}
STEPS = 16


def _problem(n, seed=0):
  return harness.problem(SHAPES, n, STEPS, seed)


def _run(tx, params, grads, mesh):
  return harness.run(tx, params, grads, mesh, STEPS)


def test_onebit_adam_matches_numpy_reference_and_freezes_v(n_devices, mesh):
  params, grads = _problem(n_devices)
  tx = cj.onebit_adam(0.01, warmup_steps=5, axis_name="data")
  p, states = _run(tx, params, grads, mesh)
  want, want_m, want_v, want_err = reference.np_onebit_adam(params, grads, lr=0.01, warmup=5)
  for k in SHAPES:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(states[-1][0].mu[k], want_m[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(states[-1][0].nu[k], states[4][0].nu[k])  # frozen after warm-up
    assert not np.array_equal(states[3][0].nu[k], states[4][0].nu[k])
    np.testing.assert_allclose(
      np.asarray(states[-1][0].residual.value[k]),
      np.stack([e[k] for e in want_err]),
      rtol=1e-5,
      atol=1e-5,
    )


def test_onebit_adam_sends_one_bit_after_warmup(n_devices, mesh):
  params = {"w": np.zeros((256, 256), np.float32)}
  tx = cj.onebit_adam(0.01, warmup_steps=5, axis_name="data")
  # wire_bytes traces both branches of the phase switch: dense psum + 1-bit gather payload.
  assert cj.wire_bytes(tx, params) == 4 * 256 * 256 + 256 * 256 // 8 + 4


def test_qadam_matches_numpy_reference(n_devices, mesh):
  params, grads = _problem(n_devices, seed=1)
  tx = cj.qadam(0.01, cj.compressors.top_k(0.2), axis_name="data")
  p, _ = _run(tx, params, grads, mesh)
  want = reference.np_qadam(
    params, grads, functools.partial(reference.np_top_k, ratio=0.2), lr=0.01
  )
  for k in SHAPES:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("name", ["onebit_adam", "qadam"])
def test_baselines_converge_on_least_squares(name, n_devices, mesh):
  tx = {
    "onebit_adam": cj.onebit_adam(0.02, warmup_steps=50, axis_name="data"),
    "qadam": cj.qadam(0.02, cj.compressors.qsgd(16), axis_name="data"),
  }[name]
  assert harness.least_squares_error(tx, mesh) < 0.05
