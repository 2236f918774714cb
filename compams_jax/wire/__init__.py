"""Wire: collectives over compressed payloads, and byte accounting (static and from HLO)."""

from compams_jax._src.axis import num_workers, recording, worker_index
from compams_jax.wire._accounting import wire_bytes
from compams_jax.wire._average import all_workers, average, sum_over_workers
from compams_jax.wire._hlo import Collective, CollectiveBytes, collective_bytes, parse_collectives
from compams_jax.wire._two_phase import chunk_size, two_phase_average

__all__ = [
  "Collective",
  "CollectiveBytes",
  "all_workers",
  "average",
  "chunk_size",
  "collective_bytes",
  "num_workers",
  "parse_collectives",
  "recording",
  "sum_over_workers",
  "two_phase_average",
  "wire_bytes",
  "worker_index",
]
