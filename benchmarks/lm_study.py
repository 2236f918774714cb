"""The language-model study: per-step compression against local SGD at equal tokens.

    python benchmarks/lm_study.py run        # trains every missing run (resumable)
    python benchmarks/lm_study.py project    # bytes per worker of every method on GPT-2 small / 1B
    python benchmarks/lm_study.py report     # prints the tables; docs via reproduce_report.py

`run` trains the byte-level GPT decoder of `configs/lm_small.py` (shrunk here to d 64, 2 layers,
context 64: `BASE`) on the Python docs' rst sources, with 16 simulated workers (one per slice,
mesh (16, 1)), 4 sequences per worker per step, `STEPS` steps (equal tokens for every method),
validating every `EVAL_EVERY` steps (local SGD: the synchronized parameters θ). Every method is
tuned on its learning-rate grid (`GRIDS`, seed 0; extended past an edge where the best rate is
there, `grid`); then the local-SGD methods are rerun at their
best rate with H in `H_SWEEP`, and every method at its best rate with seeds `EXTRA_SEEDS`. Each finished run is written at once to
`benchmarks/results/lm_study/RUN.json` (curves, bytes per worker from the traced step's
collectives, timings), so `run` can be stopped and restarted at will; two invocations may share
the queue (e.g. one per core with `taskset`): a run another one is training is skipped (a lock
file under `--runs`), and the H sweep waits for its method's grid.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lm_study"
WORKERS = 16
STEPS = 800
EVAL_EVERY = 100
# configs/lm_small.py, sized so a run takes a few minutes of one core.
BASE = (
  f"mesh_shape=({WORKERS},1)",
  "d_model=64",
  "num_layers=2",
  "num_heads=4",
  "context_length=64",
  "batch_per_slice=4",
  f"steps={STEPS}",
  f"eval_every={EVAL_EVERY}",
  "eval_sequences=256",
  "log_every=50",
)
ADAM_GRID = (1e-3, 3e-3, 1e-2)
# Method -> its learning-rate grid (the inner AdamW's for local SGD; DeMo's sign-descent step).
GRIDS = {
  "adamw": ADAM_GRID,
  "amsgrad": ADAM_GRID,
  "comp_ams_top_k": ADAM_GRID,
  "comp_ams_block_sign": ADAM_GRID,
  "diloco": ADAM_GRID,
  "sparseloco": ADAM_GRID,
  "sparseloco_predictive": ADAM_GRID,
  "demo": (3e-4, 1e-3, 3e-3),
}
# Rates a grid is extended with, past its edge (1e-5, 3e-5, 1e-4, ..., 1e-1).
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
MAX_EXTENSIONS = 2
SYNC_EVERY = 30  # H of the grid runs (DiLoCo's and SparseLoCo's)
H_SWEEP = {"diloco": (10, 100), "sparseloco": (10, 100)}
LOCAL_SGD = ("diloco", "sparseloco", "sparseloco_predictive")
SEED = 0  # the seed of the grids and the H sweep
EXTRA_SEEDS = (1, 2)  # every method again at its best rate (model init and data order)


def run_name(method: str, lr: float, sync_every: int | None, seed: int = SEED) -> str:
  h = f"_H{sync_every}" if sync_every is not None else ""
  return f"{method}_lr{lr:.0e}{h}_s{seed}".replace("e-0", "e-")


def load_runs(results: pathlib.Path = RESULTS) -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def grid(runs: dict[str, dict], method: str) -> tuple[list[float], bool]:
  """(the method's rates, whether its tuning is settled): its `GRIDS` entry, extended by the
  next `LADDER` rate past an edge whenever the best rate so far is there (at most
  `MAX_EXTENSIONS` times); settled once every rate is run and the best is inside, or the
  extensions are spent."""
  h = SYNC_EVERY if method in LOCAL_SGD else None
  rates = list(GRIDS[method])
  for extension in range(MAX_EXTENSIONS + 1):
    done = [runs.get(run_name(method, lr, h)) for lr in rates]
    if any(r is None for r in done):
      return rates, False
    finite = [r for r in done if math.isfinite(r["val_loss"])]
    if not finite or extension == MAX_EXTENSIONS:
      return rates, True
    best = min(finite, key=lambda r: r["val_loss"])["learning_rate"]
    i = min(range(len(LADDER)), key=lambda j: abs(math.log(LADDER[j] / best)))
    if best == rates[0] and i > 0:
      rates.insert(0, LADDER[i - 1])
    elif best == rates[-1] and i + 1 < len(LADDER):
      rates.append(LADDER[i + 1])
    else:
      return rates, True
  return rates, True


def best_lr(runs: dict[str, dict], method: str) -> float | None:
  """The rate of the settled `grid` with the lowest final validation loss (seed 0; local SGD
  at H = `SYNC_EVERY`); None until the grid is settled."""
  rates, settled = grid(runs, method)
  if not settled:
    return None
  h = SYNC_EVERY if method in LOCAL_SGD else None
  finite = [r for lr in rates if math.isfinite((r := runs[run_name(method, lr, h)])["val_loss"])]
  return min(finite, key=lambda r: r["val_loss"])["learning_rate"] if finite else None


def queue(runs: dict[str, dict]) -> tuple[list[tuple[str, float, int | None, int]], bool]:
  """(the runs that can be trained now, whether some wait on unfinished runs)."""
  todo, waiting = [], False
  for position in (1, 0, 2):  # every method's middle rate first: partial results cover all
    for method, rates in GRIDS.items():
      h = SYNC_EVERY if method in LOCAL_SGD else None
      lr = rates[position]
      if run_name(method, lr, h) not in runs:
        todo.append((method, lr, h, SEED))
  for method in GRIDS:  # the extensions past an edge
    h = SYNC_EVERY if method in LOCAL_SGD else None
    for lr in grid(runs, method)[0]:
      if (method, lr, h, SEED) not in todo and run_name(method, lr, h) not in runs:
        todo.append((method, lr, h, SEED))
  for method, hs in H_SWEEP.items():
    lr = best_lr(runs, method)
    if lr is None:
      waiting = True
      continue
    todo += [(method, lr, h, SEED) for h in hs if run_name(method, lr, h) not in runs]
  for seed in EXTRA_SEEDS:
    for method in GRIDS:
      h = SYNC_EVERY if method in LOCAL_SGD else None
      lr = best_lr(runs, method)
      if lr is None:
        waiting = True
      elif run_name(method, lr, h, seed) not in runs:
        todo.append((method, lr, h, seed))
  return todo, waiting


def plan(runs: dict[str, dict]) -> set[str]:
  """The names of the runs the study needs, as far as the recorded ones settle it."""
  out = set()
  for method in GRIDS:
    h = SYNC_EVERY if method in LOCAL_SGD else None
    out |= {run_name(method, lr, h) for lr in grid(runs, method)[0]}
    best = best_lr(runs, method)
    if best is not None:
      out |= {run_name(method, best, h, seed) for seed in EXTRA_SEEDS}
      out |= {run_name(method, best, hh) for hh in H_SWEEP.get(method, ())}
  return out


def _host() -> dict:
  return {
    "machine": platform.machine(),
    "python": platform.python_version(),
    "cpus": os.cpu_count(),
    "affinity": len(os.sched_getaffinity(0)),
  }


def study_config(config_file, lr, seed, sync_every, steps=STEPS):
  """(the config of one run, the overrides of `config_file` that make it)."""
  from compams_jax.experiments import config as config_lib

  overrides = [*BASE, f"learning_rate={lr}", f"seed={seed}"]
  if steps != STEPS:  # --steps: a short pipeline check
    overrides += [f"steps={steps}", f"eval_every={max(1, steps // 2)}"]
  if sync_every is not None:
    overrides.append(f"sync_every={sync_every}")
  return config_lib.apply_overrides(config_lib.load_config_file(config_file), overrides), overrides


def train_one(method, lr, sync_every, seed, corpus, mesh, config_file, steps=STEPS) -> dict:
  import jax

  from compams_jax.experiments import lm_train

  config, overrides = study_config(config_file, lr, seed, sync_every, steps)
  start = time.perf_counter()
  r = lm_train.train_method(method, config, corpus, mesh, progress=sys.stderr.isatty())
  return {
    "method": method,
    "learning_rate": lr,
    "sync_every": r["sync_every"],
    "seed": seed,
    "workers": WORKERS,
    "steps": int(config.steps),
    "tokens_per_step": r["tokens_per_step"],
    "val_curve": r["val_curve"],
    "val_loss": r["val_loss"],
    "perplexity": r["perplexity"],
    "bits_per_byte": r["bits_per_byte"],
    "bytes_per_step": r["bytes_per_step"],
    "bytes_per_sync": r["bytes_per_sync"],
    "train_losses": r["train_losses"],
    "train_seconds": r["train_seconds"],
    "run_seconds": time.perf_counter() - start,
    "overrides": overrides,
    "jax": jax.__version__,
    "host": _host(),
  }


def run(runs_dir: pathlib.Path, results: pathlib.Path, config_file: str, steps: int) -> int:
  import compams_jax as cj

  cj.simulate_cpu_devices(WORKERS)
  import jax

  from compams_jax.experiments import data as D

  corpus = D.load_python_docs()
  mesh = jax.make_mesh((WORKERS, 1), ("dcn", "fsdp"))
  runs_dir.mkdir(parents=True, exist_ok=True)
  results.mkdir(parents=True, exist_ok=True)
  while True:
    todo, waiting = queue(load_runs(results))
    started = False
    for method, lr, h, seed in todo:
      name = run_name(method, lr, h, seed)
      with open(runs_dir / f"{name}.lock", "w") as lock:
        try:
          fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          continue  # another queue trains it
        if (results / f"{name}.json").exists():
          continue
        print(f"[lm_study] {name} ...", file=sys.stderr, flush=True)
        record = train_one(method, lr, h, seed, corpus, mesh, config_file, steps)
        tmp = results / f".{name}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(results / f"{name}.json")
        print(
          f"[lm_study] {name}: val loss {record['val_loss']:.4f} ({record['run_seconds']:.0f} s)",
          file=sys.stderr,
          flush=True,
        )
        started = True
        break  # re-read: a finished grid may release the H sweep
    if started:
      continue
    if not todo and not waiting:
      return 0
    time.sleep(30)  # the rest is being trained, or waits on runs another queue trains


# `project`: the methods' bytes on real model sizes, for the link projection of the report.
PROJECTION = ROOT / "benchmarks" / "results" / "lm_study_projection.json"
PROJECTED_METHODS = (
  "adamw",
  "comp_ams_top_k",
  "comp_ams_block_sign",
  "diloco",
  "sparseloco",
  "sparseloco_predictive",
  "demo",
)


def gpt_1b():
  """A 1B configuration of the repository's decoder: vocab 50257, context 2048, d 2048,
  16 heads, 18 layers."""
  from compams_jax.experiments import lm

  return lm.GPTConfig(
    vocab_size=50257, context_length=2048, d_model=2048, num_heads=16, num_layers=18
  )


def project(out: pathlib.Path, config_file: str) -> int:
  """Bytes one worker sends per step (per sync for local SGD) on GPT-2 small and the 1B model,
  for every method of `PROJECTED_METHODS` as the study builds it (`lm_train.make_tx`), from the
  traced step's collectives over the worker axis (`cj.wire_bytes` on abstract shapes)."""
  import jax
  from flax import nnx

  import compams_jax as cj
  from compams_jax.experiments import config as config_lib
  from compams_jax.experiments import lm, lm_train

  config = config_lib.apply_overrides(
    config_lib.load_config_file(config_file), [f"sync_every={SYNC_EVERY}"]
  )
  models = {}
  for name, cfg in (("gpt2_small", lm.gpt2_small()), ("gpt_1b", gpt_1b())):
    abstract = nnx.eval_shape(lambda cfg=cfg: lm.GPT(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    n = sum(x.size for x in jax.tree.leaves(params))
    methods = {}
    for method in PROJECTED_METHODS:
      t = time.perf_counter()
      tx = lm_train.make_tx(method, config, params)
      sent = cj.wire_bytes(tx, params, num_workers=WORKERS)
      local = method in LOCAL_SGD
      methods[method] = {
        "bytes_per_sync" if local else "bytes_per_step": int(sent),
        "sync_every": SYNC_EVERY if local else 1,
        # How the payload travels: the dense mean is one all-reduce, a lossy code's payloads
        # are all-gathered (the methods' default wire).
        "collective": "all-reduce" if method in ("adamw", "diloco") else "all-gather",
        "trace_seconds": time.perf_counter() - t,
      }
      print(f"[project] {name} {method}: {sent:,} B", file=sys.stderr, flush=True)
    models[name] = {
      "params": int(n),
      "config": {k: str(v) for k, v in vars(cfg).items()},
      "methods": methods,
    }
  record = {"workers": WORKERS, "models": models, "jax": jax.__version__}
  out.write_text(json.dumps(record, indent=1) + "\n")
  print(out)
  return 0


PSEUDO = ROOT / "benchmarks" / "results" / "lm_study_pseudo_gradient_rate.json"
PSEUDO_COORDS = 16_384  # coordinates recorded (a fixed random subset of the parameters)


def pseudo(out: pathlib.Path, config_file: str, steps: int = STEPS) -> int:
  """Records every worker's pseudo-gradient d_i = θ − θ_i at every sync of dense DiLoCo (the
  study's model, H = 30, its best rate from the grid, seed 0) on `PSEUDO_COORDS` coordinates,
  then codes the sequences with `rate_distortion.code` (dithered uniform DPCM per worker, the
  empirical entropy per sync) at every Δ of its grid: no prediction, the pooled least-squares
  ρ (fixed, in hindsight) and the per-worker, per-sync least-squares ρ (its 32 bits counted).
  The θ_i of a sync are read by running that step on a copy of the state whose count is reset
  (the same inner step without the sync)."""
  from rate_distortion import DELTA_OVER_SIGMA, METHODS, code  # sets its devices: before ours

  import compams_jax as cj

  cj.simulate_cpu_devices(WORKERS)
  import jax
  import jax.numpy as jnp

  from compams_jax.experiments import data as D
  from compams_jax.experiments import lm_train

  lr = best_lr(load_runs(), "diloco") or GRIDS["diloco"][1]
  config, _ = study_config(config_file, lr, SEED, SYNC_EVERY)
  corpus = D.load_python_docs()
  mesh = jax.make_mesh((WORKERS, 1), ("dcn", "fsdp"))
  _, params, _, state, step = lm_train.build("diloco", config, corpus, mesh)
  params = lm_train.per_slice(params, mesh)
  size = sum(x.size for x in jax.tree.leaves(cj.synchronized_params(state)))
  coords = np.sort(np.random.default_rng(1).choice(size, PSEUDO_COORDS, replace=False))

  def flat(tree, rows=False):
    parts = [np.asarray(x).reshape((WORKERS, -1) if rows else (-1,)) for x in jax.tree.leaves(tree)]
    return np.concatenate(parts, axis=-1)[..., coords]

  rng = np.random.default_rng(config.seed)
  recorded, start = [], time.perf_counter()
  for t in range(steps):
    batch = lm_train._put_batch(
      D.sample_windows(corpus.train, WORKERS * config.batch_per_slice, config.context_length, rng),
      mesh,
    )
    if (t + 1) % SYNC_EVERY == 0:  # this step syncs: its θ_i from the same step without the sync
      probe, _, _ = step(params, state._replace(count=jnp.zeros_like(state.count)), batch)
      recorded.append(flat(cj.synchronized_params(state))[None] - flat(probe, rows=True))
    params, state, _ = step(params, state, batch)
  d = np.stack(recorded).astype(np.float32)  # (syncs, workers, coords)
  sigma = float(d.std())
  cur, prev = d[1:].reshape(-1, PSEUDO_COORDS), d[:-1].reshape(-1, PSEUDO_COORDS)
  rho_fixed = round(float((cur * prev).sum() / (prev * prev).sum()), 2)
  mean = d.mean(axis=1)
  cosine = float(
    np.mean(
      [
        mean[t] @ mean[t - 1] / (np.linalg.norm(mean[t]) * np.linalg.norm(mean[t - 1]))
        for t in range(1, len(mean))
      ]
    )
  )
  rows = []
  for ratio in DELTA_OVER_SIGMA:
    row = {"delta_over_sigma": ratio}
    for method in METHODS:
      row[method] = code(d, ratio * sigma, method, rho=rho_fixed)
    for method in METHODS[1:]:
      row[f"rate_reduction_{method}"] = (
        row["none"]["bits_per_coord"] / row[method]["bits_per_coord"]
      )
    rows.append(row)
    print(
      f"Δ = σ·{ratio:g}: " + ", ".join(f"{m} {row[m]['bits_per_coord']:.3f} bits" for m in METHODS),
      file=sys.stderr,
      flush=True,
    )
  record = {
    "model": "lm_study's GPT (BASE)",
    "method": "dense DiLoCo",
    "learning_rate": lr,
    "sync_every": SYNC_EVERY,
    "workers": WORKERS,
    "syncs": len(recorded),
    "coords": PSEUDO_COORDS,
    "params": int(size),
    "sigma": sigma,
    "rho_fixed_pooled_least_squares": rho_fixed,
    "mean_consecutive_cosine_of_the_average": cosine,
    "rows": rows,
    "seconds": time.perf_counter() - start,
    "jax": jax.__version__,
    "host": _host(),
  }
  out.write_text(json.dumps(record, indent=1) + "\n")
  print(out)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("command", choices=("run", "project", "pseudo", "report"))
  parser.add_argument("--runs", default=str(ROOT / "runs" / "lm_study"), help="lock files")
  parser.add_argument("--results", default=str(RESULTS))
  parser.add_argument("--config", default=str(ROOT / "configs" / "lm_small.py"))
  parser.add_argument(
    "--steps", type=int, default=STEPS, help="fewer steps to check the pipeline (with --results)"
  )
  args = parser.parse_args(argv)
  if args.steps != STEPS and pathlib.Path(args.results) == RESULTS:
    parser.error("--steps other than the study's writes elsewhere: give --results DIR")
  if args.command == "run":
    return run(pathlib.Path(args.runs), pathlib.Path(args.results), args.config, args.steps)
  if args.command == "project":
    return project(PROJECTION, args.config)
  if args.command == "pseudo":
    out = PSEUDO if args.steps == STEPS else pathlib.Path(args.results) / PSEUDO.name
    return pseudo(out, args.config, args.steps)
  import lm_study_report

  print(lm_study_report.markdown(load_runs(pathlib.Path(args.results))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
