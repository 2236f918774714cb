"""The experiments' optimizer registry: library defaults, fields reaching their arguments,
annealed top-k stages, and the bytes each phase sends."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compams_jax as cj
from compams_jax.experiments import config as config_lib
from compams_jax.experiments import optim

PARAMS = {"w": jnp.zeros((1000,)), "b": jnp.zeros((10,))}


def _top_k_bytes(ratio):
  # Brute force: k = ceil(ratio·d) kept entries per leaf, f32 value + the narrowest index.
  total = 0
  for d in (1000, 10):
    k = max(1, int(np.ceil(ratio * d - 1e-9)))
    total += k * (4 + (1 if d <= 256 else 2))
  return total


def _updates(tx, steps=3):
  """The updates `tx` makes on one worker over a few steps of a fixed gradient sequence."""
  params = {"w": jnp.linspace(-1.0, 1.0, 16), "b": jnp.ones(3)}
  state, out = tx.init(params), []
  for t in range(steps):
    grads = jax.tree.map(lambda p: jnp.sin(p * (t + 1)) + 0.1 * t, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _assert_same_updates(a, b):
  for x, y in zip(jax.tree.leaves(_updates(a)), jax.tree.leaves(_updates(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _updates_on_axis(tx, steps=3):
  """`_updates` of a `tx` built on axis "data", as the one worker of a `jax.vmap` over it."""
  one = functools.partial(jax.vmap, axis_name="data", axis_size=1)
  params = {"w": jnp.linspace(-1.0, 1.0, 16), "b": jnp.ones(3)}
  update = jax.jit(one(tx.update, in_axes=(None, 0, None)))
  state, out = one(tx.init, in_axes=None)(params), []
  for t in range(steps):
    grads = jax.tree.map(lambda p: jnp.sin(p * (t + 1)) + 0.1 * t, params)
    updates, state = update(grads, state, params)
    updates = jax.tree.map(lambda x: x[0], updates)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _assert_same_updates_on_axis(a, b):
  for x, y in zip(jax.tree.leaves(_updates_on_axis(a)), jax.tree.leaves(_updates_on_axis(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
  "section, library",
  [
    (dict(name="amsgrad"), lambda: cj.comp_ams(0.1, cj.compressors.identity())),
    (
      dict(name="comp_ams", compressor="top_k", compressor_kwargs={"ratio": 0.25}),
      lambda: cj.comp_ams(0.1, cj.compressors.top_k(0.25)),
    ),
    (
      dict(name="onebit_adam", compressor="scaled_sign", compressor_kwargs={}),
      lambda: cj.onebit_adam(0.1, cj.compressors.scaled_sign()),
    ),
    (
      dict(name="qadam", compressor="qsgd", compressor_kwargs={"levels": 127}),
      lambda: cj.qadam(0.1, cj.compressors.qsgd(127)),
    ),
    (
      dict(name="momentum_sgd", compressor="top_k", compressor_kwargs={"ratio": 0.25}),
      lambda: cj.compressed_momentum_sgd(0.1, cj.compressors.top_k(0.25), predictive=False),
    ),
  ],
  ids=lambda v: v["name"] if isinstance(v, dict) else "",
)
def test_unset_fields_take_the_library_defaults(section, library):
  """The shipped optimizer section leaves every hyperparameter to the factory's default."""
  full = {**config_lib.optimizer_section().to_dict(), **section, "learning_rate": 0.1}
  _assert_same_updates(optim.build_optimizer(full, axis_name=None), library())


def test_set_fields_reach_their_arguments():
  """eps is COMP-AMS's ε inside the root; b1, b2 the AMSGrad decays (checked against optax)."""
  section = dict(name="amsgrad", learning_rate=0.1, b1=0.5, b2=0.75, eps=0.25)
  reference = optax.chain(
    optax.scale_by_amsgrad(
      b1=0.5, b2=0.75, eps=0.0, eps_root=0.25, bias_correction_mu=False, bias_correction_nu=False
    ),
    optax.scale_by_learning_rate(0.1),
  )
  _assert_same_updates(optim.build_optimizer(section, axis_name=None), reference)
  # error_feedback=False is momentum SGD without residuals.
  off = dict(name="momentum_sgd", learning_rate=0.1, compressor="top_k", error_feedback=False)
  no_residual = optax.chain(
    cj.worker_momentum(
      inspect.signature(cj.compressed_momentum_sgd).parameters["momentum"].default
    ),
    cj.compressed_mean(cj.compressors.top_k(0.01)),
    optax.scale_by_learning_rate(0.1),
  )
  _assert_same_updates(optim.build_optimizer(off, axis_name=None), no_residual)


def test_the_registry_names_arguments_its_factories_take():
  for name, entry in optim.REGISTRY.items():
    params = inspect.signature(entry.factory).parameters
    for field, argument in entry.arguments.items():
      assert argument in params, (name, field, argument)
      assert field in config_lib.optimizer_section(), (name, field)


def test_annealed_stages_are_geometric_and_cover_the_steps():
  opt = dict(name="comp_ams", compressor="top_k", compressor_kwargs={"ratio": 0.01})
  stages = optim._annealed_stages(
    {**opt, "anneal_from": 0.1, "anneal_steps": 10, "anneal_stages": 4}
  )
  # Stage i ends at round(10·(i + 1)/4): 2.5 → 2, 5, 7.5 → 8, 10 (halves to even).
  assert [n for n, _ in stages] == [2, 3, 3, 2]
  np.testing.assert_allclose(
    [c.ratio for _, c in stages], [0.1 * 0.1 ** (i / 4) for i in range(4)], rtol=1e-12
  )
  assert optim._annealed_stages({**opt, "anneal_from": 0.1, "anneal_steps": 0}) == []


def _measured(section):
  """(per-phase (steps, bytes), steady bytes, bytes of the whole transform) on axis "data"."""
  measure = lambda tx: cj.wire_bytes(tx, PARAMS, num_workers=4)
  before, steady = optim.phases(section, axis_name="data")
  whole = measure(optim.build_optimizer(section, axis_name="data"))
  return [(n, measure(t)) for n, t in before], measure(steady), whole


def test_bytes_per_phase_dense_warmup_then_stages_then_steady():
  opt = dict(
    name="comp_ams",
    learning_rate=1e-3,
    compressor="top_k",
    compressor_kwargs={"ratio": 0.01},
    dense_warmup_steps=3,
    anneal_from=0.1,
    anneal_steps=4,
    anneal_stages=2,
  )
  before, steady, whole = _measured(opt)
  dense = 4 * 1010
  stage = [_top_k_bytes(0.1), _top_k_bytes(0.1 * 0.1**0.5)]
  assert before == [(3, dense), (2, stage[0]), (2, stage[1])]
  assert steady == _top_k_bytes(0.01)
  assert whole == dense + sum(stage) + steady  # the compiled step holds every phase
  sent = optim.bytes_sent_by_step(before, steady)
  want = [0]
  for t in range(1, 12):
    per = dense if t <= 3 else stage[0] if t <= 5 else stage[1] if t <= 7 else steady
    want.append(want[-1] + per)
  assert [sent(t) for t in range(12)] == want


def test_onebit_adam_sends_dense_during_warmup_then_its_compressed_momentum():
  opt = dict(name="onebit_adam", learning_rate=1e-3, compressor="scaled_sign", compressor_kwargs={})
  opt["warmup_steps"] = 5
  before, steady, whole = _measured(opt)
  assert before == [(5, 4 * 1010)]
  assert steady == cj.wire_bytes(cj.compressors.scaled_sign(), PARAMS)
  assert whole == 4 * 1010 + steady
  # Its warm-up length defaults to the factory's.
  default = inspect.signature(cj.onebit_adam).parameters["warmup_steps"].default
  assert _measured({**opt, "warmup_steps": None})[0] == [(default, 4 * 1010)]


def test_constant_optimizers_have_one_phase():
  opt = dict(name="comp_ams", learning_rate=1e-3, compressor="top_k")
  before, steady, whole = _measured(opt)
  assert before == [] and steady == whole == _top_k_bytes(0.01)
  assert optim.bytes_sent_by_step([], 77)(5) == 385


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["optimizer.anneal_from=0.1"], "anneal_steps"),
    (["optimizer.anneal_from=0.005", "optimizer.anneal_steps=8"], "must exceed"),
    (
      ["optimizer.anneal_from=0.1", "optimizer.anneal_steps=8", "optimizer.name=qadam"],
      "comp_ams only",
    ),
  ],
)
def test_anneal_config_refuses_what_would_be_silently_off(overrides, message):
  c = config_lib.base_config(name="t", dataset="digits", model="mlp")
  config_lib.apply_overrides(c, overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_a_hierarchical_mesh_needs_a_factory_that_takes_a_dense_axis():
  for name, entry in optim.REGISTRY.items():
    section = dict(name=name, learning_rate=1e-3)
    if "dense_axis_name" in inspect.signature(entry.factory).parameters:
      optim.build_optimizer(section, axis_name="dcn", dense_axis_name="ici")
    else:
      with pytest.raises(ValueError, match="does not support a hierarchical mesh"):
        optim.build_optimizer(section, axis_name="dcn", dense_axis_name="ici")


def test_diloco_defaults_and_fields_reach_their_arguments():
  """Unset: AdamW with optax's defaults inside, cj.diloco's own (Nesterov) outer optimizer.
  Set: SparseLoCo's machinery (a compressor with decayed error feedback, plain outer SGD for
  momentum 0), Nesterov outer momentum otherwise, the inner AdamW's fields. Run on axis "data"
  (the trainers' case), against the library."""
  default = dict(name="diloco", learning_rate=0.1, compressor="identity", compressor_kwargs={})
  default["sync_every"] = 2
  _assert_same_updates_on_axis(
    optim.build_optimizer(default, axis_name="data"),
    cj.diloco(optax.adamw(0.1), sync_every=2, axis_name="data"),
  )
  inner = dict(learning_rate=0.1, b1=0.8, weight_decay=0.05, sync_every=2, outer_lr=0.6)
  section = dict(
    name="diloco",
    compressor="top_k",
    compressor_kwargs={"ratio": 0.25},
    feedback_decay=0.95,
    outer_momentum=0.0,
    **inner,
  )
  library = cj.diloco(
    optax.adamw(0.1, b1=0.8, weight_decay=0.05),
    sync_every=2,
    outer=optax.sgd(0.6),
    compressor=cj.compressors.top_k(0.25),
    feedback_decay=0.95,
    axis_name="data",
  )
  _assert_same_updates_on_axis(optim.build_optimizer(section, axis_name="data"), library)
  nesterov = dict(name="diloco", compressor="identity", compressor_kwargs={}, **inner)
  nesterov["outer_momentum"] = 0.5
  reference = cj.diloco(
    optax.adamw(0.1, b1=0.8, weight_decay=0.05),
    sync_every=2,
    outer=optax.sgd(0.6, momentum=0.5, nesterov=True),
    axis_name="data",
  )
  _assert_same_updates_on_axis(optim.build_optimizer(nesterov, axis_name="data"), reference)
  # What a worker sends per sync: the compressed pseudo-gradient and a 4-byte finiteness flag.
  tx = optim.build_optimizer(section, axis_name="data")
  assert cj.wire_bytes(tx, PARAMS) == _top_k_bytes(0.25) + 4


def test_sync_every_is_the_sections_or_the_factorys_default():
  default = inspect.signature(optim.diloco_adamw).parameters["sync_every"].default
  assert optim.sync_every(dict(name="diloco")) == default
  assert optim.sync_every(dict(name="diloco", sync_every=7)) == 7
  assert optim.sync_every(dict(name="comp_ams", sync_every=7)) is None


def test_sparseloco_and_demo_presets_are_the_library_optimizers():
  """The presets as the papers configure them, against the library built by hand."""
  section = lambda preset, **f: {**config_lib.PRESETS[preset], "learning_rate": 0.1, **f}
  sparseloco = cj.diloco(
    optax.adamw(0.1),
    sync_every=2,
    outer=optax.sgd(0.6),
    compressor=cj.compressors.chunked_top_k(64, chunk=64, value_bits=2),
    feedback="ef",
    feedback_decay=0.95,
    axis_name="data",
  )
  built = optim.build_optimizer(section("sparseloco", sync_every=2), axis_name="data")
  _assert_same_updates_on_axis(built, sparseloco)
  demo = cj.demo(
    0.1,
    compression_decay=0.999,
    compression_topk=32,
    compression_chunk=64,
    weight_decay=0.01,
    axis_name="data",
  )
  built = optim.build_optimizer(section("demo", weight_decay=0.01), axis_name="data")
  _assert_same_updates_on_axis(built, demo)
  # Unset, DeMo's weight decay is cj.demo's own default.
  default = inspect.signature(cj.demo).parameters["weight_decay"].default
  _assert_same_updates_on_axis(
    optim.build_optimizer(section("demo"), axis_name="data"),
    cj.demo(0.1, weight_decay=default, axis_name="data"),
  )


def test_adamw_preset_is_adamw_on_the_mean_gradient():
  """Dense data-parallel AdamW against a NumPy AdamW loop on the workers' mean gradient."""
  workers, lr, wd, b1, b2, eps = 3, 0.05, 1e-4, 0.9, 0.999, 1e-8
  tx = optim.build_optimizer({**config_lib.PRESETS["adamw"], "learning_rate": lr}, axis_name="data")
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
  grads = rng.normal(size=(5, workers, 4, 3)).astype(np.float32)
  update = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None), axis_name="data"))
  state = jax.vmap(tx.init, in_axes=None, axis_size=workers, axis_name="data")(params)
  p = {"w": jnp.asarray(params["w"])}
  w, m, v = params["w"].astype(np.float64), 0.0, 0.0
  for t, g in enumerate(grads, start=1):
    updates, state = update({"w": jnp.asarray(g)}, state, p)
    np.testing.assert_array_equal(updates["w"][0], updates["w"][-1])  # one update everywhere
    p = optax.apply_updates(p, {"w": updates["w"][0]})
    mean = g.astype(np.float64).mean(0)
    m, v = b1 * m + (1 - b1) * mean, b2 * v + (1 - b2) * mean**2
    w = w - lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * w)
    np.testing.assert_allclose(p["w"], w, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="dense gradient"):
    optim.dense_adamw(0.1, cj.compressors.top_k(0.1), axis_name="data")


def test_sparseloco_predictive_preset_adds_the_least_squares_predictor():
  built = optim.build_optimizer(
    {**config_lib.PRESETS["sparseloco_predictive"], "learning_rate": 0.1, "sync_every": 2},
    axis_name="data",
  )
  by_hand = cj.diloco(
    optax.adamw(0.1),
    sync_every=2,
    outer=optax.sgd(0.6),
    compressor=cj.compressors.chunked_top_k(64, chunk=64, value_bits=2),
    feedback="ef",
    predictor=cj.predictors.least_squares(),
    axis_name="data",
  )
  _assert_same_updates_on_axis(built, by_hand)
