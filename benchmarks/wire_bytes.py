"""Per-device bytes per optimizer step, read from the compiled HLO of a `shard_map` step.

For every compressor × topology (and PowerSGD), on the paper's MNIST CNN (28x28x1, 1,199,882
parameters) and on ResNet-18 (32x32x3, 11,173,962 parameters), for n = 2, 4, 8, 16 simulated
CPU devices, this compiles one data-parallel optimizer step

    params, opt_state, per-worker grads  ->  tx.update  ->  optax.apply_updates

under `jax.shard_map` from `jax.ShapeDtypeStruct`s only (nothing model-sized is allocated; the
ResNet-18 shapes come from `jax.eval_shape(model.init, ...)`), and reads every collective from
the compiled HLO with `cj.collective_bytes`:

* operand bytes (`.total`): what each device hands to XLA's collectives per step;
* received bytes (`.received`): what each device receives under the standard algorithm of each
  collective (ring all-reduce 2(n−1)/n·S, all-gather (n−1)·S, all-to-all (n−1)/n·S).

Both are compared with a dense float32 all-reduce (a `psum` of every parameter, measured from
HLO the same way) and with a dense bfloat16 all-reduce: 2 bytes/parameter computed analytically,
and also measured from HLO — XLA:CPU widens a bf16 all-reduce to f32, so its HLO shows 4
bytes/parameter; on GPU/TPU it would be 2. Every row is also checked against the static
accounting `cj.wire_bytes(tx, params, num_workers=n)`.

Variants: "psum_f32" and "psum_bf16" (raw dense all-reduces), then for every compressor of
`cj.compressors.REGISTRY` (its first example; `--compressors` / `--all-examples` choose) a
"LABEL/gather" row, and a "LABEL/two_phase" row where its payloads are not summable (summable
ones already travel by one psum, flat in n), and "powersgd_r4". LABEL is the setting's
shell-friendly name, e.g. "top_k_0.01", "block_sign", "cast_bfloat16".

Run from the repository root:

    python benchmarks/wire_bytes.py                   # both models, n = 2 4 8 16
    python benchmarks/wire_bytes.py --models mnist_cnn  # CNN only
    python benchmarks/wire_bytes.py --quick           # CNN, n = 4 and 16, dense/top_k/block_sign
    python benchmarks/wire_bytes.py --compressors terngrad --merge   # add one compressor's rows
    python benchmarks/wire_bytes.py --variants "top_k_0.01/gather" --merge   # re-measure a row

Writes benchmarks/results/wire_bytes.json (or --out) after every model, prints markdown tables.
A variant whose step fails to compile is recorded with its error (and shown as FAILED) and the
run goes on; `--top-k-method exact` passes `method="exact"` to every factory that takes a
`method` (bytes do not depend on the selection method).
"""

from __future__ import annotations

import argparse
import os

import _common

QUICK_COMPRESSORS = ["identity", "top_k", "block_sign"]


def _parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument(
    "--models", nargs="+", default=["mnist_cnn", "resnet18"], choices=["mnist_cnn", "resnet18"]
  )
  ap.add_argument(
    "--ns",
    nargs="+",
    type=int,
    default=[2, 4, 8, 16],
    help="numbers of simulated devices (the process forces max(ns) CPU devices)",
  )
  _common.add_compressor_args(ap)
  ap.add_argument(
    "--variants",
    nargs="+",
    default=None,
    help="subset of variant names to run (default: all of the chosen compressors)",
  )
  ap.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: mnist_cnn, n = 4 16, compressors " + " ".join(QUICK_COMPRESSORS),
  )
  ap.add_argument(
    "--top-k-method",
    default=None,
    help="passed as method=... to every factory that takes one (bytes do not depend on it)",
  )
  ap.add_argument(
    "--merge",
    action="store_true",
    help="keep the rows of an existing --out file that this run does not re-measure",
  )
  ap.add_argument("--out", default=str(_common.RESULTS / "wire_bytes.json"))
  args = ap.parse_args(argv)
  if args.quick:
    args.models, args.ns = ["mnist_cnn"], [4, 16]
    args.compressors = args.compressors or QUICK_COMPRESSORS
  return args


ARGS = _parse_args() if __name__ == "__main__" else None
_common.force_devices(max(ARGS.ns) if ARGS is not None else 16)

import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import compams_jax as cj  # noqa: E402
from compams_jax.experiments.models import count_params, create_model  # noqa: E402

C = cj.compressors
LR = 1e-3
METHOD_KW = {"method": ARGS.top_k_method} if ARGS is not None and ARGS.top_k_method else {}
SPECS = _common.compressor_specs(
  ARGS.compressors if ARGS is not None else None,
  all_examples=ARGS is not None and ARGS.all_examples,
)
# The rows check_targets reads: the first example of top_k and of block_sign.
TOP_K, BLOCK_SIGN = (_common.compressor_specs([n])[0].label for n in ("top_k", "block_sign"))


def _comp_ams(spec, wire):
  return lambda n: cj.comp_ams(LR, spec.build(**METHOD_KW), axis_name="data", wire=wire)


def build_variants(specs):
  """name -> (kind, builder(n) -> GradientTransformation | dtype, spec). "psum" rows are raw
  collectives."""
  variants = {
    "psum_f32": ("psum", jnp.float32, None),
    "psum_bf16": ("psum", jnp.bfloat16, None),
  }
  for spec in specs:
    variants[f"{spec.label}/gather"] = ("tx", _comp_ams(spec, cj.wire.gather()), spec)
    if not spec.build().summable:
      variants[f"{spec.label}/two_phase"] = ("tx", _comp_ams(spec, cj.wire.two_phase()), spec)
  variants["powersgd_r4"] = (
    "tx",
    lambda n: optax.chain(
      cj.powersgd(4, axis_name="data"),
      optax.scale_by_amsgrad(
        b1=0.9, b2=0.999, eps=0.0, eps_root=1e-8, bias_correction_mu=False, bias_correction_nu=False
      ),
      optax.scale_by_learning_rate(LR),
    ),
    None,
  )
  return variants


VARIANTS = build_variants(SPECS)

MODEL_INPUTS = {"mnist_cnn": (1, 28, 28, 1), "resnet18": (1, 32, 32, 3)}


def param_shapes(model_name):
  """Parameter ShapeDtypeStructs of a model, without allocating it."""
  model = create_model(model_name, 10)
  variables = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0)}, jnp.zeros(MODEL_INPUTS[model_name]), train=False
    )
  )
  return variables["params"]


def _mesh(n):
  return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


def step_bytes(tx, params, n):
  """CollectiveBytes of one compiled shard_map optimizer step."""
  return cj.sharding.step_bytes(tx, params, mesh=_mesh(n), axis_name="data")


def psum_bytes(params, n, dtype):
  """CollectiveBytes of a plain dense all-reduce (psum) of every parameter, in `dtype`."""
  mesh = _mesh(n)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"),), out_specs=P())
  def allreduce(g):
    return jax.lax.psum(jax.tree.map(lambda x: x[0].astype(dtype), g), "data")

  grads = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      (n,) + x.shape, x.dtype, sharding=NamedSharding(mesh, P("data"))
    ),
    params,
  )
  return cj.collective_bytes(jax.jit(allreduce), grads)


def _compressor_fields(spec):
  """The row's compressor: registry name and arguments (None for psum/PowerSGD rows)."""
  if spec is None:
    return {"compressor": None, "compressor_kwargs": None}
  extra = METHOD_KW if "method" in C.REGISTRY[spec.name].parameters else {}
  fields = _common.Spec(spec.name, {**spec.kwargs, **extra}).jsonable()
  return {"compressor": fields["name"], "compressor_kwargs": fields["kwargs"]}


def measure(model_name, params, n, name):
  kind, build, spec = VARIANTS[name]
  t0 = time.perf_counter()
  try:
    if kind == "psum":
      cb, wire = psum_bytes(params, n, build), None
    else:
      tx = build(n)
      cb = step_bytes(tx, params, n)
      wire = cj.wire_bytes(tx, params, num_workers=n)
  except Exception as e:  # pylint: disable=broad-except  # a library failure: record it, go on
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {
      "model": model_name,
      "n": n,
      "variant": name,
      "error": msg,
      "operand_bytes": None,
      "received_bytes": None,
      "wire_bytes": None,
      "hlo_equals_wire_bytes": None,
      "by_op": {},
      "count_by_op": {},
      **_compressor_fields(spec),
      "compile_seconds": round(time.perf_counter() - t0, 2),
    }
  seconds = time.perf_counter() - t0
  return {
    "model": model_name,
    "n": n,
    "variant": name,
    "operand_bytes": cb.total,
    "received_bytes": cb.received,
    "by_op": cb.by_op,
    "num_collectives": cb.count,
    "count_by_op": dict(collections.Counter(c.opcode for c in cb.collectives)),
    "group_sizes": sorted({c.group_size for c in cb.collectives if c.group_size is not None}),
    "wire_bytes": wire,
    "hlo_equals_wire_bytes": None if wire is None else cb.total == wire,
    **_compressor_fields(spec),
    "compile_seconds": round(seconds, 2),
  }


def add_ratios(rows, num_params):
  """Ratios to the dense f32 psum (measured) and to a dense bf16 all-reduce (analytic)."""
  dense = {(r["model"], r["n"]): r for r in rows if r["variant"] == "psum_f32"}
  for r in rows:
    n = r["n"]
    d = dense.get((r["model"], n))
    if r.get("error") or (d and d.get("error")):
      continue
    bf16_operand = 2 * num_params
    bf16_received = 2 * (n - 1) / n * bf16_operand
    r["dense_bf16_analytic_operand_bytes"] = bf16_operand
    r["dense_bf16_analytic_received_bytes"] = bf16_received
    r["ratio_operand_vs_f32"] = r["operand_bytes"] / d["operand_bytes"] if d else None
    r["ratio_received_vs_f32"] = (
      r["received_bytes"] / d["received_bytes"] if d and d["received_bytes"] else None
    )
    r["ratio_operand_vs_bf16"] = r["operand_bytes"] / bf16_operand
    r["ratio_received_vs_bf16"] = r["received_bytes"] / bf16_received if bf16_received else None


def _fmt_bytes(b):
  return f"{b / 1e6:.3f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def _inv(x):
  return "—" if not x else f"1/{1 / x:.1f}" if x < 1 else f"{x:.2f}×"


def _order(variant):
  """This run's variants in their order, then rows merged from earlier runs by name."""
  names = list(VARIANTS)
  return (names.index(variant), "") if variant in names else (len(names), variant)


def markdown_table(rows, model_name):
  rs = [r for r in rows if r["model"] == model_name]
  ns = sorted({r["n"] for r in rs})
  names = sorted({r["variant"] for r in rs}, key=_order)
  lines = [
    f"Operand bytes per device per step (ratio to dense f32 psum; ratio of received "
    f"bytes to the f32 ring all-reduce's) — {model_name}",
    "",
    "| variant | " + " | ".join(f"n={n}" for n in ns) + " |",
    "|---|" + "---|" * len(ns),
  ]
  for v in names:
    cells = []
    for n in ns:
      r = next((r for r in rs if r["variant"] == v and r["n"] == n), None)
      if r is None:
        cells.append("")
        continue
      if r.get("error"):
        cells.append("FAILED (see JSON)")
        continue
      ok = "" if r["hlo_equals_wire_bytes"] in (None, True) else " ≠wire_bytes!"
      cells.append(
        f"{_fmt_bytes(r['operand_bytes'])} ({_inv(r['ratio_operand_vs_f32'])}; "
        f"recv {_inv(r['ratio_received_vs_f32'])}){ok}"
      )
    lines.append(f"| {v} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def check_targets(rows):
  out = {}
  get = lambda m, v, n: next(
    (
      r
      for r in rows
      if r["model"] == m and r["variant"] == v and r["n"] == n and not r.get("error")
    ),
    None,
  )
  for m in sorted({r["model"] for r in rows}):
    t = {}
    b4, b16 = get(m, f"{BLOCK_SIGN}/two_phase", 4), get(m, f"{BLOCK_SIGN}/two_phase", 16)
    if b16:
      t["two_phase_block_sign_n16_operand_ratio"] = b16["ratio_operand_vs_f32"]
      t["two_phase_block_sign_n16_le_1/25"] = b16["ratio_operand_vs_f32"] <= 1 / 25
    if b4 and b16:
      g_op = b16["operand_bytes"] / b4["operand_bytes"] - 1
      g_rx = b16["received_bytes"] / b4["received_bytes"] - 1
      t["two_phase_block_sign_operand_growth_4_to_16"] = g_op
      t["two_phase_block_sign_operand_growth_lt_10%"] = g_op < 0.10
      t["two_phase_block_sign_received_growth_4_to_16"] = g_rx
      t["two_phase_block_sign_received_ratio_vs_f32_n4_n16"] = [
        b4["ratio_received_vs_f32"],
        b16["ratio_received_vs_f32"],
      ]
    tk8 = get(m, f"{TOP_K}/gather", 8)
    if tk8:
      t["top_k_gather_n8_operand_ratio"] = tk8["ratio_operand_vs_f32"]
      t["top_k_gather_n8_le_1/40"] = tk8["ratio_operand_vs_f32"] <= 1 / 40
      t["top_k_gather_n8_received_ratio"] = tk8["ratio_received_vs_f32"]
    t["failed"] = [
      (r["variant"], r["n"], r["error"]) for r in rows if r["model"] == m and r.get("error")
    ]
    rows_tx = [r for r in rows if r["model"] == m and r["wire_bytes"] is not None]
    t["all_hlo_equal_wire_bytes"] = all(r["hlo_equals_wire_bytes"] for r in rows_tx)
    # XLA:CPU widens a bf16 all-reduce to f32, so cast(bf16) shows 2x its wire_bytes in HLO.
    t["all_hlo_equal_wire_bytes_except_cast_bf16_on_cpu"] = all(
      r["hlo_equals_wire_bytes"]
      or (
        r["variant"].startswith(("cast_bf16", "cast_bfloat16"))
        and jax.default_backend() == "cpu"
        and r["operand_bytes"] == 2 * r["wire_bytes"]
      )
      for r in rows_tx
    )
    t["mismatches"] = [
      (r["variant"], r["n"], r["operand_bytes"], r["wire_bytes"])
      for r in rows_tx
      if not r["hlo_equals_wire_bytes"]
    ]
    out[m] = t
  return out


def main(args):
  start = time.perf_counter()
  names = args.variants or list(VARIANTS)
  unknown = set(names) - set(VARIANTS)
  if unknown:
    raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
  if jax.device_count() < max(args.ns):
    raise SystemExit(f"need {max(args.ns)} devices, have {jax.device_count()}")
  result = {
    **_common.run_info("wire_bytes"),
    "method_kwargs": METHOD_KW,
    "compressors": [s.jsonable() for s in SPECS],
    "notes": (
      "operand_bytes = sum of collective operand bytes per device (cj.collective_bytes"
      "(...).total); received_bytes = standard-algorithm received bytes per device "
      "(ring all-reduce 2(n-1)/n S, all-gather (n-1) S, all-to-all (n-1)/n S). "
      "ratio_*_vs_f32 divides by the measured psum_f32 row of the same model and n; "
      "ratio_*_vs_bf16 by the analytic 2 bytes/param (XLA:CPU widens bf16 all-reduce "
      "to f32, see the psum_bf16 and cast_bfloat16 rows)."
    ),
    "models": {},
    "rows": [],
  }
  previous = []
  if args.merge and os.path.exists(args.out):
    with open(args.out) as f:
      old = json.load(f)
    previous = old["rows"]
    result["models"].update(old.get("models", {}))
    result["previous_commands"] = old.get("previous_commands", []) + [
      {
        "command": old.get("command"),
        "date": old.get("date"),
        "git": old.get("git"),
        "runtime_seconds": old.get("runtime_seconds"),
      }
    ]
    result["rows"] = [r for r in previous if r["model"] not in args.models]
  for model_name in args.models:
    params = param_shapes(model_name)
    num_params = count_params(params)
    result["models"][model_name] = {
      "num_params": num_params,
      "num_leaves": len(jax.tree.leaves(params)),
      "input_shape": list(MODEL_INPUTS[model_name][1:]),
      "dense_f32_bytes": 4 * num_params,
      "dense_bf16_bytes": 2 * num_params,
    }
    print(
      f"# {model_name}: {num_params:,} parameters in {len(jax.tree.leaves(params))} leaves",
      flush=True,
    )
    rows = []
    for n in args.ns:
      for name in names:
        r = measure(model_name, params, n, name)
        rows.append(r)
        if r.get("error"):
          print(f"  n={n:2d} {name:24s} FAILED: {r['error'][:300]}", flush=True)
          continue
        print(
          f"  n={n:2d} {name:24s} operand {r['operand_bytes']:>11,d}  received "
          f"{r['received_bytes']:>14,.0f}  wire_bytes {r['wire_bytes']!s:>11}  "
          f"{r['by_op']}  ({r['compile_seconds']:.1f}s)",
          flush=True,
        )
    done = {(r["model"], r["n"], r["variant"]) for r in rows}
    kept = [
      r
      for r in previous
      if r["model"] == model_name and (r["model"], r["n"], r["variant"]) not in done
    ]
    rows = sorted(kept + rows, key=lambda r: (r["n"], _order(r["variant"])))
    add_ratios(rows, num_params)
    result["rows"] = [r for r in result["rows"] if r["model"] != model_name] + rows
    result["targets"] = check_targets(result["rows"])
    result["runtime_seconds"] = round(time.perf_counter() - start, 1)
    _common.write_json(args.out, result)
    print()
    print(markdown_table(result["rows"], model_name))
    print(flush=True)
  print(json.dumps(result["targets"], indent=1))
  print(f"total {time.perf_counter() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
  main(ARGS)
