"""Wire: strategies that average compressed payloads over workers, and byte accounting.

A strategy is a value handed to a transform (`wire=cj.wire.gather()` or
`cj.wire.two_phase()`); hierarchical meshes add a dense axis around either
(`dense_axis_name=`). `wire_bytes` reads the bytes a transformation sends from its traced
program; `collective_bytes` reads them from a compiled program's HLO.
"""

from compams_jax._src.axis import UnboundAxisError, num_workers, worker_index
from compams_jax.wire._accounting import wire_bytes
from compams_jax.wire._collectives import (
  agree,
  all_of_worker,
  all_workers,
  mean_over,
  sum_over_workers,
)
from compams_jax.wire._gather import Gather, gather, gather_average
from compams_jax.wire._hierarchical import chunks_like, gather_chunks, own_chunks, scatter_mean
from compams_jax.wire._hlo import Collective, CollectiveBytes, collective_bytes, parse_collectives
from compams_jax.wire._strategy import Wire, check_wire
from compams_jax.wire._two_phase import TwoPhase, two_phase

__all__ = [
  "Collective",
  "CollectiveBytes",
  "Gather",
  "TwoPhase",
  "UnboundAxisError",
  "Wire",
  "agree",
  "all_of_worker",
  "all_workers",
  "check_wire",
  "chunks_like",
  "collective_bytes",
  "gather",
  "gather_average",
  "gather_chunks",
  "mean_over",
  "num_workers",
  "own_chunks",
  "parse_collectives",
  "scatter_mean",
  "sum_over_workers",
  "two_phase",
  "wire_bytes",
  "worker_index",
]
