"""One optimizer step at GPT-2-small scale, compiled from abstract shapes on 16 simulated devices.

For every registered compressor (its first example) and wire strategy, and for dense AMSGrad
(`cj.comp_ams` with the identity compressor and `feedback="none"`: one psum, no residual):
the transient memory of one compiled COMP-AMS step (`memory_analysis().temp_size_in_bytes`,
against the parameter bytes), the number of collectives in its HLO and their operand bytes, and
its compile time, each as a ratio to the dense step compiled in the same run. Nothing is
allocated: GPT-2 small (124M parameters in 148 leaves) does not have to fit in this host.

    python benchmarks/scale.py [--workers 16] [--compressors top_k block_sign] [--out PATH]
    python benchmarks/scale.py --table     # docs/benchmarks.md's table, from the JSON

Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import _common

WIRES = ("gather", "two_phase")


def gpt2_small_shapes():
  """The 148 parameter leaves of GPT-2 small (124,439,808 float32 parameters)."""
  import jax
  import jax.numpy as jnp

  d, ff, vocab, ctx, layers = 768, 3072, 50257, 1024, 12
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {"wte": f32(vocab, d), "wpe": f32(ctx, d), "ln_f": {"g": f32(d), "b": f32(d)}}
  for i in range(layers):
    params[f"h{i:02d}"] = {
      "ln_1": {"g": f32(d), "b": f32(d)},
      "attn": {
        "c_attn_w": f32(d, 3 * d),
        "c_attn_b": f32(3 * d),
        "c_proj_w": f32(d, d),
        "c_proj_b": f32(d),
      },
      "ln_2": {"g": f32(d), "b": f32(d)},
      "mlp": {"c_fc_w": f32(d, ff), "c_fc_b": f32(ff), "c_proj_w": f32(ff, d), "c_proj_b": f32(d)},
    }
  return params


def measure(tx, params, mesh):
  import compams_jax as cj

  t0 = time.perf_counter()
  compiled = cj.sharding.compile_step(tx, params, mesh=mesh, axis_name="data")
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  hlo = cj.collective_bytes(compiled)
  return {
    "compile_seconds": seconds,
    "temp_bytes": int(mem.temp_size_in_bytes),
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
    "collectives": hlo.count,
    "collective_bytes": hlo.total,
    "by_op": hlo.by_op,
  }


def table(result) -> str:
  """The markdown table of docs/benchmarks.md, with each target's verdict, from the JSON."""
  param_bytes, dense = result["param_bytes"], result["dense"]
  ops = lambda r: ", ".join(r["by_op"])
  lines = [
    "| compressor | wire | temp / params | collectives (HLO) | collective bytes / dense "
    "| compile | compile / dense | temp ≤ 2× | ≤ 4 collectives | compile ≤ 3× |",
    "|---|---|---|---|---|---|---|---|---|---|",
    f'| dense (identity, `feedback="none"`) | psum | {dense["temp_bytes"] / param_bytes:.2f} '
    f"| {dense['collectives']} ({ops(dense)}) | 1 | {dense['compile_seconds']:.1f} s | 1 | | | |",
  ]
  yes_no = lambda ok: "yes" if ok else "**no**"
  for r in result["rows"]:
    summed = r["wire"] == "gather" and "all-reduce" in r["by_op"]
    over = r["temp_bytes"] - 2 * param_bytes
    temp_ok = yes_no(over <= 0) + (f" ({over:,} B over)" if 0 < over < param_bytes // 1000 else "")
    lines.append(
      f"| {r['label']} | {r['wire']}{' (psum)' if summed else ''} | {r['temp_over_params']:.2f} "
      f"| {r['collectives']} ({ops(r)}) | {r['bytes_over_dense']:.4f} "
      f"| {r['compile_seconds']:.1f} s | {r['compile_over_dense']:.2f} | {temp_ok} "
      f"| {yes_no(r['collectives'] <= 4) if r['wire'] == 'gather' else '—'} "
      f"| {yes_no(r['compile_over_dense'] <= 3)} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=16)
  _common.add_compressor_args(parser, "the first example of every registered compressor")
  parser.add_argument("--out", default=str(_common.RESULTS / "scale.json"))
  parser.add_argument(
    "--table", action="store_true", help="print the markdown table of --out; compile nothing"
  )
  args = parser.parse_args()
  if args.table:
    print(table(json.loads(pathlib.Path(args.out).read_text())))
    return
  _common.force_devices(args.workers)

  import jax

  import compams_jax as cj

  specs = _common.compressor_specs(args.compressors, all_examples=args.all_examples)
  params = gpt2_small_shapes()
  leaves = jax.tree.leaves(params)
  param_bytes = sum(x.size * 4 for x in leaves)
  mesh = jax.make_mesh((args.workers,), ("data",))
  result = {
    **_common.run_info("scale"),
    "model": "GPT-2 small (abstract shapes)",
    "num_params": sum(x.size for x in leaves),
    "num_leaves": len(leaves),
    "param_bytes": param_bytes,
    "workers": args.workers,
    "rows": [],
  }
  # Dense: AMSGrad on the psum mean, no residual (feedback="none": the identity compressor drops
  # nothing, so error feedback would only carry an all-zero residual).
  dense_tx = cj.comp_ams(1e-3, cj.compressors.identity(), axis_name="data", feedback="none")
  dense = measure(dense_tx, params, mesh)
  result["dense"] = dense
  print(
    f"dense: temp {dense['temp_bytes'] / param_bytes:.2f}x params, "
    f"{dense['collectives']} collectives, compile {dense['compile_seconds']:.1f} s",
    flush=True,
  )
  for spec in specs:
    for wire in WIRES:
      w = {"gather": cj.wire.gather, "two_phase": cj.wire.two_phase}[wire]()
      tx = cj.comp_ams(1e-3, spec.build(), axis_name="data", wire=w)
      row = {
        "compressor": spec.jsonable(),
        "label": spec.label,
        "wire": wire,
        **measure(tx, params, mesh),
      }
      row["temp_over_params"] = row["temp_bytes"] / param_bytes
      row["compile_over_dense"] = row["compile_seconds"] / dense["compile_seconds"]
      row["bytes_over_dense"] = row["collective_bytes"] / dense["collective_bytes"]
      result["rows"].append(row)
      print(
        f"{spec.label:24s} {wire:9s} temp {row['temp_over_params']:.2f}x params, "
        f"{row['collectives']} collectives, {row['bytes_over_dense']:.4f} of dense bytes, "
        f"compile {row['compile_over_dense']:.2f}x dense",
        flush=True,
      )
      _common.write_json(args.out, result)  # partial results survive an interruption
  _common.write_json(args.out, result)


if __name__ == "__main__":
  main()
