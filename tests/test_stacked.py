"""Scanned layers: leaves stacked along a leading layer axis are compressed one layer at a time
(the paper's blocks = layers), against a NumPy loop and against the same model unstacked."""

import functools

import jax
import numpy as np
import pytest

import compams_jax as cj
from tests import harness, reference

L, STEPS, LR = 3, 5, 0.01
STACKED_SHAPES = {"w": (L, 6, 5), "b": (5,)}
COMPRESSORS = {
  "top_k": (lambda: cj.compressors.top_k(0.1), functools.partial(reference.np_top_k, ratio=0.1)),
  "block_sign": (cj.compressors.block_sign, reference.np_block_sign),
}


def _per_layer(compress):
  return lambda x: np.stack([compress(x[l]) for l in range(x.shape[0])])


@pytest.mark.parametrize("cname", sorted(COMPRESSORS))
def test_stacked_leaves_are_compressed_per_layer(cname, n_devices, mesh):
  make, np_compress = COMPRESSORS[cname]
  params, grads = harness.problem(STACKED_SHAPES, n_devices, STEPS, seed=2)
  tx = cj.comp_ams(LR, make(), axis_name="data", stacked={"w": True, "b": False})
  got, states = harness.run(tx, params, grads, mesh, STEPS)
  want_w, err_w, _ = reference.np_comp_ams(
    {"w": params["w"]}, {"w": grads["w"]}, _per_layer(np_compress), lr=LR
  )
  want_b, _, _ = reference.np_comp_ams({"b": params["b"]}, {"b": grads["b"]}, np_compress, lr=LR)
  np.testing.assert_allclose(np.asarray(got["w"]), want_w["w"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got["b"]), want_b["b"], rtol=1e-5, atol=1e-6)
  residual = np.asarray(states[-1][0].residual.value["w"])
  np.testing.assert_allclose(residual, err_w["w"], rtol=1e-5, atol=1e-6)


def test_stacked_and_unstacked_models_give_the_same_update(n_devices, mesh):
  params, grads = harness.problem(STACKED_SHAPES, n_devices, STEPS, seed=3)
  stacked_tx = cj.comp_ams(LR, cj.compressors.top_k(0.1), axis_name="data", stacked={"w": True})
  got, _ = harness.run(stacked_tx, {"w": params["w"]}, {"w": grads["w"]}, mesh, STEPS)
  layers = {f"w{l}": params["w"][l] for l in range(L)}
  layer_grads = {f"w{l}": grads["w"][:, :, l] for l in range(L)}
  plain_tx = cj.comp_ams(LR, cj.compressors.top_k(0.1), axis_name="data")
  want, _ = harness.run(plain_tx, layers, layer_grads, mesh, STEPS)
  for l in range(L):
    np.testing.assert_allclose(np.asarray(got["w"][l]), np.asarray(want[f"w{l}"]), rtol=1e-6)
  # The payload is L per-layer payloads: the same bytes as the unstacked model.
  like = {"w": jax.ShapeDtypeStruct(params["w"].shape, np.float32)}
  assert cj.wire_bytes(stacked_tx, like) == cj.wire_bytes(
    plain_tx, {k: jax.ShapeDtypeStruct(v.shape, np.float32) for k, v in layers.items()}
  )


def test_randomized_codes_draw_per_layer_and_run(n_devices, mesh):
  params, grads = harness.problem(STACKED_SHAPES, n_devices, STEPS, seed=4)
  tx = cj.comp_ams(
    LR, cj.compressors.random_k(0.2), axis_name="data", stacked={"w": True, "b": False}
  )
  got, _ = harness.run(tx, params, grads, mesh, STEPS)
  assert all(np.isfinite(np.asarray(v)).all() for v in got.values())
  # Layers of equal values still keep different random entries (keys folded per layer).
  state = jax.eval_shape(tx.init, params)
  assert state[0].residual.value["w"].shape == (1, L, 6, 5)


@pytest.mark.parametrize(
  "spec, match",
  [
    ({"w": True, "b": False, "c": True}, "pytree prefix"),
    ({"w": True, "b": True}, "no layer axis"),
  ],
)
def test_stacked_specs_that_do_not_match_the_tree_are_refused(spec, match):
  params = {"w": np.zeros((L, 4), np.float32), "b": np.zeros((), np.float32)}
  tx = cj.comp_ams(LR, cj.compressors.top_k(0.5), stacked=spec)
  state = tx.init(params)
  with pytest.raises(ValueError, match=match):
    tx.update(params, state, params)


def test_stacked_refuses_layouts_that_flatten_leaves():
  c = cj.compressors.top_k(0.5)
  params = {"w": np.zeros((L, 4), np.float32)}
  with pytest.raises(ValueError, match="two_phase"):
    tx = cj.comp_ams(LR, c, stacked={"w": True}, wire=cj.wire.two_phase(num_workers=1))
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="dense_axis_name"):
    cj.comp_ams(LR, c, stacked={"w": True}, dense_axis_name="ici")
  with pytest.raises(ValueError, match="dense_axis_name"):
    cj.predictive_compression(
      c, predictor=cj.predictors.least_squares(), stacked={"w": True}, dense_axis_name="ici"
    )


@pytest.mark.parametrize(
  "make",
  [
    lambda stacked: cj.comp_ams(
      LR,
      cj.compressors.top_k(0.2),
      axis_name="data",
      predictor=cj.predictors.least_squares(),
      stacked=stacked,
    ),
    lambda stacked: cj.comp_ams(
      LR, cj.compressors.top_k(0.2), axis_name="data", feedback="ef21", stacked=stacked
    ),
  ],
  ids=["least_squares", "ef21"],
)
def test_predictive_coding_of_stacked_layers_equals_the_unstacked_model(make, n_devices, mesh):
  """Each layer its own block with its own ρ: the same update as the model whose layers are
  separate leaves."""
  params, grads = harness.problem(STACKED_SHAPES, n_devices, STEPS, seed=5)
  got, _ = harness.run(make({"w": True}), {"w": params["w"]}, {"w": grads["w"]}, mesh, STEPS)
  layers = {f"w{l}": params["w"][l] for l in range(L)}
  layer_grads = {f"w{l}": grads["w"][:, :, l] for l in range(L)}
  want, _ = harness.run(make(None), layers, layer_grads, mesh, STEPS)
  for l in range(L):
    np.testing.assert_allclose(
      np.asarray(got["w"][l]), np.asarray(want[f"w{l}"]), rtol=1e-5, atol=1e-7
    )
