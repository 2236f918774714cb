"""Scaling pieces: two-phase compressed all-reduce, PowerSGD, received-bytes model, 2-D meshes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import harness, reference

SHAPES = {"conv": (3, 3, 2, 4), "dense": (24, 10), "bias": (10,)}
STEPS = 12
LR = 0.05


def _problem(n, seed=0, steps=STEPS, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = {
    k: (rng.normal(size=(1, n) + s) + rng.normal(size=(steps, n) + s)).astype(np.float32)
    for k, s in shapes.items()
  }
  return params, grads


def _shard_map_run(tx, params, grads, mesh, steps=STEPS):
  p, states = harness.run(tx, params, grads, mesh, steps)
  return p, states[-1], None


@pytest.mark.parametrize("name", ["top_k", "block_sign"])
def test_two_phase_matches_numpy_reference(name, n_devices, mesh):
  make, np_c = {
    "top_k": (lambda: cj.compressors.top_k(0.1), functools.partial(reference.np_top_k, ratio=0.1)),
    "block_sign": (cj.compressors.block_sign, reference.np_block_sign),
  }[name]
  params, grads = _problem(n_devices)
  tx = cj.comp_ams(LR, make(), axis_name="data", wire=cj.wire.two_phase())
  p, state, _ = _shard_map_run(tx, params, grads, mesh)
  want, want_err, want_server = reference.np_two_phase_comp_ams(params, grads, np_c, lr=LR)
  for k in SHAPES:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
  got_err = np.stack(
    [
      reference.np_flatten({k: np.asarray(v)[i] for k, v in state[0].residual.value.items()})
      for i in range(n_devices)
    ]
  )
  np.testing.assert_allclose(got_err, want_err, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(state[0].wire_state.value), want_server, rtol=1e-5, atol=1e-5
  )
  assert max(np.abs(want[k] - params[k]).max() for k in SHAPES) > 0.1


@pytest.mark.parametrize(
  "compressor",
  [cj.compressors.block_sign(), cj.compressors.top_k(0.05), cj.compressors.qsgd(8)],
  ids=["sign", "top_k", "qsgd"],
)
def test_two_phase_converges_on_least_squares(compressor, n_devices, mesh):
  tx = cj.comp_ams(0.05, compressor, axis_name="data", wire=cj.wire.two_phase())
  assert harness.least_squares_error(tx, mesh) < 0.05


def _dense_params():
  # ~1M float32 parameters in several leaves.
  return {
    "conv": jnp.zeros((3, 3, 64, 64)),
    "dense": jnp.zeros((512, 1024)),
    "out": jnp.zeros((1024, 400)),
    "b": jnp.zeros((1024,)),
  }


def _step_bytes(tx, params, n):
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  return cj.sharding.step_bytes(tx, params, mesh=mesh, axis_name="data")


def test_two_phase_bytes_do_not_grow_with_workers():
  params = _dense_params()
  dense = 4 * sum(x.size for x in jax.tree.leaves(params))
  measured = {}
  for n in (2, 4, 8):
    tx = cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name="data", wire=cj.wire.two_phase())
    cb = _step_bytes(tx, params, n)
    measured[n] = cb
    assert cb.total == cj.wire_bytes(tx, params, num_workers=n)
    # One payload (1/32 of dense) plus one chunk payload (1/n of it).
    assert cb.total <= dense / 32 * (1 + 1 / n) + 64 * n
  assert measured[8].total <= dense / 25
  # Operand bytes: one full payload + one chunk: shrink towards one payload as n grows.
  assert measured[8].total <= measured[4].total <= measured[2].total
  # Received bytes (standard algorithms): 2(n-1)/n of one payload, bounded by 2 payloads like a
  # ring all-reduce, while the all-gather topology's grow linearly in n.
  for n, cb in measured.items():
    payload = cb.by_op["all-to-all"]
    assert cb.received == pytest.approx(2 * (n - 1) / n * payload, rel=0.01)
  gather = {
    n: _step_bytes(cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name="data"), params, n)
    for n in (4, 8)
  }
  assert gather[8].received > 1.9 * gather[4].received
  assert measured[8].received < gather[8].received / 3


def test_received_bytes_model():
  coll = cj.wire.Collective
  assert coll("all-reduce", 1000, 1000, 8).received_bytes == pytest.approx(2 * 7 / 8 * 1000)
  assert coll("all-gather", 100, 800, 8).received_bytes == 700
  assert coll("all-to-all", 800, 800, 8).received_bytes == 700
  assert coll("reduce-scatter", 800, 100, 8).received_bytes == 700
  assert coll("collective-permute", 64, 64, None).received_bytes == 64


def test_powersgd_matches_numpy_reference(n_devices, mesh):
  rng = np.random.default_rng(5)
  shapes = {"w": (12, 9), "b": (9,)}
  grads = {k: rng.normal(size=(6, n_devices) + s).astype(np.float32) for k, s in shapes.items()}
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  tx = cj.powersgd(rank=2, axis_name="data")
  q0 = np.asarray(tx.init(params).q["w"])
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(specs, P("data")), out_specs=(P(), specs))
  def step(s, g):
    return tx.update(jax.tree.map(lambda x: x[0], g), s)

  outs = []
  for t in range(6):
    out, state = step(
      state, jax.device_put({k: v[t] for k, v in grads.items()}, NamedSharding(mesh, P("data")))
    )
    outs.append(out)
  want_out, want_err, want_q = reference.np_powersgd(grads["w"], q0, rank=2)
  for t in range(6):
    np.testing.assert_allclose(outs[t]["w"], want_out[t], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outs[t]["b"], grads["b"][t].mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.residual.value["w"], want_err, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(state.q["w"], want_q, rtol=1e-4, atol=1e-4)


def test_powersgd_is_exact_on_low_rank_and_sends_factors_only(n_devices, mesh):
  u = np.random.default_rng(0).normal(size=(n_devices, 256, 2)).astype(np.float32)
  v = np.random.default_rng(1).normal(size=(2, 128)).astype(np.float32)
  g = {"w": u @ v}  # every worker's gradient lies in the same rank-2 row space
  tx = cj.powersgd(rank=2, axis_name="data")
  params = {"w": jnp.zeros((256, 128))}
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")
  step = jax.jit(
    jax.shard_map(
      lambda s, g: tx.update(jax.tree.map(lambda x: x[0], g), s),
      mesh=mesh,
      in_specs=(specs, P("data")),
      out_specs=(P(), specs),
    )
  )
  g_dev = jax.device_put(g, NamedSharding(mesh, P("data")))
  out, _ = step(state, g_dev)
  np.testing.assert_allclose(out["w"], g["w"].mean(0), rtol=1e-3, atol=1e-3)
  cb = cj.collective_bytes(step, state, g_dev)
  assert cb.total == 4 * 2 * (256 + 128) == cj.wire_bytes(tx, params)
  assert set(cb.by_op) == {"all-reduce"}


@pytest.mark.parametrize("name", ["identity", "top_k", "block_sign"])
def test_2d_mesh_data_by_model_matches_unsharded(name, n_devices):
  """Params sharded over "model", compression on each local shard, collectives over "data"."""
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  rng = np.random.default_rng(7)
  params = {
    "w": rng.normal(size=(8, 6)).astype(np.float32),
    "b": rng.normal(size=(6,)).astype(np.float32),
  }
  pspecs = {"w": P(None, "model"), "b": P("model")}
  grads = {
    "w": rng.normal(size=(10, 4, 8, 6)).astype(np.float32),
    "b": rng.normal(size=(10, 4, 6)).astype(np.float32),
  }
  comp = {
    "identity": cj.compressors.identity(),
    "top_k": cj.compressors.top_k(0.25),
    "block_sign": cj.compressors.block_sign(),
  }[name]
  tx = cj.comp_ams(LR, comp, axis_name="data")
  abstract = jax.eval_shape(tx.init, params)
  specs = cj.sharding.state_specs(abstract, "data", params=params, param_specs=pspecs)
  gspecs = {"w": P("data", None, "model"), "b": P("data", "model")}

  init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(pspecs,), out_specs=specs))
  place = lambda tree, sp: jax.tree.map(
    lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, sp
  )
  p = place(params, pspecs)
  state = init(p)

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(pspecs, specs, gspecs), out_specs=(pspecs, specs)
  )
  def step(p, s, g):
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, u), s

  for t in range(10):
    p, state = step(p, state, place({k: v[t] for k, v in grads.items()}, gspecs))
    # Collectives run over "data" only: groups of 4 devices.
  groups = {
    c.group_size
    for c in cj.collective_bytes(
      step, p, state, place({k: v[0] for k, v in grads.items()}, gspecs)
    ).collectives
  }
  assert groups == {4}

  # Reference: the same run unsharded on 4 workers, each "model" shard as its own leaf (the
  # compressor sees exactly the local shards; for identity this is the plain unsharded run).
  split = lambda t: {
    "w0": t["w"][..., :3],
    "w1": t["w"][..., 3:],
    "b0": t["b"][..., :3],
    "b1": t["b"][..., 3:],
  }
  ref_p, _ = _ref_1d(
    tx_factory=lambda: cj.comp_ams(LR, comp, axis_name="data"),
    params=split(params),
    grads=split(grads),
  )
  np.testing.assert_allclose(
    np.asarray(p["w"]), np.concatenate([ref_p["w0"], ref_p["w1"]], -1), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(p["b"]), np.concatenate([ref_p["b0"], ref_p["b1"]], -1), rtol=1e-6, atol=1e-6
  )


def _ref_1d(tx_factory, params, grads):
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  steps = next(iter(grads.values())).shape[0]
  p, state, _ = _shard_map_run(tx_factory(), params, grads, mesh, steps=steps)
  return jax.tree.map(np.asarray, p), state


@pytest.mark.parametrize(
  "compressor",
  [cj.compressors.top_k(0.01), cj.compressors.random_k(0.01)],
  ids=["top_k", "random_k"],
)
def test_two_phase_traces_with_large_leaves(compressor):
  """Chunks of ≥ 65,536 elements: the fast selectors are swapped for their vmap-safe path."""
  n = 4
  params = {"w": jnp.zeros((1024, 512))}
  tx = cj.comp_ams(1e-3, compressor, axis_name="data", wire=cj.wire.two_phase())
  cb = _step_bytes(tx, params, n)
  assert cb.total == cj.wire_bytes(tx, params, num_workers=n)
  assert set(cb.by_op) == {"all-to-all", "all-gather"}
