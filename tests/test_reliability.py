"""Reliability: non-finite gradients skip the step on every worker; elastic worker counts."""

import jax
import numpy as np
import optax
import pytest

import compams_jax as cj
from tests import harness

SHAPES = {"w": (6, 5), "b": (5,)}


def _grads(n, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {k: rng.normal(size=(n,) + s).astype(np.float32) for k, s in SHAPES.items()}
    for _ in range(steps)
  ]


def _runner(tx, mesh):
  return harness.shard_map_step(tx, {k: np.ones(s, np.float32) for k, s in SHAPES.items()}, mesh)


def _equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
  "compressor",
  [cj.compressors.top_k(0.2), cj.compressors.block_sign(), cj.compressors.qsgd(8)],
  ids=["top_k", "sign", "qsgd"],
)
def test_nonfinite_on_one_worker_skips_the_step_everywhere(bad, compressor, n_devices, mesh):
  tx = cj.skip_nonfinite(cj.comp_ams(0.1, compressor, axis_name="data"), axis_name="data")
  grads = _grads(n_devices, 4)
  poisoned = {k: v.copy() for k, v in grads[2].items()}
  poisoned["w"][5, 1, 2] = bad  # one entry on worker 5 only
  p, s, step = _runner(tx, mesh)
  for g in grads[:2]:
    p, s = step(p, s, g)
  p_bad, s_bad = step(p, s, poisoned)
  # The state after the bad step equals the state before it, on every worker; one skip counted.
  _equal(p_bad, p)
  _equal(s_bad.inner_state, s.inner_state)
  assert int(s_bad.skipped) == 1 and not bool(s_bad.last_finite)
  # Training then continues exactly as if the bad step had never happened.
  p_next, s_next = step(p_bad, s_bad, grads[3])
  p_ref, s_ref = step(p, s, grads[3])
  _equal(p_next, p_ref)
  _equal(s_next.inner_state, s_ref.inner_state)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((p_next, s_next)))


def test_skip_nonfinite_composes_with_apply_if_finite_under_pmap(n_devices):
  # optax.apply_if_finite decides per worker with a lax.cond. Outside skip_nonfinite the devices
  # would disagree on entering the collectives (XLA aborts); inside, it only ever sees the
  # cleaned, finite updates. Under jax.shard_map its branches differ in device variance and it
  # does not trace at all, so this composition is for pmap.
  tx = cj.skip_nonfinite(
    optax.apply_if_finite(
      cj.comp_ams(0.1, cj.compressors.top_k(0.2), axis_name="data"), max_consecutive_errors=3
    ),
    axis_name="data",
  )
  grads = _grads(n_devices, 2)
  grads[1]["b"][0, 0] = np.nan
  params = {k: np.ones((n_devices,) + s, np.float32) for k, s in SHAPES.items()}
  state = jax.pmap(tx.init, axis_name="data")(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.pmap(step, axis_name="data")
  p1, s1 = step(params, state, grads[0])
  p2, s2 = step(p1, s1, grads[1])
  _equal(p2, p1)
  np.testing.assert_array_equal(np.asarray(s2.skipped), 1)  # on every device
  assert int(np.asarray(s2.inner_state.notfinite_count).max()) == 0  # never saw a NaN


def test_unprotected_nan_poisons_the_residual(n_devices, mesh):
  """Why the wrapper exists: without it one worker's NaN reaches every worker's parameters."""
  grads = _grads(n_devices, 1)
  grads[0]["w"][5, 0, 0] = np.nan
  p, s, step = _runner(cj.comp_ams(0.1, cj.compressors.block_sign(), axis_name="data"), mesh)
  p, s = step(p, s, grads[0])
  assert np.isnan(np.asarray(p["w"])).any()


@pytest.mark.parametrize("new_n", [2, 3, 8, 12])
def test_resize_workers_preserves_the_residual_sum(new_n):
  rng = np.random.default_rng(0)
  tx = cj.comp_ams(1e-3, cj.compressors.top_k(0.2))
  state = tx.init({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
  old = {k: rng.normal(size=(6,) + s).astype(np.float32) for k, s in SHAPES.items()}
  state = (state[0]._replace(residual=state[0].residual.replace(old)),) + state[1:]
  resized = cj.sharding.resize_workers(state, new_n)
  for k in SHAPES:
    new = np.asarray(resized[0].residual.value[k])
    assert new.shape == (new_n,) + SHAPES[k]
    np.testing.assert_allclose(new.sum(0), old[k].sum(0), rtol=1e-6, atol=1e-6)
  _equal(resized[1], state[1])  # replicated AMSGrad state untouched


@pytest.mark.parametrize(
  "make,match",
  [
    (
      lambda: cj.predictive_compression(cj.compressors.top_k(0.2)),
      "predictive encoder reconstructions",
    ),
    (lambda: cj.compressed_momentum_sgd(0.1, cj.compressors.top_k(0.2)), "per-worker momentum"),
    (
      lambda: cj.comp_ams(
        0.1, cj.compressors.block_sign(), axis_name="data", wire=cj.wire.two_phase()
      ),
      "two-phase",
    ),
  ],
)
def test_resize_workers_refuses_state_without_an_invariant(make, match, mesh):
  params = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
  state = cj.sharding.init(make(), params, mesh=mesh, axis_name="data")
  with pytest.raises(ValueError, match=match):
    cj.sharding.resize_workers(state, 2)
