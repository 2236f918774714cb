"""The data-parallel step helper: shard_map, pmap and vmap give one trajectory; guards."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import registry

STEPS = 4  # onebit_adam (warmup_steps=2) takes two compressed steps
SHAPES = {"w": (6, 3), "b": (3,)}


def _data(n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(8 * n, 6)).astype(np.float32)
  y = rng.normal(size=(8 * n, 3)).astype(np.float32)
  return {"x": x, "y": y}


def _params():
  rng = np.random.default_rng(1)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _loss(p, b):
  return jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)


def _run(make_tx, mode, n=8, axis=("data",), sizes=None, steps=STEPS):
  tx = make_tx()
  if mode == "shard_map":
    shape = sizes or (n,)
    mesh = jax.make_mesh(shape, axis, devices=jax.devices()[: int(np.prod(shape))])
    step = cj.data_parallel_step(_loss, tx, mesh=mesh, axis_name=axis)
  else:
    step = cj.data_parallel_step(
      _loss, tx, mode=mode, axis_name=axis, num_workers=sizes if mode == "vmap" and sizes else n
    )
  params, state = step.init(_params())
  losses = []
  for t in range(steps):
    params, state, metrics = step(params, state, _data(n, seed=t))
    losses.append(np.asarray(metrics["loss"]))
  params = jax.tree.map(lambda x: np.asarray(x[0] if mode == "pmap" else x), params)
  return params, np.stack(losses)


def _tolerance(compressor):
  # bfloat16/float16 payloads are summed at their own precision by vmap's psum, in float32 by
  # XLA:CPU's all-reduce: one rounding of a narrow type apart.
  narrow = getattr(compressor, "dtype", None) in (jnp.bfloat16, jnp.float16)
  return dict(rtol=1e-2, atol=1e-2) if narrow else dict(rtol=1e-5, atol=1e-6)


def _assert_same(a, b, tol):
  (pa, la), (pb, lb) = a, b
  chex.assert_trees_all_close(pa, pb, **tol)
  np.testing.assert_allclose(la, lb, **tol)


WIRES = {"gather": cj.wire.gather, "two_phase": cj.wire.two_phase}
# Two-phase in the default run for a sparsifier, a sign code and both kinds of randomness
# (random_k: one key shared by the workers; qsgd: private keys); the other compressors' two-phase
# runs are in `-m slow` (their payloads take the same two-phase code path, which test_scale and
# test_hierarchical check against NumPy; every compressor runs the gather wire here).
TWO_PHASE_DEFAULT = ("top_k", "random_k", "block_sign", "qsgd")


def _compressor_wire_cases():
  out = []
  for case in registry.cases(first=True):
    name, kwargs = case.values
    for wire in WIRES:
      slow = wire == "two_phase" and name not in TWO_PHASE_DEFAULT
      out.append(
        pytest.param(
          name, kwargs, wire, id=f"{case.id}-{wire}", marks=[pytest.mark.slow] if slow else []
        )
      )
  return out


@pytest.mark.parametrize("name,kwargs,wire", _compressor_wire_cases())
def test_vmap_and_pmap_match_shard_map_for_every_compressor(name, kwargs, wire, n_devices):
  c = registry.build(name, kwargs)
  make = lambda: cj.comp_ams(0.05, c, axis_name="data", wire=WIRES[wire]())
  want = _run(make, "shard_map", n=n_devices)
  assert np.abs(want[0]["w"] - _params()["w"]).max() > 1e-3  # it trained
  _assert_same(_run(make, "vmap", n=n_devices), want, _tolerance(c))
  _assert_same(_run(make, "pmap", n=n_devices), want, _tolerance(c))


OPTIMIZERS = {
  "compressed_momentum_sgd": lambda c: cj.compressed_momentum_sgd(0.05, c, axis_name="data"),
  "momentum_sgd_plain": lambda c: cj.compressed_momentum_sgd(
    0.05, c, predictive=False, feedback="none", axis_name="data"
  ),
  "predictive_fixed": lambda c: optax.chain(
    cj.predictive_compression(
      c, predictor=cj.predictors.fixed(0.5), feedback="none", axis_name="data"
    ),
    optax.sgd(0.05),
  ),
  "onebit_adam": lambda c: cj.onebit_adam(0.05, c, warmup_steps=2, eps=1e-4, axis_name="data"),
  "qadam": lambda c: cj.qadam(0.05, c, axis_name="data"),
  "powersgd": lambda c: optax.chain(cj.powersgd(2, axis_name="data"), optax.sgd(0.05)),
  "compressed_mean_two_phase": lambda c: optax.chain(
    cj.compressed_mean(c, axis_name="data", wire=cj.wire.two_phase()), optax.sgd(0.05)
  ),
  "skip_nonfinite": lambda c: cj.skip_nonfinite(
    cj.comp_ams(0.05, c, axis_name="data"), axis_name="data"
  ),
}


# The default run pairs every optimizer with one compressor (each compressor with several, the
# randomized qsgd with the optimizers that derive its keys from their own step counters); the
# full optimizer x compressor matrix is in `-m slow`. (powersgd takes no compressor.)
OPTIMIZER_DEFAULT = {
  "compressed_momentum_sgd": "qsgd",
  "momentum_sgd_plain": "block_sign",
  "predictive_fixed": "top_k",
  "onebit_adam": "block_sign",
  "qadam": "qsgd",
  "powersgd": "top_k",
  "compressed_mean_two_phase": "qsgd",
  "skip_nonfinite": "top_k",
}
assert OPTIMIZER_DEFAULT.keys() == OPTIMIZERS.keys()


@pytest.mark.parametrize(
  "opt,cname",
  [
    pytest.param(
      opt, c, id=f"{c}-{opt}", marks=[] if OPTIMIZER_DEFAULT[opt] == c else [pytest.mark.slow]
    )
    for c in ("top_k", "block_sign", "qsgd")
    for opt in OPTIMIZERS
  ],
)
def test_vmap_matches_shard_map_for_every_optimizer(opt, cname, n_devices):
  c = registry.build(cname, registry.REGISTRY[cname].examples[-1])
  make = lambda: OPTIMIZERS[opt](c)
  _assert_same(_run(make, "vmap", n=n_devices), _run(make, "shard_map", n=n_devices), _tolerance(c))


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("cname", ["top_k", "block_sign"])
def test_hierarchical_vmap_matches_the_2x4_mesh(cname, wire):
  c = registry.build(cname, registry.REGISTRY[cname].examples[-1])
  make = lambda: cj.comp_ams(0.05, c, axis_name="dcn", dense_axis_name="ici", wire=WIRES[wire]())
  kw = dict(n=8, axis=("dcn", "ici"), sizes=(2, 4))
  _assert_same(_run(make, "vmap", **kw), _run(make, "shard_map", **kw), _tolerance(c))


def test_two_dimensional_data_model_mesh_with_replicated_params():
  # A ("data", "model") mesh whose parameters are replicated over "model": 4 workers.
  make = lambda: cj.comp_ams(0.05, cj.compressors.top_k(0.3), axis_name="data")
  tx = make()
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  step = cj.data_parallel_step(_loss, tx, mesh=mesh, axis_name="data")
  params, state = step.init(_params())
  for t in range(STEPS):
    params, state, _ = step(params, state, _data(4, seed=t))
  want, _ = _run(make, "vmap", n=4)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=1e-5, atol=1e-6)


def test_per_worker_keys_and_aux():
  n = 4

  def loss_fn(p, b, key):
    noise = jax.random.uniform(key)
    return jnp.sum(p["w"]) * 0.0 + jnp.mean(b["x"]), {"noise": noise}

  tx = cj.comp_ams(0.05, cj.compressors.block_sign(), axis_name="data")
  step = cj.data_parallel_step(loss_fn, tx, mode="vmap", num_workers=n, has_aux=True)
  params, state = step.init({"w": jnp.zeros(3)})
  key = jax.random.key(7)
  batch = {"x": np.arange(8.0 * n, dtype=np.float32)}
  _, _, metrics = step(params, state, batch, key)
  want = [float(jax.random.uniform(jax.random.fold_in(key, i))) for i in range(n)]
  np.testing.assert_allclose(np.asarray(metrics["aux"]["noise"]), want, rtol=1e-6)
  # Worker i's loss is the mean of its own rows 8i … 8i + 7.
  np.testing.assert_allclose(np.asarray(metrics["loss"]), [8 * i + 3.5 for i in range(n)])


# -----------------------------------------------------------------------------------------------
# Guards against silent mistakes.
# -----------------------------------------------------------------------------------------------


def _hand_step(tx, mesh, specs, *, pcast: bool):
  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data")), out_specs=(P(), specs)
  )
  def step(p, s, x):
    q = jax.lax.pcast(p, "data", to="varying") if pcast else p
    g = jax.grad(lambda q: jnp.sum(q["w"] * jnp.sum(x)))(q)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return step


@pytest.mark.parametrize(
  "make",
  [
    lambda: cj.comp_ams(0.1, cj.compressors.top_k(0.5), axis_name="data"),
    lambda: cj.compressed_momentum_sgd(0.1, cj.compressors.top_k(0.5), axis_name="data"),
    lambda: cj.onebit_adam(0.1, axis_name="data"),
    lambda: optax.chain(cj.powersgd(1, axis_name="data"), optax.sgd(0.1)),
  ],
)
def test_forgotten_pcast_is_an_error_and_a_correct_step_is_not(make, mesh, n_devices):
  tx = make()
  params = {"w": jnp.ones((4, 2))}
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")
  x = jax.device_put(
    jnp.arange(2.0 * n_devices).reshape(n_devices, 2), jax.NamedSharding(mesh, P("data"))
  )
  _hand_step(tx, mesh, specs, pcast=True)(params, state, x)  # no error
  with pytest.raises(ValueError, match=r"pcast\(params.*data_parallel_step"):
    _hand_step(tx, mesh, specs, pcast=False)(params, state, x)


def test_state_from_tx_init_on_a_mesh_is_an_error(mesh, n_devices):
  tx = cj.comp_ams(0.1, cj.compressors.top_k(0.5), axis_name="data")
  params = {"w": jnp.ones((4, 2))}
  state = tx.init(params)  # one worker's state
  specs = jax.tree.map(lambda _: P(), state)
  x = jax.device_put(
    jnp.arange(2.0 * n_devices).reshape(n_devices, 2), jax.NamedSharding(mesh, P("data"))
  )
  with pytest.raises(ValueError, match=r"cj\.sharding\.init"):
    _hand_step(tx, mesh, specs, pcast=True)(params, state, x)
  step = cj.data_parallel_step(_loss, tx, mesh=mesh, axis_name="data")
  with pytest.raises(ValueError, match=r"step\.init"):
    step(params, state, _data(n_devices))


def test_wire_bytes_of_two_phase_names_num_workers():
  tx = cj.comp_ams(0.1, cj.compressors.block_sign(), axis_name="data", wire=cj.wire.two_phase())
  with pytest.raises(ValueError, match="num_workers="):
    cj.wire_bytes(tx, {"w": jnp.zeros(1000)})
  assert cj.wire_bytes(tx, {"w": jnp.zeros(1000)}, num_workers=8) == 9 * (16 + 4)


def test_bad_arguments():
  tx = cj.comp_ams(0.1, cj.compressors.top_k(0.5), axis_name="data")
  with pytest.raises(ValueError, match="num_workers"):
    cj.data_parallel_step(_loss, tx, mode="vmap")
  with pytest.raises(ValueError, match="not in the mesh"):
    cj.data_parallel_step(_loss, tx, mesh=jax.make_mesh((2,), ("x",), devices=jax.devices()[:2]))
  step = cj.data_parallel_step(_loss, tx, mode="vmap", num_workers=3)
  params, state = step.init(_params())
  with pytest.raises(ValueError, match="divisible by the 3 workers"):
    step(params, state, _data(2))
