"""Command lines: `compams-train` and `compams-plot`."""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
from collections.abc import Sequence


def _simulate_devices(count: int) -> None:
  """`count` CPU devices (`cj.simulate_cpu_devices`), unless JAX already runs, or this process
  already asked for at least as many: then the devices it has are used (`train.make_layout` says
  so if they are too few)."""
  import jax

  import compams_jax as cj

  if jax.config.jax_num_cpu_devices >= count:  # e.g. a test process's 8 simulated devices
    return
  try:
    cj.simulate_cpu_devices(count)
  except RuntimeError:  # JAX's backends already exist (e.g. called from a running program)
    pass


def _status(r: dict) -> str:
  """How a run ended: done, the loss target's step, or where it stopped (not finished)."""
  if not r["finished"]:
    return f"stopped at step {r['steps']}/{r['total_steps']}"
  if r.get("steps_to_target") is not None:
    return f"target reached at step {r['steps']}/{r['total_steps']}"
  return "done"


_TIME_NOTE = (
  "loop s: wall-clock seconds of the training loop (steps, per-epoch evaluation, checkpoints); "
  "data loading, setup and compiling the training step are not counted."
)


def _bytes(value) -> str:
  """A byte count: an int with thousands separators, a per-step equivalent with one decimal,
  "-" for none."""
  if value is None:
    return "-"
  if isinstance(value, float) and not value.is_integer():
    return f"{value:,.1f}"
  return f"{int(value):,d}"


def _sync_note(rows: list[dict]) -> list[str]:
  """The note on local-SGD rows: what bytes/sync is and their H."""
  local = [r for r in rows if r.get("bytes_per_sync") is not None]
  if not local:
    return []
  every = ", ".join(f"{r['variant']} H={r['sync_every']}" for r in local)
  return [
    "bytes/sync: what one worker sends at each synchronization of a local-SGD variant, every "
    f"H steps ({every}); its bytes/step is the per-step equivalent, bytes/sync / H."
  ]


def _format_table(rows: list[dict]) -> str:
  head = (
    f"{'variant':<32} {'test acc':>9} {'bytes/step':>17} {'bytes/sync':>17} "
    f"{'vs dense f32':>13} {'loop s':>7}  status"
  )
  body = [
    f"{r['variant']:<32} {r['test_accuracy']:>9.4f} {_bytes(r['bytes_per_step_steady']):>17} "
    f"{_bytes(r.get('bytes_per_sync')):>17} "
    f"{r['compression_ratio']:>12.1f}x {r['seconds']:>7.1f}  {_status(r)}"
    for r in rows
  ]
  rule = "-" * max(len(line) for line in [head, *body])
  return "\n".join([head, rule, *body, _TIME_NOTE, *_sync_note(rows)])


def _final_line(rows: list[dict]) -> str:
  stopped = [r for r in rows if not r["finished"]]
  if not stopped:
    return f"all {len(rows)} run(s) finished."
  which = ", ".join(f"{r['variant']} {_status(r)}" for r in stopped)
  return (
    f"{len(stopped)} of {len(rows)} run(s) NOT finished: {which}; "
    "continue with the same command and --resume."
  )


def _variant_names(values: Sequence[str] | None, parser: argparse.ArgumentParser, presets):
  """The --variant names, comma-separated and/or repeated, in order, without repeats."""
  if values is None:
    return None
  names: list[str] = []
  for value in values:
    for name in value.split(","):
      if name.strip() and name.strip() not in names:
        names.append(name.strip())
  valid = ", ".join(presets)
  if not names:
    parser.error(f"--variant needs a preset name; valid: {valid}.")
  unknown = [n for n in names if n not in presets]
  if unknown:
    parser.error(f"unknown variant(s) {', '.join(map(repr, unknown))}; valid: {valid}.")
  return names


def _presets_help(presets) -> str:
  lines = ["variants (optimizer presets; compams_jax/experiments/config.py PRESETS):"]
  for name, preset in presets.items():
    kwargs = ", ".join(f"{k}={v}" for k, v in (preset.get("compressor_kwargs") or {}).items())
    extra = "".join(
      f", {k}={v}"
      for k, v in preset.items()
      if k not in ("name", "compressor", "compressor_kwargs")
    )
    lines.append(
      f"  {name:<37} {preset['name']}, {preset.get('compressor', 'identity')}({kwargs}){extra}"
    )
  return "\n".join(lines)


def _language_model_config(argv: Sequence[str]) -> bool:
  """Whether `--config` names a language-model config (`task = "lm"`, e.g. lm_small.py)."""
  from compams_jax.experiments import config as config_lib

  for i, arg in enumerate(argv):
    path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
    path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
    if path is not None:
      try:
        return config_lib.load_config_file(path).get("task") == "lm"
      except Exception:  # a bad path or config: the classifier parser reports it
        return False
  return False


def train_main(argv: Sequence[str] | None = None) -> int:
  from compams_jax.experiments import config as config_lib
  from compams_jax.experiments.config import PRESETS

  argv = list(sys.argv[1:] if argv is None else argv)
  if _language_model_config(argv):
    from compams_jax.experiments import lm_train

    return lm_train.main(argv)

  parser = argparse.ArgumentParser(
    prog="compams-train",
    description="Train with simulated (CPU) or real data-parallel workers and compressed\n"
    "communication. Overrides are key=value, e.g. optimizer.learning_rate=1e-3, or\n"
    "ml_collections config_flags' --config.optimizer.learning_rate=1e-3 (after the key=value\n"
    "ones); the keys and their defaults: compams_jax/experiments/config.py base_config, then\n"
    "the config file (optimizer fields left None take the library optimizer's default).",
    epilog=_presets_help(PRESETS),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--config",
    required=True,
    help="configs/NAME.py or configs/NAME.py:smoke (loaded by ml_collections config_flags)",
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="run directory (default: runs/CONFIG_NAME, e.g. runs/digits); with several variants, "
    "one subfolder per variant (runs/digits/amsgrad, ...)",
  )
  parser.add_argument(
    "--variant",
    action="append",
    default=None,
    help="optimizer preset(s) to run, comma-separated and/or repeated: --variant a,b or "
    "--variant a --variant b (default: the config file's `variants` field, e.g. configs/digits.py: "
    "amsgrad, comp_ams_top_k, comp_ams_block_sign); names are listed below",
  )
  parser.add_argument(
    "--resume",
    action="store_true",
    help="continue from the latest checkpoint (an error if the run directory holds none; "
    "with several variants, those without a checkpoint start fresh)",
  )
  parser.add_argument(
    "--elastic",
    action="store_true",
    help="with --resume: allow a different num_workers (residuals redistributed "
    "with their sum preserved; not for local SGD, e.g. diloco)",
  )
  parser.add_argument(
    "--stop-after",
    type=int,
    default=None,
    help="stop after this many steps (checkpointed), as an interruption would "
    "(default: train all epochs)",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument(
    "--coordinator",
    default=None,
    help="multi-process: coordinator HOST:PORT for jax.distributed.initialize",
  )
  parser.add_argument(
    "--num-processes",
    type=int,
    default=None,
    help="multi-process: number of processes (each gets num_workers/N devices)",
  )
  parser.add_argument("--process-id", type=int, default=None, help="multi-process: this rank")
  parser.add_argument(
    "overrides", nargs="*", help="key=value config overrides (or --config.key=value)"
  )
  args, unknown = parser.parse_known_args(argv)
  flag_overrides = [a for a in unknown if a.startswith("--config.")]
  if len(flag_overrides) < len(unknown):
    parser.error(
      f"unrecognized arguments: {' '.join(a for a in unknown if a not in flag_overrides)}"
    )
  variants = _variant_names(args.variant, parser, PRESETS)

  try:
    configs = config_lib.resolve(args.config, [*args.overrides, *flag_overrides], variants)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  try:
    for c in configs:
      config_lib.validate(c)
  except config_lib.ConfigError as e:
    print(f"compams-train: error: {e}", file=sys.stderr)
    return 2
  if args.stop_after is not None and args.stop_after < 1:
    print(f"compams-train: error: --stop-after={args.stop_after} must be >= 1.", file=sys.stderr)
    return 2
  workers = max(int(c.num_workers) for c in configs)
  multi = args.coordinator is not None or (args.num_processes or 1) > 1
  if multi:
    if args.coordinator is None or args.num_processes is None or args.process_id is None:
      parser.error("multi-process runs need --coordinator, --num-processes and --process-id.")
    if workers % args.num_processes:
      parser.error(
        f"num_workers={workers} is not divisible by --num-processes={args.num_processes}."
      )
    _simulate_devices(workers // args.num_processes)
    import jax

    # On CPU, cross-process collectives go through gloo; GPU (NCCL) and TPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      args.coordinator,
      args.num_processes,
      args.process_id,
      initialization_timeout=120,
      heartbeat_timeout_seconds=30,
    )
  else:
    _simulate_devices(workers)

  from compams_jax.experiments import checkpoints, train

  base = pathlib.Path(args.workdir or pathlib.Path("runs") / configs[0].name)
  # One variant trains in `base` itself; several, each in its own subfolder.
  workdirs = [base / c.variant if len(configs) > 1 else base for c in configs]
  resume = [args.resume] * len(configs)
  if args.resume:
    resume = [checkpoints.has_checkpoint(w / "checkpoints") for w in workdirs]
    if not any(resume):
      print(
        f"compams-train: error: --resume: {base} holds no checkpoint to resume (missing or "
        "empty run directory); run without --resume to start.",
        file=sys.stderr,
      )
      return 2
    for c, w, has in zip(configs, workdirs, resume):
      if not has:  # A multi-variant run interrupted before this variant's first checkpoint.
        print(f"compams-train: note: {w} has no checkpoint; {c.variant} starts fresh.")
  rows = []
  for c, workdir, resume_this in zip(configs, workdirs, resume):
    try:
      rows.append(
        train.train(
          c,
          workdir,
          resume=resume_this,
          stop_after=args.stop_after,
          progress=not args.no_progress,
          elastic=args.elastic,
        ).summary
      )
    except (
      checkpoints.CheckpointError,
      FileNotFoundError,
      ValueError,
      RuntimeError,
      FloatingPointError,
    ) as e:
      print(f"compams-train: error: {e}", file=sys.stderr)
      return 2
  print()
  print(_format_table(rows))
  runs = [str(w) for w in workdirs if (w / "metrics.jsonl").exists()]
  if runs:
    print(f"\nplot with: compams-plot {' '.join(shlex.quote(r) for r in runs)}")
  print(_final_line(rows))
  return 0


def plot_main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="compams-plot", description="Accuracy/loss vs epochs and vs bits sent, to PNG."
  )
  parser.add_argument("runs", nargs="+", help="run directories written by compams-train")
  parser.add_argument("--out", default="compams_plot.png", help="PNG file to write")
  parser.add_argument("--title", default=None)
  args = parser.parse_args(argv)
  from compams_jax.experiments.plots import plot_runs

  try:
    out = plot_runs(args.runs, args.out, args.title)
  except FileNotFoundError as e:
    print(f"compams-plot: error: {e}", file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(train_main())
