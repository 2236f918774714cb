"""Command lines: `compams-train` and `compams-plot`."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
from collections.abc import Sequence

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _simulate_devices(count: int) -> None:
  """Asks XLA:CPU for `count` devices; must run before jax initialises its backends."""
  # XLA:CPU's thread pool is max(PJRT_NPROC or #cores, #devices); with one thread per simulated
  # device a collective can starve and abort. Give it headroom.
  os.environ.setdefault("PJRT_NPROC", str(max(2 * count, 16)))
  flags = os.environ.get("XLA_FLAGS", "")
  if _DEVICE_FLAG in flags:
    found = int(re.search(_DEVICE_FLAG + r"=(\d+)", flags).group(1))
    if found < count:
      print(
        f"warning: XLA_FLAGS asks for {found} host devices but the run needs {count}.",
        file=sys.stderr,
      )
    return
  os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={count}".strip()


def _format_table(rows: list[dict]) -> str:
  head = f"{'variant':<32} {'test acc':>9} {'bytes/step':>17} {'vs dense f32':>13} {'time s':>7}"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
      f"{r['variant']:<32} {r['test_accuracy']:>9.4f} {r['bytes_per_step_steady']:>17,d} "
      f"{r['compression_ratio']:>12.1f}x {r['seconds']:>7.1f}"
    )
  return "\n".join(lines)


def train_main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="compams-train",
    description="Train with simulated (CPU) or real data-parallel workers and compressed "
    "communication. Overrides are key=value, e.g. optimizer.learning_rate=1e-3.",
  )
  parser.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:smoke")
  parser.add_argument("--workdir", default=None, help="run directory (default runs/CONFIG_NAME)")
  parser.add_argument(
    "--variant",
    action="append",
    default=None,
    help="optimizer preset(s) to run (default: the config's `variants`)",
  )
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  parser.add_argument(
    "--elastic",
    action="store_true",
    help="with --resume: allow a different num_workers (residuals redistributed "
    "with their sum preserved)",
  )
  parser.add_argument(
    "--stop-after",
    type=int,
    default=None,
    help="stop after this many steps (checkpointed), as an interruption would",
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
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)

  from compams_jax.experiments import config as config_lib

  try:
    configs = config_lib.resolve(args.config, args.overrides, args.variant)
  except config_lib.ConfigError as e:
    parser.error(str(e))
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
  rows = []
  for c in configs:
    workdir = base / c.variant if len(configs) > 1 else base
    try:
      rows.append(
        train.train(
          c,
          workdir,
          resume=args.resume,
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
  print(f"\nrun directories under {base}; plot with: compams-plot {base}/*")
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
