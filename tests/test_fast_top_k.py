"""The estimated-threshold top-k (`method="threshold"`) against `lax.top_k` and NumPy argsort.

The fast path must return exactly k entries, the same index set as `jax.lax.top_k` on |x|
(which breaks ties towards the lower index, as a stable descending argsort does), whatever the
data: continuous, tied, heavy-tailed, all-zero, sorted, or built so that the sampled threshold
estimate is wrong (then a tie branch or the full-sort fallback must run, and it is checked
that it did). Expected sets come from NumPy's stable argsort, never from the library.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from compams_jax.compressors import _selection as sel

C = cj.compressors
MAIN, TIE, EXACT, STATIC_EXACT = 0, 1, 2, -1


def k_of(ratio: float, d: int) -> int:
  return max(1, math.ceil(Fraction(str(ratio)) * d))


def np_top_set(x, k: int) -> set[int]:
  """Brute force: the k largest |x| by a stable argsort (ties to the lower index).

  NaN ranks above +inf, as in lax.top_k's total order.
  """
  a = np.abs(np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64).reshape(-1))
  is_nan = np.isnan(a)
  a = np.where(is_nan, np.inf, a)
  order = np.lexsort((np.arange(a.size), -a, ~is_nan))  # last key is the primary one
  return set(order[:k].tolist())


@functools.cache
def _selector(k: int, method: str):
  return jax.jit(lambda x: sel.top_k_indices_and_branch(x, k, method))


def select(x, k: int, method: str = "threshold"):
  idx, branch = _selector(k, method)(jnp.asarray(x))
  return np.asarray(idx), int(branch)


def check_same_as_top_k(x, k: int, idx) -> None:
  """Exactly k distinct indices; the same set as lax.top_k and as NumPy's stable argsort."""
  assert idx.shape == (k,)
  got = set(idx.tolist())
  assert len(got) == k
  want = np_top_set(x, k)
  assert got == want
  _, lax_idx = jax.lax.top_k(jnp.abs(jnp.asarray(x)), k)
  assert got == set(np.asarray(lax_idx).tolist())


def gaussian(d, seed, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(d).astype(dtype)


D = 200_003  # > the auto cutoff (65,536), not a multiple of the 32-bit packing word
K = k_of(0.01, D)


# ----------------------------------------------------------------- continuous inputs


@pytest.mark.parametrize(
  "d, ratio", [(D, 0.01), (1_000_000, 0.01), (D, 0.1), (D, 1e-4), (70_000, 0.3)]
)
def test_continuous_same_set_as_lax_top_k(d, ratio):
  x = gaussian(d, seed=d % 1000)
  k = k_of(ratio, d)
  idx, branch = select(x, k)
  assert branch == MAIN  # the estimate holds on continuous data: no fallback
  check_same_as_top_k(x, k, idx)


def test_k_equals_one_and_heavy_tails():
  rng = np.random.default_rng(7)
  cauchy = rng.standard_cauchy(D).astype(np.float32)
  lognormal = (np.exp(rng.normal(0, 8, D)) * rng.choice([-1, 1], D)).astype(np.float32)
  for x in (cauchy, lognormal):
    idx, branch = select(x, K)
    assert branch == MAIN
    check_same_as_top_k(x, K, idx)
  idx, branch = _selector(1, "threshold")(jnp.asarray(cauchy))
  assert int(branch) == MAIN
  assert np.asarray(idx).tolist() == [int(np.argmax(np.abs(cauchy)))]


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_sorted_input(order):
  x = np.linspace(0.0, 1.0, D, dtype=np.float32)
  x = x if order == "ascending" else x[::-1].copy()
  idx, branch = select(x, K)
  assert branch == MAIN  # the stratified sample covers the tail strata too
  check_same_as_top_k(x, K, idx)


def test_bfloat16_and_float16():
  for dtype in (jnp.bfloat16, jnp.float16):
    x = jnp.asarray(gaussian(D, seed=3)).astype(dtype)  # bf16: many ties near the threshold
    idx, branch = select(x, K)
    assert branch == MAIN
    check_same_as_top_k(x, K, idx)


def test_nan_and_inf_rank_like_lax_top_k():
  x = gaussian(D, seed=4)
  x[[5, 50_000]] = np.nan
  x[[7, 150_000]] = [np.inf, -np.inf]
  idx, _ = select(x, K)
  check_same_as_top_k(x, K, idx)


# ----------------------------------------------------------------- ties and degenerate data


def test_ties_exact_lower_index_rule():
  # Integers 0..49: ~4,000 copies of each magnitude, so the k-th largest sits in a run of ties
  # far larger than k; lax.top_k keeps the lowest-index members of that run, and so must we.
  x = np.random.default_rng(5).integers(-49, 50, D).astype(np.float32)
  idx, branch = select(x, K)
  assert branch in (MAIN, TIE)
  check_same_as_top_k(x, K, idx)
  mags = np.sort(np.abs(x[idx]))
  np.testing.assert_array_equal(mags, np.sort(np.abs(x))[-K:])  # the top-k multiset


def test_ties_inside_the_candidate_buffer():
  # A run of equal values at the k-th rank, small enough to fit in the candidate buffer.
  x = gaussian(D, seed=6)
  order = np.argsort(-np.abs(x), kind="stable")
  run = order[K - 300 : K + 300]  # ranks around k share one magnitude
  x[run] = np.float32(np.abs(x[order[K]])) * np.sign(x[run])
  idx, branch = select(x, K)
  assert branch == MAIN
  check_same_as_top_k(x, K, idx)


def test_all_zeros_takes_the_tie_branch():
  x = np.zeros(D, np.float32)
  idx, branch = select(x, K)
  assert branch == TIE
  assert np.array_equal(np.sort(idx), np.arange(K))  # lax.top_k's lowest-index zeros


def test_fewer_nonzeros_than_k():
  # A mostly-zero gradient (e.g. embedding rows not in the batch): every non-zero, then the
  # first zeros.
  x = np.zeros(D, np.float32)
  nz = np.random.default_rng(8).choice(D, K // 3, replace=False)
  x[nz] = gaussian(nz.size, seed=9)
  idx, branch = select(x, K)
  assert branch == TIE
  check_same_as_top_k(x, K, idx)


def test_single_spike():
  x = np.zeros(D, np.float32)
  x[123_457] = -3.0
  idx, branch = _selector(1, "threshold")(jnp.asarray(x))
  assert np.asarray(idx).tolist() == [123_457]
  idx, branch = select(x, K)
  check_same_as_top_k(x, K, idx)
  assert 123_457 in set(idx.tolist())


# ----------------------------------------------------------------- estimate misses: fallback


def _sampled_mask(d: int, k: int) -> np.ndarray:
  plan = sel.plan(d, k)
  mask = np.zeros(d, bool)
  mask[np.asarray(sel.sample_positions(plan))] = True
  assert mask.sum() == plan.m
  return mask


def test_fallback_when_the_sample_sees_only_the_big_values():
  # Big values exactly at the sampled positions: the sample's j-th largest is far above the
  # true k-th largest, fewer than k entries pass it, and the full sort must take over.
  mask = _sampled_mask(D, K)
  x = gaussian(D, seed=10) * 1e-3
  x[mask] = 10.0 + np.abs(gaussian(mask.sum(), seed=11))
  plan = sel.plan(D, K)
  assert plan.j < K < mask.sum()  # the construction is adversarial for this plan
  idx, branch = select(x, K)
  assert branch == EXACT
  check_same_as_top_k(x, K, idx)


def test_fallback_when_the_sample_misses_the_big_values():
  # Big values only where nothing is sampled: the estimate is far too low, more than c
  # entries pass it, and more than k of them exceed it (not a tie): full sort.
  mask = _sampled_mask(D, K)
  rng = np.random.default_rng(12)
  x = rng.uniform(0.0, 1.0, D).astype(np.float32)
  big = rng.choice(np.flatnonzero(~mask), 3 * K, replace=False)
  x[big] = 10.0 + rng.uniform(0.0, 1.0, big.size).astype(np.float32)
  idx, branch = select(x, K)
  assert branch == EXACT
  check_same_as_top_k(x, K, idx)


# ----------------------------------------------------------------- methods, compressor, maps


def test_plan_invariants():
  for d in (32_768, 65_536, D, 1_000_000, 11_000_000, 2**31 - 1):
    for ratio in (1e-5, 1e-4, 0.001, 0.01, 0.05, 0.1, 0.3):
      k = k_of(ratio, d)
      p = sel.plan(d, k)
      if p is None:
        continue
      assert k <= p.c < d // 2 and p.c % 32 == 0
      assert 0 < p.j < p.m <= d // 2
      assert p.stride * (p.m - 1) < d <= p.stride * p.m  # strata cover the array
  assert sel.plan(1000, 10) is None and sel.plan(D, D) is None


def _uses_threshold_path(d: int, k: int, method: str, dtype=jnp.float32) -> bool:
  """Whether the traced program contains the threshold selector (trace only, no compile)."""
  jaxpr = jax.make_jaxpr(lambda x: sel.top_k_indices(x, k, method))(
    jax.ShapeDtypeStruct((d,), dtype)
  )
  return "custom_vmap" in str(jaxpr)


def test_method_choice_is_static():
  assert _uses_threshold_path(D, K, "auto") and _uses_threshold_path(D, K, "threshold")
  assert not _uses_threshold_path(D, K, "exact")
  assert not _uses_threshold_path(40_000, 400, "auto")  # auto: from 65,536 elements up
  assert _uses_threshold_path(40_000, 400, "threshold")
  assert _uses_threshold_path(D, K, "auto", jnp.bfloat16)
  assert not sel.supported(np.float64) and sel.supported(jnp.bfloat16)
  assert not _uses_threshold_path(1000, 10, "threshold")  # too small: lax.top_k
  assert not _uses_threshold_path(D, D, "threshold")  # k = d
  assert not _uses_threshold_path(D, k_of(0.6, D), "threshold")  # k ≥ d/2
  x = gaussian(1000, seed=13)
  idx, branch = select(x, 10, "threshold")
  assert branch == STATIC_EXACT
  check_same_as_top_k(x, 10, idx)
  # The library's entry point returns the indices only: the same ones, on both paths.
  for d, method in ((1000, "threshold"), (D, "threshold"), (D, "exact")):
    v = jnp.asarray(gaussian(d, seed=14))
    only = jax.jit(lambda v, m=method: sel.top_k_indices(v, 10, m))(v)
    assert isinstance(only, jax.Array) and only.shape == (10,)
    np.testing.assert_array_equal(np.asarray(only), select(v, 10, method)[0])
  with pytest.raises(ValueError, match="method"):
    sel.top_k_indices(jnp.asarray(x), 10, "sorted")


def test_compressor_methods_agree_and_payload_unchanged():
  x = jnp.asarray(gaussian(7 * 30_000, seed=14).reshape(7, 30_000))  # a 2-D leaf
  d = x.size
  k = k_of(0.01, d)
  exact, fast, auto = (C.top_k(0.01, method=m) for m in ("exact", "threshold", "auto"))
  assert C.top_k(0.01) == auto and auto.method == "auto"
  shapes = [c.payload_shapes(x.shape, x.dtype) for c in (exact, fast, auto)]
  assert shapes[0] == shapes[1] == shapes[2]
  # Over 65,536 entries: 16-bit offsets inside blocks of 65,536, one 16-bit count per block.
  blocks = -(-d // 65_536)
  assert shapes[0]["indices"].dtype == jnp.uint16 and shapes[0]["values"].shape == (k,)
  assert shapes[0]["counts"].shape == (blocks,)
  want_bits = k * (32 + 16) + blocks * 16
  assert exact.wire_bits(x.shape, x.dtype) == fast.wire_bits(x.shape, x.dtype) == want_bits
  p = jax.jit(fast.encode)(x)
  flat = np.asarray(x).reshape(-1)
  block_of = np.repeat(np.arange(blocks), np.asarray(p["counts"]).astype(np.int64))
  idx = block_of * 65_536 + np.asarray(p["indices"]).astype(np.int64)
  assert set(idx.tolist()) == np_top_set(flat, k)
  np.testing.assert_array_equal(np.asarray(p["values"]), flat[idx])
  dense = [
    np.asarray(jax.jit(c.decode)(q, x)) for c, q in ((exact, jax.jit(exact.encode)(x)), (fast, p))
  ]
  np.testing.assert_array_equal(dense[0], dense[1])
  np.testing.assert_array_equal(
    dense[1], np.where(np.isin(np.arange(d), idx), flat, 0.0).reshape(x.shape)
  )
  with pytest.raises(ValueError, match="method"):
    C.top_k(0.01, method="sorted")
  assert C.get("top_k", ratio=0.01, method="exact").method == "exact"


def test_vmap_mixed_branches_and_gradient():
  d, k = 70_000, 700
  rows = [
    gaussian(d, 15),
    np.zeros(d, np.float32),
    (np.arange(d) % 7).astype(np.float32),
    gaussian(d, 16) ** 3,
  ]
  xs = jnp.asarray(np.stack(rows))
  f = jax.jit(jax.vmap(lambda x: sel.top_k_indices_and_branch(x, k, "threshold")))
  idx, branch = f(xs)
  assert np.asarray(branch).tolist() == [MAIN, TIE, TIE, MAIN]
  for row, got in zip(rows, np.asarray(idx)):
    assert set(got.tolist()) == np_top_set(row, k)
  fast_rows = [rows[0], rows[3], -rows[3], gaussian(d, 17)]
  idx, branch = f(jnp.asarray(np.stack(fast_rows)))  # all fast: the batched fast branch
  assert np.asarray(branch).tolist() == [MAIN] * 4
  for row, got in zip(fast_rows, np.asarray(idx)):
    assert set(got.tolist()) == np_top_set(row, k)
  # C(x) stays differentiable in x (the selection is constant): gradient = the kept mask.
  c = C.top_k(0.01, method="threshold")
  g = jax.jit(jax.grad(lambda x: jnp.sum(c.compress(x) ** 2) / 2))(xs[0])
  assert set(np.flatnonzero(np.asarray(g)).tolist()) == np_top_set(rows[0], k)


def test_under_shard_map(mesh, n_devices):
  d = 70_000
  k = k_of(0.01, d)
  xs = np.stack([gaussian(d, 20 + i) for i in range(n_devices)])
  xs[1] = 0.0
  c = C.top_k(0.01, method="threshold")
  fn = jax.jit(
    jax.shard_map(
      lambda x: c.compress(x[0])[None], mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )
  )
  out = np.asarray(fn(jax.device_put(jnp.asarray(xs), jax.NamedSharding(mesh, P("data")))))
  for i in range(n_devices):
    want = np.zeros(d, np.float32)
    want[list(np_top_set(xs[i], k))] = xs[i][list(np_top_set(xs[i], k))]
    np.testing.assert_array_equal(out[i], want)
