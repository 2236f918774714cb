"""Byte accounting: the HLO collective counter, static wire_bytes, and what XLA really sends.

Expected byte counts are computed here from first principles (element counts × dtype widths),
or read off hand-written HLO, never taken from the library.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import registry

C = cj.compressors


def k_of(ratio: float, d: int) -> int:
  return max(1, math.ceil(Fraction(str(ratio)) * d))


def index_bytes(d: int) -> int:
  """Bytes of the narrowest unsigned integer that indexes 0..d-1."""
  return 1 if d - 1 < 2**8 else 2 if d - 1 < 2**16 else 4


def top_k_bytes(d: int, k: int, width: int = 4) -> int:
  """k values and their indices: flat ones in the narrowest type up to 65,536 entries; beyond,
  16-bit offsets inside blocks of 65,536 and one count per block (16-bit while k < 65,536)."""
  if d <= 2**16:
    return k * (width + index_bytes(d))
  return k * (width + 2) + -(-d // 2**16) * (2 if k < 2**16 else 4)


def _put(mesh, x):
  return jax.device_put(x, jax.NamedSharding(mesh, P("data")))


# ----------------------------------------------------------------- collective_bytes on HLO


@pytest.mark.parametrize("dtype, width", [(jnp.float32, 4), (jnp.float16, 2), (jnp.uint8, 1)])
def test_collective_bytes_psum_and_all_gather(mesh, n_devices, dtype, width):
  per_device = 1000
  x = _put(mesh, jnp.zeros((n_devices * per_device,), dtype))
  psum = jax.shard_map(
    lambda v: jax.lax.psum(v, "data"), mesh=mesh, in_specs=P("data"), out_specs=P()
  )
  got = cj.collective_bytes(psum, x)
  assert got.total == per_device * width
  assert got.count == 1 and got.by_op == {"all-reduce": per_device * width}
  assert got.collectives[0].group_size == n_devices

  small = _put(mesh, jnp.zeros((n_devices * 100,), dtype))
  gather = jax.shard_map(
    lambda v: jax.lax.all_gather(v, "data", to="invarying"),
    mesh=mesh,
    in_specs=P("data"),
    out_specs=P(),
  )
  got = cj.collective_bytes(gather, small)
  assert got.total == 100 * width  # what one device sends, not the gathered result
  assert got.collectives[0].opcode == "all-gather"
  assert got.collectives[0].result_bytes == n_devices * 100 * width


def test_collective_bytes_accepts_lowered_compiled_and_text(mesh, n_devices):
  x = _put(mesh, jnp.zeros((n_devices * 1000,), jnp.float32))
  f = jax.jit(
    jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh, in_specs=P("data"), out_specs=P())
  )
  lowered = f.lower(x)
  compiled = lowered.compile()
  for arg in (lowered, compiled, compiled.as_text()):
    assert cj.collective_bytes(arg).total == 4000
  # Abstract arguments work too: nothing is executed.
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  assert cj.collective_bytes(f, spec).total == 4000


def test_collective_bytes_no_collectives():
  got = cj.collective_bytes(lambda v: v * 2.0, jnp.ones(10))
  assert got.total == 0 and got.count == 0 and got.by_op == {}


HAND_WRITTEN_HLO = """\
HloModule hand_written, entry_computation_layout={(f32[10]{0}, bf16[4,5]{1,0}, u8[16]{0})->f32[10]{0}}

%add.f32 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main (p0: f32[10], p1: bf16[4,5], p2: u8[16]) -> f32[10] {
  %p0 = f32[10]{0} parameter(0), sharding={replicated}
  %p1 = bf16[4,5]{1,0} parameter(1)
  %p2 = u8[16]{0} parameter(2)
  %ar = (f32[10]{0}, bf16[4,5]{1,0}) all-reduce(%p0, %p1), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add.f32
  %gte = f32[10]{0} get-tuple-element(%ar), index=0
  %ags = (u8[16]{0}, u8[128]{0}) all-gather-start(%p2), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %agd = u8[128]{0} all-gather-done(%ags)
  %old = s32[3,2]{1,0} all-to-all(s32[3,2]{1,0} %p3), channel_id=3, replica_groups={{0,1}}, dimensions={0}
  ROOT %out = f32[10]{0} add(%gte, %gte)
}
"""


def test_parse_collectives_hand_written():
  got = cj.wire.parse_collectives(HAND_WRITTEN_HLO)
  ops = [c.opcode for c in got.collectives]
  assert sorted(ops) == ["all-gather", "all-reduce", "all-to-all"]  # the "-done" not counted
  by = {c.opcode: c for c in got.collectives}
  # Tuple-shaped all-reduce: f32[10] (40 B) + bf16[4,5] (40 B).
  assert by["all-reduce"].operand_bytes == 10 * 4 + 20 * 2
  assert by["all-reduce"].result_bytes == 80
  assert by["all-reduce"].group_size == 4
  # Async all-gather: only the start counts, with its operand u8[16].
  assert by["all-gather"].operand_bytes == 16
  assert by["all-gather"].group_size == 8
  # Older HLO text with the operand's type printed inline: s32[3,2] = 24 B.
  assert by["all-to-all"].operand_bytes == 24
  assert got.total == 80 + 16 + 24
  assert got.by_op == {"all-reduce": 80, "all-gather": 16, "all-to-all": 24}


# ----------------------------------------------------------------- static wire_bytes


PARAMS = {
  "conv": jnp.zeros((3, 3, 8, 16)),
  "dense": jnp.zeros((300, 300)),
  "bias": jnp.zeros((300,)),
  "tiny": jnp.zeros((1,)),
  "scalar": jnp.zeros(()),
  "half": jnp.zeros((70, 1000), jnp.bfloat16),
}


def _sizes(params):
  return [(int(np.prod(x.shape)), jnp.dtype(x.dtype).itemsize) for x in jax.tree.leaves(params)]


@pytest.mark.parametrize("ratio", [0.01, 0.1, 1.0])
def test_wire_bytes_top_k_first_principles(ratio):
  want = sum(top_k_bytes(d, k_of(ratio, d), w) for d, w in _sizes(PARAMS))
  assert cj.wire_bytes(C.top_k(ratio), PARAMS) == want


def test_wire_bytes_first_principles_other_compressors():
  sizes = _sizes(PARAMS)
  assert cj.wire_bytes(C.identity(), PARAMS) == sum(d * w for d, w in sizes)
  assert cj.wire_bytes(C.cast(jnp.bfloat16), PARAMS) == sum(2 * d for d, _ in sizes)
  assert cj.wire_bytes(C.cast(jnp.float16), PARAMS) == sum(2 * d for d, _ in sizes)
  assert cj.wire_bytes(C.block_sign(), PARAMS) == sum(-(-d // 8) + 4 for d, _ in sizes)
  assert cj.wire_bytes(C.block_sign(exact_zeros=True), PARAMS) == sum(
    2 * -(-d // 8) + 4 for d, _ in sizes
  )
  assert cj.wire_bytes(C.qsgd(4), PARAMS) == sum(d + 4 for d, _ in sizes)
  assert cj.wire_bytes(C.qsgd(127), PARAMS) == sum(d + 4 for d, _ in sizes)
  assert cj.wire_bytes(C.qsgd(128), PARAMS) == sum(2 * d + 4 for d, _ in sizes)
  assert cj.wire_bytes(C.random_k(0.05), PARAMS) == sum(w * k_of(0.05, d) for d, w in sizes)
  assert cj.wire_bytes(C.terngrad(), PARAMS) == sum(-(-d // 4) + 4 for d, _ in sizes)


def test_wire_bytes_model_granularity_first_principles():
  sizes = _sizes(PARAMS)
  total = sum(d for d, _ in sizes)  # one flat float32 vector (bf16 promoted with f32)
  assert cj.wire_bytes(C.top_k(0.01, granularity="model"), PARAMS) == (
    top_k_bytes(total, k_of(0.01, total))
  )
  assert cj.wire_bytes(C.scaled_sign(), PARAMS) == -(-total // 8) + 4
  assert cj.wire_bytes(C.qsgd(4, granularity="model"), PARAMS) == total + 4
  assert cj.wire_bytes(C.identity(granularity="model"), PARAMS) == 4 * total


def _encoded_bytes(c, params):
  """Bytes of the payload arrays `encode` returns, per leaf or for the flattened model, traced
  abstractly (nothing compiled): what travels, counted from the arrays themselves."""
  leaves = jax.tree.leaves(params)
  if c.granularity == "model":
    size = sum(int(np.prod(x.shape)) for x in leaves)
    leaves = [jax.ShapeDtypeStruct((size,), jnp.result_type(*[x.dtype for x in leaves]))]
  key = jax.random.key(0) if c.needs_key else None
  total = 0
  for x in leaves:
    payload = jax.eval_shape(c.encode, jax.ShapeDtypeStruct(x.shape, x.dtype), key)
    total += sum(
      int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in jax.tree.leaves(payload)
    )
  return total


@pytest.mark.parametrize("name, kwargs", registry.cases())
def test_wire_bytes_equal_encoded_payload_bytes(name, kwargs):
  for granularity in ("leaf", "model"):
    c = registry.build(name, kwargs, granularity)
    assert cj.wire_bytes(c, PARAMS) == _encoded_bytes(c, PARAMS), c


# Traces each transform's update (seconds for the sparsifiers): the first example of every
# compressor by default; every example's own bytes are test_wire_bytes_equal_encoded_payload_bytes.
@pytest.mark.parametrize("name, kwargs", registry.cases(slow_beyond_first=True))
@pytest.mark.filterwarnings("ignore:.*not a contraction:UserWarning")
def test_wire_bytes_of_transforms_equal_compressor_bytes(name, kwargs):
  c = registry.build(name, kwargs)
  want = cj.wire_bytes(c, PARAMS)
  assert cj.wire_bytes(cj.comp_ams(1e-3, c, axis_name="data"), PARAMS) == want
  assert cj.wire_bytes(cj.compressed_mean(c, axis_name="data"), PARAMS) == want


def test_wire_bytes_of_a_plain_optax_transform():
  assert cj.wire_bytes(optax.sgd(0.1), PARAMS) == 0  # no compams_jax collective at all


def test_wire_bytes_docstring_numbers():
  params = {"w": jnp.zeros((1000,))}
  assert cj.wire_bytes(C.top_k(0.01), params) == 10 * (4 + 2)


# ----------------------------------------------------------------- a full COMP-AMS step in HLO

BIG_SHAPES = {"conv": (3, 3, 64, 64), "dense": (512, 1024), "out": (1024, 400), "b": (1024,)}
NUM_PARAMS = sum(int(np.prod(s)) for s in BIG_SHAPES.values())  # 971,776
DENSE_BYTES = 4 * NUM_PARAMS


def _comp_ams_step(mesh, tx, params):
  """A jitted COMP-AMS step over the mesh: per-worker grads in, replicated params out."""
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  sspec = cj.sharding.state_specs(state, "data")
  pspec = jax.tree.map(lambda _: P(), params)
  gspec = jax.tree.map(lambda _: P("data"), params)

  def step(p, g, s):
    g = jax.tree.map(lambda x: x[0], g)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  fn = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(pspec, gspec, sspec), out_specs=(pspec, sspec))
  )
  return fn, state


def _hlo_bytes(mesh, n_devices, compressor):
  params = {k: jnp.zeros(s, jnp.float32) for k, s in BIG_SHAPES.items()}
  tx = cj.comp_ams(1e-3, compressor, axis_name="data")
  fn, state = _comp_ams_step(mesh, tx, params)
  grads = {
    k: jax.ShapeDtypeStruct(
      (n_devices,) + s, jnp.float32, sharding=jax.NamedSharding(mesh, P("data"))
    )
    for k, s in BIG_SHAPES.items()
  }
  return cj.collective_bytes(fn, params, grads, state), cj.wire_bytes(tx, params)


def test_comp_ams_hlo_bytes_identity_is_dense(mesh, n_devices):
  hlo, static = _hlo_bytes(mesh, n_devices, C.identity())
  assert hlo.total == DENSE_BYTES
  assert static == DENSE_BYTES
  assert set(hlo.by_op) == {"all-reduce"}


def test_comp_ams_hlo_bytes_top_k(mesh, n_devices):
  hlo, static = _hlo_bytes(mesh, n_devices, C.top_k(0.01))
  want = sum(top_k_bytes(int(np.prod(s)), k_of(0.01, int(np.prod(s)))) for s in BIG_SHAPES.values())
  assert hlo.total == static == want
  assert hlo.total <= DENSE_BYTES / 40
  assert set(hlo.by_op) == {"all-gather"}  # compact payloads, not dense zero-filled tensors


def test_comp_ams_hlo_bytes_block_sign(mesh, n_devices):
  hlo, static = _hlo_bytes(mesh, n_devices, C.block_sign())
  want = sum(-(-int(np.prod(s)) // 8) + 4 for s in BIG_SHAPES.values())
  assert hlo.total == static == want
  assert hlo.total <= DENSE_BYTES / 25


def test_comp_ams_bytes_cast_bf16(mesh, n_devices, record_property):
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in BIG_SHAPES.items()}
  static = cj.wire_bytes(cj.comp_ams(1e-3, C.cast(jnp.bfloat16), axis_name="data"), params)
  assert static * 2 == DENSE_BYTES
  # XLA:CPU promotes a bf16 all-reduce to f32, so the compiled number is only recorded.
  hlo, _ = _hlo_bytes(mesh, n_devices, C.cast(jnp.bfloat16))
  record_property("cast_bf16_hlo_bytes", hlo.total)


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", registry.cases(where=lambda c: not isinstance(c, C.Cast)))
@pytest.mark.filterwarnings("ignore:.*not a contraction:UserWarning")
def test_comp_ams_hlo_bytes_equal_wire_bytes_more(mesh, n_devices, name, kwargs):
  # (cast: XLA:CPU widens bf16/f16 collectives, see test_comp_ams_bytes_cast_bf16.)
  hlo, static = _hlo_bytes(mesh, n_devices, registry.build(name, kwargs))
  assert hlo.total == static


@pytest.mark.parametrize("name, kwargs", registry.cases(first=True))
@pytest.mark.filterwarnings("ignore:.*not a contraction:UserWarning")
def test_comp_ams_hlo_bytes_equal_wire_bytes_small(mesh, n_devices, name, kwargs):
  """Every registered compressor: the compiled step sends exactly `wire_bytes` (small model)."""
  params = {"w": jnp.zeros((40, 30)), "b": jnp.zeros((30,)), "s": jnp.zeros(())}
  tx = cj.comp_ams(1e-3, registry.build(name, kwargs), axis_name="data")
  fn, state = _comp_ams_step(mesh, tx, params)
  grads = {
    k: jax.ShapeDtypeStruct(
      (n_devices,) + v.shape, v.dtype, sharding=jax.NamedSharding(mesh, P("data"))
    )
    for k, v in params.items()
  }
  hlo = cj.collective_bytes(fn, params, grads, state)
  static = cj.wire_bytes(tx, params)
  c = registry.build(name, kwargs)
  payload = [c.payload_shapes(x.shape, x.dtype) for x in jax.tree.leaves(params)]
  narrow = any(
    jnp.issubdtype(p.dtype, jnp.floating) and p.dtype.itemsize == 2
    for p in jax.tree.leaves(payload)
  )
  # XLA:CPU widens 16-bit float collectives to float32 (GPU/TPU do not): up to 2x in HLO.
  assert hlo.total == static or (narrow and static < hlo.total <= 2 * static), (hlo.total, static)


# ----------------------------------------------------------------- no recompilation


@pytest.mark.parametrize("name, kwargs", registry.cases(first=True))
@pytest.mark.filterwarnings("ignore:.*not a contraction:UserWarning")
def test_jitted_step_does_not_recompile(mesh, n_devices, name, kwargs):
  compressor = registry.build(name, kwargs)
  # Replicated placement spelled the way shard_map's out_specs=P() returns it (P(None, ...)):
  # a P() input would be a different cache key on the first call only.
  params = {
    k: jax.device_put(v, jax.NamedSharding(mesh, P(*[None] * v.ndim)))
    for k, v in {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,))}.items()
  }
  tx = cj.comp_ams(1e-2, compressor, axis_name="data")
  traces = []
  state = cj.sharding.init(tx, params, mesh=mesh, axis_name="data")
  sspec = cj.sharding.state_specs(state, "data")
  pspec = jax.tree.map(lambda _: P(), params)
  gspec = jax.tree.map(lambda _: P("data"), params)

  def step(p, g, s):
    traces.append(1)
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, u), s

  fn = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(pspec, gspec, sspec), out_specs=(pspec, sspec))
  )
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = {
      k: _put(mesh, jnp.asarray(rng.standard_normal((n_devices,) + v.shape), jnp.float32))
      for k, v in params.items()
    }
    params, state = fn(params, grads, state)
  jax.block_until_ready(params)
  assert fn._cache_size() == 1
  assert len(traces) == 1
  assert int(state[0].count) == 3
  assert all(np.all(np.isfinite(np.asarray(v))) for v in params.values())


def test_two_phase_warns_when_a_code_keeps_its_rows_nearly_dense():
  """Two-phase codes 1-D rows: a code whose declared bits for such a row exceed half the dense
  bits (DeMo's DCT keeps 32 of every 64-entry vector chunk, plus indices) is warned about."""
  params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)}
  wire = cj.wire.two_phase(num_workers=8)
  with pytest.warns(UserWarning, match="two_phase"):
    cj.comp_ams(1e-3, cj.compressors.dct_top_k(32), axis_name="data", wire=wire).init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for c in (cj.compressors.top_k(0.01), cj.compressors.identity()):  # sparse; lossless
      cj.comp_ams(1e-3, c, axis_name="data", wire=wire).init(params)
