"""Reproduces the papers' experiments on real data and writes `docs/results.md`.

Two steps, each one command:

    python benchmarks/reproduce.py run      # trains every missing run, writes results JSON
    python benchmarks/reproduce.py report   # docs/results.md + docs/results/*.png from the JSON

`run` trains with `compams_jax.experiments.train` on 16 simulated CPU workers (the script sets
them up itself, `cj.simulate_cpu_devices`). Each study tunes the learning rate on seed 0 over a small grid, then trains
seeds 1 and 2 at the best rate. Run directories go under `--runs` (default `runs/reproduce`);
a finished run is never retrained, an interrupted one resumes from its checkpoint, so `run` can be
stopped and restarted at will. Two invocations may share a queue (e.g. one pinned to each core
with `taskset`): a run one of them is training is skipped by the other; a last
`run --export-only` then writes the JSON with every run. After each study its results are written to
`benchmarks/results/reproduction/STUDY.json` (a few KB: curves, bytes from HLO, timings).
`--study` picks studies; `--quick` runs a tiny version of each (1 seed, 1 rate, few steps) into a
temporary directory, to check the pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

WORKERS = 16  # Every study runs on 16 simulated devices (`run` sets them up).

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reproduction"


@dataclasses.dataclass(frozen=True)
class Study:
  """One table of docs/results.md: variants × seeds on one config, lr tuned on seed 0."""

  name: str
  title: str
  config: str
  # Optimizer presets; "preset:key=value,key=value" runs a preset with extra overrides.
  variants: tuple[str, ...]
  lr_grid: tuple[float, ...]
  overrides: tuple[str, ...] = ()
  seeds: tuple[int, ...] = (0, 1, 2)
  # If set, only this variant is tuned and every variant uses its best rate (equal-lr comparison).
  tune_on: str | None = None
  # If set, no tuning: each variant uses the rate chosen for it by this (earlier) study, or
  # its preset's (the name before ":"), or that of the variant `lr_as` maps it to.
  lr_from: str | None = None
  lr_as: tuple[tuple[str, str], ...] = ()
  # If set, each variant is tuned on its own 3-point grid of the 1-3 ladder (…, 3e-4, 1e-3,
  # 3e-3, …) centred on the rate this (earlier) study chose for it; `lr_grid` is then unused.
  lr_around: str | None = None
  # Whenever the best rate is at an edge of the grid, try the next ladder rate beyond it
  # (at most `max_extensions` times per variant).
  extend_edges: bool = False
  max_extensions: int = 2


# The learning-rate ladder grids are drawn from: 1e-5, 3e-5, 1e-4, ..., 3e-1.
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def _ladder_index(lr: float) -> int:
  return min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))


ADAPTIVE = ("amsgrad", "comp_ams_top_k", "comp_ams_block_sign", "onebit_adam", "qadam")
STUDIES = {
  s.name: s
  for s in [
    Study(
      "fashion_mnist",
      "Fashion-MNIST, CNN",
      "configs/fashion_mnist_cnn.py",
      ADAPTIVE,
      (3e-4, 1e-3, 3e-3),
      ("max_train_examples=16384", "epochs=3", "optimizer.warmup_steps=32"),
    ),
    # 1-bit Adam diverges right after warm-up at every rate (and with a 70-step warm-up):
    # weights into ReLU units dead during warm-up have frozen v = 0, the 1-bit code sends
    # their zero momentum as ±scale, and the step lr·scale/ε explodes. ε = 1e-4 bounds it.
    Study(
      "mnist5k",
      "MNIST (5k real digits), LeNet-5",
      "configs/mnist5k_lenet.py",
      (*ADAPTIVE, "onebit_adam:optimizer.eps=0.0001"),
      (3e-4, 1e-3, 3e-3),
      ("optimizer.warmup_steps=35",),
    ),
    Study(
      "rotten_tomatoes",
      "Rotten Tomatoes (IMDB stand-in), LSTM",
      "configs/rotten_tomatoes_lstm.py",
      ADAPTIVE,
      (3e-4, 1e-3, 3e-3),
      ("epochs=5", "optimizer.warmup_steps=40"),
    ),
    Study(
      "fashion_mnist_momentum",
      "Fashion-MNIST, CNN: compressed momentum SGD",
      "configs/fashion_mnist_momentum.py",
      ("momentum_sgd", "momentum_sgd_top_k", "momentum_sgd_top_k_predictive"),
      (0.01, 0.03, 0.1),
      ("max_train_examples=16384", "epochs=3"),
      tune_on="momentum_sgd",
    ),
    # Closing the early gap at equal bits (beyond the paper), at the short horizon.
    Study(
      "mnist5k_early_gap",
      "MNIST (5k real digits), LeNet-5: closing the early gap",
      "configs/mnist5k_lenet.py",
      (
        *ADAPTIVE[:3],
        "comp_ams_top_k:optimizer.feedback=ef21",
        "comp_ams_block_sign:optimizer.feedback=ef21",
        "comp_ams_top_k:optimizer.dense_warmup_steps=14",
        "comp_ams_block_sign:optimizer.dense_warmup_steps=14",
        "comp_ams_block_sign_256",
        "comp_ams_top_k_bf16",
      ),
      (1e-3, 3e-3),
    ),
    # Parity where the paper claims it: trained to convergence, rates tuned at this horizon.
    Study(
      "mnist5k_parity",
      "MNIST (5k real digits), LeNet-5, 100 epochs",
      "configs/mnist5k_lenet.py",
      ADAPTIVE[:3],
      (),
      ("epochs=100", "optimizer.warmup_steps=35"),
      lr_around="mnist5k",
      extend_edges=True,
    ),
    Study(
      "rotten_tomatoes_parity",
      "Rotten Tomatoes (IMDB stand-in), LSTM, 20 epochs",
      "configs/rotten_tomatoes_lstm.py",
      ADAPTIVE[:3],
      (),
      ("epochs=20", "optimizer.warmup_steps=40"),
      lr_around="rotten_tomatoes",
      extend_edges=True,
    ),
    # The baselines as their authors run them: bucketed QSGD (QAdam), DeepSpeed's per-tensor
    # ‖x‖₂/√d scale (1-bit Adam), at the short horizons where the defaults were measured.
    Study(
      "baselines_fashion_mnist",
      "Fashion-MNIST, CNN: baselines as their authors run them",
      "configs/fashion_mnist_cnn.py",
      ("qadam_bucketed", "onebit_adam_l2"),
      (3e-4, 1e-3, 3e-3),
      ("max_train_examples=16384", "epochs=3", "optimizer.warmup_steps=32"),
      extend_edges=True,
    ),
    Study(
      "baselines_rotten_tomatoes",
      "Rotten Tomatoes (IMDB stand-in), LSTM: baselines as their authors run them",
      "configs/rotten_tomatoes_lstm.py",
      ("onebit_adam_l2",),
      (3e-4, 1e-3, 3e-3),
      ("epochs=5", "optimizer.warmup_steps=40"),
      extend_edges=True,
    ),
    Study(
      "baselines_mnist5k",
      "MNIST (5k real digits), LeNet-5: baselines as their authors run them",
      "configs/mnist5k_lenet.py",
      ("qadam_bucketed", "onebit_adam_l2", "onebit_adam_l2:optimizer.eps=0.0001"),
      (3e-4, 1e-3, 3e-3),
      ("optimizer.warmup_steps=35",),
      extend_edges=True,
    ),
    Study(
      "fashion_mnist_lenet_parity",
      "Fashion-MNIST (60k), LeNet-5, 20 epochs",
      "configs/fashion_mnist_lenet.py",
      ADAPTIVE[:3],
      (3e-4, 1e-3, 3e-3),
      ("epochs=20",),
      extend_edges=True,
    ),
    # The paper's CNN on the full training set at 10 epochs (1,170 steps, about 20 min a run on
    # one core here): one seed per optimizer, the grid around the 96-step rates.
    Study(
      "fashion_mnist_cnn_parity",
      "Fashion-MNIST (60k), CNN, 10 epochs",
      "configs/fashion_mnist_cnn.py",
      ADAPTIVE[:3],
      (),
      ("epochs=10",),
      seeds=(0,),
      lr_around="fashion_mnist",
      extend_edges=True,
      max_extensions=1,
    ),
    # Closing the early gap on the paper's CNN at 96 steps, each option at the rate the short
    # study tuned for its compressor (equal-rate comparison with the plain variants there).
    Study(
      "fashion_mnist_early_gap",
      "Fashion-MNIST, CNN: closing the early gap",
      "configs/fashion_mnist_cnn.py",
      (
        "comp_ams_top_k:optimizer.feedback=ef21",
        "comp_ams_block_sign:optimizer.feedback=ef21",
        "comp_ams_top_k:optimizer.dense_warmup_steps=10",
        "comp_ams_block_sign:optimizer.dense_warmup_steps=10",
        "comp_ams_block_sign_256",
        "comp_ams_top_k_annealed:optimizer.anneal_steps=32",
      ),
      (),
      ("max_train_examples=16384", "epochs=3"),
      lr_from="fashion_mnist",
      lr_as=(
        ("comp_ams_block_sign_256", "comp_ams_block_sign"),
        ("comp_ams_top_k_annealed:optimizer.anneal_steps=32", "comp_ams_top_k"),
      ),
    ),
    # Longer training at the tuned rates (seed 0): does compression's gap close?
    Study(
      "mnist5k_long",
      "MNIST (5k real digits), LeNet-5, 5× longer",
      "configs/mnist5k_lenet.py",
      ADAPTIVE[:3],
      (),
      ("epochs=100",),
      seeds=(0,),
      lr_from="mnist5k",
    ),
    Study(
      "fashion_mnist_long",
      "Fashion-MNIST, CNN, full training set",
      "configs/fashion_mnist_cnn.py",
      ADAPTIVE[:3],
      (),
      ("epochs=3",),
      seeds=(0,),
      lr_from="fashion_mnist",
    ),
  ]
}


@dataclasses.dataclass(frozen=True)
class Speedup:
  """Iterations to a training-loss target for n workers at lr = base_lr·√n (the paper's rule)."""

  name: str = "speedup"
  config: str = "configs/fashion_mnist_cnn.py"
  variants: tuple[str, ...] = ("comp_ams_top_k", "comp_ams_block_sign")
  workers: tuple[int, ...] = (1, 2, 4, 8, 16)
  base_lr: float = 5e-4
  target_loss: float = 0.6
  # The loss is averaged over the last `window_examples / (n · local_batch)` steps: the same
  # number of examples for every n, so the averaging lag scales with the iteration count.
  window_examples: int = 5120
  overrides: tuple[str, ...] = ("epochs=3", "max_test_examples=2000")


SPEEDUPS = {
  sp.name: sp
  for sp in [
    Speedup(),
    # Where linear speedup is defined: a loss dense AMSGrad reaches only after epochs.
    Speedup(
      name="speedup_lenet",
      config="configs/fashion_mnist_lenet.py",
      variants=("amsgrad", "comp_ams_top_k", "comp_ams_block_sign"),
      target_loss=0.28,
      overrides=("epochs=15", "max_test_examples=2000"),
    ),
  ]
}
ALL = (*STUDIES, *SPEEDUPS)


def _quick(study):
  """A tiny version of a study, to check the pipeline end to end."""
  if isinstance(study, Speedup):
    return dataclasses.replace(
      study,
      workers=(1, 4),
      variants=study.variants[:1],
      target_loss=1.5,
      window_examples=256,
      overrides=("epochs=1", "max_train_examples=2048", "max_test_examples=256"),
    )
  return dataclasses.replace(
    study,
    seeds=(0,),
    lr_grid=study.lr_grid[1:2] or (1e-3,),
    lr_around=None,
    lr_from=None,
    extend_edges=False,
    overrides=(
      *study.overrides,
      "epochs=1",
      "max_train_examples=1024",
      "max_test_examples=256",
      "optimizer.warmup_steps=1",
    ),
  )


# ----------------------------------------------------------------------------- running


def _lr_tag(lr: float) -> str:
  return f"lr{lr:g}"


def _train_one(
  spec: str, variant: str, overrides: list[str], workdir: pathlib.Path, export_only: bool = False
) -> dict:
  """Trains one run (or loads it if finished; resumes it if interrupted) and returns a record.

  With `export_only`, an unfinished run is reported missing instead of trained. Several
  invocations may share a queue (one per core): a run another invocation is training is reported
  missing here and left to it (the lock is released when its holder exits, however it exits).
  """
  from compams_jax.experiments import config as config_lib
  from compams_jax.experiments import train

  variant, _, extra = variant.partition(":")
  overrides = [*overrides, *(o for o in extra.split(",") if o)]
  done = workdir / "summary.json"
  failed = workdir / "diverged.json"

  def finished():
    return json.loads(done.read_text()) if done.exists() else {}

  if failed.exists():
    return json.loads(failed.read_text())
  if finished().get("finished"):
    summary = finished()
  elif export_only:
    return {"variant": variant, "missing": "not trained (--export-only)", "test_accuracy": None}
  else:
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(workdir.parent / f"{workdir.name}.lock", "w") as lock:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        return {
          "variant": variant,
          "missing": "trained by another invocation",
          "test_accuracy": None,
        }
      if failed.exists():  # another invocation may have finished it meanwhile
        return json.loads(failed.read_text())
      summary = finished()
      if not summary.get("finished"):
        (config,) = config_lib.resolve(str(ROOT / spec), overrides, [variant])
        checkpoints = workdir / "checkpoints"
        resume = checkpoints.is_dir() and any(checkpoints.iterdir())
        if not resume and workdir.exists():  # stopped before its first checkpoint: start over
          shutil.rmtree(workdir)
        try:
          summary = train.train(config, workdir, resume=resume, progress=False).summary
        except FloatingPointError as e:  # A too-large learning rate is a grid outcome.
          record = {"variant": variant, "diverged": str(e), "test_accuracy": None}
          failed.write_text(json.dumps(record))
          return record
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
  return {
    **summary,
    "evals": [l for l in lines if l["kind"] == "eval"],
    "train": [l for l in lines if l["kind"] == "train"],
  }


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run_record(r: dict, seed: int) -> dict:
  """The part of a run kept in the results JSON."""
  if r.get("test_accuracy") is None:
    return {
      "seed": seed,
      **({"missing": r["missing"]} if "missing" in r else {"diverged": r.get("diverged")}),
    }
  return {
    "seed": seed,
    "test_accuracy": r["test_accuracy"],
    "test_loss": r["test_loss"],
    "steps": r["steps"],
    "seconds": round(r["seconds"], 1),
    "bits_sent_total": r["evals"][-1]["bits_sent"] if r["evals"] else None,
    # epoch, test accuracy, mean training loss of the epoch, bits sent per worker so far.
    "evals": [
      [e["epoch"], round(e["test_accuracy"], 5), round(e["train_loss"], 5), e["bits_sent"]]
      for e in r["evals"]
    ],
  }


def run_study(
  study: Study, runs: pathlib.Path, out: pathlib.Path, export_only: bool = False
) -> dict:
  """Tunes the rate on seed 0, trains the other seeds at the best rate, writes the JSON."""
  base = runs / study.name
  t_study = time.time()
  records: dict[str, dict] = {}

  def job(variant, lr, seed):
    key = (variant, lr, seed)
    if key not in records:
      workdir = (
        base
        / variant.replace(":", "__").replace("=", "-").replace(",", "_")
        / (f"{_lr_tag(lr)}_seed{seed}")
      )
      overrides = [
        *study.overrides,
        f"optimizer.learning_rate={lr}",
        f"seed={seed}",
        f"optimizer.seed={seed}",
      ]
      t = time.time()
      records[key] = r = _train_one(study.config, variant, overrides, workdir, export_only)
      acc = r.get("test_accuracy")
      _log(
        f"{study.name} {variant} lr={lr:g} seed={seed}: "
        + (f"test acc {acc:.4f}" if acc is not None else r.get("missing", "diverged"))
        + f" ({time.time() - t:.0f} s)"
      )
    return records[key]

  centres = {}
  if study.lr_around:
    source = out / f"{study.lr_around}.json"
    if not source.exists():
      raise FileNotFoundError(f"{study.name} centres its grids on {study.lr_around}: run it first.")
    centres = {v: r["lr"] for v, r in json.loads(source.read_text())["variants"].items()}

  def grid_of(variant):
    if not study.lr_around:
      return list(study.lr_grid)
    if centres.get(variant) is None:
      raise ValueError(f"{study.lr_around} chose no rate for {variant}")
    i = _ladder_index(centres[variant])
    return [LADDER[j] for j in (i - 1, i, i + 1) if 0 <= j < len(LADDER)]

  def lr_missing(variant, accs):
    """Whether a grid point is not trained yet (so the grid's edge is not known)."""
    return any("missing" in records.get((variant, lr, study.seeds[0]), {}) for lr in accs)

  def best_lr(variant):
    grid = grid_of(variant)
    accs = {}
    for _ in range(1 + (study.max_extensions if study.extend_edges else 0)):
      for lr in grid:
        if lr not in accs:
          accs[lr] = job(variant, lr, study.seeds[0]).get("test_accuracy")
      finite = {lr: a for lr, a in accs.items() if a is not None}
      best = max(finite, key=finite.get) if finite else None
      if not study.extend_edges or best is None or lr_missing(variant, accs):
        break
      i = _ladder_index(best)
      if best == min(accs) and i > 0:
        grid = [LADDER[i - 1]]
      elif best == max(accs) and i + 1 < len(LADDER):
        grid = [LADDER[i + 1]]
      else:
        break
    return best, dict(sorted(accs.items()))

  tuned = {}
  if study.lr_from:
    source = out / f"{study.lr_from}.json"
    if not source.exists():
      raise FileNotFoundError(f"{study.name} uses the rates of {study.lr_from}: run that first.")
    chosen = json.loads(source.read_text())["variants"]
    # A "preset:overrides" variant takes its preset's rate unless `lr_as` says otherwise.
    as_ = dict(study.lr_as)
    source = {v: as_.get(v, v if v in chosen else v.partition(":")[0]) for v in study.variants}
    tuned = {v: (chosen[source[v]]["lr"], {}) for v in study.variants}
  elif study.tune_on:
    tuned[study.tune_on] = best_lr(study.tune_on)
  result = {
    "study": study.name,
    "title": study.title,
    "config": study.config,
    "overrides": list(study.overrides),
    "seeds": list(study.seeds),
    "lr_grid": list(study.lr_grid),
    "tuned_on": study.tune_on,
    "lr_from": study.lr_from,
    "lr_as": dict(study.lr_as),
    "lr_around": study.lr_around,
    "extend_edges": study.extend_edges,
    "variants": {},
  }

  def write(complete):
    result["complete"] = complete
    result["wall_seconds_this_invocation"] = round(time.time() - t_study, 1)
    result["train_seconds_total"] = round(
      sum(r.get("seconds", 0.0) for r in records.values() if r.get("test_accuracy") is not None),
      1,
    )
    result["num_runs"] = len(records)
    result["host"] = _host()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study.name}.json").write_text(json.dumps(result, indent=1))

  def record(variant, seeds):
    lr, grid = tuned[study.tune_on or variant]
    if lr is None:
      result["variants"][variant] = {
        "lr": None,
        "grid": {f"{k:g}": v for k, v in grid.items()},
        "runs": [],
      }
      return
    runs_ = [job(variant, lr, seed) for seed in seeds]
    ok = [r for r in runs_ if r.get("test_accuracy") is not None]
    first = ok[0] if ok else {}
    result["variants"][variant] = {
      "lr": lr,
      "grid": {f"{k:g}": v for k, v in grid.items()} if variant in tuned else None,
      "bytes_per_step_hlo": first.get("bytes_per_step_hlo"),
      "bytes_per_step_steady": first.get("bytes_per_step_steady"),
      "dense_f32_bytes": first.get("dense_f32_bytes"),
      "collectives": first.get("collectives"),
      "runs": [_run_record(r, s) for r, s in zip(runs_, seeds)],
    }
    for key in ("num_workers", "num_params", "total_steps", "train_examples", "test_examples"):
      result.setdefault(key, first.get(key))
    if first:
      cfg = first["config"]
      result.setdefault("local_batch", cfg["local_batch"])
      result.setdefault("epochs", cfg["epochs"])
      result.setdefault("dataset", cfg["dataset"]["name"])
      result.setdefault("model", cfg["model"]["name"])

  # First every variant's grid centre, then the rest of its grid (seed 0), then the other seeds,
  # writing the JSON after each variant of each pass: an interrupted queue leaves every finished
  # run on disk and in JSON, and the runs that matter most are done first.
  if study.lr_around and not study.tune_on:
    for variant in study.variants:
      if centres.get(variant) is not None:
        job(variant, centres[variant], study.seeds[0])
  for variant in study.variants:
    if (study.tune_on or variant) not in tuned:
      tuned[variant] = best_lr(variant)
    record(variant, study.seeds[:1])
    write(False)
  for variant in study.variants:
    record(variant, study.seeds)
    write(False)
  # Complete once no run of it is missing (e.g. left to another invocation sharing the queue).
  write(not any("missing" in r for r in records.values()))
  return result


def run_speedup(
  sp: Speedup, runs: pathlib.Path, out: pathlib.Path, export_only: bool = False
) -> dict:
  """Trains to the loss target for each n and compressor; writes the JSON."""
  from compams_jax.experiments import config as config_lib

  local_batch = int(config_lib.load_config_file(str(ROOT / sp.config)).local_batch)
  result = {
    "study": sp.name,
    "config": sp.config,
    "overrides": list(sp.overrides),
    "base_lr": sp.base_lr,
    "target_loss": sp.target_loss,
    "window_examples": sp.window_examples,
    "local_batch": local_batch,
    "variants": {},
  }
  total = 0.0
  for variant in sp.variants:
    rows = []
    for n in sp.workers:
      lr = sp.base_lr * math.sqrt(n)
      window = max(1, math.ceil(sp.window_examples / (n * local_batch)))
      overrides = [
        *sp.overrides,
        f"num_workers={n}",
        f"optimizer.learning_rate={lr}",
        f"target_train_loss={sp.target_loss}",
        f"target_loss_window={window}",
        "log_every=1",
        "checkpoint_every=100000",
      ]
      t = time.time()
      r = _train_one(sp.config, variant, overrides, runs / sp.name / variant / f"n{n}", export_only)
      reached = r.get("steps_to_target")
      _log(
        f"{sp.name} {variant} n={n} lr={lr:.2e}: "
        + (
          f"target reached at step {reached}"
          if reached
          else f"target NOT reached in {r.get('steps')} steps"
        )
        + f" ({time.time() - t:.0f} s)"
      )
      losses = [l["loss"] for l in r.get("train", [])]
      smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
      ]
      stride = max(1, len(smooth) // 150)
      rows.append(
        {
          "num_workers": n,
          "lr": lr,
          "window": window,
          "steps_to_target": reached,
          "steps": r.get("steps"),
          "seconds": round(r.get("seconds", 0.0), 1),
          "bytes_per_step_hlo": r.get("bytes_per_step_hlo"),
          "curve": [[i + 1, round(smooth[i], 4)] for i in range(0, len(smooth), stride)],
        }
      )
      total += r.get("seconds", 0.0)
    result["variants"][variant] = rows
  result["train_seconds_total"] = round(total, 1)
  result["host"] = _host()
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{sp.name}.json").write_text(json.dumps(result, indent=1))
  return result


def _host() -> dict:
  import jax

  return {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "cpus": os.cpu_count(),
    "machine": platform.machine(),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split("\n\n", 1)[1],
  )
  parser.add_argument("command", choices=("run", "report"))
  parser.add_argument(
    "--study", action="append", choices=ALL, default=None, help="studies to run (default: all)"
  )
  parser.add_argument(
    "--runs", default=None, help="run directories (default runs/reproduce; with --quick a temp dir)"
  )
  parser.add_argument(
    "--results",
    default=None,
    help=f"results JSON directory (default {RESULTS.relative_to(ROOT)}; with --quick a temp dir)",
  )
  parser.add_argument("--docs", default=str(ROOT / "docs"), help="where results.md goes")
  parser.add_argument(
    "--export-only",
    action="store_true",
    help="write the results JSON from the runs already finished; train nothing",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny runs into a temporary directory, to check the pipeline",
  )
  args = parser.parse_args(argv)
  names = args.study or list(ALL)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="reproduce_quick_")) if args.quick else None
  runs = pathlib.Path(args.runs or (tmp / "runs" if tmp else ROOT / "runs" / "reproduce"))
  results = pathlib.Path(args.results or (tmp / "results" if tmp else RESULTS))
  if args.command == "report":
    from reproduce_report import write_report

    print(write_report(results, pathlib.Path(args.docs)))
    return 0
  import compams_jax as cj

  cj.simulate_cpu_devices(WORKERS)  # before any JAX operation
  for name in names:
    study = SPEEDUPS[name] if name in SPEEDUPS else STUDIES[name]
    if args.quick:
      study = _quick(study)
    _log(f"study {name}")
    try:
      if isinstance(study, Speedup):
        run_speedup(study, runs, results, args.export_only)
      else:
        run_study(study, runs, results, args.export_only)
    except FileNotFoundError as e:  # A study that needs another's results; the rest go on.
      _log(f"skipped {name}: {e}")
      continue
    _log(f"wrote {results / (name + '.json')}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  sys.exit(main())
