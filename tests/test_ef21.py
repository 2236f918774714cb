"""Closing the early gap: COMP-AMS with EF21 feedback and with a dense warm-up, against
independent NumPy loops on 8 simulated workers."""

import functools

import numpy as np
import pytest

import compams_jax as cj
from tests import harness, reference

STEPS = 16
LR = 0.05
SHAPES = {"conv": (3, 3, 2, 4), "dense": (24, 10), "bias": (10,)}


def np_ef21_comp_ams(params, grads, compress, *, lr, b1=0.9, b2=0.999, eps=1e-8):
  """EF21 (Richtárik et al. 2021) feeding AMSGrad with the paper's flags.

  Worker i keeps ĝ_i (0 at first) and sends c_i = C(g_i − ĝ_i), then ĝ_i ← ĝ_i + c_i; every
  receiver keeps ĝ = (1/n) Σ ĝ_i through ĝ ← ĝ + (1/n) Σ c_i, which drives AMSGrad.
  """
  theta = {k: np.array(v, np.float64) for k, v in params.items()}
  steps, n = next(iter(grads.values())).shape[:2]
  est = {k: np.zeros((n,) + v.shape) for k, v in theta.items()}
  avg = {k: np.zeros(v.shape) for k, v in theta.items()}
  m = {k: np.zeros(v.shape) for k, v in theta.items()}
  v_ = {k: np.zeros(v.shape) for k, v in theta.items()}
  vhat = {k: np.zeros(v.shape) for k, v in theta.items()}
  for t in range(steps):
    for k in theta:
      sent = np.stack(
        [compress((grads[k][t, i] - est[k][i]).astype(np.float32)) for i in range(n)]
      ).astype(np.float64)
      est[k] = est[k] + sent
      avg[k] = avg[k] + sent.mean(axis=0)
      m[k] = b1 * m[k] + (1 - b1) * avg[k]
      v_[k] = b2 * v_[k] + (1 - b2) * avg[k] ** 2
      vhat[k] = np.maximum(vhat[k], v_[k])
      theta[k] = theta[k] - lr * m[k] / np.sqrt(vhat[k] + eps)
  return theta, est, avg


CASES = {
  "top_k": (lambda: cj.compressors.top_k(0.1), functools.partial(reference.np_top_k, ratio=0.1)),
  "block_sign": (cj.compressors.block_sign, reference.np_block_sign),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ef21_matches_numpy_reference(name, n_devices, mesh):
  make, np_compress = CASES[name]
  params, grads = harness.problem(SHAPES, n_devices, STEPS, seed=3)
  tx = cj.comp_ams(LR, make(), axis_name="data", feedback="ef21")
  got, states = harness.run(tx, params, grads, mesh, STEPS)
  want, want_est, want_avg = np_ef21_comp_ams(params, grads, np_compress, lr=LR)
  state = states[-1][0]
  assert state.residual is None  # EF21 keeps no residual, only the shared estimate
  for k in SHAPES:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(
      np.asarray(state.reconstruction.value[k]), want_est[k], rtol=1e-4, atol=1e-5, err_msg=k
    )
    np.testing.assert_allclose(np.asarray(state.average[k]), want_avg[k], rtol=1e-4, atol=1e-5)
  assert max(np.abs(want[k] - params[k]).max() for k in SHAPES) > 0.05  # it moved


def test_feedback_options_and_bytes():
  params = {"w": np.zeros(1000, np.float32)}
  c = cj.compressors.top_k(0.01)
  same = {
    f: cj.wire_bytes(cj.comp_ams(1e-3, c, axis_name="data", feedback=f), params)
    for f in ("ef", "ef21", "none")
  }
  assert len(set(same.values())) == 1  # EF21 sends exactly the payload of error feedback
  with pytest.raises(ValueError, match="feedback"):
    cj.comp_ams(1e-3, c, feedback="ef22")
  with pytest.raises(ValueError, match="predictor"):
    cj.comp_ams(1e-3, c, feedback="ef21", predictor=cj.predictors.least_squares())


def np_warmup_comp_ams(params, grads, compress, warmup, *, lr, b1=0.9, b2=0.999, eps=1e-8):
  """COMP-AMS whose first `warmup` steps average the dense gradients (residuals stay 0)."""
  theta = {k: np.array(v, np.float64) for k, v in params.items()}
  steps, n = next(iter(grads.values())).shape[:2]
  err = {k: np.zeros((n,) + v.shape) for k, v in theta.items()}
  m = {k: np.zeros(v.shape) for k, v in theta.items()}
  v_ = {k: np.zeros(v.shape) for k, v in theta.items()}
  vhat = {k: np.zeros(v.shape) for k, v in theta.items()}
  for t in range(steps):
    for k in theta:
      if t < warmup:
        avg = grads[k][t].astype(np.float64).mean(axis=0)
      else:
        corrected = grads[k][t] + err[k]
        sent = np.stack([compress(c.astype(np.float32)) for c in corrected]).astype(np.float64)
        err[k] = corrected - sent
        avg = sent.mean(axis=0)
      m[k] = b1 * m[k] + (1 - b1) * avg
      v_[k] = b2 * v_[k] + (1 - b2) * avg**2
      vhat[k] = np.maximum(vhat[k], v_[k])
      theta[k] = theta[k] - lr * m[k] / np.sqrt(vhat[k] + eps)
  return theta, err


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_warmup_matches_numpy_reference(name, n_devices, mesh):
  make, np_compress = CASES[name]
  params, grads = harness.problem(SHAPES, n_devices, STEPS, seed=4)
  tx = cj.comp_ams(LR, make(), axis_name="data", dense_warmup_steps=5)
  got, states = harness.run(tx, params, grads, mesh, STEPS)
  want, want_err = np_warmup_comp_ams(params, grads, np_compress, 5, lr=LR)
  residual = states[-1][0].inner_state.residual.value
  assert not np.any(np.asarray(states[3][0].inner_state.residual.value["dense"]))  # warm-up
  for k in SHAPES:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(np.asarray(residual[k]), want_err[k], rtol=1e-4, atol=1e-5)


def test_annealed_top_k_matches_numpy_reference(n_devices, mesh):
  """compressor_stages: top-k 50% for 3 steps, 25% for 4, then 10%, one shared residual."""
  params, grads = harness.problem(SHAPES, n_devices, STEPS, seed=5)
  c = cj.compressors
  tx = cj.comp_ams(
    LR, c.top_k(0.1), axis_name="data", compressor_stages=[(3, c.top_k(0.5)), (4, c.top_k(0.25))]
  )
  got, states = harness.run(tx, params, grads, mesh, STEPS)
  ratios = [0.5] * 3 + [0.25] * 4 + [0.1] * (STEPS - 7)
  compress = [functools.partial(reference.np_top_k, ratio=r) for r in ratios]
  want, want_err, _ = reference.np_comp_ams(params, grads, compress, lr=LR)
  residual = states[-1][0].inner_state.residual.value
  for k in SHAPES:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(np.asarray(residual[k]), want_err[k], rtol=1e-4, atol=1e-5)


def test_staged_refuses_bad_stages():
  c = cj.compressors
  with pytest.raises(ValueError, match="one boundary fewer"):
    cj.staged([cj.error_feedback(c.top_k(0.5))], [3])
  with pytest.raises(ValueError, match="increasing"):
    cj.staged([cj.error_feedback(c.top_k(0.5)), cj.error_feedback(c.top_k(0.1))], [0])
  with pytest.raises(ValueError, match="positive"):
    cj.comp_ams(1e-3, c.top_k(0.1), compressor_stages=[(0, c.top_k(0.5))])
  tx = cj.staged([cj.error_feedback(c.top_k(0.5)), cj.compressed_mean(c.top_k(0.1))], [2])
  with pytest.raises(ValueError, match="state differs"):
    tx.init({"w": np.zeros(8, np.float32)})
