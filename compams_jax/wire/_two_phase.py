"""The two-phase strategy's transport: an all_to_all of chunk payloads, an all_gather of chunks.

Gathering every worker's payload costs each device n payloads, which grows with n while a
dense ring all-reduce does not (docs/benchmarks.md models where they cross). Two-phase averaging (`compams_jax.transforms`) splits the
vector into n chunks: device j receives only the n payloads of ITS chunk (`exchange`),
averages and recompresses them, and all devices gather the n recompressed chunks (`gather`).
Per device, the bytes handed to XLA are one full payload plus one chunk payload, whatever n is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from compams_jax._src import bucket
from compams_jax._src.axis import AxisName, UnboundAxisError, all_gather_invariant, num_workers
from compams_jax.wire._strategy import Wire


@dataclasses.dataclass(frozen=True)
class TwoPhase(Wire):
  """A compressed all-reduce whose bytes per device do not grow with n.

  The transform using it flattens the error-corrected values into one vector split into n
  chunks (each chunk a block of the compressor). Phase 1: one `all_to_all` hands device j every
  worker's payload of chunk j; device j averages them and recompresses the average with its own
  server-side residual. Phase 2: one `all_gather` brings every device the n recompressed
  chunks. The output is C(avg + s) rather than avg C(g_i + e_i): a second compression with
  its own error feedback, as in 1-bit Adam's compressed all-reduce.

  Collectives per step: 2 (one all_to_all, one all_gather), whatever the number of leaves.

  Attributes:
    num_workers: the number of workers on the worker axis. The server residuals are sized by
      it (one chunk of ⌈size / n⌉ entries per device), so with it given `tx.init(params)` works
      anywhere; without it the worker axis must be bound where the state is initialised
      (`cj.sharding.init`, `cj.data_parallel_step`).
  """

  num_workers: int | None = None
  averages_payloads = False
  exact_mean = False

  def __post_init__(self):
    n = self.num_workers
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
      raise ValueError(f"two_phase(num_workers=...) must be a positive int, got {n!r}.")

  def workers(self, axis_name: AxisName | None, *, at_init: bool = False) -> int:
    """The worker count: the bound axis's size, checked against `num_workers` if given."""
    if axis_name is None:
      return 1
    try:
      n = num_workers(axis_name)
    except UnboundAxisError:
      if at_init and self.num_workers is not None:
        return self.num_workers
      if at_init:
        raise UnboundAxisError(
          axis_name,
          "workers",
          detail="cj.wire.two_phase() sizes its server residuals by the worker count: pass "
          "cj.wire.two_phase(num_workers=n) to initialise with tx.init(params).",
        ) from None
      raise
    if self.num_workers is not None and self.num_workers != n:
      raise ValueError(
        f"cj.wire.two_phase(num_workers={self.num_workers}) runs on axis {axis_name!r} of "
        f"{n} workers: pass the axis's size."
      )
    return n

  def exchange(self, payload: Any, axis_name: AxisName | None) -> Any:
    """Row j of every payload leaf goes to worker j; returns the rows received, one per worker.

    `payload`'s leaves carry a leading axis of n rows (one per destination); so do the
    received leaves (row i came from worker i). One `all_to_all` of all leaves' bytes.
    """
    if axis_name is None:
      return payload
    n = num_workers(axis_name)
    row = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), payload)
    buffer = bucket.pack(payload, lead=1)
    if buffer is None:
      return bucket.unpack(None, row, lead=(n,))
    return bucket.unpack(jax.lax.all_to_all(buffer, axis_name, 0, 0, tiled=False), row)

  def gather(self, payload: Any, axis_name: AxisName | None) -> Any:
    """Every worker's `payload`, stacked along a leading axis (one `all_gather` of bytes)."""
    if axis_name is None:
      return jax.tree.map(lambda x: x[None], payload)
    n = num_workers(axis_name)
    buffer = bucket.pack(payload)
    if buffer is None:
      return bucket.unpack(None, payload, lead=(n,))
    return bucket.unpack(all_gather_invariant(buffer, axis_name), payload)


def two_phase(*, num_workers: int | None = None) -> TwoPhase:
  """The two-phase strategy: a compressed all-reduce whose bytes do not grow with n.

  Args:
    num_workers: the size of the worker axis; give it to initialise the state with
      `tx.init(params)` outside the mapped function (otherwise use `cj.sharding.init`).

  Returns:
    A `TwoPhase` strategy.

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name="data",
    ...                  wire=cj.wire.two_phase(num_workers=8))
    >>> state = tx.init({"w": jnp.zeros(100)})
    >>> state[0].wire_state.value.shape   # this worker's server residual: ⌈100 / 8⌉ entries
    (1, 13)
  """
  return TwoPhase(num_workers=num_workers)
