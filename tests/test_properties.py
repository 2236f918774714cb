"""Randomized (hypothesis) properties of the compressors and of error feedback on 8 workers.

tests/test_compressors.py checks fixed inputs against brute-force NumPy definitions; here the
inputs are random and the checks are the invariants every compressor declares:

* the encoded payload holds exactly `wire_bits` / `tree_wire_bits` bits;
* decode(encode(x)) has x's structure, shapes and dtypes;
* the declared pointwise deviation bound ‖C(x) − x‖² ≤ q²‖x‖² (in float64, from the arrays);
* the same key gives a bit-identical payload, different keys differ for randomized codes;
* finite inputs whose magnitudes the wire format can carry give finite outputs, zeros give zeros;
* under `jax.shard_map` on 8 devices, `error_feedback` (gather and two-phase) returns the same
  finite average on every device and conserves Σ(g + e) exactly up to rounding.

Compressors come from the registry (`tests/registry.py`: every registered compressor, every
example), with the values of well-known arguments (`ratio`, `levels`, `granularity`) drawn from
wider ranges than the examples. Rules that depend on one compressor's documented limits
(`_bound_applies`, `_finite_expected`, ...) name its class; a compressor without such a rule gets
the generic one (its pointwise bound everywhere; finite output while ‖x‖₁ cannot overflow and
2‖x‖₂ fits the leaf dtype).

Cost: every new (compressor, shapes, dtypes) is one XLA compilation (~0.3–1 s on a loaded CPU),
so shapes come from a few buckets while the VALUES are free (a recipe: kind, seed, zero
fraction, expanded by NumPy). The abstract test (shapes and bits only, `jax.eval_shape`) draws
arbitrary shapes, ratios and levels because it compiles nothing.

Where a bound does not hold for a documented reason it is restricted, with the reason in
`_bound_applies`/`_finite_expected`. Inputs that break a DOCUMENTED promise are the
regression tests at the end of the compressor section (qsgd norm overflow/underflow,
block_sign scale overflow, cast bf16→f16 clamp: bugs found by these properties, now fixed).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import registry

C = cj.compressors

F32, BF16, F16 = np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
DTYPES = (F32, BF16, F16)
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)


def finfo(dtype):
  return ml_dtypes.finfo(dtype)


def unit_roundoff(dtype) -> float:
  return float(finfo(dtype).eps) / 2


# ----------------------------------------------------------------- compressor families

RATIOS = st.sampled_from([0.01, 0.1, 0.3, 0.5, 0.999, 1.0])
LEVELS = st.sampled_from([1, 2, 4, 127, 128, 32767])
GRANULARITY = st.sampled_from(["leaf", "model"])
# Values drawn for a factory argument of this name, in place of the registry example's value.
COMPILED_ARGUMENTS = {"ratio": RATIOS, "levels": LEVELS, "granularity": GRANULARITY}
ABSTRACT_ARGUMENTS = {
  "ratio": st.floats(1e-6, 1.0, exclude_min=True),
  "levels": st.integers(1, 32767),
  "granularity": GRANULARITY,
}


@st.composite
def compressors(draw, name: str, kwargs: dict, arguments=COMPILED_ARGUMENTS):
  """The registry example `name(**kwargs)`, each argument in `arguments` the factory takes
  drawn from its strategy."""
  params = C.REGISTRY[name].parameters
  kwargs = dict(kwargs)
  for arg, strategy in arguments.items():
    if arg in params:
      kwargs[arg] = draw(strategy)
  return registry.build(name, kwargs)


def test_registry_builds_every_family():
  """`get(name, **kw)` builds the same (frozen, hashable) compressors as the factories."""
  assert C.get("top_k", ratio=0.3, granularity="model") == C.top_k(0.3, granularity="model")
  assert C.get("qsgd", levels=128) == C.qsgd(128)
  assert C.get("cast", dtype=jnp.float16) == C.cast(jnp.float16)
  assert C.get("block_sign", exact_zeros=True) == C.block_sign(exact_zeros=True)
  assert C.get("scaled_sign") == C.scaled_sign()
  assert C.get("random_k", ratio=0.5) == C.random_k(0.5)
  assert C.get("identity") == C.identity()
  assert C.get("terngrad", granularity="model") == C.terngrad(granularity="model")
  for name, kwargs in registry.examples():
    c = C.get(name, **kwargs)
    assert c == C.REGISTRY[name].factory(**kwargs) == C.FACTORIES[name](**kwargs)
    assert hash(c) == hash(C.get(name, **kwargs))


# ----------------------------------------------------------------- values

KINDS = ("zeros", "normal", "huge", "tiny", "mixed", "spike", "constant", "per_leaf")


def _magnitudes(kind: str, rng: np.random.Generator, d: int, dtype) -> np.ndarray:
  fi = finfo(dtype)
  if kind == "zeros":
    return np.zeros(d)
  if kind == "normal":
    return np.abs(rng.standard_normal(d)) * 10.0 ** rng.uniform(-3, 3)
  if kind == "huge":  # 1e30 for float32, near the maximum for the 16-bit types
    top = 1e30 if dtype == F32 else float(fi.max)
    return top * rng.uniform(0.5, 1.0, d)
  if kind == "tiny":  # straddles the smallest normal: subnormals and the first normal binades
    lo, hi = math.log10(float(fi.smallest_subnormal)), math.log10(float(fi.tiny) * 64)
    return 10.0 ** rng.uniform(lo, hi, d)
  if kind == "mixed":  # many binades at once, kept inside the dtype's normal range
    span = 4.0 if dtype == F16 else 12.0
    return 10.0 ** rng.uniform(-span, span, d)
  if kind == "spike":
    out = np.where(rng.random(d) < 0.5, 0.0, 1e-3 * np.abs(rng.standard_normal(d)))
    if d:
      out[rng.integers(d)] = 10.0 ** rng.uniform(0, 3)
    return out
  if kind == "constant":
    return np.full(d, 10.0 ** rng.uniform(-2, 2))
  raise AssertionError(kind)


def make_values(recipe, shape, dtype, leaf: int = 0) -> np.ndarray:
  """Deterministic array from a recipe (kind, seed, zero fraction); leaf varies the seed."""
  kind, seed, zero_frac = recipe
  rng = np.random.default_rng([seed, leaf])
  if kind == "per_leaf":
    kind = KINDS[rng.integers(len(KINDS) - 1)]
  d = math.prod(shape)
  x = _magnitudes(kind, rng, d, dtype) * rng.choice([-1.0, 1.0], d)
  zero = rng.random(d) < zero_frac
  x[zero] = np.where(rng.random(int(zero.sum())) < 0.5, 0.0, -0.0)
  return x.astype(dtype).reshape(shape)


recipes = st.tuples(
  st.sampled_from(KINDS), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])
)

# Leaf shapes for compiled checks: 0-d, size 1, odd sizes, the uint8→uint16 index boundary.
SHAPES = [(), (1,), (7,), (3, 5), (2, 1, 9), (257,)]
LARGE = (100_003,)  # uint32 indices; > 65,536 so top_k(method="auto") takes the threshold path

# Multi-leaf trees (mixed dtypes): leaf vs model granularity differ here.
TREES = [
  (("a", (3, 5), F32), ("b", (), BF16), ("c", (7,), F32)),
  (("w", (2, 1, 9), F16), ("v", (1,), F32)),
  (("p", (7,), BF16), ("q", (3, 5), BF16)),
]


@st.composite
def tree_specs(draw, allow_large: bool):
  """A tree spec: tuple of (name, shape, dtype) leaves; mostly one leaf."""
  choice = draw(st.integers(0, 9))
  if choice < 2:
    return draw(st.sampled_from(TREES))
  shape = LARGE if allow_large and choice == 9 else draw(st.sampled_from(SHAPES))
  return (("x", shape, draw(st.sampled_from(DTYPES))),)


def build_tree(spec, recipe):
  return {name: make_values(recipe, shape, dtype, i) for i, (name, shape, dtype) in enumerate(spec)}


# ----------------------------------------------------------------- helpers


def f64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)


def sq(v) -> float:
  return float(np.sum(np.square(v, dtype=np.float64)))


def payload_nbits(payload) -> int:
  return sum(int(np.asarray(leaf).nbytes) * 8 for leaf in jax.tree.leaves(payload))


def bits_of(tree):
  """Raw bits of every leaf (bitwise comparisons, NaN == NaN)."""
  return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


@functools.cache
def roundtrip_fn(c, spec):
  """Jitted (payload, C(tree)) for one compressor and tree spec (compiled once)."""
  del spec  # part of the cache key only: jit re-specializes on shapes anyway

  def f(tree, key):
    payload = C.encode_tree(c, tree, key)
    return payload, C.decode_tree(c, payload, tree, key)

  return jax.jit(f)


def keys_for(c, seeds):
  return [jax.random.key(s) if c.needs_key else None for s in seeds]


def blocks(c, spec, x_tree, out_tree):
  """The compression blocks: one per leaf, or one flattened vector for model granularity.

  Each block: (x as float64, C(x) as float64, flat dtype fed to the compressor, leaf dtypes).
  """
  names = [name for name, _, _ in spec]
  dtypes = [dtype for _, _, dtype in spec]
  xs = [f64(x_tree[n]).ravel() for n in names]
  outs = [f64(out_tree[n]).ravel() for n in names]
  if c.granularity == "model":
    flat = np.dtype(jnp.result_type(*dtypes))
    return [(np.concatenate(xs), np.concatenate(outs), flat, dtypes)]
  return [(x, o, dt, [dt]) for x, o, dt in zip(xs, outs, dtypes)]


def _round_to(x64: np.ndarray, dtype) -> np.ndarray:
  with np.errstate(over="ignore"):
    return x64.astype(dtype).astype(np.float64)


def _cast_decoded(c, x, flat, leaf_dtypes):
  """What cast should decode to, through flat dtype → wire dtype → each leaf dtype."""
  r = _round_to(_round_to(x, flat), c.dtype)
  return r, all(np.all(np.abs(r) <= float(finfo(dt).max)) for dt in leaf_dtypes)


def _scale_fits_leaves(scale, leaf_dtypes) -> bool:
  """Intrinsic to ONE scale for a model of mixed dtypes: a float16 leaf cannot hold a scale
  set by large float32 leaves (e.g. 65504-sized f16 entries next to 1e30 f32 entries decode
  to ±inf in the f16 leaf). Not a wire limit: the float32 scale is exact on the wire."""
  return all(scale <= float(finfo(dt).max) * (1 - 1e-3) for dt in leaf_dtypes)


def _bound_applies(c, x, flat, leaf_dtypes) -> bool:
  """Whether the declared pointwise bound is promised for this block (documented limits)."""
  if isinstance(c, C.TopK):  # values are copied: no rounding, no limit
    return True
  if isinstance(c, C.ChunkedTopK) and c.value_dtype is not None:
    # Its docstring: a value_dtype rounds a kept value within its unit roundoff only inside the
    # value dtype's normal range (as cast; XLA:CPU flushes float32 subnormals).
    fi, a = finfo(c.value_dtype), np.abs(x)
    return bool(np.all((a == 0) | ((a >= float(fi.tiny)) & (a <= float(fi.max)))))
  if isinstance(c, C.Cast):
    # Cast's docstring: only elements inside the wire dtype's normal range (or exact zeros).
    fi = finfo(c.dtype)
    a = np.abs(x)
    if not np.all((a == 0) | ((a >= float(fi.tiny)) & (a <= float(fi.max)))):
      return False
    # Regression-tested separately (test_cast_bf16_of_float16_near_max_is_finite): an element inside the wire
    # range that rounds past the LEAF dtype's max decodes to inf.
    return _cast_decoded(c, x, flat, leaf_dtypes)[1]
  if isinstance(c, C.BlockSign):
    a = np.abs(np.asarray(x, np.float64))
    # XLA:CPU treats float32 subnormal INPUTS as zero too (DAZ): they drop out of the scale.
    if np.any((a > 0) & (a < float(finfo(F32).tiny))):
      return False
    total = float(np.sum(np.abs(x)))
    if (
      total >= F32_MAX / 2
    ):  # Regression-tested separately: test_block_sign_scale_overflows_for_huge_finite_input
      return False
    # XLA:CPU flushes float32 subnormals to zero in arithmetic (FTZ/DAZ): a scale ‖x‖₁/d below
    # the smallest normal of float32 (or of a leaf dtype it is cast to) comes out 0 / rounded
    # far beyond the dtype's unit roundoff.
    scale = total / max(x.size, 1)
    if not _scale_fits_leaves(scale, leaf_dtypes):
      return False
    return scale == 0 or all(scale >= 2 * float(finfo(dt).tiny) for dt in [F32, *leaf_dtypes])
  if isinstance(c, C.DctTopK):
    # Float32 transforms: XLA:CPU flushes subnormal products and sums to zero, so entries near
    # float32's smallest normal lose more than the declared transform error (its docstring).
    a = np.abs(x)
    if np.any((a > 0) & (a < 2.0**40 * F32_TINY)):
      return False
    # A chunk's coefficients (sent in value_dtype, default the block's dtype) and decoded
    # entries are at most its norm: they must fit the wire and leaf dtypes (float16: clamped).
    wire = flat if c.value_dtype is None else c.value_dtype
    return 2 * math.sqrt(sq(x)) <= min(float(finfo(t).max) for t in [wire, *leaf_dtypes])
  return True  # a pointwise compressor without documented limits promises its bound everywhere


def _finite_expected(c, x, flat, leaf_dtypes) -> bool:
  """Whether the wire format can carry this block, so C(x) must be finite."""
  if isinstance(c, (C.Identity, C.TopK, C.RandomK)):
    return True
  if isinstance(c, C.Cast):
    # Wire dtype overflow is documented for float16 ("overflows to inf"), and above the
    # bfloat16 maximum for bfloat16; the leaf-dtype overflow is the known bug.
    r = _round_to(_round_to(x, flat), c.dtype)
    return bool(np.all(np.isfinite(r))) and _cast_decoded(c, x, flat, leaf_dtypes)[1]
  if isinstance(c, C.BlockSign):
    total = float(np.sum(np.abs(x)))
    if total >= F32_MAX / 2:  # Regression-tested separately (see _bound_applies)
      return False
    return _scale_fits_leaves(total / max(x.size, 1), leaf_dtypes)
  if isinstance(c, C.QSGD):
    norm2 = sq(x)
    if norm2 >= F32_MAX / 2:  # Regression-tested separately: test_qsgd_norm_overflow_gives_nan
      return False
    # Intrinsic: a decoded entry is up to |x_i| + ‖x‖/s, which may exceed a 16-bit leaf dtype.
    reach = (float(np.max(np.abs(x))) if x.size else 0.0) + math.sqrt(norm2) / c.levels
    return all(reach <= float(finfo(dt).max) * (1 - 1e-3) for dt in leaf_dtypes)
  # Generic: no sum of magnitudes overflows float32 and every decoded entry, at most 2‖x‖₂
  # (a scale such as max|x|, mean|x| or ‖x‖₂, plus the entry), fits each leaf dtype.
  if float(np.sum(np.abs(x))) >= F32_MAX / 2:
    return False
  reach = 2 * math.sqrt(sq(x))
  return all(reach <= float(finfo(dt).max) * (1 - 1e-3) for dt in leaf_dtypes)


def _bound_rtol(c) -> float:
  if isinstance(c, C.BlockSign):
    # The scale is a float32 mean (summation error) then rounded to the leaf dtype (≤ u):
    # a relative scale error δ adds d·δ²·s² ≤ δ²‖x‖² to the deviation.
    return 2e-4
  if isinstance(c, (C.TopK, C.Cast)):
    return 1e-12  # top_k copies, cast rounds each element within u|x_i|: exact up to float64
  return 1e-5  # generic: float32 arithmetic


def check_block(c, x, out, flat, leaf_dtypes):
  """All value properties of one compression block (x, C(x) as float64 vectors)."""
  d = x.size
  finite = _finite_expected(c, x, flat, leaf_dtypes)
  if finite:
    assert np.all(np.isfinite(out)), (c, flat, leaf_dtypes, x[~np.isfinite(out)][:5])
  if d and np.all(x == 0):
    np.testing.assert_array_equal(out, np.zeros(d), err_msg=f"{c}: zeros must give zeros")
  if c.deviation == "none":
    np.testing.assert_array_equal(out, x)
  if c.deviation == "pointwise" and _bound_applies(c, x, flat, leaf_dtypes):
    q2 = c.q_squared(d)
    dev, norm2 = sq(out - x), sq(x)
    slack = 0.0
    if isinstance(c, C.BlockSign) and c.norm == "l2":
      # The l2 scale s is not the deviation-optimal one (that is the l1 mean), so its rounding
      # to the leaf dtype, s(1 + δ) with |δ| ≤ u, changes the deviation to first order:
      # by 2δ·s·(d·s − ‖x‖₁) + d·s²·δ² ≤ (2u + u²)‖x‖².
      u = max(float(finfo(t).eps) / 2 for t in leaf_dtypes)
      slack = (2 * u + u * u) * norm2
    bound = q2 * norm2 * (1 + _bound_rtol(c)) + slack
    if isinstance(c, C.DctTopK):
      # Its docstring: a 16-bit dtype (the flattened vector's, whose coefficients are sent in it,
      # or a leaf's, to which the output is rounded) adds its relative error u twice, in norm.
      u = max(unit_roundoff(t) for t in [flat, *leaf_dtypes])
      bound = (math.sqrt(q2 * norm2) + 2.01 * u * math.sqrt(norm2)) ** 2 * (1 + _bound_rtol(c))
    assert dev <= bound, (c, flat, leaf_dtypes, dev, q2 * norm2)
  if isinstance(c, C.Cast) and _bound_applies(c, x, flat, leaf_dtypes):
    np.testing.assert_array_equal(out, _cast_decoded(c, x, flat, leaf_dtypes)[0])
  if isinstance(c, (C.TopK, C.RandomK)):  # sparsifiers: every entry is x_i or 0, ≤ k kept
    assert np.all((out == x) | (out == 0))
    assert np.count_nonzero(out) <= C.num_kept(c.ratio, d)
  if isinstance(c, C.TopK) and d:  # ... and what is kept is a largest-magnitude set
    # Ranked as XLA compares them: XLA:CPU flushes subnormals to zero, so they rank as 0.
    mag = np.where(np.abs(x) < F32_TINY, 0.0, np.abs(x))
    kept, dropped = mag[out != 0], mag[out == 0]
    if kept.size < C.num_kept(c.ratio, d):  # room left: only zeros may be dropped
      assert np.all(dropped == 0)
    elif dropped.size:
      assert np.max(dropped) <= np.min(kept)
  if isinstance(c, C.QSGD) and finite and sq(x) > 1e-30:
    # Each entry is one of the two levels around x_i (signs agree; a 16-bit leaf rounds).
    norm = math.sqrt(sq(x))
    u = max(unit_roundoff(dt) for dt in leaf_dtypes)
    tiny = max(float(finfo(dt).tiny) for dt in leaf_dtypes)
    slack = norm / c.levels * (1 + 1e-3) + 2 * u * np.abs(out) + tiny
    assert np.all(np.abs(out - x) <= slack)
    assert np.all((out == 0) | (np.sign(out) == np.sign(x)))


def _randomizes(x) -> bool:
  """Generic: at least 8 normal entries with magnitudes in [0.2, 0.8]·max|x| (a randomized code
  is expected to draw those independently of each other; e.g. TernGrad sends each with
  probability |x_i|/max|x|)."""
  a = np.abs(x)
  if not a.size or not np.all(np.isfinite(a)) or float(np.sum(a)) >= F32_MAX / 2:
    return False
  top = float(a.max())
  mid = (a >= 0.2 * top) & (a <= 0.8 * top) & (a >= 1e-30)
  return int(np.count_nonzero(mid)) >= 8


def _qsgd_nontrivial(c, x) -> bool:
  """Enough entries whose stochastic rounding is a real coin flip (frac of level in [.2, .8])."""
  norm2 = sq(x)
  if not 1e-30 < norm2 < F32_MAX / 2:
    return False
  a = c.levels * np.abs(x) / math.sqrt(norm2)
  frac = a - np.floor(a)
  return int(np.count_nonzero((frac > 0.2) & (frac < 0.8))) >= 8


def check_example(c, spec, value_recipes, n_keys=6):
  fn = roundtrip_fn(c, spec)
  like = {name: jax.ShapeDtypeStruct(shape, dtype) for name, shape, dtype in spec}
  for recipe in value_recipes:
    x_tree = build_tree(spec, recipe)
    (key,) = keys_for(c, [17])
    payload, out = fn(x_tree, key)
    # Bits on the wire: what encode really returned, and the static count.
    assert payload_nbits(payload) == C.tree_wire_bits(c, like)
    if c.granularity == "leaf":
      assert C.tree_wire_bits(c, like) == sum(c.wire_bits(s, dt) for _, s, dt in spec)
    # Structure, shapes, dtypes.
    assert jax.tree.structure(out) == jax.tree.structure(x_tree)
    for name, shape, dtype in spec:
      assert out[name].shape == shape and out[name].dtype == dtype, (name, out[name].dtype)
    # Same key → bit-identical payload (a fresh key object, a second execution).
    payload2, out2 = fn(x_tree, keys_for(c, [17])[0])
    assert bits_of(payload2) == bits_of(payload) and bits_of(out2) == bits_of(out)
    # Values.
    bl = blocks(c, spec, x_tree, out)
    for x, o, flat, leaf_dtypes in bl:
      check_block(c, x, o, flat, leaf_dtypes)
    # Different keys → different payloads, for randomized codes on non-trivial inputs.
    if c.needs_key:
      if isinstance(c, C.RandomK):
        nontrivial = [
          x.size > C.num_kept(c.ratio, x.size) and np.unique(x).size == x.size for x, *_ in bl
        ]
      elif isinstance(c, C.QSGD):
        nontrivial = [_qsgd_nontrivial(c, x) for x, *_ in bl]
      else:
        nontrivial = [_randomizes(x) for x, *_ in bl]
      if any(nontrivial):
        seen = {tuple(bits_of(fn(x_tree, k))) for k in keys_for(c, range(n_keys))}
        assert len(seen) > 1, f"{c}: {n_keys} keys gave one payload"


# ----------------------------------------------------------------- compressor properties


# Hypothesis draws each family's settings itself: the registry's other examples add nothing by
# default (they run in -m slow).
@pytest.mark.parametrize("name, kwargs", registry.cases(slow_beyond_first=True))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compressor_properties(name, kwargs, data):
  c = data.draw(compressors(name, kwargs), label="compressor")
  # top_k's threshold path costs ~10 s to compile: its large size is test_top_k_large below.
  spec = data.draw(tree_specs(allow_large=name != "top_k"), label="tree")
  value_recipes = data.draw(st.lists(recipes, min_size=1, max_size=3), label="values")
  large = any(math.prod(s) > 10_000 for _, s, _ in spec)
  check_example(c, spec, value_recipes, n_keys=3 if large else 6)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value_recipes=st.lists(recipes, min_size=2, max_size=4))
def test_top_k_large(value_recipes):
  """d = 100,003: top_k(method="auto") takes the estimated-threshold path (one compile)."""
  check_example(C.top_k(0.01), (("x", LARGE, F32),), value_recipes)


@st.composite
def abstract_compressors(draw):
  name, kwargs = draw(st.sampled_from(registry.examples()))
  return draw(compressors(name, kwargs, ABSTRACT_ARGUMENTS))


small_dims = st.integers(0, 9)
abstract_shapes = st.one_of(
  st.lists(small_dims, max_size=4).map(tuple),
  st.sampled_from([(255,), (256,), (257,), (8, 32), (65_536,), (65_537,), (300, 301)]),
)
abstract_trees = st.recursive(
  st.tuples(abstract_shapes, st.sampled_from(DTYPES)).map(
    lambda sd: jax.ShapeDtypeStruct(sd[0], sd[1])
  ),
  lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.sampled_from("abcd"), children, max_size=3)
  ),
  max_leaves=5,
)


@settings(max_examples=80, deadline=None)
@given(c=abstract_compressors(), tree=abstract_trees)
def test_wire_bits_and_shapes_abstract(c, tree):
  """Any shapes (incl. empty), ratios, levels, pytrees: payload bits and decoded shapes/dtypes,
  traced abstractly (`jax.eval_shape`, nothing compiled)."""
  key = jax.random.key(0) if c.needs_key else None

  def roundtrip(t):
    payload = C.encode_tree(c, t, key)
    return payload, C.decode_tree(c, payload, t, key)

  payload, out = jax.eval_shape(roundtrip, tree)
  assert payload_bits_abstract(payload) == C.tree_wire_bits(c, tree)
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
  for leaf in jax.tree.leaves(tree):
    assert C.payload_bits(c.payload_shapes(leaf.shape, leaf.dtype)) == c.wire_bits(
      leaf.shape, leaf.dtype
    )


def payload_bits_abstract(payload) -> int:
  return sum(math.prod(p.shape) * np.dtype(p.dtype).itemsize * 8 for p in jax.tree.leaves(payload))


# ----------------------------------------------------------------- regression tests of fixed bugs


def _eval(c, x):
  key = jax.random.key(0) if c.needs_key else None
  return np.asarray(jax.jit(c.compress)(jnp.asarray(x), key)).astype(np.float64)


def test_qsgd_norm_overflow_gives_nan():
  x = np.full(4, 1e30, np.float32)  # a = s|x_i|/‖x‖ = 2 exactly: Q(x) = x whatever the key
  out = _eval(C.qsgd(4), x)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, x, rtol=1e-5)


def test_qsgd_norm_underflow_zeroes_small_vectors():
  x = np.full(4, 1e-20, np.float32)  # a = 2 exactly: Q(x) = x whatever the key
  out = _eval(C.qsgd(4), x)
  np.testing.assert_allclose(out, x, rtol=1e-5)


@pytest.mark.parametrize(
  "x",
  [np.full(8, 1e38, np.float32), np.array([3.0e38, -3.0e38], ml_dtypes.bfloat16)],
  ids=["f32x8", "bf16x2"],
)
def test_block_sign_scale_overflows_for_huge_finite_input(x):
  out = _eval(C.block_sign(), x)
  assert np.all(np.isfinite(out))
  assert sq(out - f64(x)) <= C.block_sign().q_squared(x.size) * sq(f64(x)) * (1 + 1e-4)


def test_cast_bf16_of_float16_near_max_is_finite():
  x = np.array([65504.0, -65440.0, 65408.0, 1.0], np.float16)
  out = _eval(C.cast(jnp.bfloat16), x)
  assert np.all(np.isfinite(out))
  assert sq(out - f64(x)) <= C.cast(jnp.bfloat16).q_squared(4) * sq(f64(x))


# ----------------------------------------------------------------- error feedback on 8 devices

EF_STEPS = 4
EF_TREES = [
  (("w", (3, 5), F32), ("b", (7,), F32)),
  (("k", (2, 1, 9), F32), ("s", (), F32), ("h", (5,), BF16)),
]
# Every registry example, and each at "model" granularity where its factory takes one.
EF_COMPRESSORS = list(
  dict.fromkeys(
    [registry.build(name, kw) for name, kw in registry.examples()]
    + [registry.build(name, kw, "model") for name, kw in registry.examples()]
  )
)
ef_values = st.tuples(
  st.sampled_from(["normal", "normal", "spike", "constant", "zeros", "per_leaf_small"]),
  st.integers(0, 2**32 - 1),
  st.sampled_from([0.0, 0.1, 0.5]),
)


def _ef_grads(recipe, spec, n):
  """(n, steps, *shape) per leaf; moderate magnitudes (the sums must not overflow)."""
  kind, seed, zero_frac = recipe
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape, dtype in spec:
    leaf_kind = kind if kind != "per_leaf_small" else ["normal", "spike", "zeros"][rng.integers(3)]
    x = np.stack(
      [
        make_values(
          (leaf_kind, int(rng.integers(2**32)), zero_frac), (EF_STEPS,) + shape, np.float64
        )
        for _ in range(n)
      ]
    )
    out[name] = x.astype(dtype)
  return out


@functools.cache
def ef_run_fn(c, topology, spec, mesh):
  wire = cj.wire.two_phase() if topology == "two_phase" else cj.wire.gather()
  tx = cj.error_feedback(c, axis_name="data", seed=3, wire=wire)

  def varying(node):  # the carry of a scan must already vary over workers where it will
    if isinstance(node, cj.PerWorker):
      return node.replace(
        jax.tree.map(lambda a: jax.lax.pcast(a, "data", to="varying"), node.value)
      )
    return node

  def run(grads):
    g = jax.tree.map(lambda x: x[0], grads)  # this worker's (steps, *shape)
    state = tx.init(jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), g))
    state = jax.tree.map(varying, state, is_leaf=lambda x: isinstance(x, cj.PerWorker))

    def step(state, g_t):
      u, state = tx.update(g_t, state)
      server = state.wire_state.value[0] if topology == "two_phase" else None
      return state, (u, jax.tree.map(lambda e: e[0], state.residual.value), server)

    _, per_step = jax.lax.scan(step, state, g)  # one compiled step body, EF_STEPS iterations
    return jax.tree.map(lambda a: a[None], per_step)

  # out_specs P("data") on the (invariant) average: device i's copy lands in row i.
  return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P("data"), out_specs=P("data")))


def _flat(tree, spec, axis_prefix):
  """Leaves concatenated after `axis_prefix` leading axes, as float64, in the pytree's leaf
  order (sorted dict keys, as `flatten_tree` lays out the two-phase vector)."""
  return np.concatenate(
    [
      f64(tree[name]).reshape(tree[name].shape[:axis_prefix] + (-1,)) for name, _, _ in sorted(spec)
    ],
    axis=-1,
  )


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  c=st.sampled_from(EF_COMPRESSORS),
  topology=st.sampled_from(["gather", "two_phase"]),
  spec=st.sampled_from(EF_TREES),
  recipe=ef_values,
)
def test_error_feedback_invariants_on_8_devices(mesh, n_devices, c, topology, spec, recipe):
  n = n_devices
  grads = _ef_grads(recipe, spec, n)
  fn = ef_run_fn(c, topology, spec, mesh)
  outs, residuals, servers = fn(jax.device_put(grads, NamedSharding(mesh, P("data"))))

  for name, shape, dtype in spec:
    o = np.asarray(outs[name])  # (n devices, steps, *shape)
    assert o.shape == (n, EF_STEPS) + shape and o.dtype == dtype, (name, o.shape, o.dtype)
    assert np.all(np.isfinite(o.astype(np.float64))), name
    for i in range(1, n):  # the same average on every device, bit for bit
      assert o[i].tobytes() == o[0].tobytes(), (name, i)

  # Conservation, in float64, flattened over the tree in spec order, for every step t:
  #   gather:    Σ_i (g_i + e_i)         = n·out + Σ_i e'_i
  #   two-phase: Σ_i (g_i + e_i) + n·s   = n·out + Σ_i e'_i + n·s'   (s: server residuals)
  g = _flat(grads, spec, 2)  # (n, steps, size)
  e_new = _flat(residuals, spec, 2)
  out = _flat(outs, spec, 2)[0]  # (steps, size)
  size = out.shape[-1]
  eps = np.concatenate([np.full(math.prod(s), float(finfo(dt).eps)) for _, s, dt in sorted(spec)])
  e_old = np.concatenate([np.zeros_like(e_new[:, :1]), e_new[:, :-1]], axis=1)
  if topology == "two_phase":
    s_new = f64(servers).transpose(1, 0, 2).reshape(EF_STEPS, -1)[:, :size]  # chunks in order
    s_old = np.concatenate([np.zeros_like(s_new[:1]), s_new[:-1]])
  else:
    s_new = s_old = np.zeros_like(out)
  lhs = (g + e_old).sum(axis=0) + n * s_old
  rhs = n * out + e_new.sum(axis=0) + n * s_new
  scale = (
    np.abs(g).sum(0)
    + np.abs(e_old).sum(0)
    + np.abs(e_new).sum(0)
    + n * np.abs(out)
    + n * np.abs(s_old)
    + n * np.abs(s_new)
  )
  err = np.abs(lhs - rhs)
  tol = 4 * eps * scale + 1e-30
  if isinstance(c, C.DctTopK):
    # A transform code's decoded entries are float32 sums over a whole chunk (and decode_sum
    # transforms the sum of the coefficients once, not each worker's): an entry's rounding is
    # relative to its chunk's magnitudes, not its own. Bounded here by the largest scale of the
    # step times the vector's size (≥ a chunk's m^1.5 / 8 for these small trees).
    tol = tol + 4 * eps * scale.max(axis=-1, keepdims=True) * size
  if c.summable and topology == "gather":
    # `summable` is exact only up to the wire dtype: the psum adds the payloads in it, and each
    # of its n − 1 additions rounds (≤ u of a partial sum), an error no residual records. (On
    # XLA:CPU a bfloat16 psum is widened to float32 and rounded once; float16 is not widened.)
    wire_u = max(
      unit_roundoff(p.dtype)
      for _, shape, dtype in spec
      for p in jax.tree.leaves(c.payload_shapes(shape, dtype))
      if jnp.issubdtype(p.dtype, jnp.floating)
    )
    sent = np.abs(g + e_old - e_new).sum(axis=0)  # Σ_i |C(g_i + e_i)|
    tol = tol + 1.01 * (n - 1) * wire_u * sent
  assert np.all(err <= tol), (c, topology, np.max(err / (scale + 1e-30)))
  # Sanity: for a lossy compressor the state must not be trivially zero after non-zero inputs.
  if c.deviation != "none" and np.any(g != 0) and topology == "gather":
    # (or nothing was lost: every worker's input was sparse enough to be sent whole)
    assert np.any(e_new != 0) or np.all(np.abs(n * out - (g + e_old).sum(0)) <= tol)
