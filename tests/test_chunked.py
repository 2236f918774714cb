"""chunked_top_k (SparseLoCo) and dct_top_k (DeMo) against plain NumPy definitions.

Every expected value comes from tests/reference.py (loops over chunks, argsort, a DCT matrix
built from its definition and checked against scipy.fft), never from the library's output:
the chunk layout, the 12-bit index code and the b-bit value code byte for byte, the per-chunk
top-k set, the quantizer's codes and per-bin means, wire_bits against the payload, the bytes
ratios of SparseLoCo's and COMP-AMS's settings on a GPT-2 MLP matrix, decode_count /
decode_sum / residual over three workers (stacked and as a gathered bucket), the DCT's
orthonormality and its top-k, and DeMo's scatter-mean.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.fft

import compams_jax as cj
from compams_jax._src import bucket
from compams_jax.compressors import _index_code
from compams_jax.compressors._chunked_top_k import quantize
from tests import reference

C = cj.compressors


def rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@functools.cache
def _fn(c, what):
  return jax.jit(getattr(c, what))


def compress(c, x):
  return np.asarray(_fn(c, "compress")(jnp.asarray(x)))


def payloads_of(c, xs):
  """Three workers' payloads stacked along a leading axis (one compiled encode)."""
  return jax.jit(jax.vmap(c.encode))(jnp.asarray(np.stack(xs)))


def over_workers(fns, payloads, like):
  """[fn(payloads, like) for fn in fns] for the payloads stacked, then as the wire gathers them
  (one byte buffer, `bucket.Rows` read one worker at a time): one compiled program."""
  n = jax.tree.leaves(payloads)[0].shape[0]
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), payloads)

  def run(stacked, buffer, like):
    rows = bucket.unpack_rows(buffer, [one], n)[0]
    return [fn(stacked, like) for fn in fns], [fn(rows, like) for fn in fns]

  return jax.jit(run)(payloads, bucket.pack([payloads], lead=1), like)


# ----------------------------------------------------------------- the 12-bit and b-bit codes


@pytest.mark.parametrize("count", [1, 2, 7, 64, 4095])
def test_index_code_round_trip_and_bytes(count):
  rng = np.random.default_rng(count)
  idx = rng.integers(0, 4096, count)
  idx[0] = 4095
  idx[-1] = 0 if count > 1 else 4095
  packed, back = jax.jit(lambda i: (p := _index_code.pack12(i), _index_code.unpack12(p, count)))(
    jnp.asarray(idx)
  )
  packed, back = np.asarray(packed), np.asarray(back)
  assert packed.dtype == np.uint8 and packed.size == _index_code.index_bytes(count)
  assert packed.size == 3 * math.ceil(count / 2)
  np.testing.assert_array_equal(packed, reference.np_pack12(idx))
  assert back.dtype == np.int32
  np.testing.assert_array_equal(back, idx)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("count", [1, 5, 64])
def test_value_code_round_trip_and_bytes(bits, count):
  codes = np.random.default_rng(bits * count).integers(0, 2**bits, count)
  codes[0] = 2**bits - 1
  packed, back = jax.jit(
    lambda c: (p := _index_code.pack_bits(c, bits), _index_code.unpack_bits(p, bits, count))
  )(jnp.asarray(codes))
  packed = np.asarray(packed)
  assert packed.size == _index_code.code_bytes(count, bits) == math.ceil(count * bits / 8)
  np.testing.assert_array_equal(packed, reference.np_pack_bits(codes, bits))
  np.testing.assert_array_equal(np.asarray(back), codes)


# ----------------------------------------------------------------- chunk layout


@pytest.mark.parametrize(
  "shape, side, vector_side, want",
  [
    ((768, 3072), 64, 4096, (768, 3072, 64, 64)),
    ((50257, 768), 64, 4096, (50257, 768, 29, 64)),  # 50257 = 29·1733
    ((768,), 64, 4096, (1, 768, 1, 768)),
    ((50257,), 64, 4096, (1, 50257, 1, 1733)),
    ((4099,), 64, 4096, (1, 4099, 1, 1)),  # a prime: chunks of 1
    ((768,), 64, 64, (1, 768, 1, 64)),  # DeMo's vectors: chunks ≤ 64
    ((2, 3, 8), 4, 16, (6, 8, 3, 4)),  # ndim > 2: (prod(shape[:-1]), shape[-1])
    ((), 64, 4096, (1, 1, 1, 1)),
  ],
)
def test_layout(shape, side, vector_side, want):
  assert reference.np_chunk_layout(shape, side, vector_side) == want
  # chunked_top_k cuts vectors into chunks of up to chunk², dct_top_k (as DeMo) of up to chunk.
  c = C.ChunkedTopK(chunk=side) if vector_side == side * side else C.DctTopK(chunk=side)
  lay = c.layout(shape)
  assert (lay.rows, lay.cols, lay.r, lay.c) == want


@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 8), (12,)])
def test_chunk_membership_and_flat_index(shape):
  c = C.chunked_top_k(chunk=4, value_bits=None)
  lay = c.layout(shape)
  d = math.prod(shape)
  want = np.array(reference.np_chunks(shape, 4, 16))
  local = np.tile(np.arange(lay.m)[None], (lay.num_chunks, 1))
  got, index = jax.jit(lambda x, l: (lay.chunks(x), lay.flat_index(l)))(
    jnp.arange(d).reshape(shape), local
  )
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(index), want)


# ----------------------------------------------------------------- chunked_top_k

SMALL = [
  ({"k": 16, "chunk": 8, "value_bits": None}, (24, 40)),  # 15 chunks of 8×8, k_m = 16
  ({"k": 5, "chunk": 8, "value_bits": None}, (6, 20)),  # 6×5 chunks: k_m = ⌈5·30/64⌉ = 3
  ({"k": 16, "chunk": 8, "value_bits": 2}, (24, 40)),
  ({"k": 16, "chunk": 8, "value_bits": 4}, (3, 4, 10)),
  ({"k": 16, "chunk": 8, "value_bits": 8}, (300,)),  # 1-D: chunks of 60, k_m = 15
  ({"k": 41, "value_bits": None, "value_dtype": jnp.bfloat16}, (64, 128)),
]


@pytest.mark.parametrize("kwargs, shape", SMALL)
def test_chunked_top_k_matches_reference(kwargs, shape):
  c = C.chunked_top_k(**kwargs)
  x = rand(shape, seed=len(shape))
  got = compress(c, x)
  assert got.shape == x.shape and got.dtype == x.dtype
  np.testing.assert_allclose(got, reference.np_chunked_top_k(x, **kwargs), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs, shape", SMALL[:2])
def test_chunked_top_k_sends_each_chunks_top_k(kwargs, shape):
  """The payload's indices are, chunk by chunk, its k_m largest magnitudes (the set)."""
  c = C.chunked_top_k(**kwargs)
  x = rand(shape, seed=3)
  payload = _fn(c, "encode")(jnp.asarray(x))
  chunks = reference.np_chunks(shape, kwargs["chunk"], kwargs["chunk"] ** 2)
  m = len(chunks[0])
  k_m = min(m, max(1, math.ceil(kwargs["k"] * m / kwargs["chunk"] ** 2)))
  local = np.asarray(_index_code.unpack12(payload["indices"], len(chunks) * k_m))
  flat = x.reshape(-1)
  for j, entries in enumerate(chunks):
    want = set(reference.np_top_k_positions(flat[entries], k_m))
    assert set(local[j * k_m : (j + 1) * k_m].tolist()) == want
  positions = [chunks[j][p] for j in range(len(chunks)) for p in local[j * k_m : (j + 1) * k_m]]
  np.testing.assert_array_equal(np.asarray(payload["values"]), flat[positions])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_codes_and_bin_means(bits):
  v = rand((300,), seed=bits) * np.exp(rand((300,), seed=9))  # heavy tails: clamped bins
  codes, table = jax.jit(quantize, static_argnums=1)(jnp.asarray(v), bits)
  want_codes, want_table = reference.np_quantize(v, bits)
  np.testing.assert_array_equal(np.asarray(codes), want_codes)
  np.testing.assert_allclose(np.asarray(table), want_table, rtol=1e-6, atol=1e-7)
  assert set(want_codes) == set(range(2**bits)) or bits == 8  # every bin used (not for 256)


def test_quantizer_constant_and_single_values_are_exact():
  for v in (np.full(9, -2.5, np.float32), np.array([3.0], np.float32)):
    codes, table = jax.jit(quantize, static_argnums=1)(jnp.asarray(v), 2)
    np.testing.assert_array_equal(np.asarray(table)[np.asarray(codes)], v)


@pytest.mark.parametrize(
  "kwargs",
  [
    {"k": 64, "value_bits": 2},
    {"k": 64, "value_bits": 4},
    {"k": 64, "value_bits": 8, "value_dtype": jnp.bfloat16},
    {"k": 41, "value_bits": None, "value_dtype": jnp.bfloat16},
    {"k": 7, "chunk": 5, "value_bits": None},
  ],
)
def test_chunked_wire_bits_equal_payload_bits(kwargs):
  c = C.chunked_top_k(**kwargs)
  shapes = [(), (0,), (0, 5), (1,), (7,), (4099,), (3, 5, 7), (768, 768), (50257, 768), (768,)]
  for dtype in (jnp.float32, jnp.bfloat16):
    for shape in shapes:
      payload = c.payload_shapes(shape, dtype)
      assert C.payload_bits(payload) == c.wire_bits(shape, dtype), (shape, dtype)


def test_bytes_ratios_on_a_gpt2_mlp_matrix():
  """768×3072 float32: SparseLoCo's 64 of 4,096 with 2-bit codes sends ≥ 146× fewer bits;
  COMP-AMS's 1% (41 of 4,096) with bfloat16 values ≥ 100×; both exact to the formula."""
  shape, dense = (768, 3072), 768 * 3072 * 32
  kept = 12 * 48 * 64
  sparse_loco = C.chunked_top_k(64, chunk=64, value_bits=2).wire_bits(shape, jnp.float32)
  assert sparse_loco == kept * (12 + 2) + 4 * 32 == 516_224
  assert dense / sparse_loco >= 146
  kept = 12 * 48 * 41
  comp_ams = C.chunked_top_k(41, value_bits=None, value_dtype=jnp.bfloat16)
  assert comp_ams.wire_bits(shape, jnp.float32) == kept * (12 + 16) == 661_248
  assert dense / comp_ams.wire_bits(shape, jnp.float32) >= 100


@pytest.mark.parametrize("kwargs, shape", [SMALL[1], SMALL[2]])
def test_chunked_decode_sum_count_and_residual_over_three_workers(kwargs, shape):
  c = C.chunked_top_k(**kwargs)
  xs = [rand(shape, seed=20 + i) for i in range(3)]
  xs[1][:, :3] = 0.0  # sent zeros still count as sent
  refs = [reference.np_chunked_top_k(x, **kwargs) for x in xs]
  # Which entries each worker sent: the reference's per-chunk top-k positions.
  sent = np.zeros(math.prod(shape))
  for x in xs:
    for entries in reference.np_chunks(shape, kwargs["chunk"], kwargs["chunk"] ** 2):
      m = len(entries)
      k_m = min(m, max(1, math.ceil(kwargs["k"] * m / kwargs["chunk"] ** 2)))
      for p in reference.np_top_k_positions(x.reshape(-1)[entries], k_m):
        sent[entries[p]] += 1
  stacked = payloads_of(c, xs)
  # `like` is worker 0's x: the residual x − C(x) of worker 0's payload.
  residual = lambda p, x: c.residual(x, jax.tree.map(lambda a: a[0], p))
  for count, total, res in over_workers(
    [c.decode_count, c.decode_sum, residual], stacked, jnp.asarray(xs[0])
  ):
    assert count.dtype == jnp.float32 and count.shape == shape
    np.testing.assert_array_equal(np.asarray(count).reshape(-1), sent)
    np.testing.assert_allclose(np.asarray(total), sum(refs), rtol=1e-6, atol=1e-6)
    # x − C(x) in float32: within an ulp of x of the float64 difference.
    np.testing.assert_allclose(np.asarray(res), xs[0] - refs[0], rtol=1e-6, atol=3e-7)


def test_chunked_bf16_values_of_float16_near_max_are_clamped():
  c = C.chunked_top_k(1, chunk=1, value_bits=None, value_dtype=jnp.bfloat16)
  x = np.array([65504.0, -65504.0, 1.0], np.float16)  # bfloat16 rounds 65504 to 65536
  np.testing.assert_array_equal(compress(c, x), x)


def test_chunked_declarations():
  assert C.chunked_top_k(value_bits=2).deviation == "unbounded"
  assert C.chunked_top_k(value_bits=2).q_squared(4096) is None
  c = C.chunked_top_k(64, value_bits=None)
  assert c.deviation == "pointwise" and not c.summable and not c.unbiased
  assert c.q_squared(4096) == pytest.approx(1 - 64 / 4096)
  # 67·64 entries: a (67, 64) matrix has chunks of 1×64 (k_m = 1), the worst of its divisors.
  assert c.q_squared(67 * 64) == pytest.approx(1 - 1 / 64)
  assert c.q_squared(5) == pytest.approx(1 - 1 / 5)
  u = 2.0**-8
  bf16 = C.chunked_top_k(41, value_bits=None, value_dtype=jnp.bfloat16)
  assert bf16.q_squared(4096) == pytest.approx(1 - 41 / 4096 * (1 - u * u))


# ----------------------------------------------------------------- dct_top_k


@pytest.mark.parametrize("n", [1, 5, 29, 64])
def test_reference_dct_matrix_is_scipys_orthonormal_dct(n):
  d = reference.np_dct_matrix(n)
  np.testing.assert_allclose(d, scipy.fft.dct(np.eye(n), norm="ortho", axis=0), atol=1e-12)
  np.testing.assert_allclose(d @ d.T, np.eye(n), atol=1e-12)


def test_dct_coefficients_are_scipys_dctn_per_chunk():
  c = C.dct_top_k(chunk=8)
  x = rand((16, 24), seed=4)
  coef = np.asarray(jax.jit(c.coefficients)(jnp.asarray(x)))
  for j, (br, bc) in enumerate((br, bc) for br in range(2) for bc in range(3)):
    want = scipy.fft.dctn(
      x[br * 8 : br * 8 + 8, bc * 8 : bc * 8 + 8].astype(np.float64), norm="ortho"
    )
    np.testing.assert_allclose(coef[j], want.reshape(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(48, 40), (2, 3, 20), (96,)])
def test_dct_round_trip_keeping_every_coefficient_is_identity(shape):
  c = C.dct_top_k(k=4096, chunk=16)
  x = rand(shape, seed=5)
  np.testing.assert_allclose(compress(c, x), x, rtol=0, atol=1e-5)


DCT_SMALL = [
  ({"k": 3, "chunk": 4}, (12, 20)),  # 15 chunks of 4×4
  ({"k": 5, "chunk": 8}, (2, 3, 20)),  # (6, 20): chunks of 6×5, k_m = 5
  ({"k": 3, "chunk": 8}, (40,)),  # vectors: 1-D chunks of 8
  ({"k": 4, "chunk": 64, "value_dtype": jnp.bfloat16}, (64, 96)),  # 64×32 chunks
]


@pytest.mark.parametrize("kwargs, shape", DCT_SMALL)
def test_dct_top_k_matches_reference(kwargs, shape):
  c = C.dct_top_k(**kwargs)
  x = rand(shape, seed=6)
  got = compress(c, x)
  assert got.shape == x.shape and got.dtype == x.dtype
  want = reference.np_dct_top_k(x, **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("kwargs, shape", DCT_SMALL[:3])
def test_dct_decode_sum_and_scatter_mean_over_three_workers(kwargs, shape):
  c = C.dct_top_k(**kwargs)
  xs = [rand(shape, seed=30 + i) for i in range(3)]
  xs[2] = xs[0] + 0.01 * xs[2]  # workers 0 and 2 send mostly the same coefficients
  stacked = payloads_of(c, xs)
  like = jnp.zeros(shape)
  want_mean = reference.np_dct_scatter_mean(xs, **kwargs)
  want_sum = sum(reference.np_dct_top_k(x, **kwargs) for x in xs)
  tol = 1e-5 * sum(np.abs(x).max() for x in xs)
  for mean, total in over_workers([c.decode_mean_over_senders, c.decode_sum], stacked, like):
    assert mean.shape == shape and mean.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(np.asarray(total), want_sum, rtol=1e-5, atol=tol)
  # The scatter-mean is not the plain mean where the workers' choices differ.
  assert not np.allclose(want_mean, want_sum / 3, atol=1e-3)


def test_dct_wire_bits_and_declarations():
  for c in (C.dct_top_k(32), C.dct_top_k(4, value_dtype=jnp.bfloat16), C.dct_top_k(3, chunk=5)):
    for shape in [(), (0,), (7,), (768,), (3, 5, 7), (768, 3072), (50257, 768)]:
      for dtype in (jnp.float32, jnp.bfloat16):
        assert C.payload_bits(c.payload_shapes(shape, dtype)) == c.wire_bits(shape, dtype)
  c = C.dct_top_k(32)
  assert c.wire_bits((768, 3072), jnp.float32) == 12 * 48 * 32 * (32 + 12)
  assert c.deviation == "pointwise" and not c.summable and not c.unbiased
  assert c.q_squared(4096) == pytest.approx(1 - 32 / 4096, abs=1e-3)
  assert c.q_squared(4096) >= 1 - 32 / 4096
  assert c.q_squared(7) < 1e-6  # every coefficient kept: only float32 rounding


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_dct_16_bit_leaves(dtype):
  c = C.dct_top_k(3, chunk=8)
  x = rand((16, 16), seed=8).astype(dtype)
  got = compress(c, x)
  assert got.dtype == dtype
  want = reference.np_dct_top_k(x.astype(np.float32), k=3, chunk=8, value_dtype=dtype)
  np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-2, atol=2e-2)
