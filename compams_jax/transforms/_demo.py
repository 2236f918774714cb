"""DeMo's momentum exchange: each worker keeps a decaying momentum and sends its compressed part."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.base import Compressor
from compams_jax._src.tree import check_tree
from compams_jax._src.validate import (
  check_decay,
  check_per_worker,
)
from compams_jax._src.workers import PerWorker, local_update, per_worker_zeros
from compams_jax.transforms import _average
from compams_jax.transforms._error_feedback import _averaging, _residual_marker
from compams_jax.wire import Wire, chunks_like


class DecoupledMomentumState(NamedTuple):
  """State of `decoupled_momentum`.

  Attributes:
    momentum: each worker's momentum δ, less what it has sent (per worker; leading worker
      axis). On a hierarchical mesh it is the momentum of the device's chunk.
    count: steps taken (replicated); with the seed it determines the step's PRNG keys.
    wire_state: the wire strategy's own state (the two-phase server residuals), or None.
  """

  momentum: PerWorker
  count: jax.Array
  wire_state: PerWorker | None = None


def decoupled_momentum(
  compressor: Compressor,
  *,
  decay: float = 0.999,
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  seed: int = 0,
  momentum_dtype: Any = None,
  stacked: Any = None,
) -> optax.GradientTransformation:
  """DeMo's decoupled momentum: each worker sends the compressed part of a decaying momentum.

  Per worker i at step t (δ₀ = 0), on its input u (DeMo feeds it lr·g)::

      δ ← β·δ + u;   send C(δ);   δ ← δ − decode(C(δ))     # the sent part leaves δ
      output the wire's average of what the workers sent    # identical on every worker

  It is the error-feedback kernel with a decaying residual (`compress_with_feedback` with
  `decay=β`): δ is error feedback's residual, and with β = 1 this transform is
  `cj.error_feedback`. DeMo averages with `cj.wire.gather(average="senders")`: per entry (per
  coefficient for a transform-domain code such as `cj.compressors.dct_top_k`), the mean over
  the workers that sent it. `cj.demo` chains it with the learning rate, the sign and decoupled
  weight decay.

  Args:
    compressor: a `compams_jax.compressors` compressor (DeMo's: a DCT-domain top-k).
    decay: β, the momentum's decay, in [0, 1] (DeMo's `compression_decay`).
    axis_name: the mapped axis (of `jax.shard_map`, `jax.pmap` or `jax.vmap`) that indexes
      workers, or None for a single worker.
    dense_axis_name: a fast axis reduced densely before compression (see `cj.error_feedback`).
    wire: the wire strategy (default `cj.wire.gather()`, the plain mean; DeMo's is
      `cj.wire.gather(average="senders")`).
    seed: seeds the PRNG keys of randomized compressors.
    momentum_dtype: dtype of the momenta (default: the parameters' dtype).
    stacked: which leaves stack layers along axis 0, each layer its own block (see
      `cj.error_feedback`).

  Returns:
    An `optax.GradientTransformation` whose state is a `DecoupledMomentumState`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.transforms.decoupled_momentum(cj.compressors.top_k(0.5), decay=0.5)
    >>> u = {"w": jnp.array([1.0, -4.0, 2.0, 0.5])}
    >>> state = tx.init(u)
    >>> out, state = tx.update(u, state)          # δ = u: sends its two largest entries
    >>> out["w"]
    Array([ 0., -4.,  2.,  0.], dtype=float32)
    >>> out, state = tx.update(u, state)          # δ = 0.5·[1, 0, 0, 0.5] + u
    >>> out["w"]
    Array([ 0., -4.,  2.,  0.], dtype=float32)
    >>> cj.sharding.worker_state(state, 0).momentum.value["w"]
    Array([1.5 , 0.  , 0.  , 0.75], dtype=float32)

  References:
    Peng et al., "DeMo: Decoupled Momentum Optimization", arXiv:2411.19870, 2024.
  """
  decay = check_decay(decay)
  wire, average = _averaging(
    compressor,
    wire,
    seed=seed,
    axis_name=axis_name,
    dense_axis_name=dense_axis_name,
    stacked=stacked,
    what="decoupled_momentum",
    decay=decay,
  )
  marker = _residual_marker(dense_axis_name)
  marker["what"] = (
    "DeMo momenta" if dense_axis_name is None else "hierarchical DeMo momenta (chunk layout)"
  )

  def init_fn(params):
    check_tree(params)
    value = chunks_like(params, dense_axis_name)
    return DecoupledMomentumState(
      momentum=per_worker_zeros(value, momentum_dtype, **marker),
      count=jnp.zeros([], jnp.int32),
      wire_state=_average.init(wire, value, axis_name),
    )

  @local_update
  def update_fn(updates, state, params=None):
    del params
    momentum = state.momentum.value
    check_per_worker(updates, momentum, (axis_name, dense_axis_name), "decoupled_momentum")
    # δ ← β·δ + u, send C(δ), keep δ − C(δ) (the error-feedback kernel with decay=β), then
    # average what the workers sent by the wire strategy.
    mean, new_momentum, wire_state = average(
      updates, momentum, state.wire_state, state.count, state.momentum.shard_specs
    )
    return mean, DecoupledMomentumState(
      momentum=state.momentum.replace(new_momentum),
      count=optax.safe_increment(state.count),
      wire_state=wire_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)
