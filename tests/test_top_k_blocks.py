"""Top-k payloads at the paper's 1/100: block-local 16-bit indices and narrow value dtypes."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import compams_jax as cj


def np_top_k_payload_bytes(d, ratio, value_bytes):
  """Brute-force byte count of the documented layout."""
  k = max(1, math.ceil(ratio * d - 1e-9))
  if d <= 256:
    return k * (value_bytes + 1)
  if d <= 65536:
    return k * (value_bytes + 2)
  blocks = -(-d // 65536)
  return k * (value_bytes + 2) + blocks * (2 if k < 65536 else 4)


def np_top_k(x, ratio, value_dtype=None):
  """k largest magnitudes, ties to the lower index, values rounded through value_dtype."""
  flat = x.reshape(-1)
  k = max(1, math.ceil(ratio * flat.size - 1e-9))
  idx = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  vals = flat[idx]
  if value_dtype is not None:
    vals = vals.astype(value_dtype).astype(flat.dtype)
  out[idx] = vals
  return out.reshape(x.shape)


@pytest.mark.parametrize("d", [1000, 65536, 65537, 200_001, 1_179_648])
@pytest.mark.parametrize("value_dtype", [None, "bfloat16"])
def test_matches_numpy_reference_and_layout(d, value_dtype):
  rng = np.random.default_rng(d)
  x = rng.normal(size=d).astype(np.float32)
  x[rng.integers(0, d, size=d // 50)] = 0.5  # ties
  jdtype = None if value_dtype is None else jnp.bfloat16
  c = cj.compressors.top_k(0.01, value_dtype=jdtype)
  got = np.asarray(jax.jit(c.compress)(jnp.asarray(x)))
  want = np_top_k(x, 0.01, None if value_dtype is None else ml_dtypes.bfloat16)
  np.testing.assert_array_equal(got, want)
  payload = jax.eval_shape(c.encode, jax.ShapeDtypeStruct((d,), jnp.float32))
  vb = 4 if value_dtype is None else 2
  assert cj.compressors.payload_bits(payload) // 8 == np_top_k_payload_bytes(d, 0.01, vb)
  assert c.wire_bits((d,), jnp.float32) // 8 == np_top_k_payload_bytes(d, 0.01, vb)
  if d > 65536:
    assert all(
      leaf.dtype == jnp.uint16 for name, leaf in payload.items() if name in ("indices", "counts")
    )


@pytest.mark.parametrize("value_dtype", [None, "bfloat16"])
def test_decode_sum_matches_the_sum_of_references(value_dtype):
  rng = np.random.default_rng(7)
  d, n = 150_000, 4
  xs = rng.normal(size=(n, d)).astype(np.float32)
  jdtype = None if value_dtype is None else jnp.bfloat16
  c = cj.compressors.top_k(0.02, value_dtype=jdtype)
  # Jitted: one compile each, not one per operation as op-by-op dispatch.
  payloads = jax.jit(jax.vmap(c.encode))(jnp.asarray(xs))
  like = jax.ShapeDtypeStruct((d,), jnp.float32)
  got = np.asarray(jax.jit(lambda p: c.decode_sum(p, like))(payloads))
  ref_dtype = None if value_dtype is None else ml_dtypes.bfloat16
  want = sum(np_top_k(x, 0.02, ref_dtype) for x in xs)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bfloat16_rounding_stays_in_the_error_feedback_residual():
  rng = np.random.default_rng(3)
  g = rng.normal(size=(100_000,)).astype(np.float32)
  tx = cj.error_feedback(cj.compressors.top_k(0.01, value_dtype=jnp.bfloat16))
  state = tx.init({"w": jnp.zeros_like(g)})
  out, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state)
  sent = np_top_k(g, 0.01, ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(out["w"]), sent)
  # The residual owes exactly what was not delivered, rounding included.
  np.testing.assert_array_equal(np.asarray(state.residual.value["w"][0]), g - sent)
  kept = sent != 0
  assert np.any(g[kept] != sent[kept])  # bfloat16 really rounded some values


def test_ratio_of_dense_bytes_on_a_large_leaf():
  # One 1.18M-entry layer (the paper CNN's largest): 1/66 with f32 values, ~1/100 with bf16.
  d = 1_179_648
  dense = 4 * d
  f32 = cj.compressors.top_k(0.01).wire_bits((d,), jnp.float32) / 8
  bf16 = cj.compressors.top_k(0.01, value_dtype=jnp.bfloat16).wire_bits((d,), jnp.float32) / 8
  assert dense / f32 >= 66
  assert dense / bf16 >= 99.9


def test_value_dtype_must_be_floating():
  with pytest.raises(ValueError, match="value_dtype"):
    cj.compressors.top_k(0.01, value_dtype=jnp.int8)
