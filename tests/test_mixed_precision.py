"""bfloat16 parameters and gradients with float32 residuals: the residual keeps what the bf16
wire values drop, and the compiled step moves exactly the declared bf16 payload."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import compams_jax as cj
from tests import harness

SHAPES = {"w": (12, 8), "b": (8,)}
RATIO = 0.1


def _np_first_residual(g, ratio):
  """One worker's residual after step 1 of top-k with bf16 values and an f32 residual."""
  corrected = g.astype(np.float32).reshape(-1)
  k = int(np.ceil(ratio * corrected.size - 1e-9))
  kept = np.argsort(-np.abs(corrected), kind="stable")[:k]
  sent = corrected[kept].astype(ml_dtypes.bfloat16).astype(np.float32)
  out = corrected.copy()
  out[kept] -= sent
  return out.reshape(g.shape)


def test_bf16_gradients_with_float32_residuals(n_devices, mesh):
  params, grads = harness.problem(SHAPES, n_devices, 1, seed=5)
  bf16 = ml_dtypes.bfloat16
  params = {k: v.astype(bf16) for k, v in params.items()}
  grads = {k: v.astype(bf16) for k, v in grads.items()}
  compressor = cj.compressors.top_k(RATIO, value_dtype=jnp.bfloat16)
  tx = cj.comp_ams(1e-3, compressor, axis_name="data", residual_dtype=jnp.float32)
  p, state, step = harness.shard_map_step(tx, params, mesh)
  p, state = step(p, state, {k: v[0] for k, v in grads.items()})
  for k in SHAPES:
    residual = np.asarray(state[0].residual.value[k])
    assert residual.dtype == np.float32 and p[k].dtype == jnp.bfloat16, k
    for i in range(n_devices):
      want = _np_first_residual(np.asarray(grads[k][0, i]), RATIO)
      np.testing.assert_array_equal(residual[i], want, err_msg=f"{k} worker {i}")
  # The wire carries the declared bf16 values and narrow indices, nothing wider.
  compiled = step.dp.lower(p, state, {k: v[0] for k, v in grads.items()}).compile()
  gathers = [c for c in cj.collective_bytes(compiled).collectives if c.opcode == "all-gather"]
  like = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in SHAPES.items()}
  assert sum(c.operand_bytes for c in gathers) == cj.wire_bytes(tx, like)
  k_w, k_b = int(np.ceil(RATIO * 96)), int(np.ceil(RATIO * 8))
  assert cj.wire_bytes(tx, like) == (2 + 1) * (k_w + k_b)  # bf16 value + uint8 index each
