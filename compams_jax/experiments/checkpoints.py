"""Run directories: metadata checks and orbax checkpoints of the full training state."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this run (the message says why)."""


META_FILE = "run_meta.json"
# What must agree between a checkpoint and the run resuming it.
MUST_MATCH = ("model", "dataset", "num_workers", "param_shapes", "optimizer")


def read_meta(workdir: pathlib.Path) -> dict[str, Any] | None:
  path = workdir / META_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is corrupt ({e}); refusing to touch this run directory.") from e


def check_meta(
  saved: dict[str, Any],
  current: dict[str, Any],
  workdir: pathlib.Path,
  keys: tuple[str, ...] = MUST_MATCH,
) -> None:
  """Raises CheckpointError naming the first of `keys` whose saved and current values differ."""
  for key in keys:
    if saved.get(key) != current.get(key):
      raise CheckpointError(
        f"cannot resume {workdir}: its checkpoint was made with {key} = {saved.get(key)!r}, "
        f"this run has {key} = {current.get(key)!r}. Use a new --workdir (nothing was "
        "overwritten)."
      )


def has_checkpoint(directory: pathlib.Path) -> bool:
  """Whether `directory` (a run's checkpoints/) holds a finished checkpoint; creates nothing."""
  return pathlib.Path(directory).is_dir() and bool(ocp.utils.checkpoint_steps(directory))


class Checkpointer:
  """Saves and restores {params, opt_state, step, meters} with orbax (atomic per step)."""

  def __init__(self, directory: pathlib.Path, *, max_to_keep: int = 2):
    self.directory = directory
    self.manager = ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, item: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(item), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
    abstract = jax.tree.map(
      lambda x: (
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array)
        else x
      ),
      like,
    )
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for unreadable data.
      raise CheckpointError(
        f"checkpoint {step} in {self.directory} is unreadable or does not match this run "
        f"(corrupt, incomplete, or from another model): {type(e).__name__}: {e}"
      ) from e

  def close(self) -> None:
    self.manager.close()
