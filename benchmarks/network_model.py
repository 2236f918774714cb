"""Latency–bandwidth (alpha–beta) projection of step time and speedup over dense all-reduce.

Inputs (no JAX needed):

* benchmarks/results/wire_bytes.json — every collective of every variant's compiled step
  (opcode, operand bytes), per model and measured n;
* benchmarks/results/step_time.json — the measured per-worker compute time of one step (one
  worker, local batch 32, forward + backward + AMSGrad, no collective), per model.

Model, per step and worker (weak scaling: the compute time T_c per worker does not depend on n):

    T(n, B) = T_c + Σ_collectives [ α · messages(op, n) + received_bytes(op, n) / B ]

with the standard algorithms: ring all-reduce 2(n−1) messages and 2(n−1)/n·S received bytes;
all-gather n−1 messages and (n−1)·S; all-to-all n−1 messages and (n−1)/n·S (S = the operand
bytes of the collective). Collectives run one after another, without overlap with compute
(no overlap is the pessimistic case for dense; it is how the compiled step runs on XLA:CPU).

For n not measured, bytes are scaled from the largest measured n (n_ref) by the same formulas:
all-reduce and gather-topology all-gather operands do not depend on n; in the two-phase
topology the all-to-all operand is one full payload P (independent of n) and the all-gather
operand is one chunk payload P/n (scaled as S_ref·n_ref/n), so its received bytes are
(n−1)/n·P + (n−1)·P/n = 2(n−1)/n·P. (Per-chunk headers and narrower indices of smaller chunks
are ignored beyond n_ref: an approximation of well under 1%.)

By default every collective INSTRUCTION of the compiled HLO pays its own α term (the wire
strategies bucket every leaf's payload: one all-gather, one psum, or one all-to-all + one
all-gather per step). `--bucketed` instead charges one α per collective kind and phase, which
only differs for programs with several collectives of one kind.

The methods are the rows of wire_bytes.json (which takes its compressors from
`cj.compressors.REGISTRY`): every measured variant, dense f32 (psum_f32) first, plus dense bf16;
`--compressors` keeps only the variants of the named registry compressors (baselines stay).

The dense bf16 baseline uses 2 bytes/parameter analytically (XLA:CPU widens bf16 all-reduces
to f32 in HLO; GPU/TPU do not). The speedup is T_dense_f32 / T_method.

Run from the repository root (after wire_bytes.py and step_time.py):

    python benchmarks/network_model.py                 # alpha = 5 us, measured compute time
    python benchmarks/network_model.py --alpha-us 20 --bucketed
    python benchmarks/network_model.py --compute-ms mnist_cnn=5 resnet18=50   # what-if compute
    python benchmarks/network_model.py --compressors top_k block_sign

Writes benchmarks/results/network_model.json and network_model.png (or --out / --png), prints
markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import _common

RESULTS = str(_common.RESULTS)
DENSE_F32 = ("dense f32 (ring all-reduce)", "psum_f32", "dense")
DENSE_BF16 = ("dense bf16 (2 B/param)", "__bf16__", "dense")
BASELINES = ("psum_f32", "psum_bf16", "powersgd_r4")  # rows that are not a registry compressor


def row_compressor(row):
  """The registry name of a wire_bytes row's compressor (None for the baselines); for rows
  written before rows named it, the setting's label ("top_k_1%", "cast_bf16")."""
  if "compressor" in row:
    return row["compressor"]
  return None if row["variant"] in BASELINES else row["variant"].split("/")[0]


def _of(name, compressors):
  """Whether a row's compressor (or old label) is one of the registry names `compressors`."""
  return any(name == c or name.startswith(c + "_") for c in compressors)


def methods_of(rows, compressors=None):
  """[(label, variant, topology kind)]: dense f32 and bf16, then every measured variant in the
  order of the rows (only those of `compressors`, if given, besides the baselines)."""
  out = [DENSE_F32, DENSE_BF16]
  for r in rows:
    v = r["variant"]
    if v in ("psum_f32", "psum_bf16") or any(m[1] == v for m in out):
      continue
    name = row_compressor(r)
    if compressors is not None and name is not None and not _of(name, compressors):
      continue
    out.append((v, v, "two_phase" if v.endswith("/two_phase") else "gather"))
  return out


MESSAGES = {
  "all-reduce": lambda n: 2 * (n - 1),
  "all-gather": lambda n: n - 1,
  "all-to-all": lambda n: n - 1,
  "reduce-scatter": lambda n: n - 1,
  "collective-permute": lambda n: 1,
}


def received(op, s, n):
  if op == "all-reduce":
    return 2 * (n - 1) / n * s
  if op == "all-gather":
    return (n - 1) * s
  if op in ("all-to-all", "reduce-scatter"):
    return (n - 1) / n * s
  return float(s)


def collectives_at(row, topology, n):
  """[(op, operand_bytes, count)] of a wire_bytes row, scaled from its n to n."""
  n_ref = row["n"]
  out = []
  for op, total in row["by_op"].items():
    count = row["count_by_op"][op]
    if topology == "two_phase" and op == "all-gather":
      total = total * n_ref / n  # one chunk payload: P/n
    out.append((op, total, count))
  return out


def comm_time(colls, n, alpha, bandwidth_bytes, bucketed):
  lat = sum(alpha * MESSAGES[op](n) * (1 if bucketed else count) for op, _, count in colls)
  rx = sum(received(op, s, n) for op, s, _ in colls)
  return lat + rx / bandwidth_bytes, lat, rx


def pick_row(rows, model, variant, n):
  """The row measured at n if any, else the one at the largest measured n."""
  cand = [r for r in rows if r["model"] == model and r["variant"] == variant]
  if not cand:
    return None
  exact = [r for r in cand if r["n"] == n]
  return exact[0] if exact else max(cand, key=lambda r: r["n"])


def project(wire, compute_s, ns, gbits, alpha, bucketed, methods):
  rows = wire["rows"]
  out = []
  for model, t_c in compute_s.items():
    num_params = wire["models"][model]["num_params"]
    for n in ns:
      for g in gbits:
        bw = g * 1e9 / 8
        base = None
        for label, variant, topo in methods:
          if variant == "__bf16__":
            colls = [("all-reduce", 2 * num_params, 1)]
            measured_n = None
          else:
            r = pick_row(rows, model, variant, n)
            if r is None:
              continue
            colls = collectives_at(r, topo, n)
            measured_n = r["n"]
          t_comm, t_lat, rx = comm_time(colls, n, alpha, bw, bucketed)
          step = t_c + t_comm
          if variant == "psum_f32":
            base = step
          out.append(
            {
              "model": model,
              "n": n,
              "gbit_s": g,
              "method": label,
              "variant": variant,
              "bytes_from_n": measured_n,
              "received_bytes": rx,
              "latency_s": t_lat,
              "comm_s": t_comm,
              "compute_s": t_c,
              "step_s": step,
              "speedup_vs_dense_f32": None if base is None else base / step,
            }
          )
  return out


def _cell(proj, model, n, g, label, fmt):
  p = next(
    (
      p
      for p in proj
      if p["model"] == model and p["n"] == n and p["gbit_s"] == g and p["method"] == label
    ),
    None,
  )
  return "" if p is None else fmt(p)


def _ms(seconds):
  ms = seconds * 1e3
  return f"{ms:,.0f}" if ms >= 1000 else f"{ms:.3g}"


def markdown(proj, model, ns, gbits, methods, what="speedup"):
  """Rows: n × method; columns: bandwidths. what = "speedup" (step ms and speedup) or "comm"."""
  t_c = next(p["compute_s"] for p in proj if p["model"] == model)
  if what == "speedup":
    title = (
      f"**{model}** — projected step time in ms (speedup over dense f32 all-reduce); "
      f"compute {_ms(t_c)} ms per worker"
    )
    fmt = lambda p: f"{_ms(p['step_s'])} ({p['speedup_vs_dense_f32']:.2f}×)"
  else:
    title = (
      f"**{model}** — communication time only, ms per step "
      f"(α·messages + received bytes / bandwidth)"
    )
    fmt = lambda p: _ms(p["comm_s"])
  lines = [
    title,
    "",
    "| n | method | " + " | ".join(f"{g} Gbit/s" for g in gbits) + " |",
    "|---|---|" + "---|" * len(gbits),
  ]
  for n in ns:
    for label, _, _ in methods:
      cells = [_cell(proj, model, n, g, label, fmt) for g in gbits]
      if any(cells):
        lines.append(f"| {n} | {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(scenarios, ns, gbits, path, plot_methods):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = [(s, m) for s in scenarios for m in sorted({p["model"] for p in scenarios[s]})]
  fig, axes = plt.subplots(
    len(keys), len(ns), figsize=(4.2 * len(ns), 3.2 * len(keys)), squeeze=False, sharex=True
  )
  for i, (scen, model) in enumerate(keys):
    proj = scenarios[scen]
    for j, n in enumerate(ns):
      ax = axes[i][j]
      for label in plot_methods:
        pts = sorted(
          (p["gbit_s"], p["speedup_vs_dense_f32"])
          for p in proj
          if p["model"] == model and p["n"] == n and p["method"] == label
        )
        if pts:
          ax.plot(*zip(*pts), marker="o", label=label)
      ax.axhline(1.0, color="k", lw=0.8, ls="--")  # dense f32 all-reduce
      ax.set_xscale("log")
      ax.set_xticks(gbits)
      ax.set_xticklabels([str(g) for g in gbits])
      t_c = next(p["compute_s"] for p in proj if p["model"] == model)
      ax.set_title(f"{model}, n={n}\n{scen}: T_c = {_ms(t_c)} ms", fontsize=9)
      if j == 0:
        ax.set_ylabel("speedup vs dense f32")
      if i == len(keys) - 1:
        ax.set_xlabel("link bandwidth (Gbit/s)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--wire", default=os.path.join(RESULTS, "wire_bytes.json"))
  ap.add_argument("--step-time", default=os.path.join(RESULTS, "step_time.json"))
  ap.add_argument(
    "--alpha-us", type=float, default=5.0, help="per-message latency α in microseconds (default 5)"
  )
  ap.add_argument("--ns", nargs="+", type=int, default=[8, 64, 512])
  ap.add_argument("--gbits", nargs="+", type=float, default=[10, 25, 100, 400])
  ap.add_argument(
    "--bucketed",
    action="store_true",
    help="one α term per collective kind instead of per HLO collective",
  )
  ap.add_argument(
    "--compute-ms",
    nargs="*",
    default=None,
    metavar="MODEL=MS",
    help="override the measured compute time per worker, e.g. mnist_cnn=5",
  )
  ap.add_argument(
    "--what-if-scale",
    type=float,
    default=0.01,
    help="also project a hypothetical faster worker whose compute time is this "
    "fraction of the measured CPU time (0 to disable; default 0.01)",
  )
  ap.add_argument(
    "--compressors",
    nargs="+",
    default=None,
    metavar="NAME",
    help="registry names whose variants are projected (default: every one in --wire)",
  )
  ap.add_argument(
    "--plot",
    nargs="+",
    default=None,
    metavar="VARIANT",
    help="variants drawn (default: every projected method but dense f32, the y = 1 line)",
  )
  ap.add_argument("--out", default=os.path.join(RESULTS, "network_model.json"))
  ap.add_argument("--png", default=os.path.join(RESULTS, "network_model.png"))
  args = ap.parse_args(argv)
  gbits = [int(g) if float(g).is_integer() else g for g in args.gbits]

  with open(args.wire) as f:
    wire = json.load(f)
  with open(args.step_time) as f:
    st = json.load(f)
  compute = {m: s["compute_s"] for m, s in st["single_worker"].items() if m in wire["models"]}
  source = {
    m: "step_time.json single_worker[model].compute_s (measured, 1 CPU worker)" for m in compute
  }
  for kv in args.compute_ms or []:
    m, v = kv.split("=")
    compute[m] = float(v) / 1e3
    source[m] = "--compute-ms override"
  missing = [m for m in wire["models"] if m not in compute]
  if missing:
    print(
      f"no compute time for {missing}: skipped (run step_time.py without --no-resnet)",
      file=sys.stderr,
    )
  present = sorted({c for c in map(row_compressor, wire["rows"]) if c is not None})
  unknown = [c for c in args.compressors or () if not any(_of(p, [c]) for p in present)]
  if unknown:
    raise SystemExit(f"no rows for {unknown} in {args.wire}; it has {present}")
  methods = methods_of(wire["rows"], args.compressors)
  plot_methods = args.plot or [label for label, v, _ in methods if v != "psum_f32"]
  alpha = args.alpha_us * 1e-6
  scenarios = {
    "measured CPU compute": project(wire, compute, args.ns, gbits, alpha, args.bucketed, methods)
  }
  if args.what_if_scale > 0:
    scaled = {m: t * args.what_if_scale for m, t in compute.items()}
    scenarios[f"what-if compute x{args.what_if_scale:g}"] = project(
      wire, scaled, args.ns, gbits, alpha, args.bucketed, methods
    )

  result = {
    "benchmark": "network_model",
    "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "python": platform.python_version(),
    "inputs": {
      "wire_bytes": os.path.relpath(args.wire),
      "wire_bytes_date": wire.get("date"),
      "step_time": os.path.relpath(args.step_time),
      "step_time_date": st.get("date"),
      "jax_version": wire.get("jax_version"),
    },
    "alpha_s": alpha,
    "bucketed": args.bucketed,
    "ns": args.ns,
    "gbit_s": gbits,
    "compute_s": compute,
    "compute_source": source,
    "methods": [{"label": m[0], "variant": m[1], "topology": m[2]} for m in methods],
    "model": (
      "T = T_c + sum over collectives of alpha*messages + received/B; ring all-reduce "
      "2(n-1) msgs, 2(n-1)/n S; all-gather n-1 msgs, (n-1) S; all-to-all n-1 msgs, "
      "(n-1)/n S; bytes beyond the measured n scaled by these formulas; no overlap"
    ),
    "scenarios": scenarios,
  }
  _common.write_json(args.out, result)
  for scen, proj in scenarios.items():
    print(f"## {scen} (α = {args.alpha_us:g} µs{', bucketed' if args.bucketed else ''})\n")
    for model in compute:
      if model in wire["models"]:
        print(markdown(proj, model, args.ns, gbits, methods) + "\n")
  for model in compute:
    if model in wire["models"]:
      print(
        markdown(scenarios["measured CPU compute"], model, args.ns, gbits, methods, "comm") + "\n"
      )
  plot(scenarios, args.ns, gbits, args.png, plot_methods)
  print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
  main()
