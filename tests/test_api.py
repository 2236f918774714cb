"""The optimizers' shared communication arguments: misuse guards, init outside the mesh, and
1-bit Adam through every wire layout, against a plain NumPy loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import harness

SHAPES = {"dense": (6, 5), "bias": (5,)}
STEPS, WARMUP, LR, EPS = 8, 3, 0.01, 1e-8


def _np_dense_onebit_adam(params, grads, *, lr, warmup, b1=0.9, b2=0.999, eps=EPS):
  """1-bit Adam with an exact (uncompressed) momentum average: v frozen after the warm-up."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t in range(grads["dense"].shape[0]):
    for k in p:
      g = grads[k][t].astype(np.float64).mean(axis=0)
      m[k] = b1 * m[k] + (1 - b1) * g
      if t < warmup:
        v[k] = b2 * v[k] + (1 - b2) * g * g
      p[k] = p[k] - lr * m[k] / (np.sqrt(v[k]) + eps)
  return p


def _hier_run(tx, params, grads, mesh, axes):
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name=axes)
  specs = cj.sharding.state_specs(state, axes)

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P(axes)), out_specs=(P(), specs)
  )
  def step(p, s, g):
    loss = lambda p: sum(jnp.vdot(p[k], g[k][0]) for k in p)
    grads = jax.grad(loss)(jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), p))
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  p, where = params, jax.sharding.NamedSharding(mesh, P(axes))
  for t in range(STEPS):
    p, state = step(p, state, {k: jax.device_put(v[t], where) for k, v in grads.items()})
  return p


@pytest.mark.parametrize("layout", ["flat_gather", "flat_two_phase", "hierarchical"])
def test_onebit_adam_takes_every_wire_layout(layout, n_devices):
  params, grads = harness.problem(SHAPES, n_devices, STEPS, seed=4)
  want = _np_dense_onebit_adam(params, grads, lr=LR, warmup=WARMUP)
  dense = cj.compressors.identity()  # exact, so every layout must give the exact average
  if layout == "hierarchical":
    mesh = jax.make_mesh((2, n_devices // 2), ("dcn", "ici"))
    tx = cj.onebit_adam(LR, dense, warmup_steps=WARMUP, axis_name="dcn", dense_axis_name="ici")
    got = _hier_run(tx, params, grads, mesh, ("dcn", "ici"))
  else:
    mesh = jax.make_mesh((n_devices,), ("data",))
    wire = cj.wire.two_phase() if layout == "flat_two_phase" else cj.wire.gather()
    tx = cj.onebit_adam(LR, dense, warmup_steps=WARMUP, axis_name="data", wire=wire)
    got, _ = harness.run(tx, params, grads, mesh, STEPS)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize(
  "make",
  [
    lambda: cj.qadam(0.01, cj.compressors.top_k(0.5), axis_name="data"),
    lambda: cj.comp_ams(0.01, cj.compressors.top_k(0.5), axis_name="data"),
    lambda: cj.onebit_adam(0.01, axis_name="data"),
    lambda: cj.compressed_momentum_sgd(0.01, cj.compressors.top_k(0.5), axis_name="data"),
  ],
  ids=["qadam", "comp_ams", "onebit_adam", "compressed_momentum_sgd"],
)
def test_every_optimizer_refuses_gradients_already_summed_over_workers(make, n_devices):
  """Gradients of replicated parameters inside shard_map are already summed over the workers:
  every optimizer's first per-worker transform must refuse them (qadam's local Adam did not
  check, and its output, mixed with per-worker moments, passed the later check)."""
  mesh = jax.make_mesh((n_devices,), ("data",))
  tx = make()
  params = {"w": jnp.ones(8)}
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  specs = cj.sharding.state_specs(state, "data")

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), specs), out_specs=(P(), specs))
  def step(p, s):
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(p)  # no pcast: not per-worker
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  with pytest.raises(ValueError, match="do not vary over the worker axes"):
    jax.jit(step)(params, state)


def test_two_phase_with_num_workers_initialises_outside_the_mesh(n_devices):
  params = {"w": jnp.zeros((10, 3)), "b": jnp.zeros(7)}
  mesh = jax.make_mesh((n_devices,), ("data",))
  plain = cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name="data", wire=cj.wire.two_phase())
  with pytest.raises(ValueError, match=r"two_phase\(num_workers=n\)"):
    plain.init(params)
  sized = cj.comp_ams(
    1e-3,
    cj.compressors.block_sign(),
    axis_name="data",
    wire=cj.wire.two_phase(num_workers=n_devices),
  )
  local = jax.eval_shape(sized.init, params)
  on_mesh = cj.sharding.init(plain, params, mesh=mesh, axis_name="data")
  # One worker's state from tx.init has the shapes of one row of the mesh's global state.
  assert local[0].wire_state.value.shape == (1, -(-37 // n_devices))
  assert on_mesh[0].wire_state.value.shape == (n_devices, -(-37 // n_devices))
  wrong = cj.comp_ams(
    1e-3, cj.compressors.block_sign(), axis_name="data", wire=cj.wire.two_phase(num_workers=3)
  )
  with pytest.raises(ValueError, match="num_workers=3"):
    cj.sharding.init(wrong, params, mesh=mesh, axis_name="data")


def test_worker_state_reads_one_workers_residual(n_devices):
  mesh = jax.make_mesh((n_devices,), ("data",))
  tx = cj.error_feedback(cj.compressors.top_k(0.5), axis_name="data")
  params = {"w": jnp.zeros(4)}
  p, state, step = harness.shard_map_step(tx, params, mesh)
  g = np.arange(n_devices * 4, dtype=np.float32).reshape(n_devices, 1, 4) % 5 - 2
  _, state = step(p, state, {"w": g})
  for i in range(n_devices):
    kept = np.argsort(-np.abs(g[i, 0]), kind="stable")[:2]  # top-2, ties to the lower index
    want = g[i, 0].copy()
    want[kept] = 0.0  # what was not sent is owed
    got = cj.sharding.worker_state(state, i).residual.value["w"]
    assert got.shape == (4,)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("bad", ["EF", True, "ef22"])
def test_feedback_switch_is_checked_everywhere(bad):
  c = cj.compressors.top_k(0.1)
  for make in (
    lambda: cj.comp_ams(1e-3, c, feedback=bad),
    lambda: cj.compressed_momentum_sgd(1e-3, c, feedback=bad),
    lambda: cj.qadam(1e-3, c, feedback=bad),
  ):
    with pytest.raises(ValueError, match="feedback must be one of"):
      make()
  with pytest.raises(ValueError, match="feedback must be 'ef' or 'none'"):
    cj.predictive_compression(c, feedback=bad)
