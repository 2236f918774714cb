"""cj.diloco against an independent NumPy loop of DiLoCo / SparseLoCo, on 8 simulated workers."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compams_jax as cj
from tests import reference

D, ROWS, H, INNER_LR = 24, 6, 4, 0.05


def _data(n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n * ROWS, D)).astype(np.float32)
  # Each worker its own targets: local models drift apart between syncs.
  y = (x @ rng.normal(size=D) + rng.normal(size=n * ROWS)).astype(np.float32)
  return {"x": x, "y": y}


def _loss(p, batch):
  return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)


def _np_grad(batch, i, theta):
  x = batch["x"][i * ROWS : (i + 1) * ROWS].astype(np.float64)
  y = batch["y"][i * ROWS : (i + 1) * ROWS].astype(np.float64)
  return 2 * x.T @ (x @ theta - y) / ROWS


CASES = {
  "dense": (dict(), dict()),
  "top_k_ef": (
    dict(compressor=cj.compressors.top_k(0.25), feedback_decay=0.95),
    dict(compress=functools.partial(reference.np_top_k, ratio=0.25), decay=0.95),
  ),
  "top_k_none": (
    dict(compressor=cj.compressors.top_k(0.25), feedback="none"),
    dict(compress=functools.partial(reference.np_top_k, ratio=0.25), feedback=False),
  ),
}


def _step(tx, runner, n, mesh):
  if runner == "shard_map":
    return cj.data_parallel_step(_loss, tx, mesh=mesh, axis_name="data", donate=False)
  return cj.data_parallel_step(
    _loss, tx, mode=runner, axis_name="data", num_workers=n, donate=False
  )


def _run(tx, runner, n, mesh, batch, steps):
  step = _step(tx, runner, n, mesh)
  params, state = step.init({"w": jnp.zeros(D)})
  assert params["w"].shape == (n, D)  # every worker its own model
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, state


@pytest.mark.parametrize("runner", ["shard_map", "vmap", "pmap"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference(case, runner, n_devices, mesh):
  kwargs, np_kwargs = CASES[case]
  if runner != "shard_map" and case != "top_k_ef":
    pytest.skip("the other cases run under shard_map; one case checks each other runner")
  n, steps = n_devices, 3 * H + 2  # ends mid-period
  batch = _data(n)
  tx = cj.diloco(optax.adam(INNER_LR), sync_every=H, axis_name="data", **kwargs)
  params, state = _run(tx, runner, n, mesh, batch, steps)
  theta, local, err = reference.np_diloco(
    np.zeros(D),
    functools.partial(_np_grad, batch),
    n=n,
    steps=steps,
    sync_every=H,
    inner_lr=INNER_LR,
    **np_kwargs,
  )
  theta_got = state.params.value["w"]
  if runner != "shard_map":  # pmap and vmap: every state leaf has a leading worker axis
    theta_got = theta_got[0]
  np.testing.assert_allclose(theta_got, theta, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(params["w"], np.stack(local), rtol=2e-4, atol=2e-5)
  if case == "top_k_ef":
    residual = state.sync_state[0].residual.value["w"]
    np.testing.assert_allclose(residual.reshape(n, D), err, rtol=2e-4, atol=2e-5)


def test_rows_equal_bit_for_bit_after_every_sync(n_devices, mesh):
  tx = cj.diloco(
    optax.adam(INNER_LR), sync_every=H, axis_name="data", compressor=cj.compressors.top_k(0.25)
  )
  step = _step(tx, "shard_map", n_devices, mesh)
  params, state = step.init({"w": jnp.zeros(D)})
  batch = _data(n_devices, seed=1)
  for t in range(1, 2 * H + 1):
    params, state, _ = step(params, state, batch)
    w = np.asarray(params["w"])
    if t % H == 0:
      assert bool(state.params.fresh)
      np.testing.assert_array_equal(w, np.broadcast_to(state.params.value["w"], w.shape))
    else:
      assert not bool(state.params.fresh)
      assert not np.all(w == w[0])  # the workers drift apart between syncs


_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)")


def _computations(hlo):
  """name -> body text of each computation of an HLO module."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      name, lines = head.group(1), []
    elif line.startswith("}") and name is not None:
      out[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return out


def _collectives_under(comps, name, seen=None):
  seen = set() if seen is None else seen
  if name in seen or name not in comps:
    return 0
  seen.add(name)
  body = comps[name]
  count = len(_COLLECTIVE.findall(body))
  for called in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", body):
    count += _collectives_under(comps, called, seen)
  for group in re.findall(r"branch_computations=\{([^}]*)\}", body):
    for called in re.findall(r"%?([\w.\-]+)", group):
      count += _collectives_under(comps, called, seen)
  return count


def test_nothing_is_communicated_between_syncs(n_devices, mesh):
  """The compiled step's only conditional holds the exchange: its sync branch has the
  collectives, its other branch none, and nothing outside it communicates."""
  tx = cj.diloco(
    optax.adam(INNER_LR), sync_every=H, axis_name="data", compressor=cj.compressors.top_k(0.25)
  )
  step = _step(tx, "shard_map", n_devices, mesh)
  params, state = step.init({"w": jnp.zeros(D)})
  hlo = step.lower(params, state, _data(n_devices)).compile().as_text()
  comps = _computations(hlo)
  entry = next(k for k in comps if k.startswith("main"))
  conditionals = [
    sorted(_collectives_under(comps, b) for b in re.findall(r"%?([\w.\-]+)", group))
    for group in re.findall(r"branch_computations=\{([^}]*)\}", comps[entry])
  ]
  # The step's one conditional: its sync branch holds the exchange (the finiteness flag, the
  # payloads), its other branch nothing.
  assert len(conditionals) == 1 and conditionals[0][0] == 0 and conditionals[0][1] >= 2, (
    conditionals
  )
  outside = len(_COLLECTIVE.findall(comps[entry]))
  assert outside == 0, outside


def test_a_nonfinite_pseudo_gradient_skips_the_sync_for_everyone(n_devices, mesh):
  tx = cj.diloco(
    optax.adam(INNER_LR), sync_every=2, axis_name="data", compressor=cj.compressors.top_k(0.25)
  )
  step = _step(tx, "shard_map", n_devices, mesh)
  params, state = step.init({"w": jnp.zeros(D)})
  batch = _data(n_devices)
  params, state, _ = step(params, state, batch)
  bad = dict(batch, y=batch["y"].copy())
  bad["y"][0] = np.nan  # worker 0's loss, gradient, params and inner state turn NaN
  params, state, _ = step(params, state, bad)
  assert int(state.skipped) == 1
  np.testing.assert_array_equal(state.params.value["w"], np.zeros(D))  # θ untouched
  np.testing.assert_array_equal(params["w"], np.zeros((n_devices, D)))  # all restart from θ
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))  # nothing poisoned
  params, state, _ = step(params, state, batch)
  params, state, _ = step(params, state, batch)
  assert int(state.skipped) == 1 and np.all(np.isfinite(params["w"]))
  assert not np.all(np.asarray(state.params.value["w"]) == 0)  # and training goes on


@pytest.mark.parametrize(
  "kwargs, error",
  [
    (dict(sync_every=0), ValueError),
    (dict(sync_every=2.5), ValueError),
    (dict(sync_every=2, feedback="ef21"), ValueError),
    (dict(sync_every=2, feedback_decay=0.9), ValueError),  # no compressor, no residual
    (dict(sync_every=2, compressor=cj.compressors.top_k(0.1), feedback_decay=1.5), ValueError),
    (
      dict(sync_every=2, compressor=cj.compressors.top_k(0.1), feedback="none", feedback_decay=0.5),
      ValueError,
    ),
    (dict(sync_every=2, predictor=cj.predictors.least_squares()), ValueError),
    (dict(sync_every=2, outer="sgd"), TypeError),
  ],
)
def test_bad_arguments_are_refused(kwargs, error):
  with pytest.raises(error):
    cj.diloco(optax.sgd(0.1), axis_name="data", **kwargs)


def test_update_without_params_is_refused():
  tx = cj.diloco(optax.sgd(0.1), sync_every=2, axis_name=None)
  p = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="params"):
    tx.update(p, tx.init(p))


def test_wire_bytes_are_the_compressors_per_sync():
  c = cj.compressors.top_k(0.25)
  tx = cj.diloco(optax.sgd(0.1), sync_every=30, axis_name="data", compressor=c)
  params = {"w": jnp.zeros(D), "b": jnp.zeros((4, 5))}
  payload = cj.compressors.tree_wire_bits(c, params) // 8
  assert cj.wire_bytes(tx, params) == payload + 4  # and the int32 finiteness flag


def _chunk_top_k(x, k=4, ratio=0.5):
  """Top-k of each of k contiguous chunks: the hierarchical chunks, or the FSDP shards."""
  return np.concatenate([reference.np_top_k(c, ratio) for c in np.split(x, k)])


@pytest.mark.parametrize("layout", ["hierarchical", "fsdp"])
def test_slices_match_numpy_reference(layout):
  """2 slices × 4 devices: dense_axis_name averages the inner gradient over the slice and each
  device compresses its chunk; with FSDP each device compresses its shard of the slice's model.
  Both are DiLoCo over 2 workers whose compressor is top-k per quarter of the vector."""
  n, k, steps = 2, 4, 2 * H + 1
  batch = _data(n * k)
  tx_kwargs = dict(compressor=cj.compressors.top_k(0.5), feedback_decay=0.9)
  if layout == "hierarchical":
    mesh = jax.make_mesh((n, k), ("dcn", "ici"))
    tx = cj.diloco(
      optax.adam(INNER_LR), sync_every=H, axis_name="dcn", dense_axis_name="ici", **tx_kwargs
    )
    step = cj.data_parallel_step(_loss, tx, mesh=mesh, axis_name=("dcn", "ici"), donate=False)
  else:
    mesh = jax.make_mesh((n, k), ("dcn", "fsdp"))
    tx = cj.diloco(optax.adam(INNER_LR), sync_every=H, axis_name="dcn", **tx_kwargs)

    def loss(p, b):  # fully manual FSDP: gather the weight; each device a quarter of the loss
      w = jax.lax.all_gather(p["w"], "fsdp", axis=0, tiled=True)
      return _loss({"w": w}, b) / k

    step = cj.data_parallel_step(
      loss, tx, mesh=mesh, axis_name="dcn", param_specs={"w": jax.P("fsdp")}, donate=False
    )
  params, state = step.init({"w": jnp.zeros(D)})
  for _ in range(steps):
    params, state, _ = step(params, state, batch)

  def slice_grad(i, theta):  # the mean gradient over slice i's rows
    x = batch["x"][i * k * ROWS : (i + 1) * k * ROWS].astype(np.float64)
    y = batch["y"][i * k * ROWS : (i + 1) * k * ROWS].astype(np.float64)
    return 2 * x.T @ (x @ theta - y) / (k * ROWS)

  theta, local, _ = reference.np_diloco(
    np.zeros(D),
    slice_grad,
    n=n,
    steps=steps,
    sync_every=H,
    inner_lr=INNER_LR,
    compress=_chunk_top_k,
    decay=0.9,
  )
  np.testing.assert_allclose(state.params.value["w"], theta, rtol=2e-4, atol=2e-5)
  rows = np.asarray(params["w"]).reshape(n, -1, D)[:, 0]
  np.testing.assert_allclose(rows, np.stack(local), rtol=2e-4, atol=2e-5)


def test_agreement_check_counts_workers_whose_params_differ(n_devices, mesh):
  kwargs = dict(sync_every=2, axis_name="data", check_agreement=True)
  kwargs["compressor"] = cj.compressors.top_k(0.25)
  tx = cj.diloco(optax.adam(INNER_LR), **kwargs)
  batch = _data(n_devices)
  step = _step(tx, "shard_map", n_devices, mesh)
  params, state = step.init({"w": jnp.zeros(D)})
  for _ in range(4):
    params, state, _ = step(params, state, batch)
  assert int(state.disagreements) == 0
  # Simulated workers keep a copy of replicated state each: corrupt worker 3's θ.
  step = _step(tx, "vmap", n_devices, mesh)
  params, state = step.init({"w": jnp.zeros(D)})
  theta = state.params.value["w"].at[3].add(1.0)
  state = state._replace(
    params=state.params.__class__(value={"w": theta}, fresh=state.params.fresh)
  )
  for _ in range(2):
    params, state, _ = step(params, state, batch)
  assert np.all(np.asarray(state.disagreements) == 1)


def test_a_non_contractive_compressor_under_error_feedback_warns():
  tx = cj.diloco(
    optax.sgd(0.1), sync_every=2, axis_name=None, compressor=cj.compressors.qsgd(levels=4)
  )
  with pytest.warns(UserWarning, match="not a contraction"):
    tx.init({"w": jnp.zeros(10_000)})
