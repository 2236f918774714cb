"""Optimizer state on a device mesh: partition specs, sharded `init`, the bytes one step sends
(from compiled HLO), and resizing per-worker state to another worker count."""

from compams_jax._src.workers import worker_state
from compams_jax.sharding._bytes import compile_step, step_bytes
from compams_jax.sharding._resize import resize_workers
from compams_jax.sharding._specs import init, init_specs, state_specs

__all__ = [
  "compile_step",
  "init",
  "init_specs",
  "resize_workers",
  "state_specs",
  "step_bytes",
  "worker_state",
]
