"""Compression follows the parameter sharding: a ("dcn", "fsdp"[, "tp"]) mesh in jax's explicit
mode, parameters sharded inside each slice, COMP-AMS across slices under a partial-manual
`jax.shard_map(..., axis_names={"dcn"})`. Checked against a NumPy loop that compresses each
device's shard of each leaf on its own, and against the compiled step's collectives."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import reference

STEPS, LR = 6, 0.05
LAYOUTS = {
  # mesh shape, axis names, {leaf: (shape, spec)}
  "2x4": (
    (2, 4),
    ("dcn", "fsdp"),
    {
      "rows": ((16, 6), P("fsdp", None)),
      "cols": ((6, 16), P(None, "fsdp")),
      "bias": ((5,), P()),
    },
  ),
  "2x2x2": (
    (2, 2, 2),
    ("dcn", "fsdp", "tp"),
    {
      "both": ((8, 6), P("fsdp", "tp")),
      "rows": ((4, 6), P("fsdp", None)),
      "tp": ((6, 4), P(None, "tp")),
      "bias": ((3,), P()),
    },
  ),
}
COMPRESSORS = {
  "top_k": (lambda: cj.compressors.top_k(0.1), functools.partial(reference.np_top_k, ratio=0.1)),
  "block_sign": (cj.compressors.block_sign, reference.np_block_sign),
}


def _norm(spec):
  """A PartitionSpec without trailing Nones (P(None,) and P() name the same layout)."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def _shardwise(compress, spec, sizes):
  """C applied to every device's shard of a leaf on its own (the shard is the block)."""

  def apply(x, dim=0):
    if dim == x.ndim:
      return compress(x)
    entry = spec[dim] if dim < len(spec) else None
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    parts = math.prod(sizes[n] for n in names)
    pieces = np.split(x, parts, axis=dim)
    return np.concatenate([apply(p, dim + 1) for p in pieces], axis=dim)

  return apply


def _setup(layout, seed=0):
  shape, names, leaves = LAYOUTS[layout]
  mesh = jax.make_mesh(shape, names)
  rng = np.random.default_rng(seed)
  slices = shape[0]
  params = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in leaves.items()}
  grads = {
    k: (rng.normal(size=(1, slices) + s) + rng.normal(size=(STEPS, slices) + s)).astype(np.float32)
    for k, (s, _) in leaves.items()
  }
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in leaves.items()}
  return mesh, params, grads, shardings, {k: spec for k, (_, spec) in leaves.items()}


def _step(tx, mesh, specs):
  def replica(params, opt_state, g):
    # Explicit FSDP: a weight is gathered to be used; the transpose reduce-scatters its gradient.
    loss = lambda p: sum(jnp.vdot(jax.sharding.reshard(p[k], P()), g[k][0]) for k in p)
    grads = jax.grad(loss)(jax.lax.pcast(params, "dcn", to="varying"))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(
    jax.shard_map(
      replica,
      mesh=mesh,
      in_specs=(P(), specs, P("dcn")),
      out_specs=(P(), specs),
      axis_names={"dcn"},
    )
  )


def gather(w, spec):
  """Fully manual FSDP: every shard of the weight, to use it."""
  for dim, name in enumerate(spec):
    if name is not None:
      w = jax.lax.all_gather(w, name, axis=dim, tiled=True)
  return w


def _compare(got, params, grads, specs, mesh, np_compress):
  """The parameters after STEPS steps against the shard-wise NumPy loop, leaf by leaf."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  for k in params:
    compress = _shardwise(np_compress, specs[k], sizes)
    want, _, _ = reference.np_comp_ams({k: params[k]}, {k: grads[k]}, compress, lr=LR)
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _train(tx, mesh, params, grads, shardings):
  params = jax.device_put(params, shardings)
  opt_state = cj.sharding.init(tx, params, mesh=mesh, axis_name="dcn")  # reads the shardings
  step = _step(tx, mesh, cj.sharding.state_specs(opt_state, "dcn"))
  per_slice = NamedSharding(mesh, P("dcn"))
  for t in range(STEPS):
    g = {k: jax.device_put(v[t], per_slice) for k, v in grads.items()}
    params, opt_state = step(params, opt_state, g)
  return params, opt_state, step, g


@pytest.mark.parametrize("cname", sorted(COMPRESSORS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_comp_ams_compresses_each_devices_shard(layout, cname):
  mesh, params, grads, shardings, specs = _setup(layout)
  make, np_compress = COMPRESSORS[cname]
  tx = cj.comp_ams(LR, make(), axis_name="dcn")
  got, state, _, _ = _train(tx, mesh, params, grads, shardings)
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  for k in params:
    compress = _shardwise(np_compress, specs[k], sizes)
    want, err, _ = reference.np_comp_ams({k: params[k]}, {k: grads[k]}, compress, lr=LR)
    # The update keeps the sharding.
    assert _norm(got[k].sharding.spec) == _norm(shardings[k].spec), k
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    residual = state[0].residual.value[k]
    assert residual.shape == (mesh.devices.shape[0],) + params[k].shape
    np.testing.assert_allclose(np.asarray(residual), err[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_state_is_sharded_like_the_parameters():
  mesh, params, _, shardings, specs = _setup("2x4")
  tx = cj.comp_ams(LR, cj.compressors.top_k(0.1), axis_name="dcn")
  state = cj.sharding.init(tx, jax.device_put(params, shardings), mesh=mesh, axis_name="dcn")
  for k, spec in specs.items():
    residual = state[0].residual.value[k]
    assert _norm(residual.sharding.spec) == _norm(P("dcn", *spec)), k
    # Each device holds the residual of its own shard only.
    shard = residual.addressable_shards[0].data.shape
    assert math.prod(shard) == math.prod(params[k].shape) // (4 if any(spec) else 1), k
    assert _norm(state[1].mu[k].sharding.spec) == _norm(spec), k


def _by_span(compiled, slices):
  """(collectives whose groups span slices, bytes of all-gathers inside a slice, the
  all-gathers issued by the compression itself: the nested map over the shard axes)."""
  found = cj.collective_bytes(compiled).collectives
  assert all(c.group_size is not None for c in found), found
  lines = [l for l in compiled.as_text().splitlines() if " all-gather(" in l]
  in_compression = [l for l in lines if "shard_map/shard_map/" in l]
  across = [c for c in found if c.group_size == slices]
  inside = sum(
    c.operand_bytes for c in found if c.opcode == "all-gather" and c.group_size != slices
  )
  return across, inside, in_compression


def test_only_compressed_bytes_cross_slices_and_no_gradient_is_gathered():
  mesh, params, grads, shardings, specs = _setup("2x4")
  compressor = cj.compressors.top_k(0.1)
  tx = cj.comp_ams(LR, compressor, axis_name="dcn")
  p, state, step, g = _train(tx, mesh, params, grads, shardings)
  across, inside, in_compression = _by_span(step.lower(p, state, g).compile(), slices=2)
  # Across slices: the packed payloads of this device's own shards, one all-gather for the
  # sharded leaves and one for the replicated leaf (a bucket per varying type).
  shards = {
    "rows": jax.ShapeDtypeStruct((4, 6), np.float32),
    "cols": jax.ShapeDtypeStruct((6, 4), np.float32),
    "bias": jax.ShapeDtypeStruct((5,), np.float32),
  }
  assert [c.opcode for c in across] == ["all-gather"] * 2, across
  assert sum(c.operand_bytes for c in across) == cj.wire_bytes(compressor, shards)
  # The compression gathers nothing but those payloads: no gradient is gathered to compress it.
  assert len(in_compression) == 2 and all("u8[" in l for l in in_compression), in_compression

  # The same step with plain optax: the dense mean over slices, then AMSGrad.
  def dense_mean():
    return optax.GradientTransformation(
      lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.lax.pmean(u, "dcn"), s)
    )

  plain = optax.chain(
    dense_mean(),
    optax.scale_by_amsgrad(eps=0.0, eps_root=1e-8, bias_correction_mu=False),
    optax.scale_by_learning_rate(LR),
  )
  pp = jax.device_put(params, shardings)
  ps = cj.sharding.init(plain, pp, mesh=mesh, axis_name="dcn")
  plain_step = _step(plain, mesh, cj.sharding.state_specs(ps, "dcn"))
  _, plain_inside, _ = _by_span(plain_step.lower(pp, ps, g).compile(), slices=2)
  # In explicit mode the partial-manual shard_map boundary all-gathers every operand sharded
  # over "fsdp" and slices it back (params and AMSGrad state in both steps): beyond plain
  # optax's, the only gathers are the residual's, in and out (docs/guide.md).
  residual = sum(params[k].nbytes for k in ("rows", "cols"))
  assert inside <= plain_inside + 2 * residual, (inside, plain_inside)


def _shard(x, spec, sizes, pos):
  """The shard of `x` that the device at mesh position `pos` ({axis: index}) holds."""
  index = []
  for dim in range(x.ndim):
    entry = spec[dim] if dim < len(spec) else None
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    parts, at = 1, 0
    for name in names:  # row-major over the entry's axes
      parts, at = parts * sizes[name], at * sizes[name] + pos[name]
    step = x.shape[dim] // parts
    index.append(slice(at * step, (at + 1) * step))
  return x[tuple(index)]


def _compare_two_phase(got, params, grads, specs, mesh):
  """The parameters after STEPS steps of two-phase COMP-AMS (top-k 25%) against the NumPy
  two-phase loop run on each device's shards of each group of leaves sharded alike."""
  compress = functools.partial(reference.np_top_k, ratio=0.25)
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  groups = {}
  for k, spec in specs.items():
    axes = tuple(
      a
      for a in mesh.axis_names
      if any(a in ((e,) if isinstance(e, str) else e or ()) for e in spec)
    )
    groups.setdefault(axes, []).append(k)
  for axes, keys in groups.items():
    positions = [dict(zip(axes, idx)) for idx in np.ndindex(*(sizes[a] for a in axes))]
    for pos in positions:
      full = {a: pos.get(a, 0) for a in mesh.axis_names}
      p0 = {k: _shard(params[k], specs[k], sizes, full) for k in keys}
      g0 = {
        k: np.stack([[_shard(x, specs[k], sizes, full) for x in row] for row in grads[k]])
        for k in keys
      }
      want, _, _ = reference.np_two_phase_comp_ams(p0, g0, compress, lr=LR)
      for k in keys:
        np.testing.assert_allclose(
          _shard(np.asarray(got[k]), specs[k], sizes, full),
          want[k],
          rtol=1e-5,
          atol=1e-6,
          err_msg=f"{k} at {pos}",
        )
  return groups


@pytest.mark.parametrize(
  "layout", [pytest.param(n, marks=pytest.mark.slow) if n != "2x4" else n for n in sorted(LAYOUTS)]
)
def test_two_phase_runs_on_each_devices_shards_per_group(layout):
  """cj.wire.two_phase() on sharded leaves: each device flattens its own shards of the leaves
  sharded alike (a replicated leaf is its own group) and runs the two-phase algorithm (worker
  and server residuals) across slices, against the NumPy two-phase loop on those shards."""
  mesh, params, grads, shardings, specs = _setup(layout)
  tx = cj.comp_ams(LR, cj.compressors.top_k(0.25), axis_name="dcn", wire=cj.wire.two_phase())
  got, state, step, g = _train(tx, mesh, params, grads, shardings)
  groups = _compare_two_phase(got, params, grads, specs, mesh)
  assert len(groups) > 1  # replicated and sharded leaves: one server residual each
  assert isinstance(state[0].wire_state.value, tuple)
  if layout != "2x4":  # there every axis has 2 devices: group sizes do not tell them apart
    return
  # Across slices: per group, one all-to-all of the chunk payloads and one all-gather of the
  # recompressed chunks, every one packed bytes (u8); nothing dense.
  compiled = step.lower(got, state, g).compile()
  across, _, _ = _by_span(compiled, slices=mesh.devices.shape[0])
  ops = sorted(c.opcode for c in across)
  assert ops == sorted(["all-to-all", "all-gather"] * len(groups)), ops
  lines = [l for l in compiled.as_text().splitlines() if " all-to-all(" in l]
  assert lines and all("u8[" in l.split("=")[1].split("all-to-all")[0] for l in lines), lines


def test_bad_layouts_are_refused():
  mesh = jax.make_mesh((2, 4), ("dcn", "fsdp"))
  params = {"w": jnp.zeros((8, 4))}
  hier = cj.comp_ams(LR, cj.compressors.top_k(0.1), axis_name="dcn", dense_axis_name="fsdp")
  sharded = jax.device_put(params, NamedSharding(mesh, P("fsdp", None)))
  g = jax.device_put({"w": jnp.ones((2, 8, 4))}, NamedSharding(mesh, P("dcn")))
  whole = cj.onebit_adam(LR, warmup_steps=0, axis_name="dcn")  # scaled sign of the model
  for tx, match in [(hier, "dense_axis_name"), (whole, "'model'")]:
    state = cj.sharding.init(tx, params, mesh=mesh, axis_name="dcn")
    step = _step(tx, mesh, cj.sharding.state_specs(state, "dcn"))
    with pytest.raises(ValueError, match=match):
      step(sharded, state, g)
  # Two-phase state initialised on unsharded parameters has one server residual, but a sharded
  # and a replicated leaf need one each.
  two = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(3)}
  tx = cj.comp_ams(LR, cj.compressors.top_k(0.25), axis_name="dcn", wire=cj.wire.two_phase())
  state = cj.sharding.init(tx, two, mesh=mesh, axis_name="dcn")
  step = _step(tx, mesh, cj.sharding.state_specs(state, "dcn"))
  placed = {"w": sharded["w"], "b": jax.device_put(two["b"], NamedSharding(mesh, P()))}
  g2 = {**g, "b": jax.device_put(jnp.ones((2, 3)), NamedSharding(mesh, P("dcn")))}
  with pytest.raises(ValueError, match="initialise the state with cj.sharding.init"):
    step(placed, state, g2)


@pytest.mark.parametrize("wire", ["gather", pytest.param("two_phase", marks=pytest.mark.slow)])
def test_full_manual_spelling_keeps_everything_sharded(wire):
  """shard_map manual over every axis, the FSDP collectives written out: the same update, and
  inside a slice no all-gather at all (only the model's reduce-scatters)."""
  mesh, params, grads, shardings, specs = _setup("2x4")
  if wire == "two_phase":  # the groups of leaves come from the state (cj.sharding.init)
    tx = cj.comp_ams(LR, cj.compressors.top_k(0.25), axis_name="dcn", wire=cj.wire.two_phase())
  else:
    tx = cj.comp_ams(LR, cj.compressors.top_k(0.1), axis_name="dcn")
  p = jax.device_put(params, shardings)
  state = cj.sharding.init(tx, p, mesh=mesh, axis_name="dcn")
  state_specs = cj.sharding.state_specs(state, "dcn", params=p, param_specs=specs)

  def replica(p, s, g):
    # Each of the 4 devices of a slice holds the slice's gradient: its share of the loss is a
    # quarter (the reduce-scatter of the weights' gradients adds the shares up).
    loss = lambda p: sum(jnp.vdot(gather(p[k], specs[k]), g[k][0]) for k in p) / 4
    grads = jax.grad(loss)(jax.lax.pcast(p, "dcn", to="varying"))
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(
    jax.shard_map(
      replica,
      mesh=mesh,
      in_specs=(specs, state_specs, P("dcn")),
      out_specs=(specs, state_specs),
    )
  )
  per_slice = NamedSharding(mesh, P("dcn"))
  for t in range(STEPS):
    g = {k: jax.device_put(v[t], per_slice) for k, v in grads.items()}
    p, state = step(p, state, g)
  if wire == "two_phase":
    _compare_two_phase(p, params, grads, specs, mesh)
  else:
    _compare(p, params, grads, specs, mesh, functools.partial(reference.np_top_k, ratio=0.1))
  found = cj.collective_bytes(step.lower(p, state, g).compile()).collectives
  gathers = [c for c in found if c.opcode == "all-gather"]
  assert gathers and all(c.group_size == 2 for c in gathers), found  # payloads across slices


@pytest.mark.parametrize(
  "make",
  [
    lambda: cj.onebit_adam(LR, cj.compressors.block_sign(), warmup_steps=2, axis_name="dcn"),
    lambda: cj.qadam(LR, cj.compressors.top_k(0.1), axis_name="dcn"),
    lambda: cj.compressed_momentum_sgd(
      LR, cj.compressors.top_k(0.1), predictive=False, axis_name="dcn"
    ),
    # Least-squares predictive coding of the momentum: one ρ per shard, as per leaf.
    lambda: cj.compressed_momentum_sgd(LR, cj.compressors.top_k(0.1), axis_name="dcn"),
  ],
  ids=["onebit_adam", "qadam", "momentum_sgd", "momentum_sgd_predictive"],
)
def test_baselines_follow_the_sharding_too(make):
  """Each equals the same optimizer on replicated parameters whose compressor sees the shards:
  here, the unsharded run of a model whose leaves ARE the shards (a 16x6 row-sharded leaf is
  four 4x6 leaves), compared leaf by leaf."""
  mesh, params, grads, shardings, specs = _setup("2x4")
  got, _, _, _ = _train(make(), mesh, params, grads, shardings)

  def split(tree):  # every sharded leaf cut into its four device shards
    out = {}
    for k, x in tree.items():
      axis = {"rows": 0, "cols": 1}.get(k)
      if axis is None:
        out[k] = x
        continue
      for j, part in enumerate(np.split(x, 4, axis=axis + (x.ndim - params[k].ndim))):
        out[f"{k}{j}"] = part
    return out

  flat_mesh = jax.make_mesh((2, 4), ("dcn", "fsdp"))
  flat_params = split(params)
  flat_grads = split(grads)
  replicated = {k: NamedSharding(flat_mesh, P()) for k in flat_params}
  want, _, _, _ = _train(make(), flat_mesh, flat_params, flat_grads, replicated)
  for k in ("rows", "cols"):
    axis = {"rows": 0, "cols": 1}[k]
    joined = np.concatenate([np.asarray(want[f"{k}{j}"]) for j in range(4)], axis=axis)
    np.testing.assert_allclose(np.asarray(got[k]), joined, rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(np.asarray(got["bias"]), np.asarray(want["bias"]), rtol=1e-5)


def test_data_parallel_step_covers_sharded_models():
  """`cj.data_parallel_step(..., param_specs=...)` is the fully manual spelling: the loss gathers
  its weights explicitly, and compression follows the shards."""
  mesh, params, grads, shardings, specs = _setup("2x4")
  tx = cj.comp_ams(LR, cj.compressors.block_sign(), axis_name="dcn")

  # Every device of a slice holds the slice's gradient here, so its share of the loss is a
  # quarter: the reduce-scatter of the weights' gradients adds the four shares up.
  loss = lambda p, g: sum(jnp.vdot(gather(p[k], specs[k]), g[k][0]) for k in p) / 4
  step = cj.data_parallel_step(loss, tx, mesh=mesh, axis_name="dcn", param_specs=specs)
  p, state = step.init(params)
  for t in range(STEPS):
    p, state, _ = step(p, state, {k: v[t] for k, v in grads.items()})
  _compare(p, params, grads, specs, mesh, reference.np_block_sign)
  for k in params:
    assert _norm(p[k].sharding.spec) == _norm(specs[k]), k


@pytest.mark.parametrize("wire", ["gather", pytest.param("two_phase", marks=pytest.mark.slow)])
def test_auto_axes_follow_the_shardings_passed_once(wire):
  """Auto mesh axes: the types carry no sharding, so `cj.sharding.init` records the
  parameters' specs (read from the arrays) on the residuals, and compression follows them."""
  shape, names, leaves = LAYOUTS["2x4"]
  mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  _, params, grads, _, specs = _setup("2x4")
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  if wire == "two_phase":
    tx = cj.comp_ams(LR, cj.compressors.top_k(0.25), axis_name="dcn", wire=cj.wire.two_phase())
  else:
    tx = cj.comp_ams(LR, cj.compressors.top_k(0.1), axis_name="dcn")
  p = jax.device_put(params, shardings)
  state = cj.sharding.init(tx, p, mesh=mesh, axis_name="dcn")
  sspecs = cj.sharding.state_specs(state, "dcn")

  def replica(p, s, g):
    loss = lambda p: sum(jnp.vdot(p[k], g[k][0]) for k in p)  # the compiler places it all
    grads = jax.grad(loss)(jax.lax.pcast(p, "dcn", to="varying"))
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(
    jax.shard_map(
      replica,
      mesh=mesh,
      in_specs=(P(), sspecs, P("dcn")),
      out_specs=(P(), sspecs),
      axis_names={"dcn"},
    )
  )
  per_slice = NamedSharding(mesh, P("dcn"))
  for t in range(STEPS):
    g = {k: jax.device_put(v[t], per_slice) for k, v in grads.items()}
    p, state = step(p, state, g)
  if wire == "two_phase":
    _compare_two_phase(p, params, grads, specs, mesh)
    return
  _compare(p, params, grads, specs, mesh, functools.partial(reference.np_top_k, ratio=0.1))
  across, _, in_compression = _by_span(step.lower(p, state, g).compile(), slices=2)
  shards = {
    "rows": jax.ShapeDtypeStruct((4, 6), np.float32),
    "cols": jax.ShapeDtypeStruct((6, 4), np.float32),
    "bias": jax.ShapeDtypeStruct((5,), np.float32),
  }
  assert sum(c.operand_bytes for c in across) == cj.wire_bytes(tx, shards)
  assert all("u8[" in l for l in in_compression), in_compression


def _shard_slices(shape, spec, sizes):
  """The index of every device's shard of a leaf (each a tuple of slices)."""
  out = [()]
  for dim, n in enumerate(shape):
    entry = spec[dim] if dim < len(spec) else None
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    parts = math.prod(sizes[a] for a in names)
    step = n // parts
    out = [s + (slice(j * step, (j + 1) * step),) for s in out for j in range(parts)]
  return out


@pytest.mark.parametrize("feedback", ["ef", "none"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_predictive_coding_codes_each_devices_shard(layout, feedback):
  """Least-squares predictive coding on sharded parameters: each device codes its shard (its
  own ρ, its own top-k budget) against a NumPy loop of the temporal paper on every shard."""
  mesh, params, grads, shardings, specs = _setup(layout)
  c = cj.predictive_compression(
    cj.compressors.top_k(0.25),
    predictor=cj.predictors.least_squares(),
    feedback=feedback,
    axis_name="dcn",
  )
  got, state, _, _ = _train(optax.chain(c, optax.sgd(LR)), mesh, params, grads, shardings)
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  compress = functools.partial(reference.np_top_k, ratio=0.25)
  for k in params:
    want = params[k].copy()
    for index in _shard_slices(params[k].shape, specs[k], sizes):
      xs = {k: grads[k][(slice(None), slice(None), *index)]}
      outputs, recon, _, _ = reference.np_predictive(
        xs, compress, rho=None, error_feedback=feedback == "ef"
      )
      want[index] = params[k][index] - LR * sum(o[k] for o in outputs)
      got_recon = np.asarray(state[0].reconstruction.value[k])[(slice(None), *index)]
      np.testing.assert_allclose(got_recon, recon[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert _norm(got[k].sharding.spec) == _norm(shardings[k].spec), k
    np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("cname", ["top_k", pytest.param("block_sign", marks=pytest.mark.slow)])
def test_hierarchical_mode_on_sharded_parameters(cname):
  """dense_axis_name on parameters sharded over a third axis: a ("dcn", "ici", "fsdp") mesh;
  every device's shard of a leaf is that leaf for the hierarchical algorithm (reduce-scatter
  over "ici", chunk-wise error feedback, average over "dcn", all-gather over "ici"), against
  the NumPy hierarchical loop run on the shards."""
  from tests import reference_hierarchical as rh

  slices, k, f = 2, 2, 2
  mesh = jax.make_mesh((slices, k, f), ("dcn", "ici", "fsdp"))
  leaves = {
    "rows": ((8, 6), P("fsdp", None)),
    "cols": ((6, 8), P(None, "fsdp")),
    "bias": ((5,), P()),
  }
  specs = {n: spec for n, (_, spec) in leaves.items()}
  rng = np.random.default_rng(0)
  params = {n: rng.normal(size=s).astype(np.float32) for n, (s, _) in leaves.items()}
  grads = {
    n: (rng.normal(size=(1, slices * k) + s) + rng.normal(size=(STEPS, slices * k) + s)).astype(
      np.float32
    )
    for n, (s, _) in leaves.items()
  }
  make, np_c = {
    "top_k": (lambda: cj.compressors.top_k(0.25), functools.partial(rh.np_top_k, ratio=0.25)),
    "block_sign": (cj.compressors.block_sign, rh.np_block_sign),
  }[cname]
  tx = cj.comp_ams(LR, make(), axis_name="dcn", dense_axis_name="ici")
  axes = ("dcn", "ici")
  p = jax.device_put(params, {n: NamedSharding(mesh, s) for n, s in specs.items()})
  state = cj.sharding.init(tx, p, mesh=mesh, axis_name=axes)
  sspecs = cj.sharding.state_specs(state, axes)

  def replica(p, s, g):
    loss = lambda p: sum(jnp.vdot(jax.sharding.reshard(p[n], P()), g[n][0]) for n in p)
    grads_ = jax.grad(loss)(jax.lax.pcast(p, axes, to="varying"))
    updates, s = tx.update(grads_, s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(
    jax.shard_map(
      replica,
      mesh=mesh,
      in_specs=(P(), sspecs, P(axes)),
      out_specs=(P(), sspecs),
      axis_names=set(axes),
    )
  )
  per_device = NamedSharding(mesh, P(axes))
  for t in range(STEPS):
    p, state = step(p, state, {n: jax.device_put(v[t], per_device) for n, v in grads.items()})
  sizes = {"dcn": slices, "ici": k, "fsdp": f}
  residual = state[0].residual.value
  for j in range(f):
    pos = {"dcn": 0, "ici": 0, "fsdp": j}
    p0 = {n: _shard(params[n], specs[n], sizes, pos) for n in params}
    g0 = {
      n: np.stack([[_shard(x, specs[n], sizes, pos) for x in row] for row in grads[n]])
      for n in params
    }
    trace, want_res, _ = rh.np_hier_comp_ams(p0, g0, np_c, slices=slices, k=k, lr=LR)
    for n in params:
      np.testing.assert_allclose(
        _shard(np.asarray(p[n]), specs[n], sizes, pos),
        trace[-1][n],
        rtol=1e-5,
        atol=1e-5,
        err_msg=f"{n} at fsdp {j}",
      )
      # Each device's chunk residual of its own shard: (dcn·ici rows, fsdp-split chunks).
      got = np.asarray(residual[n]).reshape(slices * k, -1)
      c = want_res[n].shape[1]
      part = got[:, j * c : (j + 1) * c] if any(specs[n]) else got
      np.testing.assert_allclose(part, want_res[n], rtol=1e-5, atol=1e-5, err_msg=f"e {n}")
