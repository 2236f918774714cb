"""Fast exact top-k selection by magnitude: an estimated threshold, a compaction, a refinement.

`jax.lax.top_k` on CPU is a partial sort over the whole array, far slower than an elementwise
pass on a large vector (docs/benchmarks.md, section 3). `top_k_indices` returns the SAME
index set (ties broken towards the lower index, as `lax.top_k`) with a fixed output shape, in
a few streaming passes:

1. Keys. Every |x_i| is read as the integer bit pattern of x_i with the sign bit cleared. For
   non-negative IEEE floats that integer order is the float order (NaN above +inf, as the
   total order `lax.top_k` uses), so all comparisons below are exact integer comparisons.
2. Estimate. A stratified pseudo-random sample of m keys (one per stratum of d/m elements,
   position hashed from the stratum number: no PRNG key, no constant in the program) is
   bisected; its j-th largest key t is a threshold with k ≤ #{key ≥ t} ≤ c with overwhelming
   probability on any data without huge runs of equal values (j and the candidate budget c are
   chosen with a 6-sigma margin on the order-statistic spread).
3. Compaction. One pass packs the mask key ≥ t into 32-bit words; prefix sums over the words
   (d/32 of them) and a select-the-r-th-set-bit on each word place the first c entries above t,
   in index order, into a fixed-size buffer. No d-sized scatter or prefix sum.
4. Refinement. On the ≤ c candidates, a bisection on the integer keys finds the exact k-th
   largest key T; the output is every candidate with key > T plus the lowest-index candidates
   with key == T (exactly what `lax.top_k` keeps).

When the estimate misses (fewer than k or more than c entries above t) the result stays exact:
if t itself is the k-th largest value (a tie run at the threshold, e.g. a mostly-zero or an
all-zero gradient), a tie branch takes all keys > t and the lowest-index keys == t; otherwise
`lax.cond` falls back to the full `lax.top_k`. Under `vmap` a custom batching rule takes the
fast branch when every example of the batch succeeds (one scalar `cond`), so a batch does not
pay for the fallback it does not use.

The output ORDER differs from `lax.top_k` (the fast path returns ascending indices; the
fallback returns `lax.top_k`'s descending-magnitude order); the set is the same.

Costs: a few elementwise passes at run time, against a partial sort for `lax.top_k`, and a
larger program to compile (compressors compile it once per leaf shape); docs/benchmarks.md
measures both (benchmarks/compressor_throughput.py, benchmarks/scale.py).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Method = Literal["auto", "exact", "threshold"]
METHODS = ("auto", "exact", "threshold")

# Below this many elements `method="auto"` uses `lax.top_k` (compile time and fixed costs of
# the threshold path dominate there; the gain is at ResNet-layer sizes).
AUTO_MIN_SIZE = 1 << 16

_WORD = 32  # mask bits per packed word
_Z = 6.0  # sigmas of margin on the sample's order statistic
_MIN_SAMPLE = 1 << 14
_MAX_SAMPLE = 1 << 15


class Plan(NamedTuple):
  """Static parameters of the threshold path for one (d, k)."""

  d: int
  k: int
  m: int  # sample size: one per stratum of `stride` elements
  stride: int
  j: int  # threshold = j-th largest sampled key
  c: int  # candidate buffer size


@functools.cache
def plan(d: int, k: int) -> Plan | None:
  """The threshold path's static parameters, or None where it cannot pay off."""
  if d < 2 * _MIN_SAMPLE or k <= 0 or k >= d:
    return None
  q = k / d
  m = int(min(max(math.ceil(2000 / q), _MIN_SAMPLE), _MAX_SAMPLE, d // 2))
  stride = -(-d // m)
  m = -(-d // stride)  # strata of `stride` elements cover the array (the last one shorter)
  qm = q * m
  # Count above the j-th largest of m stratified samples ≈ d·Beta(j, m − j + 1): mean ≈ d·j/m,
  # sd ≈ d·√j/m. Pick j with j − z√j ≥ q·m (too few entries above t is a z-sigma event) and a
  # buffer c ≥ (j + z√j)·d/m (too many is a z-sigma event too).
  sj = (_Z + math.sqrt(_Z * _Z + 4.0 * qm)) / 2.0
  j = int(math.ceil(sj * sj))
  if j >= m:
    return None
  c = int(math.ceil((j + _Z * math.sqrt(j) + 1) * d / m)) + 64
  c = -(-c // _WORD) * _WORD
  if c >= d // 2:  # candidates are most of the array: no gain over the full sort
    return None
  return Plan(d=d, k=k, m=m, stride=stride, j=j, c=max(c, k))


# ------------------------------------------------------------------------------- keys


def _key_dtype(dtype) -> np.dtype | None:
  dtype = np.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    return None
  return {2: np.dtype(np.int16), 4: np.dtype(np.int32)}.get(dtype.itemsize)


def supported(dtype) -> bool:
  """Dtypes with a threshold path: 16- and 32-bit floats (float64 uses `lax.top_k`)."""
  return _key_dtype(dtype) is not None


def keys_of(x: jax.Array) -> jax.Array:
  """|x| as an int32 whose order is the total order of |x| (NaN > inf > ... > +0)."""
  kd = _key_dtype(x.dtype)
  bits = lax.bitcast_convert_type(x, kd)
  mask = np.array(np.iinfo(kd).max, kd)  # all bits but the sign
  return (bits & mask).astype(jnp.int32)


# ------------------------------------------------------------------------------- helpers


_SCAN_BLOCK = 128
_TRIU = np.triu(np.ones((_SCAN_BLOCK, _SCAN_BLOCK), np.float32))


def _cumsum(v: jax.Array, bound: int) -> jax.Array:
  """Inclusive prefix sums along the last axis of a non-negative int32 array, exactly.

  `bound` is a static upper bound of the entries (and their total must stay below 2**31).
  XLA:CPU lowers `jnp.cumsum` to a reduce-window and `lax.associative_scan` to a deep chain
  of slices; both compile slowly at these sizes and run slower than this: blocks
  of 128 summed by a float32 matmul with a triangular matrix (exact while a block's sum stays
  below 2**24; larger entries are split into byte planes summed separately), then the block
  totals recursively; at most 128 entries are summed with integer compares.
  """
  n = v.shape[-1]
  lead = v.shape[:-1]
  if n <= _SCAN_BLOCK:
    tri = np.tril(np.ones((n, n), bool))  # tri[i, j] = j ≤ i
    return jnp.sum(jnp.where(tri, v[..., None, :], 0), axis=-1, dtype=jnp.int32)
  rows = -(-n // _SCAN_BLOCK)
  blocks = jnp.pad(v, [(0, 0)] * len(lead) + [(0, rows * _SCAN_BLOCK - n)])
  blocks = blocks.reshape(*lead, rows, _SCAN_BLOCK)
  exact_in_f32 = int(bound) * _SCAN_BLOCK < 2**24
  planes = 1 if exact_in_f32 else -(-int(bound).bit_length() // 8)
  within = None
  for b in range(planes):
    plane = blocks if exact_in_f32 else (blocks >> (8 * b)) & 0xFF
    part = jnp.matmul(plane.astype(jnp.float32), _TRIU, precision=lax.Precision.HIGHEST)
    part = part.astype(jnp.int32) << (8 * b)
    within = part if within is None else within + part
  totals = within[..., -1]
  offsets = _cumsum(totals, min(int(bound) * _SCAN_BLOCK, 2**31 - 1)) - totals
  within = within + offsets[..., None]
  return within.reshape(*lead, rows * _SCAN_BLOCK)[..., :n]


def _hash32(i: jax.Array) -> jax.Array:
  """A 32-bit integer mix (lowbias32): a fixed pseudo-random function of i."""
  h = i.astype(jnp.uint32)
  h = (h ^ (h >> 16)) * np.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * np.uint32(0x846CA68B)
  return h ^ (h >> 16)


def sample_positions(p: Plan) -> jax.Array:
  """The m sampled positions: one per stratum of `stride` elements, at a hashed offset."""
  i = jnp.arange(p.m, dtype=jnp.int32)
  start = i * p.stride
  length = jnp.minimum(p.stride, p.d - start).astype(jnp.uint32)
  return start + (_hash32(i) % length).astype(jnp.int32)


def _sample_threshold(flat: jax.Array, p: Plan) -> jax.Array:
  """The j-th largest key of the stratified sample."""
  return _kth_largest(keys_of(flat[sample_positions(p)]), p.j, jnp.int32(0))


def _pack(flat: jax.Array, pred) -> jax.Array:
  """pred(keys) packed little-endian into uint32 words: bit b of word w is entry 32·w + b."""
  d = flat.shape[0]
  whole = d // _WORD
  shifts = jnp.arange(_WORD, dtype=jnp.uint32)
  parts = []
  if whole:
    m = pred(keys_of(flat[: whole * _WORD])).reshape(whole, _WORD).astype(jnp.uint32)
    parts.append(jnp.sum(m << shifts, axis=1, dtype=jnp.uint32))
  tail = d - whole * _WORD
  if tail:
    m = pred(keys_of(flat[whole * _WORD :])).astype(jnp.uint32)
    parts.append(jnp.sum(m << shifts[:tail], dtype=jnp.uint32)[None])
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _select_bit(word: jax.Array, rank: jax.Array) -> jax.Array:
  """Position of the rank-th (0-based) set bit of each uint32 word (rank < popcount(word))."""
  pos = jnp.zeros(word.shape, jnp.uint32)
  rank = rank.astype(jnp.uint32)
  for width in (16, 8, 4, 2, 1):
    low = (word >> pos) & np.uint32((1 << width) - 1)
    n = lax.population_count(low)
    up = rank >= n
    rank = jnp.where(up, rank - n, rank)
    pos = jnp.where(up, pos + np.uint32(width), pos)
  return pos.astype(jnp.int32)


def _first_set(words: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Flat positions of the first `size` set bits of `words`, ascending, and the total count.

  Slots past the count hold garbage; callers mask them with the count.
  """
  cnt = lax.population_count(words).astype(jnp.int32)
  incl = _cumsum(cnt, _WORD)
  excl = incl - cnt
  # Each slot's word: the last word whose exclusive offset is ≤ the slot. The offsets are
  # non-decreasing, so that is (the number of words with offset ≤ slot) − 1: a scatter-add of
  # ones at the offsets, then a prefix sum.
  marks = jnp.zeros((size,), jnp.int32).at[excl].add(1, mode="drop")
  w = _cumsum(marks, words.shape[0]) - 1
  rank = jnp.arange(size, dtype=jnp.int32) - excl[w]
  pos = w * _WORD + _select_bit(words[w], rank)
  return pos, incl[-1]


def _kth_largest(cand: jax.Array, k: int, lo: jax.Array) -> jax.Array:
  """The k-th largest of the int32 keys `cand` (padding < 0), given count(cand ≥ lo) ≥ k."""
  hi = jnp.max(cand)

  def cond(b):
    return b[0] < b[1]

  def body(b):
    lo, hi = b
    half = hi - lo
    mid = lo + half // 2 + half % 2  # ceil midpoint without overflow
    ok = jnp.sum(cand >= mid, dtype=jnp.int32) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  # min/max with hi also give both carries hi's manual-axis type under shard_map.
  lo = lo.astype(jnp.int32)
  return lax.while_loop(cond, body, (jnp.minimum(lo, hi), jnp.maximum(hi, lo)))[0]


def _take_top(cand_idx: jax.Array, cand: jax.Array, k: int, kth: jax.Array) -> jax.Array:
  """The k candidate indices with key > kth, then the lowest-index ones == kth (ascending)."""
  gt = cand > kth
  eq = cand == kth
  cum = _cumsum(jnp.stack([gt, eq]).astype(jnp.int32), 1)
  n_gt = cum[0, -1]
  need = k - n_gt
  take = gt | (eq & (cum[1] <= need))
  slot = cum[0] + jnp.minimum(cum[1], need) - 1
  slot = jnp.where(take, slot, k)
  return jnp.zeros((k,), jnp.int32).at[slot].set(cand_idx, mode="drop")


# ------------------------------------------------------------------------------- branches


def exact_indices(flat: jax.Array, k: int) -> jax.Array:
  """`lax.top_k` on |x| (descending magnitude, ties towards the lower index)."""
  return lax.top_k(jnp.abs(flat), k)[1].astype(jnp.int32)


def _estimate(flat: jax.Array, p: Plan):
  t = _sample_threshold(flat, p)
  words = _pack(flat, lambda key: key >= t)
  return t, words


def _main(flat: jax.Array, t: jax.Array, words: jax.Array, p: Plan) -> jax.Array:
  idx, n = _first_set(words, p.c)
  valid = jnp.arange(p.c, dtype=jnp.int32) < n
  idx = jnp.where(valid, idx, 0)
  cand = jnp.where(valid, keys_of(flat[idx]), -1)
  kth = _kth_largest(cand, p.k, t)
  return _take_top(idx, cand, p.k, kth)


def _tie(flat: jax.Array, t: jax.Array, p: Plan) -> jax.Array:
  """The k-th largest key is t itself: every key > t, then the first keys == t."""
  gt_idx, n_gt = _first_set(_pack(flat, lambda key: key > t), p.k)
  eq_idx, _ = _first_set(_pack(flat, lambda key: key == t), p.k)
  slot = jnp.arange(p.k, dtype=jnp.int32)
  return jnp.where(slot < n_gt, gt_idx, eq_idx[jnp.maximum(slot - n_gt, 0)])


BRANCH_MAIN, BRANCH_TIE, BRANCH_EXACT = 0, 1, 2
BRANCH_STATIC_EXACT = -1  # `lax.top_k` chosen at trace time (see `top_k_indices_and_branch`)


def _branch(flat, t, words, p: Plan) -> jax.Array:
  """Which branch serves this input: 0 threshold, 1 tie at the threshold, 2 full sort."""
  n_ge = jnp.sum(lax.population_count(words), dtype=jnp.int32)
  main_ok = (n_ge >= p.k) & (n_ge <= p.c)
  zero = jnp.zeros_like(n_ge)  # (constants typed like the data, for shard_map)

  def tie_or_exact():
    n_gt = jnp.sum(keys_of(flat) > t, dtype=jnp.int32)
    return jnp.where(n_gt <= p.k, zero + BRANCH_TIE, zero + BRANCH_EXACT)

  # n_ge < k: t is too high for the tie branch as well. n_ge > c: one more pass to see whether
  # t is the k-th largest value (then #{key > t} ≤ k).
  return lax.cond(
    main_ok,
    lambda: zero + BRANCH_MAIN,
    lambda: lax.cond(n_ge > p.c, tie_or_exact, lambda: zero + BRANCH_EXACT),
  )


def _single(flat: jax.Array, p: Plan) -> tuple[jax.Array, jax.Array]:
  t, words = _estimate(flat, p)
  branch = _branch(flat, t, words, p)
  idx = lax.switch(
    branch,
    [
      lambda: _main(flat, t, words, p),
      lambda: _tie(flat, t, p),
      lambda: exact_indices(flat, p.k),
    ],
  )
  return idx, branch


@functools.cache
def _batched_selector(p: Plan):
  """(indices, branch) of one flat array, with a vmap rule that keeps the fast path cheap."""

  @jax.custom_batching.custom_vmap
  def select(flat):
    return _single(flat, p)

  @select.def_vmap
  def _rule(axis_size, in_batched, flat):
    del axis_size
    if not in_batched[0]:
      return select(flat), (False, False)
    t, words = jax.vmap(lambda f: _estimate(f, p))(flat)
    n_ge = jnp.sum(lax.population_count(words), axis=-1, dtype=jnp.int32)

    # One scalar decision for the whole batch: the threshold branch when every example can take
    # it; otherwise every example goes through the per-example switch (vmapped, that runs every
    # branch for every example: slow, but only for a batch with a miss).
    def fast():
      idx = jax.vmap(lambda f, t, w: _main(f, t, w, p))(flat, t, words)
      return idx, jnp.zeros_like(n_ge) + BRANCH_MAIN

    out = lax.cond(
      jnp.all((n_ge >= p.k) & (n_ge <= p.c)), fast, lambda: jax.vmap(lambda f: _single(f, p))(flat)
    )
    return out, (True, True)

  return select


def _plan_for(flat: jax.Array, k: int, method: Method) -> Plan | None:
  """The threshold path's plan for this call, or None where `lax.top_k` is used statically."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  d = flat.shape[0]
  p = plan(d, k) if supported(flat.dtype) else None
  if method == "exact" or p is None or (method == "auto" and d < AUTO_MIN_SIZE):
    return None
  return p


def top_k_indices(flat: jax.Array, k: int, method: Method = "auto") -> jax.Array:
  """Flat indices of the k largest |flat| entries: the set `lax.top_k(|flat|, k)` returns.

  Args:
    flat: a 1-D floating-point array.
    k: static number of entries, 0 < k ≤ flat.size.
    method: "exact" (`lax.top_k`), "threshold" (the estimated-threshold path wherever it is
      defined: 16/32-bit floats, at least 32,768 elements, k well below d/2), or "auto" (the
      threshold path from `AUTO_MIN_SIZE` elements up, `lax.top_k` below).

  Returns:
    int32 indices, shape (k,).
  """
  p = _plan_for(flat, k, method)
  if p is None:
    return exact_indices(flat, k)
  return _batched_selector(p)(lax.stop_gradient(flat))[0]


def top_k_indices_and_branch(
  flat: jax.Array, k: int, method: Method = "auto"
) -> tuple[jax.Array, jax.Array]:
  """`top_k_indices` and which branch ran, for tests and benchmarks (the library never asks).

  Args:
    flat: as in `top_k_indices`.
    k: as in `top_k_indices`.
    method: as in `top_k_indices`.

  Returns:
    (the indices `top_k_indices` returns, an int32 branch: `BRANCH_MAIN` (0) threshold,
    `BRANCH_TIE` (1) tie at the threshold, `BRANCH_EXACT` (2) full `lax.top_k` at run time,
    or `BRANCH_STATIC_EXACT` (-1) when `lax.top_k` was chosen statically).
  """
  p = _plan_for(flat, k, method)
  if p is None:
    return exact_indices(flat, k), jnp.int32(BRANCH_STATIC_EXACT)
  return _batched_selector(p)(lax.stop_gradient(flat))
