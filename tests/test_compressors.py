"""Compressors against brute-force NumPy definitions.

Every expected value here is computed from first principles in NumPy (argsort for top-k,
sign·mean|x| for Block-Sign, ml_dtypes casts, exact expectations for the randomized codes),
never from the library's own output.

The registry section runs every registered compressor, every example (`tests/registry.py`),
against its brute-force reference (`tests/reference.py` REFERENCES) and against what it declares
(deviation, unbiasedness, summability, randomness, sends_every_entry, wire_bits), and trains
COMP-AMS with it under `shard_map`; the sections after it test single compressors in depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from compams_jax._src.keys import step_key
from tests import harness, reference, registry

C = cj.compressors
KEY = jax.random.key(1234)


# ----------------------------------------------------------------- brute-force references


def k_of(ratio: float, d: int) -> int:
  """k = max(1, ceil(ratio·d)), with ratio read as the decimal the user wrote."""
  if d == 0:
    return 0
  return max(1, math.ceil(Fraction(str(ratio)) * d))


def np_top_k(x: np.ndarray, k: int) -> np.ndarray:
  flat = np.asarray(x).reshape(-1)
  idx = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[idx] = flat[idx]
  return out.reshape(np.shape(x))


np_block_sign = reference.np_block_sign_exact  # sign(x)·mean|x| in float64 (zeros → +)
np_cast = reference.np_cast  # round to nearest even through ml_dtypes / NumPy (not XLA)


def sq(v) -> float:
  v = np.asarray(v, np.float64)
  return float(np.sum(v * v))


def f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def payload_nbits(payload) -> int:
  return sum(int(np.asarray(leaf).nbytes) * 8 for leaf in jax.tree.leaves(payload))


@functools.cache
def _jitted(c):
  return jax.jit(lambda x, k: c.compress(x, k))


def apply(c, x, key=None):
  """C(x), jitted (one compilation per compressor and shape, not one per eager op)."""
  return _jitted(c)(x, key)


def rand(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def key_or_none(c, seed=0):
  return jax.random.key(seed) if c.needs_key else None


# ----------------------------------------------------------------- every registered compressor

REF_SHAPES = [(), (1,), (2,), (7,), (3, 5), (257,), (1000,)]


def test_every_registered_compressor_has_a_reference():
  """Registering a compressor without its brute-force reference fails here."""
  missing = sorted(set(C.REGISTRY) - set(reference.REFERENCES))
  assert not missing, f"add a NumPy reference to tests/reference.py REFERENCES for {missing}"
  assert sorted(reference.REFERENCES) == sorted(C.REGISTRY)  # and none for unregistered names
  assert C.FACTORIES == {name: entry.factory for name, entry in C.REGISTRY.items()}


def _ref_input(shape, seed):
  """Gaussian values with some exact zeros (and a -0.0) where the array has room."""
  x = rand(shape, seed=seed)
  if x.size >= 4:
    x.flat[1::4] = 0.0
    x.flat[2] = -0.0
  return x


def _ref_atol(c, x) -> float:
  """0, except for codes whose every output entry is a float32 sum over a whole chunk (a
  transform such as dct_top_k's DCT): their float32 rounding is relative to the chunk's norm,
  not to the entry, so an entry near zero (an exact zero of x) is matched to 1e-6·‖x‖₂."""
  if isinstance(c, C.DctTopK):
    return 1e-6 * math.sqrt(sq(x))
  return 0.0


@pytest.mark.parametrize("name, kwargs", registry.cases())
def test_matches_reference(name, kwargs):
  """C(x) equals the brute-force NumPy definition (same key: same randomness), entry by entry;
  zeros of the reference are exact zeros of C(x) (up to `_ref_atol` for transform codes)."""
  c = registry.build(name, kwargs)
  ref = reference.REFERENCES[name]
  for i, shape in enumerate(REF_SHAPES):
    x = _ref_input(shape, seed=i)
    for seed in (0, 1) if c.needs_key else (0,):
      key = key_or_none(c, seed)
      got = np.asarray(apply(c, jnp.asarray(x), key))
      assert got.shape == x.shape and got.dtype == x.dtype
      want = np.asarray(ref(x, key, **kwargs), np.float64)
      np.testing.assert_allclose(
        got.astype(np.float64),
        want,
        rtol=2e-6,
        atol=_ref_atol(c, x),
        err_msg=f"{c} on {shape}, key {seed}",
      )


@pytest.mark.parametrize("name, kwargs", registry.cases(slow_beyond_first=True))
def test_decode_sum_matches_sum_of_references(name, kwargs):
  """decode_sum of three workers' payloads = Σ of the reference C(x_i) (shared randomness: one
  key for all workers; private: one key each, not needed to decode)."""
  c = registry.build(name, kwargs)
  shape = (13, 5)  # 65 entries: not a multiple of 2, 4 or 8
  xs = [_ref_input(shape, seed=10 + i) for i in range(3)]
  if c.randomness == "shared":
    keys = [jax.random.key(7)] * 3
  else:
    keys = [key_or_none(c, 7 + i) for i in range(3)]
  payloads = [jax.jit(c.encode)(jnp.asarray(x), k) for x, k in zip(xs, keys)]
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *payloads)
  got = jax.jit(c.decode_sum)(
    stacked, jnp.zeros(shape), keys[0] if c.randomness == "shared" else None
  )
  assert got.shape == shape and got.dtype == jnp.float32
  want = sum(
    np.asarray(reference.REFERENCES[name](x, k, **kwargs), np.float64) for x, k in zip(xs, keys)
  )
  atol = 3e-6 * sum(np.abs(x).max() for x in xs)  # float32 sums of three terms
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6, atol=atol)


@pytest.mark.parametrize("name, kwargs", registry.cases())
def test_declarations_are_well_formed(name, kwargs):
  c = registry.build(name, kwargs)
  assert isinstance(c, cj.Compressor)
  hash(c)  # Frozen dataclasses: usable as static jit arguments.
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.granularity = "model"
  assert c.deviation in ("none", "pointwise", "expected", "unbounded")
  assert c.randomness in ("none", "private", "shared")
  assert c.needs_key == (c.randomness != "none")
  assert isinstance(c.unbiased, bool) and isinstance(c.summable, bool)
  assert isinstance(c.sends_every_entry, bool)
  assert C.get(name, **kwargs) == c
  for d in (0, 1, 2, 7, 100, 65537):
    q2 = c.q_squared(d)
    if c.deviation == "none":
      assert q2 == 0.0
    elif c.deviation in ("pointwise", "expected"):
      assert q2 is not None and 0.0 <= q2 < math.inf, (d, q2)
  if c.needs_key:  # a randomized code refuses to run without its key
    with pytest.raises(ValueError, match="key"):
      c.compress(jnp.ones(8))


def _away_from_zero(d, seed):
  """|x_i| in [1, ~5) with random signs: no zeros, no tiny entries."""
  rng = np.random.default_rng(seed)
  return ((1.0 + np.abs(rng.standard_normal(d))) * rng.choice([-1.0, 1.0], d)).astype(np.float32)


@pytest.mark.parametrize("name, kwargs", registry.cases(slow_beyond_first=True))
def test_declared_behaviour(name, kwargs):
  """What the compressor declares (randomness, losslessness, unbiasedness of deterministic codes,
  sends_every_entry, summability), checked on its outputs."""
  c = registry.build(name, kwargs)
  d = 50
  x, y = _away_from_zero(d, 1), _away_from_zero(d, 2)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  out1 = np.asarray(apply(c, jnp.asarray(x), k1 if c.needs_key else None), np.float64)
  if c.randomness == "none":  # a key, if passed, changes nothing
    np.testing.assert_array_equal(np.asarray(apply(c, jnp.asarray(x), k1)), out1)
  else:  # another key, another draw
    assert not np.array_equal(np.asarray(apply(c, jnp.asarray(x), k2)), out1)
  if c.randomness == "private":  # receivers never see a private key: decoding does not need it
    payload = jax.jit(c.encode)(jnp.asarray(x), k1)
    np.testing.assert_array_equal(np.asarray(jax.jit(c.decode)(payload, jnp.asarray(x))), out1)
  if c.deviation == "none" or (c.unbiased and c.randomness == "none"):  # then C(x) = E[C(x)] = x
    np.testing.assert_array_equal(out1, x)
  if c.sends_every_entry:
    assert np.all(out1 != 0)
  if c.summable:  # the sum of two payloads (one key: what a psum adds) decodes to the sum
    key = k1 if c.needs_key else None
    p1, p2 = (jax.jit(c.encode)(jnp.asarray(v), key) for v in (x, y))
    summed = jax.jit(c.decode)(jax.tree.map(jnp.add, p1, p2), jnp.asarray(x), key)
    out2 = np.asarray(apply(c, jnp.asarray(y), key), np.float64)
    eps = max(float(jnp.finfo(leaf.dtype).eps) for leaf in jax.tree.leaves(p1))
    np.testing.assert_allclose(np.asarray(summed, np.float64), out1 + out2, rtol=eps)


@pytest.mark.parametrize("name, kwargs", registry.cases(where=lambda c: c.needs_key))
def test_randomized_expectations(name, kwargs):
  """Over 10,000 keys: E‖C(x) − x‖² within the declared q²‖x‖², and E[C(x)] = x if declared
  unbiased, with a tolerance that resolves a bias of 15% of every entry."""
  c = registry.build(name, kwargs)
  n, d = 10_000, 50
  x = _away_from_zero(d, 3).astype(np.float64)
  keys = jax.random.split(jax.random.key(11), n)
  fn = jax.jit(jax.vmap(lambda k: c.compress(jnp.asarray(x, jnp.float32), k)))
  samples = np.asarray(fn(keys), np.float64)
  err = np.sum((samples - x) ** 2, axis=1)
  margin = 5 * err.std() / np.sqrt(n)
  if c.deviation in ("pointwise", "expected"):
    assert err.mean() <= c.q_squared(d) * sq(x) + margin
  if c.unbiased:
    tol = 5 * samples.std(0) / np.sqrt(n) + 1e-6 * np.abs(x)
    assert np.all(tol < 0.15 * np.abs(x))  # the check has power
    assert np.all(np.abs(samples.mean(0) - x) <= tol)


@pytest.mark.parametrize("name, kwargs", registry.cases(slow_beyond_first=True))
@pytest.mark.filterwarnings("ignore:.*not a contraction:UserWarning")
def test_comp_ams_trains_under_shard_map(name, kwargs, mesh):
  """COMP-AMS with the compressor fits a least-squares problem on 8 workers (shard_map)."""
  c = registry.build(name, kwargs)
  err = harness.least_squares_error(cj.comp_ams(0.05, c, axis_name="data"), mesh)
  assert err < 0.3, (c, err)


# ----------------------------------------------------------------- declared properties


@pytest.mark.parametrize(
  "make, deviation, unbiased, summable, randomness",
  [
    (C.identity, "none", True, True, "none"),
    (lambda: C.top_k(0.1), "pointwise", False, False, "none"),
    (lambda: C.random_k(0.1), "expected", False, True, "shared"),
    (C.block_sign, "pointwise", False, False, "none"),
    (C.scaled_sign, "pointwise", False, False, "none"),
    (lambda: C.qsgd(4), "expected", True, False, "private"),
    (C.terngrad, "expected", True, False, "private"),
    (C.cast, "pointwise", False, True, "none"),
  ],
)
def test_declared_properties(make, deviation, unbiased, summable, randomness):
  c = make()
  assert (c.deviation, c.unbiased, c.summable, c.randomness) == (
    deviation,
    unbiased,
    summable,
    randomness,
  )
  assert isinstance(c, cj.Compressor)
  hash(c)  # Frozen dataclasses: usable as static jit arguments.


def test_scaled_sign_is_model_granularity():
  assert C.scaled_sign().granularity == "model"
  assert C.block_sign().granularity == "leaf"


@pytest.mark.parametrize("d", [1, 2, 7, 100, 1000, 65537])
def test_declared_q_squared(d):
  # The textbook bounds, from the definitions.
  assert C.top_k(0.1).q_squared(d) == pytest.approx(1 - k_of(0.1, d) / d)
  assert C.random_k(0.3).q_squared(d) == pytest.approx(1 - k_of(0.3, d) / d)
  assert C.block_sign().q_squared(d) == pytest.approx(1 - 1 / d)
  assert C.qsgd(4).q_squared(d) == pytest.approx(min(d / 16, math.sqrt(d) / 4))
  assert C.terngrad().q_squared(d) == pytest.approx((math.sqrt(d) - 1) / 2)
  assert C.cast(jnp.bfloat16).q_squared(d) == pytest.approx(2.0**-16)
  assert C.cast(jnp.float16).q_squared(d) == pytest.approx(2.0**-22)
  assert C.identity().q_squared(d) == 0.0


# ----------------------------------------------------------------- top-k


@pytest.mark.parametrize(
  "shape, ratio",
  [
    ((), 0.01),
    ((1,), 0.5),
    ((2,), 0.5),
    ((7,), 0.33),
    ((3, 5), 0.1),
    ((2, 3, 4), 0.5),
    ((257,), 0.01),
    ((1000,), 0.01),
    ((1000,), 0.33),
    ((6, 5), 1.0),
  ],
)
def test_top_k_matches_argsort(shape, ratio):
  x = rand(shape, seed=hash((shape, ratio)) % 2**32)
  d = int(np.prod(shape))
  k = k_of(ratio, d)
  out = np.asarray(apply(C.top_k(ratio), jnp.asarray(x)))
  assert out.shape == np.shape(x) and out.dtype == np.float32
  np.testing.assert_array_equal(out, np_top_k(x, k))
  assert np.count_nonzero(out) == k


def test_top_k_ties_go_to_lower_index():
  out = apply(C.top_k(0.5), jnp.array([1.0, -1.0, 1.0, 1.0]))
  np.testing.assert_array_equal(np.asarray(out), [1.0, -1.0, 0.0, 0.0])


def test_top_k_bfloat16_keeps_k_largest_magnitudes():
  # bf16 has ties on random inputs, so compare multisets of magnitudes, not positions.
  x = jnp.asarray(rand((40, 25), seed=3)).astype(jnp.bfloat16)
  k = k_of(0.05, x.size)
  out = apply(C.top_k(0.05), x)
  assert out.dtype == jnp.bfloat16
  xo, oo = f64(x).ravel(), f64(out).ravel()
  kept = np.flatnonzero(oo)
  assert kept.size == k
  np.testing.assert_array_equal(oo[kept], xo[kept])
  np.testing.assert_array_equal(np.sort(np.abs(oo[kept])), np.sort(np.abs(xo))[-k:])


def test_top_k_per_leaf_vs_model():
  tree = {"a": rand((30,), 1), "b": [rand((5, 4), 2) * 10.0, rand((50,), 3) * 0.01]}
  jtree = jax.tree.map(jnp.asarray, tree)

  per_leaf = jax.jit(lambda t: C.compress_tree(C.top_k(0.1), t))(jtree)
  for got, x in zip(jax.tree.leaves(per_leaf), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(got), np_top_k(x, k_of(0.1, x.size)))

  model = jax.jit(lambda t: C.compress_tree(C.top_k(0.1, granularity="model"), t))(jtree)
  allx = np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
  k = k_of(0.1, allx.size)
  thresh = np.sort(np.abs(allx))[-k]  # the k-th largest magnitude over the whole model
  total = 0
  for got, x in zip(jax.tree.leaves(model), jax.tree.leaves(tree)):
    want = np.where(np.abs(x) >= thresh, x, 0.0)
    np.testing.assert_array_equal(np.asarray(got), want)
    total += np.count_nonzero(np.asarray(got))
  assert total == k
  # The big-magnitude leaf takes (almost) all of the global budget; the tiny one gets none.
  assert np.count_nonzero(np.asarray(model["b"][1])) == 0


def test_top_k_decode_sum_is_sum_of_decoded():
  xs = [rand((60,), s) for s in range(3)]
  c = C.top_k(0.1)
  enc = jax.jit(lambda t: C.encode_tree(c, t))
  payloads = [enc({"w": jnp.asarray(x)}) for x in xs]
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *payloads)
  got = jax.jit(lambda p, t: C.decode_sum_tree(c, p, t))(stacked, {"w": jnp.zeros(60)})["w"]
  want = sum(np_top_k(x, k_of(0.1, 60)) for x in xs)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("exact_zeros", [False, True])
@pytest.mark.parametrize(
  "shape", [(13,), (5, 7), (64,)]
)  # sizes not a multiple of 8, and one that is
def test_block_sign_decode_sum_is_sum_of_scaled_signs(shape, exact_zeros):
  xs = [rand(shape, s) for s in range(4)]
  xs[0].flat[::3] = 0.0  # zeros: sent as +1 unless exact_zeros
  c = C.block_sign(exact_zeros=exact_zeros)
  payloads = [jax.jit(c.encode)(jnp.asarray(x)) for x in xs]
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *payloads)
  got = jax.jit(lambda p: c.decode_sum(p, jnp.zeros(shape)))(stacked)
  sign = (lambda x: np.sign(x)) if exact_zeros else (lambda x: np.where(x < 0, -1.0, 1.0))
  want = sum(np.abs(x).mean() * sign(x) for x in xs)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- random-k


@pytest.mark.parametrize("shape, ratio", [((1000,), 0.1), ((7, 9), 0.3), ((1,), 0.5), ((10,), 1.0)])
def test_random_k_exactly_k_entries_of_x(shape, ratio):
  x = rand(shape, seed=5)
  x[np.asarray(x) == 0] = 1.0
  k = k_of(ratio, x.size)
  out = np.asarray(apply(C.random_k(ratio), jnp.asarray(x), KEY))
  kept = out != 0
  assert kept.sum() == k
  np.testing.assert_array_equal(out[kept], x[kept])


def test_random_k_positions_depend_on_key_only():
  c = C.random_k(0.1)
  x1, x2 = rand((1000,), 1), rand((1000,), 2)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  pos = lambda x, k: frozenset(np.flatnonzero(np.asarray(apply(c, jnp.asarray(x), k))))
  assert pos(x1, k1) == pos(x2, k1)  # same key, different data: same coordinates
  assert pos(x1, k1) != pos(x1, k2)  # different keys: different coordinates
  assert len(pos(x1, k1) & pos(x1, k2)) < 50  # ~k²/d = 10 expected overlap


def test_random_k_payload_carries_values_only_and_sums():
  # Summable: the sum of two workers' payloads decodes to the sum of their C(x) (same key).
  c = C.random_k(0.2)
  rng = np.random.default_rng(0)
  x1, x2 = (rng.integers(1, 100, 50).astype(np.float32) for _ in range(2))
  enc, dec = jax.jit(c.encode), jax.jit(c.decode)
  p1, p2 = enc(jnp.asarray(x1), KEY), enc(jnp.asarray(x2), KEY)
  assert set(p1) == {"values"} and p1["values"].shape == (k_of(0.2, 50),)
  d1, d2 = (np.asarray(dec(p, jnp.zeros(50), KEY)) for p in (p1, p2))
  summed = np.asarray(dec(jax.tree.map(jnp.add, p1, p2), jnp.zeros(50), KEY))
  mask = d1 != 0
  assert mask.sum() == k_of(0.2, 50) and np.array_equal(mask, d2 != 0)
  np.testing.assert_array_equal(d1, np.where(mask, x1, 0.0))
  np.testing.assert_array_equal(summed, np.where(mask, x1 + x2, 0.0))


def test_random_k_model_granularity_one_budget():
  tree = {"a": jnp.asarray(rand((40,), 1) + 5.0), "b": jnp.asarray(rand((3, 20), 2) + 5.0)}
  out = jax.jit(lambda t: C.compress_tree(C.random_k(0.1, granularity="model"), t, KEY))(tree)
  total = sum(int(np.count_nonzero(np.asarray(v))) for v in out.values())
  assert total == k_of(0.1, 100)
  for name in tree:
    got, x = np.asarray(out[name]), np.asarray(tree[name])
    np.testing.assert_array_equal(got[got != 0], x[got != 0])


@pytest.mark.parametrize("ratio, d", [(0.1, 50)])
def test_random_k_expectation_biased_and_error_in_expectation(ratio, d):
  n = 4000
  x = rand((d,), seed=11)
  c = C.random_k(ratio)
  keys = jax.random.split(jax.random.key(7), n)
  samples = np.asarray(jax.jit(jax.vmap(lambda k: c.compress(jnp.asarray(x), k)))(keys), np.float64)
  k = k_of(ratio, d)
  p = k / d
  # Unscaled random-k is biased: E[C(x)] = (k/d)·x, each entry a Bernoulli(p)·x_i.
  se = np.abs(x) * np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(samples.mean(0) - p * x) <= 5 * se + 1e-7)
  assert not np.allclose(samples.mean(0), x, rtol=0.2)  # really biased
  # E‖C(x) − x‖² = (1 − k/d)‖x‖² ≤ q²‖x‖².
  err = np.sum((samples - x) ** 2, axis=1)
  margin = 5 * err.std() / np.sqrt(n)
  assert err.mean() <= c.q_squared(d) * sq(x) + margin
  assert abs(err.mean() - (1 - p) * sq(x)) <= margin


def test_random_k_requires_key():
  with pytest.raises(ValueError, match="key"):
    C.random_k(0.1).compress(jnp.ones(10))


# ----------------------------------------------------------------- block-sign / scaled-sign


@pytest.mark.parametrize("shape", [(), (1,), (9,), (4, 33), (1000,)])
def test_block_sign_matches_reference(shape):
  x = rand(shape, seed=int(np.prod(shape)))
  out = np.asarray(apply(C.block_sign(), jnp.asarray(x)))
  np.testing.assert_allclose(out, np_block_sign(x), rtol=2e-6)


def test_block_sign_docstring_example():
  out = apply(C.block_sign(), jnp.array([1.0, -2.0, 3.0, -6.0]))
  np.testing.assert_array_equal(np.asarray(out), [3.0, -3.0, 3.0, -3.0])


def test_block_sign_zeros_default_and_exact():
  x = np.array([0.0, -2.0, 0.0, 4.0, 0.0, -0.0, 1.0, 0.0, 0.0, -3.0], np.float32)
  scale = np.abs(x).mean()  # 1.0
  default = np.asarray(apply(C.block_sign(), jnp.asarray(x)))
  np.testing.assert_allclose(default, np.where(x < 0, -scale, scale), rtol=1e-6)
  exact = np.asarray(apply(C.block_sign(exact_zeros=True), jnp.asarray(x)))
  np.testing.assert_allclose(exact, np.sign(x) * scale, rtol=1e-6)
  assert np.all(exact[x == 0] == 0.0)


def test_block_sign_all_zero_leaf():
  np.testing.assert_array_equal(np.asarray(apply(C.block_sign(), jnp.zeros(13))), np.zeros(13))


def test_block_sign_per_leaf_and_scaled_sign_global():
  tree = {"a": rand((10,), 1), "b": {"c": rand((3, 7), 2) * 100.0}, "d": rand((), 3)}
  jtree = jax.tree.map(jnp.asarray, tree)
  per_leaf = jax.jit(lambda t: C.compress_tree(C.block_sign(), t))(jtree)
  for got, x in zip(jax.tree.leaves(per_leaf), jax.tree.leaves(tree)):
    np.testing.assert_allclose(np.asarray(got), np_block_sign(x), rtol=2e-6)
  allx = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)
  scale = np.abs(allx).mean()  # one ‖x‖₁/d over the whole flattened pytree
  for c in (C.scaled_sign(), C.block_sign(granularity="model")):
    out = jax.jit(lambda t: C.compress_tree(c, t))(jtree)
    for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
      np.testing.assert_allclose(np.asarray(got), np.where(x < 0, -scale, scale), rtol=2e-6)


# ----------------------------------------------------------------- qsgd


def _check_qsgd_levels(out, x, levels, norm):
  """Every entry is sign(x)·ℓ·norm/s with integer ℓ ∈ {⌊a⌋, ⌈a⌉}, a = s|x|/norm."""
  out, x = np.asarray(out, np.float64), np.asarray(x, np.float64)
  lev = out / (norm / levels)
  ilev = np.round(lev)
  np.testing.assert_allclose(lev, ilev, atol=1e-3)
  assert np.all(np.abs(ilev) <= levels)
  a = levels * np.abs(x) / norm
  mag = np.abs(ilev)
  assert np.all(mag >= np.floor(a - 1e-4)) and np.all(mag <= np.ceil(a + 1e-4))
  assert np.all((ilev == 0) | (np.sign(ilev) == np.sign(x)))


@pytest.mark.parametrize("levels, shape", [(1, (37,)), (4, (6, 7)), (127, (1,)), (1000, (37,))])
def test_qsgd_levels_bracket_input(levels, shape):
  x = rand(shape, seed=levels)
  c = C.qsgd(levels)
  fn = jax.jit(lambda x, k: c.compress(x, k))
  for i in range(3):
    out = fn(jnp.asarray(x), jax.random.key(i))
    assert out.shape == x.shape and out.dtype == jnp.float32
    _check_qsgd_levels(out, x, levels, np.linalg.norm(x.astype(np.float64)))


def test_qsgd_payload_levels_dtype():
  x = jnp.asarray(rand((20,), 0))
  p4 = jax.jit(C.qsgd(4).encode)(x, KEY)
  assert p4["levels"].dtype == jnp.int8 and p4["norm"].shape == ()
  assert float(p4["norm"]) == pytest.approx(np.linalg.norm(np.asarray(x, np.float64)), 1e-6)
  assert jax.eval_shape(C.qsgd(127).encode, x, KEY)["levels"].dtype == jnp.int8
  assert jax.eval_shape(C.qsgd(128).encode, x, KEY)["levels"].dtype == jnp.int16
  assert jax.eval_shape(C.qsgd(32767).encode, x, KEY)["levels"].dtype == jnp.int16


def test_qsgd_zero_vector():
  np.testing.assert_array_equal(np.asarray(apply(C.qsgd(4), jnp.zeros(9), KEY)), np.zeros(9))


def test_qsgd_model_granularity_uses_one_norm():
  tree = {"a": rand((10,), 1), "b": rand((4, 5), 2) * 3.0}
  out = jax.jit(lambda t: C.compress_tree(C.qsgd(8, granularity="model"), t, KEY))(
    jax.tree.map(jnp.asarray, tree)
  )
  norm = np.sqrt(sum(sq(x) for x in tree.values()))
  for name in tree:
    _check_qsgd_levels(out[name], tree[name], 8, norm)


@pytest.mark.parametrize("levels, d", [(2, 30), (4, 50)])
def test_qsgd_unbiased_and_error_in_expectation(levels, d):
  n = 4000
  x = rand((d,), seed=21).astype(np.float64)
  c = C.qsgd(levels)
  keys = jax.random.split(jax.random.key(3), n)
  samples = np.asarray(
    jax.jit(jax.vmap(lambda k: c.compress(jnp.asarray(x, jnp.float32), k)))(keys), np.float64
  )
  norm = np.linalg.norm(x)
  a = levels * np.abs(x) / norm
  frac = a - np.floor(a)
  # Each entry is (norm/s)·sign(x)·(⌊a⌋ + Bernoulli(frac)).
  entry_std = norm / levels * np.sqrt(frac * (1 - frac))
  mean = samples.mean(0)
  assert np.all(np.abs(mean - x) <= 5 * entry_std / np.sqrt(n) + 1e-6 * norm)
  err = np.sum((samples - x) ** 2, axis=1)
  margin = 5 * err.std() / np.sqrt(n)
  exact = float(np.sum(entry_std**2))  # E‖Q(x) − x‖² exactly
  assert abs(err.mean() - exact) <= margin + 1e-9
  assert err.mean() <= c.q_squared(d) * sq(x) + margin
  assert exact <= c.q_squared(d) * sq(x)


def test_qsgd_requires_key():
  with pytest.raises(ValueError, match="key"):
    C.qsgd(4).compress(jnp.ones(10))


# ----------------------------------------------------------------- terngrad


def _terngrad_worst_case(d: int) -> np.ndarray:
  """One entry s = 1 and d − 1 entries 1/(1 + √d): maximizes s‖x‖₁/‖x‖² (= (1 + √d)/2)."""
  x = np.full(d, 1.0 / (1.0 + math.sqrt(d)))
  x[d // 3] = -1.0
  return x


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("shape", [(), (1,), (3,), (4,), (5,), (2, 3, 7), (1001,)])
def test_terngrad_bit_identical_to_reference(shape, dtype):
  x = _ref_input(shape, seed=len(shape) + int(np.prod(shape))).astype(dtype)
  c = C.terngrad()
  for seed in range(3):
    key = jax.random.key(seed)
    got = np.asarray(apply(c, jnp.asarray(x), key))
    assert got.dtype == x.dtype and got.shape == x.shape
    want = reference.np_terngrad(x, reference.uniforms(key, x.size))
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))
    flat, out = f64(x).ravel(), got.astype(np.float64).ravel()
    s = np.abs(flat).max()
    assert np.all((out == 0) | (np.abs(out) == s))  # ternary: 0 or ±max|x|
    assert np.all((out == 0) | (np.sign(out) == np.sign(flat)))
    assert np.all(out[flat == 0] == 0)
    assert np.all(out[np.abs(flat) == s] == flat[np.abs(flat) == s])  # the max is always sent


@pytest.mark.parametrize("d", [0, 1, 3, 4, 5, 8, 1001])
def test_terngrad_payload(d):
  x = jnp.asarray(_ref_input((d,), seed=d))
  payload = jax.jit(C.terngrad().encode)(x, KEY)
  assert set(payload) == {"levels", "scale"}
  assert payload["levels"].dtype == jnp.uint8 and payload["levels"].shape == (-(-d // 4),)
  assert payload["scale"].dtype == jnp.float32 and payload["scale"].shape == ()
  assert float(payload["scale"]) == (float(np.abs(np.asarray(x)).max()) if d else 0.0)
  # 2-bit codes, entry j at bits 2(j mod 4) of byte j // 4: 0 → 0, 1 → +1, 2 → −1 (never 3).
  packed = np.asarray(payload["levels"])
  codes = ((packed[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1)
  assert np.all(codes[d:] == 0) and not np.any(codes == 3)
  want = reference.np_terngrad(np.asarray(x), reference.uniforms(KEY, d))
  np.testing.assert_array_equal(np.sign(want), (codes[:d] == 1) * 1.0 - (codes[:d] == 2) * 1.0)
  assert 8 * packed.nbytes + 32 == C.terngrad().wire_bits((d,), jnp.float32)


def test_terngrad_zero_and_non_finite_blocks():
  c = C.terngrad()
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    out = np.asarray(apply(c, jnp.zeros((9,), dtype), KEY))
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.astype(np.float32), np.zeros(9))  # no NaN from 0/0
  # A non-finite block is not silently dropped: it decodes non-finite.
  for bad in (np.inf, -np.inf, np.nan):
    x = jnp.asarray(np.array([1.0, bad, -2.0, 0.5], np.float32))
    assert not np.all(np.isfinite(np.asarray(apply(c, x, KEY))))
  # Huge and tiny (normal) finite blocks: exact, finite ternary codes.
  for scale in (1e38, 1e-30):
    x = _ref_input((100,), seed=5) / np.float32(4) * np.float32(scale)
    got = np.asarray(apply(c, jnp.asarray(x), KEY))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, reference.np_terngrad(x, reference.uniforms(KEY, 100)))


@pytest.mark.parametrize("d, worst", [(30, False), (50, False), (16, True), (5, True)])
def test_terngrad_unbiased_and_error_in_expectation(d, worst):
  """E[C(x)] = x and E‖C(x) − x‖² = Σ|x_i|(s − |x_i|) ≤ q²‖x‖², with equality on the worst case."""
  n = 4000
  x = _terngrad_worst_case(d) if worst else rand((d,), seed=31).astype(np.float64)
  c = C.terngrad()
  keys = jax.random.split(jax.random.key(5), n)
  samples = np.asarray(
    jax.jit(jax.vmap(lambda k: c.compress(jnp.asarray(x, jnp.float32), k)))(keys), np.float64
  )
  x = f64(jnp.asarray(x, jnp.float32))
  a, s = np.abs(x), np.abs(x).max()
  entry_std = np.sqrt(a * (s - a))  # each entry is s·sign(x_i)·Bernoulli(|x_i|/s)
  assert np.all(np.abs(samples.mean(0) - x) <= 5 * entry_std / np.sqrt(n) + 1e-6 * s)
  assert np.median(5 * entry_std / np.sqrt(n) / np.maximum(a, 1e-30)) < 0.3  # has power
  err = np.sum((samples - x) ** 2, axis=1)
  margin = 5 * err.std() / np.sqrt(n)
  exact = float(np.sum(a * (s - a)))  # E‖C(x) − x‖² exactly
  assert abs(err.mean() - exact) <= margin + 1e-9
  assert err.mean() <= c.q_squared(d) * sq(x) + margin
  assert exact <= c.q_squared(d) * sq(x) * (1 + 1e-6)
  if worst:  # the declared q² is attained: it cannot be made smaller
    assert exact == pytest.approx(c.q_squared(d) * sq(x), rel=1e-6)


def test_terngrad_q_squared_is_a_bound_on_random_vectors():
  """s‖x‖₁ − ‖x‖² ≤ q²‖x‖² on many random (heavy-tailed, sparse, flat) vectors."""
  rng = np.random.default_rng(0)
  c = C.terngrad()
  for d in (2, 3, 9, 50, 1000):
    for _ in range(300):
      x = np.abs(rng.standard_normal(d)) ** rng.uniform(0.05, 4.0)
      x[rng.random(d) < rng.uniform(0, 0.5)] = 0.0
      if not x.any():
        continue
      expected_err = x.max() * x.sum() - sq(x)
      assert expected_err <= c.q_squared(d) * sq(x) * (1 + 1e-12)


def test_terngrad_model_granularity_uses_one_scale():
  tree = {"a": rand((10,), 1), "b": rand((4, 5), 2) * 3.0}
  out = jax.jit(lambda t: C.compress_tree(C.terngrad(granularity="model"), t, KEY))(
    jax.tree.map(jnp.asarray, tree)
  )
  s = max(np.abs(x).max() for x in tree.values())
  for name in tree:
    got = np.asarray(out[name], np.float64)
    assert np.all((got == 0) | (np.abs(got) == np.float32(s)))
  assert np.count_nonzero(np.asarray(out["b"])) > 0


def test_terngrad_requires_key():
  with pytest.raises(ValueError, match="key"):
    C.terngrad().compress(jnp.ones(10))


# ----------------------------------------------------------------- cast / identity


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cast_equals_numpy_round_trip(dtype):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(2000) * np.exp(rng.uniform(-8, 8, 2000))).astype(np.float32)
  x = np.concatenate([x, np.float32([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-9, 65504.0])])
  out = np.asarray(apply(C.cast(dtype), jnp.asarray(x)))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, np_cast(x, dtype))
  assert C.cast(dtype).encode(jnp.asarray(x))["values"].dtype == dtype


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="float64 exists when x64 is on")
def test_cast_float64_without_x64_is_rejected():
  # With x64 off JAX would send float32 while wire_bits would count 64 bits per entry.
  with pytest.raises(ValueError, match="jax_enable_x64"):
    C.cast(jnp.float64)


def test_identity_is_exact():
  x = rand((3, 4), 0)
  np.testing.assert_array_equal(np.asarray(apply(C.identity(), jnp.asarray(x))), x)


# ----------------------------------------------------------------- pointwise deviation bounds


def _inputs(d, n, seed):
  """Gaussian, heavy-tailed, sparse, near-constant and one-spike vectors."""
  rng = np.random.default_rng(seed)
  out = [
    rng.standard_normal(d),
    rng.standard_cauchy(d),
    rng.standard_normal(d) ** 5,
    np.where(rng.random(d) < 0.05, rng.standard_normal(d), 0.0),
    1.0 + 1e-3 * rng.standard_normal(d),
    np.eye(1, d, d // 2)[0],
  ]
  while len(out) < n:
    out.append(rng.standard_normal(d) * np.exp(rng.uniform(-5, 5)))
  return np.stack(out).astype(np.float32)


# Settings beyond the registry's examples that this bound was always checked for.
EXTRA_POINTWISE = [("top_k", {"ratio": 0.1}), ("top_k", {"ratio": 0.5})]


@pytest.mark.parametrize("d", [5, 8, 37, 300, 1000])
@pytest.mark.parametrize(
  "name, kwargs",
  registry.cases(where=lambda c: c.deviation == "pointwise", slow_beyond_first=True)
  + [pytest.param(n, kw, id=registry.case_id(n, kw)) for n, kw in EXTRA_POINTWISE],
)
def test_pointwise_deviation_bound(name, kwargs, d):
  c = registry.build(name, kwargs)
  xs = _inputs(d, 64, seed=d)
  if isinstance(c, C.Cast) and c.dtype == jnp.float16:
    xs = np.clip(np.abs(xs), 1e-4, 6e4) * np.sign(xs + 1e-30)  # float16's normal range
    xs[xs == 0] = 1e-3
  outs = np.asarray(jax.jit(jax.vmap(c.compress))(jnp.asarray(xs)), np.float64)
  q2 = c.q_squared(d)
  for x, out in zip(xs.astype(np.float64), outs):
    assert sq(out - x) <= q2 * sq(x) * (1 + 1e-5) + 1e-30


def test_top_k_deviation_bound_is_tight_for_flat_vectors():
  # |x_i| all equal: ‖C(x) − x‖² = (1 − k/d)‖x‖² exactly, so q² cannot be smaller.
  d = 200
  x = np.where(np.arange(d) % 3 == 0, -1.0, 1.0).astype(np.float32)
  out = np.asarray(apply(C.top_k(0.1), jnp.asarray(x)), np.float64)
  assert sq(out - x) == pytest.approx(C.top_k(0.1).q_squared(d) * sq(x), rel=1e-6)


# ----------------------------------------------------------------- payload size == wire_bits

PAYLOAD_SHAPES = [
  (),
  (1,),
  (2,),
  (7,),
  (8,),
  (9,),
  (3, 5, 7),
  (255,),
  (256,),
  (257,),
  (65536,),
  (65537,),
]


@pytest.mark.parametrize("name, kwargs", registry.cases())
def test_encoded_payload_bits_equal_wire_bits(name, kwargs):
  c = registry.build(name, kwargs, "leaf")
  for dtype in (jnp.float32, jnp.bfloat16):
    for shape in PAYLOAD_SHAPES:
      # The payload `encode` produces, traced abstractly (no computation).
      x = jax.ShapeDtypeStruct(shape, dtype)
      payload = jax.eval_shape(c.encode, x, KEY)
      bits = sum(int(np.prod(p.shape)) * p.dtype.itemsize * 8 for p in jax.tree.leaves(payload))
      assert bits == c.wire_bits(shape, dtype), (shape, dtype)
  # And on concrete arrays, for a few shapes: nbytes of what encode really returns.
  x = jnp.asarray(rand((257,), seed=2))
  assert payload_nbits(jax.jit(c.encode)(x, KEY)) == c.wire_bits((257,), jnp.float32)


@pytest.mark.parametrize(
  "d, index_dtype",
  [
    (1, np.uint8),
    (255, np.uint8),
    (256, np.uint8),
    (257, np.uint16),
    (65536, np.uint16),
    (65537, np.uint16),  # beyond 65,536: 16-bit offsets inside blocks, plus per-block counts
  ],
)
def test_top_k_index_dtype_is_narrowest(d, index_dtype):
  x = jnp.asarray(rand((d,), 0))
  payload = jax.jit(C.top_k(0.01).encode)(x)
  assert payload["indices"].dtype == index_dtype
  k = k_of(0.01, d)
  assert payload["values"].shape == (k,) and payload["indices"].shape == (k,)
  want_bits = k * (32 + 8 * np.dtype(index_dtype).itemsize)
  blocks = -(-d // 65536)
  if blocks > 1:
    assert payload["counts"].dtype == np.uint16 and payload["counts"].shape == (blocks,)
    assert int(np.asarray(payload["counts"]).sum()) == k
    want_bits += 16 * blocks
  else:
    assert "counts" not in payload
  assert C.top_k(0.01).wire_bits((d,), jnp.float32) == want_bits
  # The largest index must be addressable: it round-trips.
  np.testing.assert_array_equal(np.asarray(apply(C.top_k(0.01), x)), np_top_k(np.asarray(x), k))


TREE = {
  "bf": jnp.asarray(rand((6, 5), 1)).astype(jnp.bfloat16),
  "nested": {
    "list": [jnp.asarray(rand((1,), 2)), None, jnp.asarray(rand((), 3))],
    "f32": jnp.asarray(rand((250,), 4)),
  },
  "empty": {},
}


@pytest.mark.parametrize(
  "name, kwargs, granularity",
  registry.cases(granularities=("leaf", "model"), slow_beyond_first=True),
)
def test_tree_helpers_structure_dtypes_and_payload_bits(name, kwargs, granularity):
  """Nested dicts/lists, bf16 + f32, size-1 and 0-d leaves, None leaves, an empty subtree."""
  c = registry.build(name, kwargs, granularity)
  assert c.granularity == granularity

  def roundtrip(t):
    payload = C.encode_tree(c, t, KEY)
    return payload, C.decode_tree(c, payload, t, KEY)

  payload, out = jax.jit(roundtrip)(TREE)
  assert payload_nbits(payload) == C.tree_wire_bits(c, TREE)
  if name == "top_k":  # "model" is one payload of 282 entries: indices switch to uint16.
    want = np.uint16 if granularity == "model" else np.uint8
    assert all(p["indices"].dtype == want for p in payload)
  assert jax.tree.structure(out) == jax.tree.structure(TREE)
  for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(TREE)):
    assert got.shape == x.shape and got.dtype == x.dtype
    assert np.all(np.isfinite(f64(got)))
  assert C.compress_tree(c, {}, KEY) == {}
  assert C.tree_wire_bits(c, {}) == 0
  if c.deviation == "none":
    for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(TREE)):
      np.testing.assert_array_equal(f64(got), f64(x))


def test_compress_tree_values_bf16_leaf_top_k():
  out = jax.jit(lambda t: C.compress_tree(C.top_k(0.5), t))(TREE)
  for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(TREE)):
    k = k_of(0.5, x.size)
    xo, go = f64(x).ravel(), f64(got).ravel()
    kept = np.flatnonzero(go)
    assert kept.size == k
    np.testing.assert_array_equal(np.sort(np.abs(go[kept])), np.sort(np.abs(xo))[-k:])


# One compiled error-feedback step per case: the first example of every compressor by default
# (the other examples' encode/decode on this TREE is test_tree_helpers_..., by default).
@pytest.mark.parametrize("name, kwargs", registry.cases(slow_beyond_first=True))
@pytest.mark.filterwarnings("ignore:.*not a contraction:UserWarning")
def test_error_feedback_pytree_edge_cases(name, kwargs):
  c = registry.build(name, kwargs, "leaf")
  tx = cj.error_feedback(c)
  state = tx.init(TREE)
  upd, state = jax.jit(tx.update)(TREE, state)
  assert jax.tree.structure(upd) == jax.tree.structure(TREE)
  for got, x in zip(jax.tree.leaves(upd), jax.tree.leaves(TREE)):
    assert got.shape == x.shape and got.dtype == x.dtype
  # Error feedback invariant: residual = corrected − sent = g − C(g) on the first step.
  for e, g, u in zip(
    jax.tree.leaves(state.residual.value), jax.tree.leaves(TREE), jax.tree.leaves(upd)
  ):
    assert e.shape == (1,) + g.shape
    if g.dtype == jnp.float32:
      np.testing.assert_allclose(f64(e[0]), f64(g) - f64(u), rtol=1e-6, atol=1e-6)
  empty = cj.error_feedback(c)
  u, _ = empty.update({}, empty.init({}))
  assert u == {}


def test_error_feedback_top_k_two_steps_against_numpy():
  rng = np.random.default_rng(0)
  g1, g2 = rng.standard_normal((2, 50)).astype(np.float32)
  tx = cj.error_feedback(C.top_k(0.1))
  state = tx.init({"w": jnp.zeros(50)})
  u1, state = tx.update({"w": jnp.asarray(g1)}, state)
  u2, state = tx.update({"w": jnp.asarray(g2)}, state)
  e = np.zeros(50, np.float32)
  want = []
  for g in (g1, g2):
    sent = np_top_k(g + e, 5)
    e = g + e - sent
    want.append(sent)
  np.testing.assert_allclose(np.asarray(u1["w"]), want[0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u2["w"]), want[1], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.residual.value["w"][0]), e, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- keys under shard_map


def _put(mesh, x):
  return jax.device_put(x, jax.NamedSharding(mesh, P("data")))


def _per_worker_keys(mesh, compressor, count):
  def f(_):
    key = step_key(compressor, 0, jnp.int32(count), "data")
    return jax.random.key_data(key)[None]

  fn = jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  return np.asarray(jax.jit(fn)(_put(mesh, jnp.zeros(mesh.size))))


@pytest.mark.parametrize("name, kwargs", registry.cases())
def test_step_keys_follow_declared_randomness(name, kwargs, mesh, n_devices):
  c = registry.build(name, kwargs)
  if c.randomness == "none":
    assert step_key(c, 0, jnp.int32(0), "data") is None
    return
  k0, k1 = (_per_worker_keys(mesh, c, t) for t in (0, 1))
  rows0, rows1 = {row.tobytes() for row in k0}, {row.tobytes() for row in k1}
  if c.randomness == "private":
    assert len(rows0) == n_devices  # private: one key per worker
    assert not rows0 & rows1  # and per step
  else:
    assert len(rows0) == 1  # shared: every worker the same key
    assert rows0 != rows1  # but a new one each step


def _mean_step(mesh, tx, x, steps):
  """Runs `steps` updates of `tx` with the same gradient x on every worker."""
  n = mesh.size
  g = _put(mesh, jnp.broadcast_to(jnp.asarray(x), (n,) + x.shape))
  state = cj.sharding.init(tx, {"w": jnp.asarray(x)}, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  def f(g, s):
    u, s = tx.update({"w": g[0]}, s)
    return u["w"], s

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), specs), out_specs=(P(), specs)))
  outs = []
  for _ in range(steps):
    out, state = fn(g, state)
    outs.append(np.asarray(out, np.float64))
  return outs


def test_qsgd_workers_draw_private_roundings(mesh, n_devices):
  levels = 4
  x = rand((64,), 9)
  tx = cj.compressed_mean(C.qsgd(levels), axis_name="data")
  outs = _mean_step(mesh, tx, x, steps=2)
  norm = np.linalg.norm(x.astype(np.float64))
  a = levels * np.abs(x) / norm
  for out in outs:
    # n·mean in units of norm/s is a sum of n integer levels, each ⌊a⌋ or ⌈a⌉ ...
    total = out * n_devices / (norm / levels)
    np.testing.assert_allclose(total, np.round(total), atol=1e-3)
    mag = np.abs(np.round(total))
    assert np.all(mag >= n_devices * np.floor(a)) and np.all(mag <= n_devices * np.ceil(a))
    # ... and if all workers shared one key the mean would itself be on the level grid.
    single = out / (norm / levels)
    assert np.max(np.abs(single - np.round(single))) > 0.1
  assert not np.array_equal(outs[0], outs[1])  # a new key each step


def test_random_k_shared_key_mean_equals_each_workers_c(mesh):
  # Integer-valued inputs: the psum of n equal values and /n are exact in float32.
  x = np.random.default_rng(0).integers(1, 1000, 200).astype(np.float32)
  k = k_of(0.05, 200)
  for make in (cj.compressed_mean, cj.error_feedback):
    tx = make(C.random_k(0.05), axis_name="data")
    outs = _mean_step(mesh, tx, x, steps=2)
    for step, out in enumerate(outs):
      kept = out != 0
      assert kept.sum() == k  # all workers kept the same k coordinates
      if step == 0 or make is cj.compressed_mean:  # (EF's step 2 sends x + residual)
        np.testing.assert_array_equal(out[kept], x[kept])
    positions = [frozenset(np.flatnonzero(o)) for o in outs]
    assert positions[0] != positions[1]


def test_uniforms_of_large_arrays_are_drawn_chunk_by_chunk():
  """Brute-force definition: chunk j of 2^20 entries is uniform(fold_in(key, j)); under vmap
  every key draws its own (shared randomness stays shared, private stays private)."""
  from compams_jax._src import keys

  n = keys.UNIFORM_CHUNK
  key = jax.random.key(7)
  u = np.asarray(keys.uniforms(key, (2 * n + 5,)))
  for j, (lo, hi) in enumerate([(0, n), (n, 2 * n), (2 * n, 2 * n + 5)]):
    want = np.asarray(jax.random.uniform(jax.random.fold_in(key, j), (n,), jnp.float32))
    np.testing.assert_array_equal(u[lo:hi], want[: hi - lo])
  assert u.min() >= 0.0 and u.max() < 1.0
  small = np.asarray(keys.uniforms(key, (3, 5)))
  np.testing.assert_array_equal(small, np.asarray(jax.random.uniform(key, (3, 5), jnp.float32)))
  ks = jax.random.split(key, 2)
  batched = np.asarray(jax.vmap(lambda k: keys.uniforms(k, (n + 3,)))(ks))
  for i in range(2):
    np.testing.assert_array_equal(batched[i], np.asarray(keys.uniforms(ks[i], (n + 3,))))
  assert not np.array_equal(batched[0], batched[1])
