"""GPT-2 small sharded inside slices: FSDP over 8 devices x 2 slices, and scanned layers.

Part 1, FSDP: on a ("dcn", "fsdp") = (2, 8) mesh in jax's explicit mode, every matrix of GPT-2
small sharded over "fsdp" (vectors replicated), one optimizer step under a partial-manual
`jax.shard_map(..., axis_names={"dcn"})` and the same step fully manual: per-device optimizer
state against the unsharded state, the compiled step's transient memory, the bytes of the
collectives that cross slices, the all-gathers inside a slice, and any all-gather issued by the
compression itself (a gathered gradient), for dense AMSGrad (plain optax, a dense pmean) and
COMP-AMS with top-k 1% and block-sign.

Part 2, scanned layers: GPT-2 small with its 12 blocks stacked along a leading layer axis
(`stacked=`), 16 workers on a 1-D mesh: compile time and transient memory of the step against
the dense step, next to the unscanned model.

Nothing is allocated (abstract shapes).

    python benchmarks/sharded_scale.py [--out PATH]

Writes benchmarks/results/sharded_scale.json.
"""

from __future__ import annotations

import argparse
import math
import time

import _common
from scale import gpt2_small_shapes


def fsdp_spec(shape, k):
  """Shard a matrix's largest dimension divisible by k; replicate vectors."""
  from jax.sharding import PartitionSpec as P

  if len(shape) < 2:
    return P()
  dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % k == 0]
  if not dims:
    return P()
  return P(*["fsdp" if d == dims[0] else None for d in range(len(shape))])


def tiny_shapes():
  """A GPT-2-shaped model small enough for a dry run (2 blocks, d = 64)."""
  import jax
  import jax.numpy as jnp

  d, ff, vocab, ctx = 64, 256, 512, 128
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {"wte": f32(vocab, d), "wpe": f32(ctx, d), "ln_f": {"g": f32(d), "b": f32(d)}}
  for i in range(2):
    params[f"h{i:02d}"] = {
      "attn": {"c_attn_w": f32(d, 3 * d), "c_proj_w": f32(d, d), "c_proj_b": f32(d)},
      "mlp": {"c_fc_w": f32(d, ff), "c_proj_w": f32(ff, d)},
    }
  return params


def methods(axis_name, workers):
  """Dense AMSGrad (plain optax: a dense pmean over the slices) and two COMP-AMS codes."""
  import jax
  import optax

  import compams_jax as cj

  def dense_mean():
    return optax.GradientTransformation(
      lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.lax.pmean(u, axis_name), s)
    )

  amsgrad = dict(eps=0.0, eps_root=1e-8, bias_correction_mu=False, bias_correction_nu=False)
  return {
    "dense (plain optax: pmean + AMSGrad)": optax.chain(
      dense_mean(), optax.scale_by_amsgrad(**amsgrad), optax.scale_by_learning_rate(1e-3)
    ),
    "COMP-AMS top-k 1%": cj.comp_ams(1e-3, cj.compressors.top_k(0.01), axis_name=axis_name),
    "COMP-AMS block-sign": cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name=axis_name),
    "COMP-AMS top-k 1%, two-phase": cj.comp_ams(
      1e-3,
      cj.compressors.top_k(0.01),
      axis_name=axis_name,
      wire=cj.wire.two_phase(num_workers=workers),
    ),
  }


def stacked_shapes():
  """GPT-2 small with its 12 blocks stacked: the same 124M parameters in 16 leaves."""
  import jax

  flat = gpt2_small_shapes()
  blocks = [flat.pop(f"h{i:02d}") for i in range(12)]
  flat["h"] = jax.tree.map(
    lambda *xs: jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype), *blocks
  )
  return flat, {k: k == "h" for k in flat}


def _shard_bytes(tree):
  """Bytes one device holds of abstract arrays carrying shardings."""
  import jax

  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


def _collectives(compiled, slices):
  import compams_jax as cj

  found = cj.collective_bytes(compiled).collectives
  lines = [l for l in compiled.as_text().splitlines() if " all-gather(" in l]
  return {
    "cross_slice_bytes": sum(c.operand_bytes for c in found if c.group_size == slices),
    "cross_slice_ops": sorted({c.opcode for c in found if c.group_size == slices}),
    "in_slice_all_gather_bytes": sum(
      c.operand_bytes for c in found if c.opcode == "all-gather" and c.group_size != slices
    ),
    "gathers_in_compression": sum(
      1 for l in lines if "shard_map/shard_map/" in l and " u8[" not in l.split("=")[1][:6]
    ),
    "unparsed_groups": sum(1 for c in found if c.group_size is None),
  }


def update_step(tx, mesh, state, params, specs, *, manual):
  """The optimizer step (params, state, per-slice grads) -> (params, state) under shard_map:
  partial-manual over "dcn" (specs from the arrays), or fully manual with the params' specs."""
  import jax
  import optax
  from jax.sharding import PartitionSpec as P

  import compams_jax as cj

  def replica(p, s, g):
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, u), s

  if not manual:
    sspecs = cj.sharding.state_specs(state, "dcn")
    return jax.shard_map(
      replica,
      mesh=mesh,
      in_specs=(P(), sspecs, P("dcn")),
      out_specs=(P(), sspecs),
      axis_names={"dcn"},
    )
  sspecs = cj.sharding.state_specs(state, "dcn", params=params, param_specs=specs)
  gspecs = jax.tree.map(lambda s: P("dcn", *s), specs, is_leaf=lambda x: isinstance(x, P))
  return jax.shard_map(
    replica, mesh=mesh, in_specs=(specs, sspecs, gspecs), out_specs=(specs, sspecs)
  )


def fsdp_rows(slices, k, small=False, only=None):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import compams_jax as cj

  mesh = jax.make_mesh((slices, k), ("dcn", "fsdp"))
  shapes = tiny_shapes() if small else gpt2_small_shapes()
  specs = jax.tree.map(lambda x: fsdp_spec(x.shape, k), shapes)
  params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
    shapes,
    specs,
  )
  grads = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(
      (slices, *x.shape), x.dtype, sharding=NamedSharding(mesh, P("dcn", *s))
    ),
    shapes,
    specs,
  )
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(shapes))

  methods_ = methods("dcn", slices)
  if only:
    unknown = sorted(set(only) - set(methods_))
    if unknown:
      raise SystemExit(f"unknown --methods {unknown}; valid: {list(methods_)}")
    methods_ = {k_: v for k_, v in methods_.items() if k_ in only}
  rows = []
  for name, tx in methods_.items():
    state = jax.eval_shape(
      lambda p, tx=tx: cj.sharding.init(tx, p, mesh=mesh, axis_name="dcn"), params
    )
    unsharded = jax.eval_shape(tx.init, shapes)
    for spelling in ("partial-manual", "fully manual"):
      step = update_step(tx, mesh, state, shapes, specs, manual=spelling == "fully manual")
      t0 = time.perf_counter()
      compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
      seconds = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      row = {
        "method": name,
        "spelling": spelling,
        "compile_seconds": seconds,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "state_bytes_per_device": _shard_bytes(state),
        "state_bytes_unsharded": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(unsharded)),
        **_collectives(compiled, slices),
      }
      row["temp_over_params"] = row["temp_bytes"] / param_bytes
      row["state_fraction"] = row["state_bytes_per_device"] / row["state_bytes_unsharded"]
      rows.append(row)
      print(
        f"{name:38s} {spelling:15s} state/device {row['state_fraction']:.4f} of unsharded, "
        f"temp {row['temp_over_params']:.3f}x params, across slices "
        f"{row['cross_slice_bytes']:,} B {row['cross_slice_ops']}, in-slice all-gathers "
        f"{row['in_slice_all_gather_bytes']:,} B, gathers in compression "
        f"{row['gathers_in_compression']}, compile {seconds:.1f} s",
        flush=True,
      )
  return {"mesh": [slices, k], "param_bytes": param_bytes, "rows": rows}


def scanned_rows(workers):
  import jax
  from scale import measure

  import compams_jax as cj

  mesh = jax.make_mesh((workers,), ("data",))
  flat = gpt2_small_shapes()
  stacked, flags = stacked_shapes()
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(flat))
  rows = []
  for model, params, spec in (("unscanned", flat, None), ("scanned", stacked, flags)):
    dense_tx = cj.comp_ams(1e-3, cj.compressors.identity(), axis_name="data", feedback="none")
    dense = measure(dense_tx, params, mesh)
    for label, c in (
      ("top-k 1%", cj.compressors.top_k(0.01)),
      ("block-sign", cj.compressors.block_sign()),
    ):
      tx = cj.comp_ams(1e-3, c, axis_name="data", stacked=spec)
      row = {"model": model, "compressor": label, **measure(tx, params, mesh)}
      row["dense_compile_seconds"] = dense["compile_seconds"]
      row["compile_over_dense"] = row["compile_seconds"] / dense["compile_seconds"]
      row["temp_over_params"] = row["temp_bytes"] / param_bytes
      rows.append(row)
      print(
        f"{model:10s} {label:10s} compile {row['compile_over_dense']:.2f}x dense "
        f"({row['compile_seconds']:.1f} s), temp {row['temp_over_params']:.2f}x params, "
        f"{row['collectives']} collectives",
        flush=True,
      )
  return {"workers": workers, "param_bytes": param_bytes, "rows": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--slices", type=int, default=2)
  parser.add_argument("--fsdp", type=int, default=8)
  parser.add_argument("--workers", type=int, default=16, help="part 2's data-parallel workers")
  parser.add_argument("--out", default=str(_common.RESULTS / "sharded_scale.json"))
  parser.add_argument(
    "--methods", nargs="*", default=None, help="part 1's methods by name (default: all)"
  )
  parser.add_argument("--no-scanned", action="store_true", help="skip part 2")
  args = parser.parse_args()
  _common.force_devices(max(args.slices * args.fsdp, args.workers))
  result = {**_common.run_info("sharded_scale"), "model": "GPT-2 small (abstract shapes)"}
  result["fsdp"] = fsdp_rows(args.slices, args.fsdp, only=args.methods)
  _common.write_json(args.out, result)
  if not args.no_scanned:
    result["scanned"] = scanned_rows(args.workers)
    _common.write_json(args.out, result)


if __name__ == "__main__":
  main()
