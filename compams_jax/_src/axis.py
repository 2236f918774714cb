"""Named-axis queries that fail with a clear message, and a recorder for payload accounting."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax

_RECORDER: contextvars.ContextVar[PayloadRecorder | None] = contextvars.ContextVar(
  "compams_jax_payload_recorder", default=None
)


@dataclasses.dataclass
class PayloadRecorder:
  """Collects what every compams_jax collective would send while a function is traced."""

  sends: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
  num_workers: int = 1


@contextlib.contextmanager
def recording(num_workers: int = 1) -> Iterator[PayloadRecorder]:
  """Within this context, collectives record their payloads instead of communicating.

  Args:
    num_workers: the number of workers to account for (payload shapes of the two-phase
      all-reduce depend on it); the traced function still runs as if on one device.
  """
  rec = PayloadRecorder(num_workers=num_workers)
  token = _RECORDER.set(rec)
  try:
    yield rec
  finally:
    _RECORDER.reset(token)


def active_recorder() -> PayloadRecorder | None:
  return _RECORDER.get()


def effective_axis(axis_name: str | None) -> str | None:
  """The axis to communicate over: None while recording (one worker, no collective)."""
  return None if _RECORDER.get() is not None else axis_name


def num_workers(axis_name: str | None) -> int:
  """Size of the named axis (1 for None), with a clear error when the axis is not bound."""
  recorder = _RECORDER.get()
  if recorder is not None:
    return recorder.num_workers
  axis_name = effective_axis(axis_name)
  if axis_name is None:
    return 1
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
      f"axis_name={axis_name!r} is not bound here. Call the optimizer's update inside "
      f"jax.shard_map over a mesh with an axis named {axis_name!r}, or inside "
      f"jax.pmap(..., axis_name={axis_name!r}); use axis_name=None for a single worker."
    ) from e


def worker_index(axis_name: str | None) -> jax.Array | int:
  """This worker's index along the axis (0 for None)."""
  axis_name = effective_axis(axis_name)
  if axis_name is None:
    return 0
  num_workers(axis_name)  # Raises the clear error for an unbound axis.
  return jax.lax.axis_index(axis_name)
