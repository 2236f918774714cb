"""Writes docs/results.md and its figures from benchmarks/results/reproduction/*.json.

Used by `python benchmarks/reproduce.py report`; needs only the JSON (no training, no jax).
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics

import lm_study_report

LABELS = {
  "amsgrad": "AMSGrad (full precision)",
  "comp_ams_top_k": "COMP-AMS top-k 1%",
  "comp_ams_block_sign": "COMP-AMS block-sign",
  "comp_ams_block_sign_256": "COMP-AMS block-sign, 256-entry blocks",
  "comp_ams_top_k_bf16": "COMP-AMS top-k 1%, bfloat16 values",
  "comp_ams_top_k_annealed": "COMP-AMS top-k annealed 10% → 1%",
  "onebit_adam": "1-bit Adam",
  "onebit_adam_l2": "1-bit Adam, DeepSpeed's per-tensor ‖x‖₂/√d scale",
  "qadam": "QAdam (qsgd, 127 levels)",
  "qadam_bucketed": "QAdam (qsgd, 127 levels, buckets of 512)",
  "momentum_sgd": "momentum SGD (full precision)",
  "momentum_sgd_top_k": "momentum SGD, top-k 1% + EF",
  "momentum_sgd_top_k_predictive": "momentum SGD, top-k 1% + EF, predictive (LS ρ)",
}
STUDY_ORDER = (
  "fashion_mnist_lenet_parity",
  "fashion_mnist_cnn_parity",
  "mnist5k_parity",
  "rotten_tomatoes_parity",
  "fashion_mnist",
  "fashion_mnist_long",
  "mnist5k",
  "mnist5k_long",
  "mnist5k_early_gap",
  "fashion_mnist_early_gap",
  "rotten_tomatoes",
  "baselines_fashion_mnist",
  "baselines_mnist5k",
  "baselines_rotten_tomatoes",
  "fashion_mnist_momentum",
)
# Studies at the horizons where the paper claims parity with full precision.
PARITY = (
  "fashion_mnist_lenet_parity",
  "fashion_mnist_cnn_parity",
  "mnist5k_parity",
  "rotten_tomatoes_parity",
)
SPEEDUPS = ("speedup_lenet", "speedup")
DENSE = {"amsgrad", "momentum_sgd"}
# The papers' claims this page tests: what they claim, and when a measurement holds a claim.
# Every verdict below is computed from these values and the results JSON.
CLAIMS = {
  # COMP-AMS reaches full-precision AMSGrad's accuracy: within `points` of it is parity.
  "parity": {
    "points": 0.5,
    "dense": "amsgrad",
    "variants": {"comp_ams_top_k": "top-k 1%", "comp_ams_block_sign": "block-sign"},
  },
  # COMP-AMS sends `claimed`× fewer bits than full precision; held at `held_fraction` of it.
  # `kept_fraction`: the share of entries a sparse compressor sends (its bytes per kept entry
  # explain a ratio short of the claim); `also`: a further variant reported with the ratios.
  "compression": {
    "claimed": {"comp_ams_top_k": 100, "comp_ams_block_sign": 30},
    "held_fraction": 0.9,
    "kept_fraction": {"comp_ams_top_k": 0.01},
    "also": ("mnist5k_early_gap", "comp_ams_top_k_bf16", "top-k with bfloat16 values", "MNIST-5k"),
  },
  # Iterations to a loss target fall linearly in n: held at `held_fraction` of linear.
  "speedup": {"held_fraction": 0.5},
  # Prediction lowers the rate at equal distortion: held where every step Δ up to
  # `fine_delta_over_sigma`·σ has a rate reduction above `held_reduction`.
  "rate": {"fine_delta_over_sigma": 1.0, "held_reduction": 1.0},
}
PARITY_POINTS = CLAIMS["parity"]["points"]


def _label(name: str) -> str:
  preset, _, extra = name.partition(":")
  base = LABELS.get(preset, preset)
  return f"{base} ({extra.replace('optimizer.', '')})" if extra else base


def _load(results: pathlib.Path) -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def _mean_std(values: list[float]) -> tuple[float, float]:
  if not values:
    return math.nan, math.nan
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt_bits(bits: float) -> str:
  for unit, scale in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
    if bits >= scale:
      return f"{bits / scale:.3g} {unit}"
  return f"{bits:.0f} bit"


def _ok_runs(v: dict) -> list[dict]:
  return [r for r in v["runs"] if r.get("test_accuracy") is not None]


def _study_figure(study: dict, out: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, (ax_e, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, v in study["variants"].items():
    runs = _ok_runs(v)
    if not runs:
      continue
    length = min(len(r["evals"]) for r in runs)
    acc = np.array([[e[1] for e in r["evals"][:length]] for r in runs])
    epochs = [e[0] for e in runs[0]["evals"][:length]]
    bits = [max(e[3], 1) for e in runs[0]["evals"][:length]]
    mean, std = acc.mean(0), acc.std(0)
    label = _label(name)
    (line,) = ax_e.plot(epochs, mean, marker="o", ms=3, label=label)
    ax_e.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax_b.plot(bits, mean, marker="o", ms=3, color=line.get_color(), label=label)
  ax_e.set_xlabel("epoch")
  ax_b.set_xlabel("bits sent per worker (cumulative, log scale)")
  ax_b.set_xscale("log")
  for ax in (ax_e, ax_b):
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
  ax_e.legend(fontsize=8)
  fig.suptitle(
    f"{study['title']}: {study['num_workers']} workers, mean ± std over {len(study['seeds'])} seeds"
  )
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def _speedup_figure(sp: dict, out: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  variants = list(sp["variants"])
  fig, axes = plt.subplots(1, len(variants) + 1, figsize=(5 * (len(variants) + 1), 4.2))
  for ax, name in zip(axes, variants):
    for row in sp["variants"][name]:
      steps, loss = zip(*row["curve"]) if row["curve"] else ((), ())
      ax.plot(steps, loss, label=f"n = {row['num_workers']}")
    ax.axhline(sp["target_loss"], color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"training loss (mean over {sp['window_examples']} examples)")
    ax.set_title(_label(name))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  ax = axes[-1]
  for name in variants:
    rows = [r for r in sp["variants"][name] if r["steps_to_target"]]
    base = next((r["steps_to_target"] for r in rows if r["num_workers"] == 1), None)
    if base:
      ax.plot(
        [r["num_workers"] for r in rows],
        [base / r["steps_to_target"] for r in rows],
        marker="o",
        label=_label(name),
      )
  ns = [r["num_workers"] for r in sp["variants"][variants[0]]]
  ax.plot(ns, ns, "k--", lw=0.8, label="linear")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("workers n")
  ax.set_ylabel("speedup T(1) / T(n) in iterations")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def _parity_step(study: dict, name: str, dense: str) -> int | None:
  """The first step at which `name`'s seed-mean accuracy is within PARITY_POINTS of `dense`'s
  final accuracy (None: never, or not measured)."""
  v, d = study["variants"].get(name), study["variants"].get(dense)
  if not v or not d or not _ok_runs(v) or not _ok_runs(d):
    return None
  target = statistics.fmean(r["test_accuracy"] for r in _ok_runs(d)) - PARITY_POINTS / 100
  runs = _ok_runs(v)
  length = min(len(r["evals"]) for r in runs)
  per_epoch = study["total_steps"] / study["epochs"]
  for i in range(length):
    if statistics.fmean(r["evals"][i][1] for r in runs) >= target:
      return round(runs[0]["evals"][i][0] * per_epoch)
  return None


def _steps_to_parity(study: dict, name: str, dense: str) -> str:
  step = _parity_step(study, name, dense)
  if step is not None:
    return f"{step:,}"
  measured = study["variants"].get(name) and _ok_runs(study["variants"][name])
  return f"not in {study['total_steps']:,}" if measured else "—"


def _study_section(study: dict, fig_rel: str) -> list[str]:
  variants = study["variants"]
  dense_name = next((n for n in variants if n in DENSE), None)
  dense = variants.get(dense_name, {})
  # Without a full-precision variant in the study, dense float32 is the reference.
  dense_bits = 8 * (
    dense.get("bytes_per_step_steady")
    or next((v["dense_f32_bytes"] for v in variants.values() if v.get("dense_f32_bytes")), 0)
  )
  seeds = len(study["seeds"])
  then = (
    f"; seeds {study['seeds'][1:]} then use the best rate."
    if seeds > 1
    else "; one seed per optimizer: the best rate's tuning run is the reported run."
  )
  out = [f"### {study['title']}", ""]
  if not _complete(study):
    done = sum(len(_ok_runs(v)) for v in study["variants"].values())
    out += [
      f"Partial: {done} finished run(s) of the {len(study['seeds'])} seeds per optimizer; the "
      f"study resumes with `python benchmarks/reproduce.py run --study {study['study']}`.",
      "",
    ]
  out.append(
    f"{study['train_examples']:,} training / {study['test_examples']:,} test examples, "
    f"model `{study['model']}` ({study['num_params']:,} parameters), "
    f"{study['num_workers']} workers × local batch {study['local_batch']}, "
    f"{study['epochs']} epochs ({study['total_steps']} steps). "
    + (
      f"Each optimizer uses the rate tuned for it in the `{study['lr_from']}` study"
      + (" (an option of a preset uses the preset's rate)" if study.get("lr_as") else "")
      + f"; seed{'s' if seeds > 1 else ''} {study['seeds']}."
      if study.get("lr_from")
      else f"Learning rate tuned on seed 0 over {study['lr_grid']} for `{study['tuned_on']}` and "
      "used for every variant."
      if study.get("tuned_on")
      else f"Learning rate tuned per optimizer on seed 0 over a 3-point grid around the rate "
      f"the `{study['lr_around']}` study chose for it (1-3 ladder)"
      + (", extended while the best was at an edge" if study.get("extend_edges") else "")
      + then
      if study.get("lr_around")
      else f"Learning rate tuned per optimizer on seed 0 over {study['lr_grid']}"
      + (", extended while the best was at an edge" if study.get("extend_edges") else "")
      + then
    )
  )
  out.append("")
  out.append(
    "| optimizer | lr | test accuracy (mean ± std) | seeds | bits / worker / step "
    "| fewer bits than full precision | Mbit sent / worker (run) "
    f"| steps to within {PARITY_POINTS} pt of full precision's final | CPU s / run |"
  )
  out.append("|---|---|---|---|---|---|---|---|---|")
  for name, v in variants.items():
    runs = _ok_runs(v)
    if not runs:
      why = "diverged at every rate" if v.get("lr") is None else "every seed diverged"
      out.append(f"| {_label(name)} | {why} | — | 0/{seeds} | — | — | — | — | — |")
      continue
    mean, std = _mean_std([r["test_accuracy"] for r in runs])
    steady = 8 * (v.get("bytes_per_step_steady") or 0)
    hlo = 8 * (v.get("bytes_per_step_hlo") or 0)
    ratio = dense_bits / steady if steady else math.nan
    bits_note = f"{steady:,}" + ("" if steady == hlo else f" (HLO both phases: {hlo:,})")
    total = statistics.fmean([r["bits_sent_total"] for r in runs]) / 1e6 if runs else math.nan
    secs = statistics.fmean([r["seconds"] for r in runs]) if runs else math.nan
    lr = f"{v['lr']:g}" if v.get("lr") else "all diverged"
    acc = f"{mean:.4f} ± {std:.4f}" if len(runs) > 1 else f"{mean:.4f}"
    out.append(
      f"| {_label(name)} | {lr} | {acc} | {len(runs)}/{seeds} "
      f"| {bits_note} | {ratio:.1f}× | {total:,.1f} "
      f"| {_steps_to_parity(study, name, dense_name) if dense_name else '—'} | {secs:.0f} |"
    )
  out.append("")
  grids = [(n, v["grid"]) for n, v in variants.items() if v.get("grid")]
  if grids:
    lrs = sorted({lr for _, g in grids for lr in g}, key=float)
    out.append("Seed-0 test accuracy over the learning-rate grid (— = diverged, or not run):")
    out.append("")
    out.append("| optimizer | " + " | ".join(f"lr {lr}" for lr in lrs) + " |")
    out.append("|---|" + "---|" * len(lrs))
    for name, grid in grids:
      cells = [f"{grid[lr]:.4f}" if grid.get(lr) is not None else "—" for lr in lrs]
      out.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    out.append("")
  out.append(f"![{study['title']}]({fig_rel})")
  out.append("")
  return out


def _speedup_section(sp: dict, fig_rel: str) -> list[str]:
  model = "LeNet-5" if "lenet" in sp["config"] else "CNN"
  out = [f"### Linear speedup (Fashion-MNIST, {model})", ""]
  out.append(
    f"Iterations T(n) until the training loss, averaged over the last "
    f"{sp['window_examples']:,} examples (⌈{sp['window_examples']}/(32·n)⌉ steps), first "
    f"reaches {sp['target_loss']}; n workers × local batch {sp['local_batch']}, "
    f"lr = {sp['base_lr']:g}·√n."
  )
  out.append("")
  variants = list(sp["variants"])
  out.append(
    "| n | lr | " + " | ".join(f"T(n) {LABELS.get(v, v)} | speedup" for v in variants) + " |"
  )
  out.append("|---|---|" + "---|---|" * len(variants))
  rows = {v: {r["num_workers"]: r for r in sp["variants"][v]} for v in variants}
  base = {v: (rows[v].get(1) or {}).get("steps_to_target") for v in variants}
  for n in sorted(rows[variants[0]]):
    cells = []
    for v in variants:
      r = rows[v].get(n, {})
      t = r.get("steps_to_target")
      cells.append(f"{t}" if t else f"> {r.get('steps')} (not reached)")
      cells.append(f"{base[v] / t:.2f}× (ideal {n}×)" if t and base[v] else "—")
    out.append(f"| {n} | {rows[variants[0]][n]['lr']:.2e} | " + " | ".join(cells) + " |")
  out.append("")
  out.append(f"![linear speedup]({fig_rel})")
  out.append("")
  return out


def _gap(study: dict, name: str, dense: str) -> str:
  """`name`'s mean test accuracy minus `dense`'s, in points, with the seeds' spread."""
  v, d = study["variants"].get(name), study["variants"].get(dense)
  if not v or not d or not _ok_runs(v) or not _ok_runs(d):
    return "—"
  a, sa = _mean_std([r["test_accuracy"] for r in _ok_runs(v)])
  b, sb = _mean_std([r["test_accuracy"] for r in _ok_runs(d)])
  if len(_ok_runs(v)) == 1 and len(_ok_runs(d)) == 1:
    return f"{100 * (a - b):+.1f} (1 seed)"
  return f"{100 * (a - b):+.1f} ± {100 * math.hypot(sa, sb):.1f}"


def _ratio(study: dict, name: str, dense: str) -> str:
  v, d = study["variants"].get(name), study["variants"].get(dense)
  if not v or not d or not v.get("bytes_per_step_steady"):
    return "—"
  return f"{d['bytes_per_step_steady'] / v['bytes_per_step_steady']:.1f}×"


def _complete(study: dict) -> bool:
  """Every variant has a run record for every seed (finished or diverged)."""
  seeds = len(study["seeds"])
  return study.get("complete", True) is not False and all(
    len(v["runs"]) == seeds or v.get("lr") is None for v in study["variants"].values()
  )


def _gap_points(study: dict, name: str, dense: str) -> float | None:
  v, d = study["variants"].get(name), study["variants"].get(dense)
  if not v or not d or not _ok_runs(v) or not _ok_runs(d):
    return None
  a = statistics.fmean(r["test_accuracy"] for r in _ok_runs(v))
  b = statistics.fmean(r["test_accuracy"] for r in _ok_runs(d))
  return 100 * (a - b)


def _verdict(study: dict, name: str, dense: str) -> str:
  """held: mean gap within PARITY_POINTS; within noise: not, but within the seeds' combined
  spread of it; not held otherwise. Only for complete studies."""
  if not _complete(study):
    return "not decided yet (study incomplete)"
  gap = _gap_points(study, name, dense)
  if gap is None:
    return "not measured"
  if len(_ok_runs(study["variants"][name])) < 2 or len(_ok_runs(study["variants"][dense])) < 2:
    # One seed: no spread to judge noise by.
    return f"{'held' if gap >= -PARITY_POINTS else 'not held'} (1 seed)"
  if gap >= -PARITY_POINTS:
    return "held"
  sd = [
    _mean_std([r["test_accuracy"] for r in _ok_runs(study["variants"][k])])[1]
    for k in (name, dense)
  ]
  return "within noise" if gap + 100 * math.hypot(*sd) >= -PARITY_POINTS else "not held"


def _sigmas(x: float) -> str:
  """A step of x standard deviations: "σ", "2σ", "0.5σ"."""
  return "σ" if x == 1 else f"{x:g}σ"


def _standard_error_note(studies: list[dict], dense: str) -> str:
  """The standard error of one run's test accuracy on the smallest test split measured."""
  runs = [(st, _ok_runs(st["variants"][dense])) for st in studies if dense in st["variants"]]
  runs = [(st, r) for st, r in runs if r]
  if not runs:
    return ""
  st, dense_runs = min(runs, key=lambda sr: sr[0]["test_examples"])
  p, n = statistics.fmean(r["test_accuracy"] for r in dense_runs), st["test_examples"]
  return (
    f" A test split of {n:,} examples, as in {st['title'].split(',')[0]}, has a standard error "
    f"of about {100 * math.sqrt(p * (1 - p) / n):.1f} points per run."
  )


def _compression_row(data: dict[str, dict], st: dict) -> str:
  """The bits claim on one study: each compressor's ratio to full precision, against the
  claimed ratio (`CLAIMS["compression"]`)."""
  spec, parity = CLAIMS["compression"], CLAIMS["parity"]
  dense = st["variants"][parity["dense"]]
  ratios, verdicts = {}, []
  for name, claimed in spec["claimed"].items():
    v, what = st["variants"].get(name), parity["variants"][name]
    if not (v and v.get("bytes_per_step_steady") and dense.get("bytes_per_step_steady")):
      verdicts.append(f"{what} not measured")
      continue
    ratios[name] = ratio = dense["bytes_per_step_steady"] / v["bytes_per_step_steady"]
    if ratio >= spec["held_fraction"] * claimed:
      verdicts.append(f"{what} held")
      continue
    why = f"{what} not held"
    kept = spec["kept_fraction"].get(name)
    if kept:  # bytes per kept entry: the value's (the dense dtype's) and the index's
      per_entry = v["bytes_per_step_steady"] / (kept * st["num_params"])
      value = dense["bytes_per_step_steady"] / st["num_params"]
      why += (
        f": it sends {per_entry:.0f} bytes per kept entry ({8 * value:.0f}-bit values and "
        f"{8 * (per_entry - value):.0f}-bit indices), so about {ratio:.0f}×, not {claimed}×"
      )
    verdicts.append(why)
  study, name, what, where = spec["also"]
  also, also_dense = (
    data.get(study, {}).get("variants", {}).get(k) for k in (name, parity["dense"])
  )
  extra = ""
  if also and also_dense and also.get("bytes_per_step_steady"):
    extra = (
      f"; {what} "
      f"{also_dense['bytes_per_step_steady'] / also['bytes_per_step_steady']:.1f}× ({where})"
    )
  claim = " and ".join(
    f"~{claimed}× ({parity['variants'][n]})" for n, claimed in spec["claimed"].items()
  )
  measured = " and ".join(f"{ratios[n]:.1f}×" for n in spec["claimed"] if n in ratios)
  held = all(v.endswith(" held") for v in verdicts)
  return (
    f"| COMP-AMS sends {claim} fewer bits | {st['title']} "
    f"| {measured} fewer bits per step (HLO){extra} | {'held' if held else '; '.join(verdicts)} |"
  )


def _paper_claims_section(data: dict[str, dict], rd: dict | None) -> list[str]:
  """The papers' claims, one a row, each with the measurement that tests it and a verdict."""
  parity, dense_name = CLAIMS["parity"], CLAIMS["parity"]["dense"]
  measured = [data[n] for n in PARITY if n in data]
  out = [
    "## The papers' claims, and whether they held here",
    "",
    f"Parity means a mean test accuracy within {PARITY_POINTS} points of full-precision "
    "AMSGrad's at the horizon the paper trains to (rates tuned at that horizon, "
    + (f"{max(len(st['seeds']) for st in measured)} seeds, " if measured else "")
    + "except where a row says 1 seed); "
    "*within noise* means further than that, but not by more than the seeds' combined "
    "standard deviation." + _standard_error_note(measured, dense_name),
    "",
    "| claim | where measured | measurement | verdict |",
    "|---|---|---|---|",
  ]
  for study_name in PARITY:
    st = data.get(study_name)
    for name, what in parity["variants"].items():
      claim = f"COMP-AMS {what} reaches full-precision AMSGrad's test accuracy"
      if not st or name not in st["variants"]:
        out.append(f"| {claim} | {study_name} | not run yet | — |")
        continue
      step = _parity_step(st, name, dense_name)
      when = (
        f"within {PARITY_POINTS} pt of AMSGrad's final accuracy from step {step:,}"
        if step is not None
        else f"never within {PARITY_POINTS} pt of AMSGrad's final accuracy in "
        f"{st['total_steps']:,} steps"
      )
      out.append(
        f"| {claim} | {st['title']} | {_gap(st, name, dense_name)} points; {when} "
        f"| {_verdict(st, name, dense_name)} |"
      )
  for study_name in PARITY:
    st = data.get(study_name)
    if st and dense_name in st["variants"]:
      out.append(_compression_row(data, st))
      break
  sp = next((data[n] for n in SPEEDUPS if n in data), None)
  if sp and sp["variants"]:
    cells, held, top, fraction = [], True, 1, CLAIMS["speedup"]["held_fraction"]
    for v, rows in sp["variants"].items():
      by_n = {r["num_workers"]: r["steps_to_target"] for r in rows}
      top = max(by_n)
      if by_n.get(1) and by_n.get(top):
        speedup = by_n[1] / by_n[top]
        held &= speedup >= fraction * top
        cells.append(f"{_label(v)}: {speedup:.1f}× at n = {top}")
      else:
        held = False
        cells.append(f"{_label(v)}: target not reached")
    out.append(
      f"| Iterations to a training loss fall linearly in n | {sp['config']}, loss target "
      f"{sp['target_loss']} | {'; '.join(cells)} (linear: {top}×) "
      f"| {f'held (at least {fraction:g}× linear)' if held else 'not held'} |"
    )
  for study_name in ("baselines_fashion_mnist", "baselines_mnist5k", "baselines_rotten_tomatoes"):
    st, short = data.get(study_name), data.get(study_name.removeprefix("baselines_"))
    if not st or not short:
      continue
    cells = []
    for name, v in st["variants"].items():
      runs = _ok_runs(v)
      if runs:
        mean, _ = _mean_std([r["test_accuracy"] for r in runs])
        cells.append(f"{_label(name)} {mean:.4f}")
    for name in ("comp_ams_top_k", "comp_ams_block_sign", "amsgrad"):
      v = short["variants"].get(name)
      if v and _ok_runs(v):
        cells.append(
          f"{_label(name)} {_mean_std([r['test_accuracy'] for r in _ok_runs(v)])[0]:.4f}"
        )
    out.append(
      f"| COMP-AMS is competitive with 1-bit Adam and QAdam run as their authors run them "
      f"| {st['title'].split(':')[0]} | {'; '.join(cells)} | see the table below |"
    )
  rate = CLAIMS["rate"]
  fine_limit = rate["fine_delta_over_sigma"]
  if rd and any(r["delta_over_sigma"] <= fine_limit for r in rd["rows"]):
    rows = rd["rows"]
    fine = [r for r in rows if r["delta_over_sigma"] <= fine_limit]
    coarse = [r for r in rows if r["delta_over_sigma"] > fine_limit]

    def span(key, rs):
      vals = [r[key] for r in rs]
      return f"{min(vals):.2f}×–{max(vals):.2f}×"

    saved = [r["none"]["bits_per_coord"] - r["fixed"]["bits_per_coord"] for r in fine]
    cells = (
      f"for Δ ≤ {_sigmas(fine_limit)} (distortion ≤ "
      f"{fine[0]['uniform_distortion'] / rd['momentum_rms'] ** 2:.3f} of "
      f"the momentum power): rate ÷ {span('rate_reduction_fixed', fine)} with ρ = β, "
      f"÷ {span('rate_reduction_least_squares', fine)} with least-squares ρ "
      f"({min(saved):.2f}–{max(saved):.2f} bits per coordinate saved with ρ = β)"
    )
    if coarse:
      cells += (
        f"; at Δ = {coarse[0]['delta_over_sigma']:g}σ prediction costs bits "
        f"(÷ {coarse[0]['rate_reduction_fixed']:.2f} and ÷ "
        f"{coarse[0]['rate_reduction_least_squares']:.2f})"
      )
    held = all(r["rate_reduction_fixed"] > rate["held_reduction"] for r in fine)
    out.append(
      "| Prediction lowers the communication rate at equal distortion (temporal paper) "
      f"| real momentum of the Fashion-MNIST CNN ({rd['workers']} workers, {rd['steps']} steps), "
      f"dithered uniform code, `benchmarks/rate_distortion.py` | {cells} "
      f"| {f'held for Δ ≤ {_sigmas(fine_limit)}' if held else 'not held'} |"
    )
  mom = data.get("fashion_mnist_momentum")
  if mom:
    out.append(
      "| Predictive compressed momentum SGD trains as well as plain compression at equal rate "
      f"| {mom['title']} | {_gap(mom, 'momentum_sgd_top_k_predictive', 'momentum_sgd_top_k')} "
      f"points | {_verdict(mom, 'momentum_sgd_top_k_predictive', 'momentum_sgd_top_k')} |"
    )
  out.append("")
  return out


def _claims_section(data: dict[str, dict]) -> list[str]:
  """One row per study: accuracy gaps to full precision and bit ratios, from the JSON."""
  out = [
    "## Every study against full precision",
    "",
    "Test-accuracy difference to full-precision AMSGrad in percentage points (mean over "
    "seeds ± the two spreads combined; negative = worse), and bits per step relative to it.",
    "",
    "| study | top-k 1%: Δ accuracy | top-k 1%: fewer bits | block-sign: Δ accuracy "
    "| block-sign: fewer bits | 1-bit Adam: Δ accuracy | QAdam: Δ accuracy |",
    "|---|---|---|---|---|---|---|",
  ]
  for name in STUDY_ORDER:
    st = data.get(name)
    if not st or "amsgrad" not in st["variants"]:
      continue
    out.append(
      f"| {st['title']} | {_gap(st, 'comp_ams_top_k', 'amsgrad')} "
      f"| {_ratio(st, 'comp_ams_top_k', 'amsgrad')} "
      f"| {_gap(st, 'comp_ams_block_sign', 'amsgrad')} "
      f"| {_ratio(st, 'comp_ams_block_sign', 'amsgrad')} "
      f"| {_gap(st, 'onebit_adam', 'amsgrad')} | {_gap(st, 'qadam', 'amsgrad')} |"
    )
  mom = data.get("fashion_mnist_momentum")
  if mom:
    out += [
      "",
      "Compressed momentum SGD (Fashion-MNIST, equal rate): "
      f"top-k 1% + EF {_gap(mom, 'momentum_sgd_top_k', 'momentum_sgd')} points, "
      f"with prediction {_gap(mom, 'momentum_sgd_top_k_predictive', 'momentum_sgd')} "
      "points against full-precision momentum SGD; prediction against plain top-k: "
      f"{_gap(mom, 'momentum_sgd_top_k_predictive', 'momentum_sgd_top_k')} points, at "
      f"{8 * mom['variants']['momentum_sgd_top_k_predictive']['bytes_per_step_steady']:,} "
      f"vs {8 * mom['variants']['momentum_sgd_top_k']['bytes_per_step_steady']:,} bits "
      "per step.",
    ]
  sp = data.get("speedup")
  if sp:
    cells = []
    for v, rows in sp["variants"].items():
      by_n = {r["num_workers"]: r["steps_to_target"] for r in rows}
      top = max(by_n)
      if by_n.get(1) and by_n.get(top):
        cells.append(f"{_label(v)}: T(1)/T({top}) = {by_n[1] / by_n[top]:.1f}× (linear: {top}×)")
    out += ["", "Speedup in iterations to the loss target: " + "; ".join(cells) + "."]
  out.append("")
  return out


def _timing_section(data: dict[str, dict]) -> list[str]:
  out = ["## CPU time", "", "| study | runs | training seconds (sum) |", "|---|---|---|"]
  for name, d in data.items():
    if name.startswith("speedup"):
      runs = sum(len(v) for v in d["variants"].values())
    else:
      runs = d.get("num_runs", 0)
    out.append(f"| {name} | {runs} | {d.get('train_seconds_total', 0):,.0f} |")
  host = next(iter(data.values())).get("host", {})
  out += [
    "",
    f"Host: {host.get('cpus')} CPU cores ({host.get('machine')}), no accelerator, jax "
    f"{host.get('jax')}, {host.get('devices')} simulated XLA:CPU devices. Seconds are wall "
    "time of the training loop (compilation and data loading excluded) while two queues "
    "shared the 2 cores, so each run had about one core.",
    "",
  ]
  return out


def write_report(results: pathlib.Path, docs: pathlib.Path) -> pathlib.Path:
  """Renders docs/results.md (+ docs/results/*.png) from the results JSON."""
  data = _load(results)
  if not data:
    raise FileNotFoundError(f"no results JSON in {results}; run `reproduce.py run` first.")
  figs = docs / "results"
  figs.mkdir(parents=True, exist_ok=True)
  text = (pathlib.Path(__file__).with_name("reproduce_report.md")).read_text()
  head, _, tail = text.partition("<!-- TABLES -->")
  rd_path = results.parent / "rate_distortion.json"
  rd = json.loads(rd_path.read_text()) if rd_path.exists() else None
  body: list[str] = _paper_claims_section(data, rd) + _claims_section(data)
  for name in STUDY_ORDER:
    if name in data:
      _study_figure(data[name], figs / f"{name}.png")
      body += _study_section(data[name], f"results/{name}.png")
  for name in SPEEDUPS:
    if name in data:
      _speedup_figure(data[name], figs / f"{name}.png")
      body += _speedup_section(data[name], f"results/{name}.png")
  body += lm_study_report.section(results.parent, figs, "results/lm_study.png")
  body += _timing_section(data)
  out = docs / "results.md"
  out.write_text(head + "\n".join(body) + tail)
  return out
