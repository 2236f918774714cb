"""The wire strategy interface: how the workers' compressed vectors become their average."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax

from compams_jax._src.axis import AxisName
from compams_jax._src.base import Compressor
from compams_jax._src.workers import PerWorker


@dataclasses.dataclass(frozen=True)
class Wire(abc.ABC):
  """A strategy that averages the workers' compressed vectors over the worker axis.

  A strategy is a value handed to a transform (`wire=cj.wire.gather()`); it owns the
  worker-side compression step (through the one error-feedback kernel), the collectives and any
  state of its own, and states its exact static bytes and collective count. Its payloads travel
  bucketed: a fixed number of collectives per step whatever the leaf count.

  Class-level declarations:

  * `exact_mean`: the output is exactly (1/n) Σ_i decode(payload_i), the mean of what the
    workers sent (no second compression). Predictive coding needs it: its receivers rebuild
    the senders' reconstructions from that mean.
  """

  exact_mean: ClassVar[bool] = True

  @abc.abstractmethod
  def init(self, compressor: Compressor, like: Any, axis_name: AxisName | None) -> PerWorker | None:
    """The strategy's own per-device state for values shaped like `like` (None if it has none)."""

  @abc.abstractmethod
  def step(
    self,
    compressor: Compressor,
    value: Any,
    residual: Any,
    state: PerWorker | None,
    *,
    key: jax.Array | None,
    axis_name: AxisName | None,
  ) -> tuple[Any, Any, PerWorker | None]:
    """Compresses value + residual, averages over the workers of `axis_name`.

    Returns:
      (mean, new_residual, new_state): the average (identical on every worker, shaped like
      `value`), this worker's new residual (what it owes), and the strategy's new state.
    """

  def average(
    self,
    compressor: Compressor,
    payload: Any,
    like: Any,
    *,
    axis_name: AxisName | None,
    key: jax.Array | None = None,
    own: Any = None,
  ) -> Any:
    """(1/n) Σ_i decode(payload_i) of payloads already encoded (strategies with `exact_mean`)."""
    raise NotImplementedError(f"{type(self).__name__} does not average ready-made payloads.")

  @abc.abstractmethod
  def bytes(self, compressor: Compressor, like: Any, num_workers: int) -> int:
    """Exact bytes one worker hands to this strategy's collectives per step."""

  @abc.abstractmethod
  def collectives(self, compressor: Compressor) -> int:
    """Collectives per step, whatever the number of leaves."""


def check_wire(wire: Any) -> Wire:
  if not isinstance(wire, Wire):
    raise TypeError(
      f"wire must be a strategy such as cj.wire.gather() or cj.wire.two_phase(), got {wire!r}."
    )
  return wire
