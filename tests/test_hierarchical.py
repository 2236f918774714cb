"""Hierarchical data parallelism on a ("dcn", "ici") mesh: dense over the fast axis, compressed
over the slow one, checked against an independent NumPy loop (tests/reference_hierarchical.py),
the collectives of the compiled step, the state layout, and a 2-process run."""

import functools
import math
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import reference_hierarchical as ref

AXES = ("dcn", "ici")
SLICES, K = 2, 4
# Leaf sizes 90, 7, 240 and 1: two are not multiples of K, so the last chunk is padded.
SHAPES = {"conv": (3, 3, 2, 5), "bias": (7,), "dense": (24, 10), "one": (1,)}
STEPS = 10
LR = 0.05

COMPRESSORS = {
  "top_k": (lambda: cj.compressors.top_k(0.1), functools.partial(ref.np_top_k, ratio=0.1)),
  "block_sign": (cj.compressors.block_sign, ref.np_block_sign),
}


def _mesh(order="default"):
  if order == "default":
    return jax.make_mesh((SLICES, K), AXES)
  # The same devices in another order: slice membership must be read from the mesh.
  devices = np.array(jax.devices())[[5, 2, 7, 0, 1, 6, 3, 4]].reshape(SLICES, K)
  return jax.sharding.Mesh(devices, AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def _problem(shapes=SHAPES, steps=STEPS, seed=0, dtype=np.float32):
  """Params and per-device gradients grads[k] of shape (T, S·K, *leaf): a device-specific offset
  plus per-step noise, so all eight devices disagree."""
  rng = np.random.default_rng(seed)
  n = SLICES * K
  params = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
  grads = {
    k: (rng.normal(size=(1, n) + s) + rng.normal(size=(steps, n) + s)).astype(dtype)
    for k, s in shapes.items()
  }
  return params, grads


def _hier_step(tx, params, mesh):
  """(params placed replicated, sharded initial state, jitted step(p, s, per_device_grads))."""
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name=AXES)
  specs = cj.sharding.state_specs(state, AXES)

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P(AXES)), out_specs=(P(), specs)
  )
  def step(p, s, g):
    # The gradient of Σ⟨p, g_device⟩ is this device's own gradient.
    loss = lambda p: sum(jnp.vdot(p[k], g[k][0]).astype(jnp.float32) for k in p)
    grads = jax.grad(loss)(jax.tree.map(lambda x: jax.lax.pcast(x, AXES, to="varying"), p))
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  return jax.device_put(params, NamedSharding(mesh, P())), state, step


def _put_grads(g, mesh):
  return jax.device_put(g, NamedSharding(mesh, P(AXES)))


def _run_and_compare(tx, np_c, wire, mesh):
  params, grads = _problem()
  trace, want_res, want_server = ref.np_hier_comp_ams(
    params, grads, np_c, slices=SLICES, k=K, lr=LR, wire=wire
  )
  p, state, step = _hier_step(tx, params, mesh)
  for t in range(STEPS):
    p, state = step(p, state, _put_grads({k: v[t] for k, v in grads.items()}, mesh))
    for k in SHAPES:
      np.testing.assert_allclose(
        np.asarray(p[k]), trace[t][k], rtol=1e-5, atol=1e-5, err_msg=f"{k} after step {t + 1}"
      )
  residual = state[0].residual.value
  for k in SHAPES:
    got = np.asarray(residual[k])
    assert got.shape == (SLICES * K, ref.chunk_len(SHAPES[k], K)), k
    np.testing.assert_allclose(got, want_res[k], rtol=1e-5, atol=1e-5, err_msg=f"residual {k}")
  # The run moved the parameters (the comparison is not of two idle runs).
  assert max(np.abs(trace[-1][k] - params[k]).max() for k in SHAPES) > 0.1
  return state, want_res, want_server


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_gather_matches_numpy_reference(name, n_devices):
  make, np_c = COMPRESSORS[name]
  tx = cj.comp_ams(LR, make(), axis_name="dcn", dense_axis_name="ici")
  _, want_res, _ = _run_and_compare(tx, np_c, "gather", _mesh())
  if name == "block_sign":
    # The padded entries of the last chunk are part of the block: they were sent as ±scale and
    # their residual is non-zero (the library's residuals matched these above).
    pad = K * ref.chunk_len(SHAPES["conv"], K) - math.prod(SHAPES["conv"])
    assert pad > 0 and np.abs(want_res["conv"][K - 1 :: K, -pad:]).min() > 0


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_two_phase_matches_numpy_reference(name, n_devices):
  make, np_c = COMPRESSORS[name]
  tx = cj.comp_ams(LR, make(), axis_name="dcn", dense_axis_name="ici", wire=cj.wire.two_phase())
  state, _, want_server = _run_and_compare(tx, np_c, "two_phase", _mesh())
  got = np.asarray(state[0].wire_state.value)
  assert got.shape == want_server.shape
  np.testing.assert_allclose(got, want_server, rtol=1e-5, atol=1e-5, err_msg="server residual")


def test_permuted_device_order_matches_reference(n_devices):
  """The chunk owner is the ici position in the mesh, whatever the device ids are."""
  tx = cj.comp_ams(LR, cj.compressors.block_sign(), axis_name="dcn", dense_axis_name="ici")
  _run_and_compare(tx, ref.np_block_sign, "gather", _mesh("permuted"))


# ------------------------------------------------------------------------------ compiled HLO

_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_GROUPS_EXPLICIT_RE = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_COLLECTIVE_OPS = (
  "all-gather",
  "all-reduce",
  "all-to-all",
  "reduce-scatter",
  "collective-permute",
  "collective-broadcast",
  "ragged-all-to-all",
)


def _replica_groups(line):
  m = _GROUPS_EXPLICIT_RE.search(line)
  if m:
    return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
  m = _GROUPS_IOTA_RE.search(line)
  if m:
    groups, size = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(d) for d in m.group(4).split(",")])
    return ids.reshape(groups, size).tolist()
  return None


def _collective_lines(hlo):
  """(opcode, replica groups, result element type) of every collective, in HLO text order."""
  out = []
  for line in hlo.splitlines():
    m = _DEF_RE.match(re.sub(r"/\*.*?\*/", "", line))
    if not m:
      continue
    for op in _COLLECTIVE_OPS:
      if re.search(rf"\s{re.escape(op)}(-start)?\(", " " + m.group(1)):
        etype = re.match(r"\(?([a-z][a-z0-9]*)\[", m.group(1)).group(1)
        out.append((op, _replica_groups(line), etype))
        break
  return out


def _split_collectives(compiled, mesh):
  """(across slices, within slices): lists of (opcode, operand_bytes, group_size, element_type)
  of the compiled step's collectives.

  Replica groups name positions in the executable's device assignment (partition ids); each
  position is mapped to its device and the device to its dcn row in the mesh.
  """
  assignment = jax.tree.leaves(compiled.input_shardings)[0]._device_assignment
  row_of = {d.id: int(r) for r, row in enumerate(mesh.devices) for d in row}
  slice_of = [row_of[d.id] for d in assignment]
  lines = _collective_lines(compiled.as_text())
  parsed = cj.collective_bytes(compiled).collectives
  assert [op for op, _, _ in lines] == [c.opcode for c in parsed]
  cross, within = [], []
  for (op, groups, etype), c in zip(lines, parsed):
    assert groups, f"no replica groups for {op}"
    spans = [len({slice_of[i] for i in g}) > 1 for g in groups]
    assert len(set(spans)) == 1, f"{op}: groups {groups} both within and across slices"
    assert sorted(i for g in groups for i in g) == list(range(SLICES * K))
    assert all(len(g) == c.group_size for g in groups)
    (cross if spans[0] else within).append((op, c.operand_bytes, c.group_size, etype))
  return cross, within


def _block_sign_payload_bytes(c):
  return -(-c // 8) + 4  # one bit per entry, packed; one float32 scale


def _many_shapes(n):
  shapes = [(3, 3, 2, 5), (7,), (24, 10), (1,), (5, 3), (13,)]
  return {f"leaf{i:02d}": shapes[i % len(shapes)] for i in range(n)}


def _compile(tx, params, mesh):
  p, state, step = _hier_step(tx, params, mesh)
  g = {k: np.zeros((SLICES * K,) + v.shape, v.dtype) for k, v in params.items()}
  return step.lower(p, state, _put_grads(g, mesh)).compile()


@pytest.mark.parametrize(
  "leaves, order", [(3, "default"), (30, "default"), (3, "permuted")], ids=["3", "30", "3-permuted"]
)
def test_hlo_gather_only_compressed_bytes_cross_slices(leaves, order, n_devices):
  mesh = _mesh(order)
  shapes = _many_shapes(leaves)
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  tx = cj.comp_ams(LR, cj.compressors.block_sign(), axis_name="dcn", dense_axis_name="ici")
  cross, within = _split_collectives(_compile(tx, params, mesh), mesh)
  assert len(cross) + len(within) == 3, (cross, within)  # whatever the number of leaves
  chunks = [ref.chunk_len(s, K) for s in shapes.values()]
  want_wire = sum(_block_sign_payload_bytes(c) for c in chunks)
  assert cj.wire_bytes(tx, params, num_workers=SLICES, dense_workers=K) == want_wire
  # Across slices: one all-gather of every leaf's packed payload, as bytes.
  assert cross == [("all-gather", want_wire, SLICES, "u8")]
  # Within a slice: the dense float32 chunks, one reduce-scatter and one all-gather.
  dense = 4 * sum(chunks)
  assert sorted(within) == [
    ("all-gather", dense, K, "f32"),
    ("reduce-scatter", K * dense, K, "f32"),
  ]


@pytest.mark.parametrize("leaves", [3, 30])
def test_hlo_two_phase_only_compressed_bytes_cross_slices(leaves, n_devices):
  mesh = _mesh()
  shapes = _many_shapes(leaves)
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  tx = cj.comp_ams(
    LR,
    cj.compressors.block_sign(),
    axis_name="dcn",
    dense_axis_name="ici",
    wire=cj.wire.two_phase(),
  )
  cross, within = _split_collectives(_compile(tx, params, mesh), mesh)
  assert len(cross) + len(within) == 4, (cross, within)  # whatever the number of leaves
  total = sum(ref.chunk_len(s, K) for s in shapes.values())
  sub = _block_sign_payload_bytes(-(-total // SLICES))
  want_wire = SLICES * sub + sub  # all_to_all of S sub-chunk payloads + all_gather of one
  assert cj.wire_bytes(tx, params, num_workers=SLICES, dense_workers=K) == want_wire
  assert sum(b for _, b, _, _ in cross) == want_wire
  assert sorted(cross) == [
    ("all-gather", sub, SLICES, "u8"),
    ("all-to-all", SLICES * sub, SLICES, "u8"),
  ]
  assert sorted(within) == [
    ("all-gather", 4 * total, K, "f32"),
    ("reduce-scatter", 4 * K * total, K, "f32"),
  ]


def test_hlo_one_dense_pair_per_dtype(n_devices):
  """bfloat16 and float32 leaves: one reduce-scatter and one all-gather over ici per dtype."""
  mesh = _mesh()
  shapes = _many_shapes(6)
  dtypes = {k: np.float32 if i % 2 else jnp.bfloat16 for i, k in enumerate(shapes)}
  params = {k: np.zeros(s, dtypes[k]) for k, s in shapes.items()}
  tx = cj.comp_ams(LR, cj.compressors.block_sign(), axis_name="dcn", dense_axis_name="ici")
  p, state, step = _hier_step(tx, params, mesh)
  g = {k: np.zeros((SLICES * K,) + v.shape, v.dtype) for k, v in params.items()}
  lowered = step.lower(p, state, _put_grads(g, mesh))
  compiled = lowered.compile()
  cross, within = _split_collectives(compiled, mesh)
  want_wire = sum(_block_sign_payload_bytes(ref.chunk_len(s, K)) for s in shapes.values())
  assert cross == [("all-gather", want_wire, SLICES, "u8")]
  chunks = {}  # entries of this device's chunks, per dtype
  for k, s in shapes.items():
    name = np.dtype(dtypes[k]).name
    chunks[name] = chunks.get(name, 0) + ref.chunk_len(s, K)
  # XLA:CPU runs bfloat16 collectives in float32, so compare entries (bytes / itemsize of the
  # compiled collective's own element type) rather than bytes.
  itemsize = {"f32": 4, "bf16": 2}
  entries = [(op, b // itemsize[t], size) for op, b, size, t in within]
  assert sorted(entries) == sorted(
    [("all-gather", c, K) for c in chunks.values()]
    + [("reduce-scatter", K * c, K) for c in chunks.values()]
  )
  # The traced program sends the bfloat16 chunks as bfloat16.
  text = lowered.as_text()
  assert f"(tensor<1x{chunks['bfloat16']}xbf16>) -> tensor<4x{chunks['bfloat16']}xbf16>" in text
  assert f"(tensor<1x{chunks['float32']}xf32>) -> tensor<4x{chunks['float32']}xf32>" in text


# ------------------------------------------------------------------------------ state layout


@pytest.mark.parametrize("wire", ["gather", "two_phase"])
def test_state_specs_and_init(wire, n_devices):
  mesh = _mesh()
  params = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
  strategy = cj.wire.two_phase() if wire == "two_phase" else cj.wire.gather()
  tx = cj.comp_ams(
    LR, cj.compressors.block_sign(), axis_name="dcn", dense_axis_name="ici", wire=strategy
  )
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name=AXES)
  specs = cj.sharding.state_specs(state, AXES)
  ef, ams = state[0], state[1]
  for k, s in SHAPES.items():
    assert specs[0].residual.value[k] == P(AXES)
    assert ef.residual.value[k].shape == (SLICES * K, ref.chunk_len(s, K))
    assert ef.residual.value[k].sharding.spec[0] == AXES
    for moment in ("mu", "nu", "nu_max"):
      assert getattr(specs[1], moment)[k] == P()
      assert getattr(ams, moment)[k].shape == s
  assert specs[0].count == P() and specs[1].count == P()
  if wire == "two_phase":
    total = sum(ref.chunk_len(s, K) for s in SHAPES.values())
    assert specs[0].wire_state.value == P(AXES)
    assert ef.wire_state.value.shape == (SLICES * K, -(-total // SLICES))
  else:
    assert ef.wire_state is None
  # Device (s, j) holds row s·K + j of every per-worker leaf.
  for shard in ef.residual.value["conv"].addressable_shards:
    pos = np.argwhere(mesh.devices == shard.device)[0]
    assert shard.index[0] == slice(pos[0] * K + pos[1], pos[0] * K + pos[1] + 1)


# ------------------------------------------------------------------------------ 2 processes

# Runs STEPS steps of block_sign COMP-AMS on a (2, 4) ("dcn", "ici") mesh, twice: with "dyadic"
# gradients (multiples of 1/8 below 16 in magnitude: every sum of four is exact in float32, in
# any order) and with "general" (normal) gradients. Each process writes the residual rows it
# holds; process 0 writes the final (replicated) params.
_SCRIPT = textwrap.dedent(
  """
  import functools, sys
  import numpy as np
  nproc, pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  gloo = sys.argv[5] == "gloo"  # else XLA:CPU's in-process collectives (one process only)
  import jax
  import compams_jax as cj
  cj.simulate_cpu_devices(8 // nproc)
  if gloo:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  AXES = ("dcn", "ici")
  SHAPES = {"conv": (3, 3, 2, 5), "bias": (7,), "dense": (24, 10)}
  STEPS = 4
  assert jax.device_count() == 8 and jax.process_count() == nproc, jax.devices()
  mesh = jax.make_mesh((2, 4), AXES)
  if nproc > 1:  # each slice (dcn row) is one process
    for row in mesh.devices:
      assert len({d.process_index for d in row}) == 1, mesh.devices
    assert mesh.devices[0, 0].process_index != mesh.devices[1, 0].process_index

  def place(x, spec):
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

  tx = cj.comp_ams(0.05, cj.compressors.block_sign(), axis_name="dcn", dense_axis_name="ici")
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  p0 = {k: place(v, P()) for k, v in params.items()}
  state0 = cj.sharding.init(tx, p0, mesh=mesh, axis_name=AXES)
  specs = cj.sharding.state_specs(state0, AXES)

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), specs, P(AXES)), out_specs=(P(), specs)
  )
  def step(p, s, g):
    loss = lambda p: sum(jnp.vdot(p[k], g[k][0]) for k in p)
    gr = jax.grad(loss)(jax.tree.map(lambda x: jax.lax.pcast(x, AXES, to="varying"), p))
    u, s = tx.update(gr, s, p)
    return optax.apply_updates(p, u), s

  res = {}
  for kind in ("dyadic", "general"):
    rng = np.random.default_rng(1)
    if kind == "dyadic":
      grads = {
        k: (rng.integers(-127, 128, size=(STEPS, 8) + s) / 8).astype(np.float32)
        for k, s in SHAPES.items()
      }
    else:
      grads = {
        k: (rng.normal(size=(1, 8) + s) + rng.normal(size=(STEPS, 8) + s)).astype(np.float32)
        for k, s in SHAPES.items()
      }
    p, state = p0, state0
    for t in range(STEPS):
      p, state = step(p, state, {k: place(v[t], P(AXES)) for k, v in grads.items()})
    for k, v in state[0].residual.value.items():
      for shard in v.addressable_shards:
        res[f"{kind}/residual/{k}/{shard.index[0].start}"] = np.asarray(shard.data)[0]
    if pid == 0:
      for k, v in p.items():
        res[f"{kind}/params/{k}"] = np.asarray(v.addressable_data(0))
  np.savez(f"{out}/process_{pid}.npz", **res)
  if gloo:
    jax.distributed.shutdown()
  """
)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(script, nproc, out, port=0, collectives="gloo"):
  out.mkdir()
  # Each process sets up its own 8 // nproc devices (cj.simulate_cpu_devices in the script).
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
  env["JAX_PLATFORMS"] = "cpu"
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  return [
    subprocess.Popen(
      [sys.executable, str(script), str(nproc), str(i), str(port), str(out), collectives],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(nproc)
  ]


def _wait(procs):
  outs = []
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]


def _load(out):
  data = {}
  for f in sorted(out.glob("*.npz")):
    with np.load(f) as z:
      data.update({k: z[k] for k in z.files})
  return data


@pytest.fixture(scope="module")
def process_runs(tmp_path_factory):
  """Results of 2 processes × 4 devices (gloo across and within processes), of 1 process × 8
  devices with the same gloo collectives, and of 1 process × 8 with XLA:CPU's in-process ones."""
  tmp = tmp_path_factory.mktemp("hierarchical_processes")
  script = tmp / "hier_run.py"
  script.write_text(_SCRIPT)
  _wait(_launch(script, 2, tmp / "two", port=_free_port()))
  _wait(_launch(script, 1, tmp / "one", port=_free_port()))
  _wait(_launch(script, 1, tmp / "in_process", collectives="in_process"))
  runs = {name: _load(tmp / name) for name in ("two", "one", "in_process")}
  for data in runs.values():
    assert sorted(data) == sorted(runs["two"])
    for kind in ("dyadic", "general"):
      assert sum(k.startswith(f"{kind}/residual/") for k in data) == 3 * 8
      assert sum(k.startswith(f"{kind}/params/") for k in data) == 3
  return runs


def test_two_processes_match_one_process_bit_for_bit(process_runs):
  """One slice per process (gloo across processes) is bit-identical to one process holding both
  slices, with the same collectives implementation (gloo on CPU, as NCCL on GPUs serves both
  layouts): every residual row and the parameters, for general float gradients."""
  two, one = process_runs["two"], process_runs["one"]
  for k in two:
    np.testing.assert_array_equal(two[k], one[k], err_msg=k)
  # The run moved the parameters and left non-zero residuals.
  conv0 = np.random.default_rng(0).normal(size=(3, 3, 2, 5)).astype(np.float32)
  for kind in ("dyadic", "general"):
    assert np.abs(two[f"{kind}/params/conv"] - conv0).max() > 0.05
    assert np.abs(two[f"{kind}/residual/conv/7"]).max() > 0


def test_in_process_collectives_differ_from_gloo_only_in_summation_order(process_runs):
  """XLA:CPU's in-process reduce-scatter sums the four ici chunks left to right, gloo's
  pairwise: bit-identical where every sum is exact in float32 (dyadic gradients), equal to
  float32 rounding otherwise."""
  two, in_process = process_runs["two"], process_runs["in_process"]
  for k in two:
    if k.startswith("dyadic/"):
      np.testing.assert_array_equal(two[k], in_process[k], err_msg=k)
    else:
      np.testing.assert_allclose(two[k], in_process[k], rtol=1e-5, atol=1e-6, err_msg=k)
