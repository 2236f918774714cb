"""Predictive (innovation) compression (Adikari & Draper 2021) on 8 simulated workers.

Checked against an independent NumPy loop of the scheme (tests/reference.py `np_predictive`),
for sender/receiver agreement, for the distortion it saves on correlated sequences at equal
wire bytes, and end to end in `compressed_momentum_sgd` and `comp_ams`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import reference

BETA = 0.9

# ---------------------------------------------------------------------------------------------
# Data and runners.
# ---------------------------------------------------------------------------------------------


def _momentum_sequence(shapes, steps, n, seed, beta=BETA, sigma=1.0):
  """Per worker x_t = β x_{t−1} + g_t with g_t = μ + μ_i + σ·noise: strongly correlated in t."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in shapes.items():
    mu = rng.normal(size=(1,) + s) + 0.5 * rng.normal(size=(n,) + s)
    m, seq = np.zeros((n,) + s), []
    for _ in range(steps):
      m = beta * m + mu + sigma * rng.normal(size=(n,) + s)
      seq.append(m)
    out[k] = np.stack(seq).astype(np.float32)
  return out


def _white(shapes, steps, n, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(steps, n) + s).astype(np.float32) for k, s in shapes.items()}


def _time_specs(specs):
  """Specs of a state stacked over time (a new leading axis, not sharded)."""
  return jax.tree.map(lambda s: P(None, *s), specs, is_leaf=lambda s: isinstance(s, P))


# Cheaper XLA compiles for the runs whose exact rounding does not matter (distortion,
# convergence): compile time, not run time, dominates these tests on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class _Sharded:
  """Runs `tx.update` for T steps under `jax.shard_map` (8 workers), one compile per tx.

  Called with xs: dict of (T, n, *shape). Returns (outputs stacked over t, replicated;
  states after every step stacked over t, global view: PerWorker leaves (T, n, *shape)).
  """

  def __init__(self, tx, like, mesh, compiler_options=None):
    self.mesh = mesh
    self.compiler_options = compiler_options
    self._compiled = None
    self.state = cj.sharding.init(tx, like, mesh=mesh, axis_name="data")
    specs = cj.sharding.state_specs(self.state, "data")

    @jax.jit
    @functools.partial(
      jax.shard_map,
      mesh=mesh,
      in_specs=(specs, P(None, "data")),
      out_specs=(P(), _time_specs(specs)),
    )
    def run(s, xs):
      def body(s, x):
        out, s = tx.update(jax.tree.map(lambda a: a[0], x), s)
        return s, (out, s)

      return jax.lax.scan(body, s, xs)[1]

    self._run = run

  def __call__(self, xs):
    xs = jax.device_put(xs, NamedSharding(self.mesh, P(None, "data")))
    if self._compiled is None:
      self._compiled = self._run.lower(self.state, xs).compile(self.compiler_options)
    return jax.tree.map(np.asarray, self._compiled(self.state, xs))


def _run_single(tx, xs):
  """One worker (axis_name=None): xs dict of (T, *shape). Returns (outputs, states) over t."""

  def run(xs):
    def body(s, x):
      out, s = tx.update(x, s)
      return s, (out, s)

    return jax.lax.scan(body, tx.init(jax.tree.map(lambda a: a[0], xs)), xs)[1]

  return jax.tree.map(np.asarray, jax.jit(run)(xs))


def _run_pmap(tx, xs, n):
  """Under jax.pmap: per step the (n, ...) outputs and states (PerWorker leaves (n, 1, ...))."""
  like = {k: np.zeros((n,) + v.shape[2:], np.float32) for k, v in xs.items()}
  state = jax.pmap(tx.init, axis_name="data")(like)
  step = jax.pmap(tx.update, axis_name="data")
  steps = next(iter(xs.values())).shape[0]
  outs, states = [], []
  for t in range(steps):
    out, state = step({k: v[t] for k, v in xs.items()}, state)
    outs.append(jax.tree.map(np.asarray, out))
    states.append(jax.tree.map(np.asarray, state))
  return outs, states


def _distortion(outs, xs):
  """Σ_t ‖x̄̂_t − x̄_t‖² / Σ_t ‖x̄_t‖², x̄_t the mean over workers of the true vectors."""
  num = den = 0.0
  for k in xs:
    truth = xs[k].astype(np.float64).mean(axis=1)
    num += np.sum((np.asarray(outs[k], np.float64) - truth) ** 2)
    den += np.sum(truth**2)
  return num / den


def _predictive(compressor, predictor, ef, axis_name="data"):
  return cj.predictive_compression(
    compressor, predictor=predictor, feedback="ef" if ef else "none", axis_name=axis_name
  )


# ---------------------------------------------------------------------------------------------
# 1. Against the independent NumPy loop of the scheme.
# ---------------------------------------------------------------------------------------------

REF_SHAPES = {"kernel": (6, 4, 3), "bias": (9,)}
REF_STEPS = 24
REF_RATIO = 0.25
PREDICTORS = {
  "fixed": (lambda: cj.predictors.fixed(BETA), BETA),
  "least_squares": (cj.predictors.least_squares, None),
}


def _check_against_reference(outs, recon, residual, xs, rho, ef):
  want_outs, want_recon, want_err, want_rho = reference.np_predictive(
    xs, functools.partial(reference.np_top_k, ratio=REF_RATIO), rho=rho, error_feedback=ef
  )
  for k in xs:
    scale = float(np.abs(xs[k]).max())
    for t in range(REF_STEPS):
      np.testing.assert_allclose(
        outs[t][k], want_outs[t][k], rtol=1e-5, atol=1e-5 * scale, err_msg=f"{k} output at step {t}"
      )
    np.testing.assert_allclose(
      recon[k], want_recon[k], rtol=1e-5, atol=1e-5 * scale, err_msg=f"{k} reconstructions"
    )
    if ef:
      np.testing.assert_allclose(
        residual[k], want_err[k], rtol=1e-5, atol=1e-5 * scale, err_msg=f"{k} residuals"
      )
  if rho is None:
    # The least-squares ρ really varies per leaf and over time (not a constant in disguise).
    rhos = np.array([[r[k] for k in xs] for r in want_rho[1:]])
    assert np.ptp(rhos) > 0.05 and np.all(np.abs(rhos) < 2.0)
  # The scheme really compressed: the output is not the exact mean.
  assert max(np.abs(want_outs[-1][k] - xs[k][-1].mean(0)).max() for k in xs) > 1e-2


@pytest.mark.parametrize("ef", [False, True], ids=["no_ef", "ef"])
@pytest.mark.parametrize("pred", sorted(PREDICTORS))
def test_matches_numpy_reference_shard_map(pred, ef, n_devices, mesh):
  make, rho = PREDICTORS[pred]
  xs = _momentum_sequence(REF_SHAPES, REF_STEPS, n_devices, seed=3)
  tx = _predictive(cj.compressors.top_k(REF_RATIO), make(), ef)
  like = {k: np.zeros(s, np.float32) for k, s in REF_SHAPES.items()}
  outs, states = _Sharded(tx, like, mesh)(xs)
  outs_t = [{k: outs[k][t] for k in xs} for t in range(REF_STEPS)]
  recon = {k: v[-1] for k, v in states.reconstruction.value.items()}  # (n, *shape)
  residual = None if not ef else {k: v[-1] for k, v in states.residual.value.items()}
  assert (states.residual is None) == (not ef)
  np.testing.assert_array_equal(states.count, np.arange(1, REF_STEPS + 1))
  for k in xs:  # the replicated average state is the output
    np.testing.assert_array_equal(states.average[k], outs[k])
  _check_against_reference(outs_t, recon, residual, xs, rho, ef)


def test_matches_numpy_reference_pmap(n_devices):
  xs = _momentum_sequence(REF_SHAPES, REF_STEPS, n_devices, seed=4)
  tx = _predictive(cj.compressors.top_k(REF_RATIO), cj.predictors.least_squares(), True)
  outs, states = _run_pmap(tx, xs, n_devices)
  outs_t = [{k: o[k][0] for k in xs} for o in outs]
  recon = {k: v[:, 0] for k, v in states[-1].reconstruction.value.items()}  # (n, 1, ...)
  residual = {k: v[:, 0] for k, v in states[-1].residual.value.items()}
  _check_against_reference(outs_t, recon, residual, xs, None, True)


def test_single_worker_matches_numpy_reference():
  xs = _momentum_sequence(REF_SHAPES, REF_STEPS, 1, seed=5)
  tx = _predictive(
    cj.compressors.top_k(REF_RATIO), cj.predictors.least_squares(), True, axis_name=None
  )
  outs, states = _run_single(tx, {k: v[:, 0] for k, v in xs.items()})
  outs_t = [{k: outs[k][t] for k in xs} for t in range(REF_STEPS)]
  recon = {k: v[-1] for k, v in states.reconstruction.value.items()}  # (1, *shape)
  residual = {k: v[-1] for k, v in states.residual.value.items()}
  _check_against_reference(outs_t, recon, residual, xs, None, True)


# ---------------------------------------------------------------------------------------------
# 2. Sender / receiver agreement.
# ---------------------------------------------------------------------------------------------

AGREE_SHAPES = {"w": (16, 8), "b": (8,)}
AGREE_STEPS = 100


def test_pmap_replicated_state_bitwise_identical_on_every_device(n_devices):
  xs = _momentum_sequence(AGREE_SHAPES, AGREE_STEPS, n_devices, seed=6)
  # qsgd draws private keys per worker: the receivers must still agree bit for bit.
  tx = _predictive(cj.compressors.qsgd(16), cj.predictors.least_squares(), True)
  outs, states = _run_pmap(tx, xs, n_devices)
  for t in range(AGREE_STEPS):
    for k in xs:
      for name, x in (("output", outs[t][k]), ("average", states[t].average[k])):
        np.testing.assert_array_equal(
          x, np.broadcast_to(x[0], x.shape), err_msg=f"{name} {k} at step {t}"
        )
      np.testing.assert_array_equal(outs[t][k], states[t].average[k])
    np.testing.assert_array_equal(states[t].count, t + 1)
  # Workers' own state really differs (it is per worker, not replicated).
  recon = states[-1].reconstruction.value["w"]
  assert np.abs(recon[1] - recon[0]).max() > 0
  assert all(np.isfinite(o["w"]).all() for o in outs)


SINGLE_CASES = {
  "top_k-fixed-no_ef": (
    lambda: cj.compressors.top_k(0.1),
    lambda: cj.predictors.fixed(BETA),
    False,
  ),
  "qsgd-least_squares-ef": (lambda: cj.compressors.qsgd(16), cj.predictors.least_squares, True),
  "block_sign-fixed-ef": (cj.compressors.block_sign, lambda: cj.predictors.fixed(BETA), True),
}


def _run_eager(tx, xs):
  """Step by step without jit (op by op: no fusion), states after every step stacked."""
  s = tx.init(jax.tree.map(lambda a: a[0], xs))
  outs, states = [], []
  for t in range(next(iter(xs.values())).shape[0]):
    out, s = tx.update(jax.tree.map(lambda a: a[t], xs), s)
    outs.append(out)
    states.append(s)
  stack = lambda *a: np.stack([np.asarray(x) for x in a])
  return jax.tree.map(stack, *outs), jax.tree.map(stack, *states)


@pytest.mark.parametrize(
  "mode,case",
  [("jit", c) for c in sorted(SINGLE_CASES)]
  + [
    # Op by op (no fusion) the same cases agree bit for bit: the scheme itself is consistent.
    ("eager", "top_k-fixed-no_ef")
  ],
)
def test_single_worker_sender_and_receiver_bitwise_identical(mode, case):
  make_c, make_p, ef = SINGLE_CASES[case]
  steps = AGREE_STEPS if mode == "jit" else 12  # eager dispatch is slow
  xs = _momentum_sequence(AGREE_SHAPES, steps, 1, seed=7)
  xs = {k: v[:, 0] for k, v in xs.items()}
  tx = _predictive(make_c(), make_p(), ef, axis_name=None)
  outs, states = (_run_single if mode == "jit" else _run_eager)(tx, xs)
  for k in xs:
    sender = states.reconstruction.value[k][:, 0]  # (T, *shape)
    assert np.isfinite(sender).all()
    assert np.abs(sender - xs[k]).max() > 1e-3  # really lossy
    np.testing.assert_array_equal(outs[k], states.average[k], err_msg=k)
    np.testing.assert_array_equal(sender, states.average[k], err_msg=k)


def test_receivers_average_equals_mean_of_senders_reconstructions(n_devices, mesh):
  xs = _momentum_sequence(AGREE_SHAPES, AGREE_STEPS, n_devices, seed=8)
  tx = _predictive(cj.compressors.top_k(0.1), cj.predictors.least_squares(), True)
  like = {k: np.zeros(s, np.float32) for k, s in AGREE_SHAPES.items()}
  outs, states = _Sharded(tx, like, mesh)(xs)
  for k in xs:
    senders = states.reconstruction.value[k].astype(np.float64).mean(axis=1)  # (T, *shape)
    scale = np.abs(senders).max()
    # Not bitwise: the receivers sum the decoded payloads in another order. Float32 tolerance.
    np.testing.assert_allclose(states.average[k], senders, rtol=1e-5, atol=1e-5 * scale, err_msg=k)
    np.testing.assert_array_equal(outs[k], states.average[k])


# ---------------------------------------------------------------------------------------------
# 3. Distortion at equal wire bytes, and 4. randomized compressors.
# ---------------------------------------------------------------------------------------------

DIST_SHAPES = {"w": (32, 16)}
DIST_STEPS = 100
DIST_COMPRESSORS = {
  "top_k(0.05)": lambda: cj.compressors.top_k(0.05),
  "random_k(0.05)": lambda: cj.compressors.random_k(0.05),
  "qsgd(2)": lambda: cj.compressors.qsgd(2),
  "qsgd(16)": lambda: cj.compressors.qsgd(16),
}
DIST_PREDICTORS = {
  "compressed_mean": None,
  "fixed(0)": lambda: cj.predictors.fixed(0.0),
  "fixed(0.9)": lambda: cj.predictors.fixed(BETA),
  "least_squares": cj.predictors.least_squares,
}
_DIST_RUNNERS = {}
_DIST_RESULTS = {}


def _dist_like():
  return {k: jnp.zeros(s) for k, s in DIST_SHAPES.items()}


@functools.cache
def _dist_data(kind, n):
  if kind == "correlated":
    return _momentum_sequence(DIST_SHAPES, DIST_STEPS, n, seed=11)
  return _white(DIST_SHAPES, DIST_STEPS, n, seed=12)


def _dist_run(mesh, cname, pname, ef, kind):
  """(outputs, states) of one configuration on one data set; one compile per configuration."""
  key = (cname, pname, ef, kind)
  if key not in _DIST_RESULTS:
    rkey = (cname, pname, ef)
    if rkey not in _DIST_RUNNERS:
      compressor = DIST_COMPRESSORS[cname]()
      if pname == "compressed_mean":
        tx = (
          cj.error_feedback(compressor, axis_name="data")
          if ef
          else cj.compressed_mean(compressor, axis_name="data")
        )
      else:
        tx = _predictive(compressor, DIST_PREDICTORS[pname](), ef)
      like = {k: np.zeros(s, np.float32) for k, s in DIST_SHAPES.items()}
      _DIST_RUNNERS[rkey] = _Sharded(tx, like, mesh, FAST_COMPILE)
    _DIST_RESULTS[key] = _DIST_RUNNERS[rkey](_dist_data(kind, mesh.devices.size))
  return _DIST_RESULTS[key]


def _recovered_rho(states, xs):
  """ρ_t = Σ_i⟨x_{t,i}, x̂_{t−1,i}⟩ / Σ_i‖x̂_{t−1,i}‖² from the stored reconstructions (no EF)."""
  rhos = []
  for t in range(1, DIST_STEPS):
    num = den = 0.0
    for k in xs:
      h = states.reconstruction.value[k][t - 1].astype(np.float64)
      num += np.sum(xs[k][t] * h)
      den += np.sum(h * h)
    rhos.append(num / den)
  return np.array(rhos)


@pytest.mark.parametrize("cname", ["top_k(0.05)", "random_k(0.05)", "qsgd(2)"])
def test_fixed_zero_without_feedback_is_exactly_compressed_mean(cname, mesh):
  for kind in ("correlated", "white"):
    base, _ = _dist_run(mesh, cname, "compressed_mean", False, kind)
    zero, _ = _dist_run(mesh, cname, "fixed(0)", False, kind)
    for k in base:
      np.testing.assert_array_equal(zero[k], base[k], err_msg=f"{cname} {kind} {k}")
  assert cj.wire_bytes(
    cj.compressed_mean(DIST_COMPRESSORS[cname]()), _dist_like()
  ) == cj.wire_bytes(
    _predictive(DIST_COMPRESSORS[cname](), cj.predictors.fixed(0.9), False, axis_name=None),
    _dist_like(),
  )


@pytest.mark.parametrize("cname", ["top_k(0.05)", "random_k(0.05)", "qsgd(2)"])
def test_prediction_lowers_distortion_on_correlated_sequences(cname, mesh):
  xs = _dist_data("correlated", mesh.devices.size)
  d = {
    p: _distortion(_dist_run(mesh, cname, p, False, "correlated")[0], xs) for p in DIST_PREDICTORS
  }
  base = d["compressed_mean"]
  assert 0.01 < base < 2.0, d  # the baseline really is lossy
  # Least squares always helps on a momentum sequence (ρ ≈ 1 fits it).
  assert d["least_squares"] < 0.95 * base, d
  compressor = DIST_COMPRESSORS[cname]()
  size = math.prod(DIST_SHAPES["w"])
  if compressor.q_squared(size) * BETA**2 < 1:
    # A contracting compressor (q²ρ² < 1): the fixed ρ = β prediction helps as well.
    assert d["fixed(0.9)"] < 0.75 * base, d
  else:
    # qsgd(2) on 512 entries has E‖C(x) − x‖² ≈ 12‖x‖²: without feedback the closed loop
    # x̂_t = ρ x̂_{t−1} + C(u) amplifies the error by ≈ q²ρ² > 1 per step. Not admissible for a
    # fixed ρ (the analysis assumes a contraction); least squares shrinks ρ and stays safe.
    assert d["fixed(0.9)"] > base, d


@pytest.mark.parametrize("cname", ["top_k(0.05)", "random_k(0.05)", "qsgd(2)"])
def test_least_squares_costs_nothing_on_white_noise(cname, mesh):
  n = mesh.devices.size
  xs = _dist_data("white", n)
  base = _distortion(_dist_run(mesh, cname, "compressed_mean", False, "white")[0], xs)
  outs, states = _dist_run(mesh, cname, "least_squares", False, "white")
  ls = _distortion(outs, xs)
  assert ls <= 1.02 * base, (ls, base)
  rho = _recovered_rho(states, xs)
  assert np.abs(rho).mean() < 0.1 and np.abs(rho).max() < 0.3, rho
  # On the correlated sequence the same predictor finds a clearly non-zero ρ (≈ 1 when the
  # reconstructions are good; ≈ 0.13 for qsgd(2), whose reconstructions are mostly noise).
  _, states_c = _dist_run(mesh, cname, "least_squares", False, "correlated")
  rho_c = _recovered_rho(states_c, _dist_data("correlated", n))
  assert np.median(rho_c) > max(0.1, 5 * np.abs(rho).mean()), rho_c
  # The recovered ρ is the one the receivers used: x̄_t = ρ_t x̄_{t−1} + (1/n) Σ_i C(u_i), and
  # C(u_i) = x̂_{t,i} − ρ_t x̂_{t−1,i}.
  for k in xs:
    h = states.reconstruction.value[k].astype(np.float64)
    avg = states.average[k].astype(np.float64)
    sent = (h[1:] - rho.reshape(-1, 1, 1, 1) * h[:-1]).mean(axis=1)
    np.testing.assert_allclose(
      avg[1:], rho.reshape(-1, 1, 1) * avg[:-1] + sent, rtol=1e-4, atol=1e-4 * np.abs(avg).max()
    )


def _bounded(outs, xs, ef):
  """Finite, not growing, and (with feedback) the running sums agree: Σ x̄̂ − Σ x̄ = −ē_T.

  Measured for plain error feedback (no prediction) on the same data: random_k(0.05)
  distortion 22, late/early error 2.4, running-sum gap 0.078; qsgd(16) 0.16, 1.1, 9e-6. With
  feedback the per-step output is noisy by design; what SGD integrates is the running sum.
  """
  assert all(np.isfinite(v).all() for v in outs.values())
  err = sum(
    np.sum((outs[k].astype(np.float64) - xs[k].mean(1)) ** 2, axis=tuple(range(1, outs[k].ndim)))
    for k in xs
  )
  quarter = DIST_STEPS // 4
  late, early = err[-quarter:].mean(), err[quarter : 2 * quarter].mean()
  assert late < 4.0 * early + 1e-6, (early, late)
  if ef:
    gap = sum(np.sum((outs[k].sum(0, dtype=np.float64) - xs[k].sum(0).mean(0)) ** 2) for k in xs)
    total = sum(np.sum(xs[k].sum(0).mean(0).astype(np.float64) ** 2) for k in xs)
    assert gap < 0.15 * total, (gap, total)
    assert _distortion(outs, xs) < 40.0
  else:
    assert _distortion(outs, xs) < 1.0


RANDOMIZED_CASES = [
  (c, p, ef)
  for c in ("random_k(0.05)", "qsgd(16)")
  for p in ("least_squares", "fixed(0.9)")
  for ef in (False, True)
]

_BUG_EF_FIXED = pytest.mark.xfail(
  strict=True,
  reason=(
    "KNOWN LIMITATION (documented in cj.predictive_compression, which warns): predictive_compression(feedback='ef') with fixed rho = 0.9 is unstable: the "
    "sender's compression error is fed back twice (the closed-loop prediction rho*x_hat already "
    "carries -rho*e, the residual adds +e), so e_t = (I-C)[(x_t - rho x_{t-1}) + (1+rho) e_{t-1}"
    " - rho e_{t-2}] and an unsent coordinate grows by up to 1/(1-rho) per echo; the residual "
    "and the output diverge"
  ),
)


def _randomized_marks(cname, pname, ef):
  marks = [_BUG_EF_FIXED] if (ef and pname == "fixed(0.9)") else []
  if (pname == "fixed(0.9)" and cname == "qsgd(16)") or marks:
    marks.append(pytest.mark.slow)  # extra compiles; the bug also shows in the SGD tests below
  return marks


@pytest.mark.parametrize(
  "cname,pname,ef",
  [pytest.param(c, p, ef, marks=_randomized_marks(c, p, ef)) for c, p, ef in RANDOMIZED_CASES],
)
def test_randomized_compressors_stay_finite_and_bounded(cname, pname, ef, mesh):
  xs = _dist_data("correlated", mesh.devices.size)
  outs, states = _dist_run(mesh, cname, pname, ef, "correlated")
  _bounded(outs, xs, ef)
  for leaf in jax.tree.leaves(states.reconstruction):
    assert np.isfinite(leaf).all()


@_BUG_EF_FIXED
def test_error_feedback_with_fixed_rho_keeps_residual_bounded_top_k():
  """The NumPy reference of the scheme shows the same blow-up: it is the scheme, as coded."""
  xs = _momentum_sequence({"w": (32, 16)}, 100, 8, seed=13)
  ratio = 0.05
  compress = functools.partial(reference.np_top_k, ratio=ratio)
  _, _, err_plain, _ = reference.np_predictive(xs, compress, rho=0.0, error_feedback=True)
  outs, _, err_pred, _ = reference.np_predictive(xs, compress, rho=BETA, error_feedback=True)
  plain = np.linalg.norm(err_plain["w"])
  pred = np.linalg.norm(err_pred["w"])
  # Plain error feedback (ρ = 0) keeps ‖e‖ of the order of a few inputs; prediction with
  # feedback should not be worse than that by orders of magnitude.
  assert pred < 10 * plain, (pred, plain)


# ---------------------------------------------------------------------------------------------
# 5. compressed_momentum_sgd end to end, 7. comp_ams with a predictor.
# ---------------------------------------------------------------------------------------------

LSQ_M, LSQ_IN, LSQ_OUT, LSQ_STEPS, LSQ_NOISE = 32, 8, 4, 200, 0.5


@functools.cache
def _lsq_problem(n):
  """Per-worker least squares with different data (and a different local optimum) per worker.

  Loss L(θ) = (1/n) Σ_i (1/2m) ‖X_i θ − Y_i‖²_F with a bias column in X; stochastic gradients
  are the exact local gradients plus N(0, σ²) noise.
  """
  rng = np.random.default_rng(21)
  x = rng.normal(size=(n, LSQ_M, LSQ_IN))
  x = np.concatenate([x, np.ones((n, LSQ_M, 1))], axis=-1).astype(np.float32)
  w_true = rng.normal(size=(LSQ_IN + 1, LSQ_OUT)) + 0.5 * rng.normal(size=(n, LSQ_IN + 1, LSQ_OUT))
  y = (np.einsum("nmi,nio->nmo", x, w_true) + 0.3 * rng.normal(size=(n, LSQ_M, LSQ_OUT))).astype(
    np.float32
  )
  noise = (LSQ_NOISE * rng.normal(size=(LSQ_STEPS, n, LSQ_IN + 1, LSQ_OUT))).astype(np.float32)
  w_opt = np.linalg.lstsq(x.reshape(-1, LSQ_IN + 1), y.reshape(-1, LSQ_OUT), rcond=None)[0]
  return x, y, noise, w_opt


def _lsq_loss(w, x, y):
  w = np.asarray(w, np.float64)
  return float(
    np.mean([0.5 * np.mean(np.sum((x[i] @ w - y[i]) ** 2, -1)) for i in range(x.shape[0])])
  )


def _train_lsq(tx, mesh):
  x, y, noise, _ = _lsq_problem(mesh.devices.size)
  params = {"w": np.zeros((LSQ_IN + 1, LSQ_OUT), np.float32)}
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  def local_loss(p, xi, yi):
    return 0.5 * jnp.mean(jnp.sum((xi @ p["w"] - yi) ** 2, -1))

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), specs, P("data"), P("data"), P(None, "data")),
    out_specs=P(),
  )
  def run(p, s, xi, yi, nz):
    def body(carry, nz_t):
      p, s = carry
      # The gradient w.r.t. a device-varying copy: each worker's own gradient, not their sum.
      g = jax.grad(local_loss)(jax.lax.pcast(p, "data", to="varying"), xi[0], yi[0])
      g = {"w": g["w"] + nz_t[0]}
      updates, s = tx.update(g, s, p)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(body, (p, s), nz)[0][0]

  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  args = (
    put(params, P()),
    state,
    put(x, P("data")),
    put(y, P("data")),
    put(noise, P(None, "data")),
  )
  out = run.lower(*args).compile(FAST_COMPILE)(*args)
  return np.asarray(out["w"])


@functools.cache
def _heavy_ball_loss(n, lr):
  x, y, noise, _ = _lsq_problem(n)

  def grad(theta, t):
    g = np.mean([x[i].T @ (x[i] @ theta - y[i]) / LSQ_M for i in range(n)], axis=0)
    return g + noise[t].mean(0)

  trace = reference.np_heavy_ball(
    np.zeros((LSQ_IN + 1, LSQ_OUT)), grad, lr=lr, momentum=BETA, steps=LSQ_STEPS
  )
  return _lsq_loss(trace[-1], x, y)


SGD_LR = 0.01
SGD_COMPRESSORS = {
  "top_k(0.1)": lambda: cj.compressors.top_k(0.1),
  "block_sign": cj.compressors.block_sign,
  "random_k(0.1)": lambda: cj.compressors.random_k(0.1),
  "qsgd(4)": lambda: cj.compressors.qsgd(4),
}


@pytest.mark.parametrize(
  "cname,ef,predictive",
  [
    pytest.param(
      c, ef, pr, marks=[_BUG_EF_FIXED] if (ef and pr == "fixed" and c != "block_sign") else []
    )
    for c in SGD_COMPRESSORS
    for ef in (True, False)
    for pr in ("least_squares", "fixed", "none")
    if pr != "fixed" or c in ("top_k(0.1)", "block_sign")
  ],
)
@pytest.mark.filterwarnings("ignore:predictive_compression with feedback")
def test_compressed_momentum_sgd_converges(cname, ef, predictive, mesh):
  n = mesh.devices.size
  x, y, _, w_opt = _lsq_problem(n)
  pred = {"least_squares": True, "fixed": cj.predictors.fixed(BETA), "none": False}[predictive]
  tx = cj.compressed_momentum_sgd(
    SGD_LR,
    SGD_COMPRESSORS[cname](),
    momentum=BETA,
    predictive=pred,
    feedback="ef" if ef else "none",
    axis_name="data",
  )
  w = _train_lsq(tx, mesh)
  l0, lopt = _lsq_loss(np.zeros_like(w_opt), x, y), _lsq_loss(w_opt, x, y)
  final = _lsq_loss(w, x, y)
  hb = _heavy_ball_loss(n, SGD_LR)  # for orientation, in the message only
  msg = f"L0={l0:.4f} L*={lopt:.4f} final={final:.4f} dense heavy ball={hb:.4f}"
  assert np.isfinite(final), msg
  # Excess loss below 10% of the initial excess, and close to the optimum.
  assert final - lopt < 0.1 * (l0 - lopt), msg
  # Unscaled random-k (10% of coordinates, stale error feedback) converges more slowly and its
  # trajectory depends on the drawn subsets: measured 0.018 and 0.061 of the initial excess
  # with two valid subset samplers.
  assert final - lopt < (0.08 if cname.startswith("random_k") else 0.06) * (l0 - lopt), msg


def test_comp_ams_with_least_squares_predictor_reduces_loss(mesh):
  n = mesh.devices.size
  x, y, _, w_opt = _lsq_problem(n)
  tx = cj.comp_ams(
    0.05, cj.compressors.top_k(0.1), axis_name="data", predictor=cj.predictors.least_squares()
  )
  w = _train_lsq(tx, mesh)
  l0, lopt = _lsq_loss(np.zeros_like(w_opt), x, y), _lsq_loss(w_opt, x, y)
  final = _lsq_loss(w, x, y)
  assert final - lopt < 0.1 * (l0 - lopt), (l0, lopt, final)


# ---------------------------------------------------------------------------------------------
# 6. State layout and wire bytes.
# ---------------------------------------------------------------------------------------------

STATE_PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,)), "k": jnp.zeros((2, 2, 5))}


@pytest.mark.parametrize("ef", [False, True], ids=["no_ef", "ef"])
def test_state_specs_and_sharded_init(ef, n_devices, mesh):
  tx = _predictive(cj.compressors.top_k(0.5), cj.predictors.least_squares(), ef)
  abstract = jax.eval_shape(tx.init, STATE_PARAMS)
  assert isinstance(abstract, cj.PredictiveState)
  specs = cj.sharding.state_specs(abstract, "data")
  sharded = {k: P("data") for k in STATE_PARAMS}
  assert specs.reconstruction.value == sharded
  assert (specs.residual.value if ef else specs.residual) == (sharded if ef else None)
  assert abstract.residual is None if not ef else isinstance(abstract.residual, cj.PerWorker)
  assert specs.average == {k: P() for k in STATE_PARAMS}
  assert specs.count == P()
  # Local view: a leading worker axis of size 1; global view: size n, sharded over "data".
  for k, v in STATE_PARAMS.items():
    assert abstract.reconstruction.value[k].shape == (1,) + v.shape
    assert abstract.average[k].shape == v.shape
  state = cj.sharding.init(tx, STATE_PARAMS, mesh=mesh, axis_name="data")
  for k, v in STATE_PARAMS.items():
    leaf = state.reconstruction.value[k]
    assert leaf.shape == (n_devices,) + v.shape
    assert leaf.sharding.spec[0] == "data"
    if ef:
      assert state.residual.value[k].shape == (n_devices,) + v.shape
    assert state.average[k].shape == v.shape
  assert state.residual is None if not ef else True


def test_compressed_momentum_sgd_state_specs():
  for predictive in (True, False):
    tx = cj.compressed_momentum_sgd(
      0.1, cj.compressors.top_k(0.5), predictive=predictive, axis_name="data"
    )
    specs = cj.sharding.state_specs(jax.eval_shape(tx.init, STATE_PARAMS), "data")
    assert isinstance(specs[0], cj.WorkerMomentumState)
    assert specs[0].momentum.value == {k: P("data") for k in STATE_PARAMS}
    if predictive:
      assert isinstance(specs[1], cj.PredictiveState)
      assert specs[1].average == {k: P() for k in STATE_PARAMS}


@pytest.mark.parametrize("cname", ["top_k", "block_sign", "random_k", "qsgd"])
def test_wire_bytes_least_squares_adds_two_float32_per_leaf(cname):
  compressor = {
    "top_k": lambda: cj.compressors.top_k(0.01),
    "block_sign": cj.compressors.block_sign,
    "random_k": lambda: cj.compressors.random_k(0.1),
    "qsgd": lambda: cj.compressors.qsgd(4),
  }[cname]()
  params = {"a": jnp.zeros((1000,)), "b": jnp.zeros((10,)), "c": jnp.zeros((3, 3, 4))}
  bits = cj.compressors.tree_wire_bits(compressor, params)
  leaves = len(jax.tree.leaves(params))
  own = -(-bits // 8)
  assert cj.wire_bytes(compressor, params) == own
  for ef in (False, True):
    fixed = _predictive(compressor, cj.predictors.fixed(0.9), ef, axis_name="data")
    ls = _predictive(compressor, cj.predictors.least_squares(), ef, axis_name="data")
    assert cj.wire_bytes(fixed, params) == own
    assert cj.wire_bytes(ls, params) == -(-(bits + leaves * 2 * 32) // 8)
  assert cj.wire_bytes(
    cj.compressed_momentum_sgd(
      0.1, compressor, predictive=cj.predictors.least_squares(), axis_name="data"
    ),
    params,
  ) == -(-(bits + leaves * 64) // 8)
  assert cj.wire_bytes(
    cj.comp_ams(0.1, compressor, predictor=cj.predictors.least_squares(), axis_name="data"),
    params,
  ) == -(-(bits + leaves * 64) // 8)
