"""Every optimizer honours the optax contract: extra arguments, no recompilation, map_params,
inject_hyperparams, dtypes, convergence, MultiSteps, masked, state fields by name."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compams_jax as cj

C = cj.compressors

OPTIMIZERS = {
  "comp_ams": lambda lr=0.05: cj.comp_ams(lr, C.top_k(0.5)),
  "comp_ams_block_sign": lambda lr=0.05: cj.comp_ams(lr, C.block_sign()),
  "compressed_momentum_sgd": lambda lr=0.05: cj.compressed_momentum_sgd(lr, C.top_k(0.5)),
  "onebit_adam": lambda lr=0.05: cj.onebit_adam(lr, warmup_steps=5, eps=1e-4),
  "qadam": lambda lr=0.05: cj.qadam(lr, C.qsgd(64)),
  "powersgd": lambda lr=0.05: optax.chain(cj.powersgd(2), optax.sgd(lr)),
  "predictive_compression": lambda lr=0.05: optax.chain(
    cj.predictive_compression(C.block_sign(), predictor=cj.predictors.least_squares()),
    optax.sgd(lr),
  ),
  "demo": lambda lr=0.05: cj.demo(lr, weight_decay=0.01, compressor=C.top_k(0.5)),
}
FACTORIES = {
  "comp_ams": (cj.comp_ams, dict(compressor=C.top_k(0.5))),
  "compressed_momentum_sgd": (cj.compressed_momentum_sgd, dict(compressor=C.top_k(0.5))),
  "onebit_adam": (cj.onebit_adam, dict(compressor=C.scaled_sign(), warmup_steps=5, eps=1e-4)),
  "qadam": (cj.qadam, dict(compressor=C.qsgd(64))),
  "demo": (cj.demo, dict(compressor=C.top_k(0.5))),
}

TARGET = {"w": np.linspace(-1.0, 1.0, 12).reshape(3, 4).astype(np.float32)}


def _loss(p):
  return 0.5 * sum(jnp.sum((p[k] - TARGET[k]) ** 2) for k in TARGET)


def _params(dtype=jnp.float32):
  return {"w": jnp.zeros((3, 4), dtype)}


def _train(tx, params, steps=300):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(_loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state, step


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_converges_without_recompiling(name):
  params, state, step = _train(OPTIMIZERS[name](), _params())
  assert float(_loss(params)) < 0.05 * float(_loss(_params()))
  assert step._cache_size() == 1  # one compilation for every step


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_extra_args_are_accepted(name):
  tx = optax.with_extra_args_support(OPTIMIZERS[name]())
  state = tx.init(_params())
  g = jax.grad(_loss)(_params())
  tx.update(g, state, _params(), value=jnp.float32(1.0), unused=3)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_params_keep_their_dtype(name):
  params = _params(jnp.bfloat16)
  tx = OPTIMIZERS[name]()
  state = tx.init(params)
  u, _ = tx.update(jax.grad(_loss)(params), state, params)
  assert optax.apply_updates(params, u)["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_multi_steps_and_masked(name):
  tx = optax.MultiSteps(OPTIMIZERS[name](), every_k_schedule=2)
  params, _, _ = _train(tx, _params(), steps=400)
  assert float(_loss(params)) < 0.1 * float(_loss(_params()))
  params = {"w": jnp.zeros((3, 4)), "frozen": jnp.ones(2)}
  masked = optax.masked(OPTIMIZERS[name](), {"w": True, "frozen": False})
  state = masked.init(params)
  g = {"w": jnp.ones((3, 4)), "frozen": jnp.ones(2)}
  u, _ = masked.update(g, state, params)
  np.testing.assert_array_equal(np.asarray(u["frozen"]), np.ones(2))  # passed through untouched


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_map_params(name):
  tx = OPTIMIZERS[name]()
  state = tx.init(_params())
  mapped = optax.tree.map_params(tx, lambda x: x + 1.0, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(mapped, state)


@pytest.mark.parametrize("name", FACTORIES)
def test_inject_hyperparams_needs_no_static_args(name):
  factory, kwargs = FACTORIES[name]
  tx = optax.inject_hyperparams(factory)(learning_rate=0.05, **kwargs)
  params, state, _ = _train(tx, _params())
  assert float(_loss(params)) < 0.05 * float(_loss(_params()))
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.05)
  state.hyperparams["learning_rate"] = jnp.float32(0.0)  # the usual way to change it mid-run
  updates, _ = tx.update(jax.grad(_loss)(params), state, params)
  np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)


def test_schedules_and_clipping_chains():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 20, 300)
  tx = optax.chain(optax.clip_by_global_norm(1.0), cj.comp_ams(schedule, C.top_k(0.5)))
  params, _, _ = _train(tx, _params())
  assert float(_loss(params)) < 0.05 * float(_loss(_params()))


def test_state_fields_are_reachable_by_name():
  tx = cj.comp_ams(0.05, C.top_k(0.5))
  state = tx.init(_params())
  residual = optax.tree.get(state, "residual")
  assert isinstance(residual, cj.PerWorker)
  assert residual.value["w"].shape == (1, 3, 4)
  assert optax.tree.get(state, "nu")["w"].shape == (3, 4)


def test_compressors_are_not_callables():
  # optax.inject_hyperparams takes any callable argument for a schedule.
  for name in C.REGISTRY:
    assert not callable(C.get(name, **C.REGISTRY[name].examples[0]))
