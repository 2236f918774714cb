"""Paper-style figures from run directories: accuracy and loss versus epochs and bits sent."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence


def read_run(run_dir: str | pathlib.Path) -> dict:
  """The eval lines and the label of one run directory."""
  run_dir = pathlib.Path(run_dir)
  metrics = run_dir / "metrics.jsonl"
  if not metrics.exists():
    raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a compams-train run directory?")
  lines = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
  evals = [l for l in lines if l["kind"] == "eval"]
  label = run_dir.name
  summary = run_dir / "summary.json"
  if summary.exists():
    label = json.loads(summary.read_text()).get("variant", label)
  return {"label": label, "evals": evals, "train": [l for l in lines if l["kind"] == "train"]}


def plot_runs(
  run_dirs: Sequence[str | pathlib.Path], out: str | pathlib.Path, title: str | None = None
) -> pathlib.Path:
  """Draws test accuracy and loss versus epochs and versus bits sent, one curve per run.

  Args:
    run_dirs: run directories written by `compams-train`.
    out: the PNG file to write.
    title: the figure title.

  Returns:
    The path written.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [read_run(d) for d in run_dirs]
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  for run in runs:
    ev = run["evals"]
    if not ev:
      continue
    epochs = [e["epoch"] for e in ev]
    bits = [max(e["bits_sent"], 1) for e in ev]
    axes[0, 0].plot(epochs, [e["test_accuracy"] for e in ev], marker="o", ms=3, label=run["label"])
    axes[0, 1].plot(bits, [e["test_accuracy"] for e in ev], marker="o", ms=3, label=run["label"])
    axes[1, 0].plot(epochs, [e["train_loss"] for e in ev], marker="o", ms=3, label=run["label"])
    axes[1, 1].plot(bits, [e["train_loss"] for e in ev], marker="o", ms=3, label=run["label"])
  for ax in axes[:, 1]:
    ax.set_xscale("log")
    ax.set_xlabel("bits sent per worker")
  for ax in axes[:, 0]:
    ax.set_xlabel("epoch")
  for ax in axes[0]:
    ax.set_ylabel("test accuracy")
  for ax in axes[1]:
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  axes[0, 0].legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
