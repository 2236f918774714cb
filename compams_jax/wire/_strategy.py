"""The wire strategy interface: a value naming how the workers' payloads travel."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class Wire:
  """How payloads travel over the worker axis (`cj.wire.gather()`, `cj.wire.two_phase()`).

  A strategy only moves and decodes bytes; the algorithms (error feedback, predictive coding,
  two-phase's second compression) live in the transforms that use it. Its payloads travel
  bucketed: a fixed number of collectives per step whatever the leaf count.

  Declarations, read by the transforms:

  * `averages_payloads`: every worker's per-leaf payload reaches every worker, which averages
    them (`average`). A strategy without it exchanges chunk payloads (`exchange`) and gathers
    recompressed ones (`gather`): two-phase averaging, whose transforms compress the model
    flattened into n chunks.
  * `exact_mean`: the strategy's output is exactly (1/n) Σ_i decode(payload_i). Predictive
    coding needs it: its receivers rebuild the senders' reconstructions from that mean. The
    gather strategy's averaging options (`average="senders"`, `clip="median"`) and two-phase
    averaging do not declare it.
  """

  averages_payloads: ClassVar[bool] = True
  exact_mean: ClassVar[bool] = True


def check_wire(wire: Any) -> Wire:
  if not isinstance(wire, Wire):
    raise TypeError(
      f"wire must be a strategy such as cj.wire.gather() or cj.wire.two_phase(), got {wire!r}."
    )
  return wire
