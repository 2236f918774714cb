"""The language-model study's section of docs/results.md, from its JSON alone (no jax).

Reads `benchmarks/results/lm_study/*.json` (one per run, `lm_study.py run`),
`benchmarks/results/lm_study_projection.json` (`lm_study.py project`),
`benchmarks/results/lm_study_pseudo_gradient_rate.json` (`lm_study.py pseudo`) and the measured codec
times of `benchmarks/results/compressor_throughput_chunked.json`
(`compressor_throughput.py --compressors chunked_top_k dct_top_k`).
"""

from __future__ import annotations

import json
import math
import pathlib

import lm_study as S

LABELS = {
  "adamw": "AdamW, dense data-parallel",
  "amsgrad": "AMSGrad, dense (COMP-AMS's baseline)",
  "comp_ams_top_k": "COMP-AMS top-k 1% (every step)",
  "comp_ams_block_sign": "COMP-AMS block-sign (every step)",
  "diloco": "DiLoCo, dense pseudo-gradient",
  "sparseloco": "SparseLoCo (64/4,096, 2-bit, EF 0.95)",
  "sparseloco_predictive": "SparseLoCo's code + least-squares prediction across syncs",
  "demo": "DeMo (DCT top-32/64², every step)",
}
DENSE = "adamw"
TOLERANCE = 0.01  # "matches" / "within": relative validation-loss gap

# Projection to real links (stated assumptions; see the section's text).
LINKS = {"TPU v5p DCN": 50e9, "H200 InfiniBand": 400e9}  # bits/s per chip / GPU
CHIPS = {  # dense bf16 peak FLOP/s, HBM bytes/s
  "TPU v5p DCN": (459e12, 2.765e12),
  "H200 InfiniBand": (989e12, 4.8e12),
}
MFU = 0.4
# Tokens one worker processes per step: 16 sequences of the model's context.
TOKENS_PER_WORKER_STEP = {"gpt2_small": 16 * 1024, "gpt_1b": 16 * 2048}
SWEEP_GBITS = (1, 10, 50, 100, 400, 1600, 7200)  # 7,200 Gb/s: H200's NVLink (900 GB/s)
# Which measured encode each method's codec is (compressor_throughput's candidates).
ENCODE = {
  "comp_ams_top_k": "top_k_0.01.encode",
  "comp_ams_block_sign": "block_sign.encode",
  "sparseloco": "chunked_top_k_64_64_2.encode",
  "sparseloco_predictive": "chunked_top_k_64_64_2.encode",
  "demo": "dct_top_k_64_32.encode",
}
# Dense-sized passes a receiver makes to decode what it receives: block-sign expands each of
# the n payloads; DeMo inverts one DCT of the averaged coefficients (taken as one more encode);
# the top-k codes scatter n·k entries (their payload bytes, counted as memory traffic).
DECODE_PASSES = {"comp_ams_block_sign": "n", "demo": "encode"}


def _fmt(x: float, digits: int = 4) -> str:
  return f"{x:.{digits}f}"


def _bytes(x: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if x >= scale:
      return f"{x / scale:,.2f} {unit}"
  return f"{x:,.0f} B"


def sent_after(run: dict, step: int) -> float:
  """Bytes one worker has sent after `step` steps (local SGD: at each completed sync)."""
  if run.get("bytes_per_sync") is not None:
    return (step // run["sync_every"]) * run["bytes_per_sync"]
  return step * run["bytes_per_step"]


def over_seeds(runs: dict[str, dict], run: dict) -> dict:
  """`run` with its validation loss and curve averaged over the seeds recorded at its rate and
  H (`val_sd`: their standard deviation, `seeds`: how many)."""
  h = run["sync_every"] if run.get("bytes_per_sync") is not None else None
  names = [S.run_name(run["method"], run["learning_rate"], h, s) for s in (S.SEED, *S.EXTRA_SEEDS)]
  same = [runs[n] for n in names if n in runs] or [run]
  vals = [r["val_loss"] for r in same]
  mean = sum(vals) / len(vals)
  sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
  steps = [st for st, _ in run["val_curve"]]
  curves = [dict(map(tuple, r["val_curve"])) for r in same]
  curve = [
    [st, sum(c[st] for c in curves) / len(curves)] for st in steps if all(st in c for c in curves)
  ]
  return {
    **run,
    "val_loss": mean,
    "perplexity": math.exp(mean),
    "val_sd": sd,
    "seeds": len(same),
    "val_curve": curve,
  }


def best_runs(runs: dict[str, dict]) -> dict[str, dict]:
  """Each method at its best rate of the grid (seed 0; local SGD at the grid's H), averaged
  over the seeds recorded there (`over_seeds`)."""
  out = {}
  for method in S.GRIDS:
    h = S.SYNC_EVERY if method in S.LOCAL_SGD else None
    done = [runs[n] for lr in S.grid(runs, method)[0] if (n := S.run_name(method, lr, h)) in runs]
    finite = [r for r in done if math.isfinite(r["val_loss"])]
    if finite:
      out[method] = over_seeds(runs, min(finite, key=lambda r: r["val_loss"]))
  return out


def _seeds(best: dict[str, dict], *methods: str) -> str:
  n = sorted({best[m]["seeds"] for m in methods})
  return f"{'/'.join(map(str, n))} seed{'s' if n != [1] else ''}"


def _grid_note(runs: dict[str, dict], method: str, best: dict) -> str:
  rates, settled = S.grid(runs, method)
  h = S.SYNC_EVERY if method in S.LOCAL_SGD else None
  missing = [lr for lr in rates if S.run_name(method, lr, h) not in runs]
  if missing:
    return f" (grid incomplete: {len(rates) - len(missing)}/{len(rates)})"
  if not settled:
    return " (grid being extended)"
  if best["learning_rate"] in (rates[0], rates[-1]):
    return " (edge of grid)"
  return ""


def reach(run: dict, target: float) -> tuple[int, float] | None:
  """(step, bytes) of the first validation at or below `target`; None if never."""
  for step, loss in run["val_curve"]:
    if loss <= target:
      return step, sent_after(run, step)
  return None


def _gap(run: dict, dense: dict) -> float:
  return (run["val_loss"] - dense["val_loss"]) / dense["val_loss"]


def methods_table(runs: dict[str, dict]) -> list[str]:
  best = best_runs(runs)
  dense = best.get(DENSE)
  out = [
    "| method | lr | val loss ± sd (seeds) | perplexity | vs AdamW | bytes / worker (run) | fewer bytes "
    "| bytes to AdamW's final loss | iso-loss ratio |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for method, r in best.items():
    total = sent_after(r, r["steps"])
    gap = f"{100 * _gap(r, dense):+.2f}%" if dense else "–"
    fewer = f"{sent_after(dense, dense['steps']) / total:,.0f}×" if dense and total else "–"
    iso, ratio = "–", "–"
    if dense:
      hit = reach(r, dense["val_loss"])
      if hit is None:
        iso = "not reached"
      else:
        iso = f"{_bytes(hit[1])} (step {hit[0]})"
        ratio = f"{sent_after(dense, dense['steps']) / hit[1]:,.0f}×" if hit[1] else "∞"
    out.append(
      f"| {LABELS[method]} | {r['learning_rate']:g}{_grid_note(runs, method, r)} "
      f"| {_fmt(r['val_loss'])} ± {_fmt(r['val_sd'])} ({r['seeds']}) | {r['perplexity']:.2f} "
      f"| {gap} | {_bytes(total)} | {fewer} "
      f"| {iso} | {ratio} |"
    )
  return out


def grid_table(runs: dict[str, dict]) -> list[str]:
  out = ["| method | rate → final validation loss (seed 0) |", "|---|---|"]
  for method in S.GRIDS:
    h = S.SYNC_EVERY if method in S.LOCAL_SGD else None
    cells = []
    for lr in S.grid(runs, method)[0]:
      r = runs.get(S.run_name(method, lr, h))
      cells.append(f"{lr:g} → {_fmt(r['val_loss'])}" if r else f"{lr:g} → (not run)")
    out.append(f"| {LABELS[method]} | " + "; ".join(cells) + " |")
  return out


def sweep_table(runs: dict[str, dict]) -> list[str]:
  best = best_runs(runs)
  out = [
    "| method | H | val loss | bytes / sync | bytes / worker (run) |",
    "|---|---|---|---|---|",
  ]
  for method, hs in S.H_SWEEP.items():
    if method not in best:
      continue
    lr = best[method]["learning_rate"]
    for h in sorted((*hs, S.SYNC_EVERY)):
      r = runs.get(S.run_name(method, lr, h))
      if r is None:
        out.append(f"| {LABELS[method]} (lr {lr:g}) | {h} | (not run) | | |")
        continue
      out.append(
        f"| {LABELS[method]} (lr {lr:g}) | {h} | {_fmt(r['val_loss'])} "
        f"| {_bytes(r['bytes_per_sync'])} | {_bytes(sent_after(r, r['steps']))} |"
      )
  return out


def figure(runs: dict[str, dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  best = best_runs(runs)
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  for method, r in best.items():
    steps = [s for s, _ in r["val_curve"]]
    losses = [v for _, v in r["val_curve"]]
    sent = [max(sent_after(r, s), 1.0) for s in steps]
    a.plot([s * r["tokens_per_step"] for s in steps], losses, marker="o", ms=3, label=method)
    b.plot(sent, losses, marker="o", ms=3, label=method)
  a.set(xlabel="tokens (all workers)", ylabel="validation loss (nats / byte)")
  b.set(xscale="log", xlabel="bytes sent per worker", ylabel="validation loss (nats / byte)")
  for ax in (a, b):
    ax.grid(alpha=0.3)
  b.legend(fontsize=8)
  fig.suptitle("Byte-level GPT on the Python docs, 16 workers, equal tokens (best rate of each)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _encode_ratios(results: pathlib.Path) -> dict[str, float]:
  path = results / "compressor_throughput_chunked.json"
  if not path.exists():
    return {}
  data = json.loads(path.read_text())["results"]
  return {k: v["median_paired_ratio"] for k, v in data.items()}


def utilization(models: dict, mk: str, method: str, gbits: float, chip: str, encode: dict, n: int):
  """(compute utilization, step seconds) of one worker, no overlap of compute and messages."""
  m = models[mk]["methods"][method]
  params = models[mk]["params"]
  peak, hbm = CHIPS[chip]
  compute = 6 * params * TOKENS_PER_WORKER_STEP[mk] / (peak * MFU)
  size = m.get("bytes_per_sync", m.get("bytes_per_step"))
  if m["collective"] == "all-reduce":
    received = 2 * (n - 1) / n * size
  else:
    received = (n - 1) * size
  comm = 8 * received / gbits
  codec = 0.0
  if method in ENCODE:
    elementwise = 8 * params / hbm  # one pass reading and writing f32 parameters
    passes = encode[ENCODE[method]]
    decode = DECODE_PASSES.get(method)
    passes += n if decode == "n" else (encode[ENCODE[method]] if decode == "encode" else 0)
    codec = passes * elementwise + 2 * n * size / hbm
  step = compute + (comm + codec) / m["sync_every"]
  return compute / step, step


def projection_tables(projection: dict, encode: dict) -> list[str]:
  n = projection["workers"]
  models = projection["models"]
  names = {"gpt2_small": "GPT-2 small", "gpt_1b": "1B"}
  cols = [(mk, link) for mk in models for link in LINKS]
  out = [
    "| method | "
    + " | ".join(f"{names[mk]}, {link} ({LINKS[link] / 1e9:g} Gb/s)" for mk, link in cols)
    + " |",
    "|---|" + "---|" * len(cols),
  ]
  worse = []

  def cell(mk, method, gbits, chip, where):
    u, _ = utilization(models, mk, method, gbits, chip, encode, n)
    base = "diloco" if method in S.LOCAL_SGD else DENSE
    if method != base:
      ub, _ = utilization(models, mk, base, gbits, chip, encode, n)
      if u <= ub:
        worse.append(f"{method}, {names[mk]}, {where} ({100 * u:.1f}% vs {100 * ub:.1f}%)")
    return f"{100 * u:.1f}%"

  for method in S.PROJECTED_METHODS:
    cells = [cell(mk, method, LINKS[link], link, link) for mk, link in cols]
    out.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  for mk in models:
    out += ["", f"Bandwidth per GPU against utilization, {names[mk]}, H200 compute:", ""]
    out += [
      "| method | " + " | ".join(f"{g:g} Gb/s" for g in SWEEP_GBITS) + " |",
      "|---|" + "---|" * len(SWEEP_GBITS),
    ]
    for method in S.PROJECTED_METHODS:
      cells = [cell(mk, method, g * 1e9, "H200 InfiniBand", f"{g:g} Gb/s") for g in SWEEP_GBITS]
      out.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  out += [
    "",
    "Where compression does not pay (utilization no better than the same method's dense "
    "form: AdamW for the per-step codes, dense DiLoCo for the local-SGD codes): "
    + ("; ".join(worse) if worse else "nowhere in these tables")
    + ".",
  ]
  return out


def _rate_claim(rate: dict) -> str:
  """The claim row of `lm_study.py pseudo`'s measurement."""
  red = sorted(r["rate_reduction_least_squares"] for r in rate["rows"])
  median = red[len(red) // 2]
  verdict = (
    f"holds, by {100 * (median - 1):.1f}% (median over Δ)"
    if median >= 1.01
    else f"does not hold beyond 1% (median {100 * (median - 1):+.1f}%)"
  )
  return (
    "| Prediction lowers the pseudo-gradient's rate at equal distortion | "
    f"per-worker least-squares ρ: {red[0]:.3f}–{red[-1]:.3f}× fewer bits over Δ/σ "
    f"{min(r['delta_over_sigma'] for r in rate['rows']):g}–"
    f"{max(r['delta_over_sigma'] for r in rate['rows']):g} (dense DiLoCo H = "
    f"{rate['sync_every']}, {rate['syncs']} syncs, {rate['workers']} workers, "
    f"{rate['coords']:,} coordinates; consecutive averaged pseudo-gradients' cosine "
    f"{rate['mean_consecutive_cosine_of_the_average']:.2f}) | {verdict} |"
  )


def claims(runs: dict[str, dict], projection: dict | None, rate: dict | None = None) -> list[str]:
  best = best_runs(runs)
  out = ["| claim | measured | verdict |", "|---|---|---|"]

  def within(method: str, base: str, claim: str) -> None:
    if method not in best or base not in best:
      out.append(f"| {claim} | (runs missing) | not yet measured |")
      return
    gap = _gap(best[method], best[base])
    ok = gap <= TOLERANCE
    out.append(
      f"| {claim} | {_fmt(best[method]['val_loss'])} vs {_fmt(best[base]['val_loss'])} "
      f"({100 * gap:+.2f}%) | {'holds' if ok else 'does not hold'} at this scale, "
      f"{_seeds(best, method, base)} |"
    )

  within("comp_ams_top_k", DENSE, "COMP-AMS top-k 1% stays within 1% of AdamW's validation loss")
  within("comp_ams_top_k", "amsgrad", "COMP-AMS top-k 1% stays within 1% of AMSGrad's")
  within("comp_ams_block_sign", "amsgrad", "COMP-AMS block-sign stays within 1% of AMSGrad's")
  within("diloco", DENSE, "DiLoCo at H = 30 matches data parallelism's loss at equal tokens (≤ 1%)")
  within("demo", DENSE, "DeMo stays within 1% of AdamW's validation loss")
  if "sparseloco" in best and "diloco" in best:
    s, d = best["sparseloco"], best["diloco"]
    ratio = d["bytes_per_sync"] / s["bytes_per_sync"]
    gpt2 = ""
    if projection:
      m = projection["models"]["gpt2_small"]["methods"]
      gpt2 = (
        f"; GPT-2 small: {m['diloco']['bytes_per_sync'] / m['sparseloco']['bytes_per_sync']:.1f}×"
      )
    gap = _gap(s, d)
    verdict = (
      "holds"
      if ratio >= 146 and gap <= TOLERANCE
      else (
        "bytes hold, loss does not"
        if ratio >= 146
        else ("loss holds, bytes do not" if gap <= TOLERANCE else "does not hold")
      )
    )
    out.append(
      "| SparseLoCo sends ≥ 146× fewer bytes per sync than f32 at DiLoCo's loss "
      f"| {ratio:.1f}× per sync here{gpt2}; loss {_fmt(s['val_loss'])} vs "
      f"{_fmt(d['val_loss'])} ({100 * gap:+.2f}%) | {verdict} "
      f"({_seeds(best, 'sparseloco', 'diloco')}) |"
    )
  if rate is not None:
    out.append(_rate_claim(rate))
  if "sparseloco_predictive" in best and "sparseloco" in best:
    p, s = best["sparseloco_predictive"], best["sparseloco"]
    gap = (p["val_loss"] - s["val_loss"]) / s["val_loss"]
    extra = p["bytes_per_sync"] - s["bytes_per_sync"]
    out.append(
      "| Prediction across syncs trains as well as SparseLoCo at (nearly) equal bytes "
      f"| {_fmt(p['val_loss'])} vs {_fmt(s['val_loss'])} ({100 * gap:+.2f}%), "
      f"+{extra:,} B per sync of predictor statistics | "
      f"{'holds' if gap <= TOLERANCE else 'does not hold'} "
      f"({_seeds(best, 'sparseloco_predictive', 'sparseloco')}; SparseLoCo's feedback "
      "decay 0.95 is 1.0 here, a predictor needs a plain residual) |"
    )
  return out


def reading(runs: dict[str, dict]) -> str:
  """What the table says, in one paragraph generated from it."""
  best = best_runs(runs)
  dense = best.get(DENSE)
  if dense is None:
    return ""
  others = {m: r for m, r in best.items() if m not in (DENSE, "amsgrad")}
  if not others:
    return ""
  reached = [m for m, r in others.items() if reach(r, dense["val_loss"]) is not None]
  lowest = min(others, key=lambda m: others[m]["val_loss"])
  fewest = min(others, key=lambda m: sent_after(others[m], others[m]["steps"]))
  total = sent_after(dense, dense["steps"])

  def describe(m):
    r = others[m]
    return (
      f"{LABELS[m]} ({_fmt(r['val_loss'])}, {100 * _gap(r, dense):+.1f}% against AdamW, "
      f"{total / sent_after(r, r['steps']):,.0f}× fewer bytes)"
    )

  head = (
    f"Within the run, {', '.join(LABELS[m] for m in reached)} reach AdamW's final loss."
    if reached
    else "Within the run no compressed or local-SGD method reaches AdamW's final loss, so "
    "no iso-loss ratio exists at this horizon."
  )
  return (
    f"{head} The lowest loss among them: {describe(lowest)}; the fewest bytes: "
    f"{describe(fewest)}. These verdicts are about this scale ({dense['steps']} steps, "
    f"{dense['steps'] * dense['tokens_per_step'] / 1e6:.1f}M tokens, the small model above), "
    "far below the horizons at which the papers make their claims."
  )


def section(results: pathlib.Path, figs: pathlib.Path, fig_rel: str) -> list[str]:
  """The markdown lines of the section (and its figure), or [] when no run is recorded."""
  runs = S.load_runs(results / "lm_study")
  if not runs:
    return []
  proj_path = results / "lm_study_projection.json"
  projection = json.loads(proj_path.read_text()) if proj_path.exists() else None
  encode = _encode_ratios(results)
  rate_path = results / "lm_study_pseudo_gradient_rate.json"
  rate = json.loads(rate_path.read_text()) if rate_path.exists() else None
  figure(runs, figs / "lm_study.png")
  total_s = sum(r["run_seconds"] for r in runs.values())
  planned = S.plan(runs)
  extra = len(set(runs) - planned)
  one = next(iter(runs.values()))
  out = [
    "## A transformer language model: per-step compression against local SGD",
    "",
    "At equal tokens, which method reaches which validation loss for how many bytes? The "
    "repository's GPT decoder (`compams_jax.experiments.lm`; bytes, d 64, 2 scanned layers, "
    "4 heads, context 64) on the Python docs' reStructuredText sources (`python3.11-doc`), "
    f"{one['workers']} simulated workers, 4 sequences each per step "
    f"({one['tokens_per_step']:,} tokens per step), {one['steps']} steps "
    f"({one['steps'] * one['tokens_per_step'] / 1e6:.1f}M tokens) for every method; validation "
    f"loss (nats per byte) every {S.EVAL_EVERY} steps on 256 held-out windows (local SGD: "
    "the synchronized parameters θ). Each method is tuned on a 3-point rate grid at this "
    "horizon (seed 0), extended by the next rate of the 1–3 ladder past an edge where the "
    "best rate is there (twice at most), then trained at its best rate with seeds 1 and 2 (model initialization "
    "and data order); losses are the mean over the seeds recorded (their count is in each "
    "row: fewer than 3 where the queue had not reached them). Bytes are what one worker hands to the "
    "collectives across workers, from the traced step (`cj.wire_bytes`).",
    "",
    "```bash",
    "python benchmarks/lm_study.py run       # every missing run (resumable, one JSON per run)",
    "python benchmarks/lm_study.py project   # bytes of every method on GPT-2 small and 1B",
    "python benchmarks/lm_study.py pseudo    # the pseudo-gradients' rate, with prediction",
    "python benchmarks/reproduce.py report   # this page",
    "```",
    "",
    f"Runs recorded: {len(set(runs) & planned)} of the {len(planned)} the study needs"
    + (f", and {extra} at a rate a grid extension superseded" if extra else "")
    + f"; {total_s / 3600:.2f} CPU hours (one core each).",
    "",
    "### Claims",
    "",
    *claims(runs, projection, rate),
    "",
    reading(runs),
    "",
    "### Every method at its best rate",
    "",
    "*iso-loss ratio*: AdamW's bytes for the whole run over the method's bytes at the first "
    f"validation (every {S.EVAL_EVERY} steps) at or below AdamW's final loss.",
    "",
    *methods_table(runs),
    "",
    f"![LM study]({fig_rel})",
    "",
    "### The rate grids (final validation loss)",
    "",
    *grid_table(runs),
    "",
    "### H sweep (local SGD, at the method's best rate for H = 30; seed 0)",
    "",
    *sweep_table(runs),
    "",
  ]
  if projection and encode:
    out += [
      "### Projection to real links",
      "",
      "Compute utilization = compute time / step time of one worker, with "
      f"{projection['workers']} workers across the slow link and nothing overlapped: "
      "compute = 6 · parameters · tokens per worker per step (16 sequences of the model's "
      "context: 16,384 for GPT-2 small, 32,768 for 1B) / "
      f"(bf16 peak · {MFU:.0%} MFU), peaks 459 TFLOP/s (TPU v5p) and 989 TFLOP/s (H200); "
      "messages = the bytes received per worker (ring all-reduce 2(n−1)/n · S for the dense "
      "mean, all-gather (n−1) · S for a compressed payload S, S from "
      "`benchmarks/results/lm_study_projection.json`) over the per-chip link, per step or per "
      "sync / H; codec = the encode time measured on this CPU as a multiple of an elementwise "
      "pass (`benchmarks/results/compressor_throughput_chunked.json`) times the chip's "
      "elementwise pass over the parameters (8 bytes each over HBM: 2.765 TB/s v5p, 4.8 TB/s "
      "H200), plus the decode (block-sign: one pass per received payload; DeMo: one more "
      "encode for the inverse DCT) and the received payloads read twice. These are "
      "assumptions, not measurements on those machines: no accelerator ran them.",
      "",
      *projection_tables(projection, encode),
      "",
    ]
  return out


def markdown(runs: dict[str, dict]) -> str:
  return "\n".join(methods_table(runs) + [""] + grid_table(runs) + [""] + sweep_table(runs))
