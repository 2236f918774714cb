"""1-bit Adam's preconditioner: a dense warm-up, then frozen variance and compressed momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.base import Compressor
from compams_jax._src.keys import step_key
from compams_jax._src.tree import check_tree, encode_tree
from compams_jax._src.validate import (
  check_axis_name,
  check_compressor,
  check_per_worker,
  check_seed,
  check_updates,
)
from compams_jax._src.workers import PerWorker, local_update, per_worker_zeros
from compams_jax.compressors import identity, scaled_sign
from compams_jax.transforms import _average
from compams_jax.wire import (
  Wire,
  check_wire,
  chunks_like,
  gather,
  gather_average,
  gather_chunks,
  own_chunks,
  scatter_mean,
)


class OneBitAdamState(NamedTuple):
  """State of `scale_by_onebit_adam`.

  Attributes:
    count: steps taken (replicated).
    mu: the averaged first moment m (replicated).
    nu: the second moment v, frozen after warm-up (replicated).
    residual: each worker's error-feedback residual of its momentum (per worker; on a
      hierarchical mesh, of the device's chunk).
    wire_state: the averaging's own state (the two-phase server residuals), or None.
  """

  count: jax.Array
  mu: Any
  nu: Any
  residual: PerWorker
  wire_state: PerWorker | None = None


def scale_by_onebit_adam(
  compressor: Compressor | None = None,
  *,
  warmup_steps: int = 100,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  seed: int = 0,
) -> optax.GradientTransformation:
  """1-bit Adam's direction m / (sqrt(v) + ε), with the momentum averaged compressed.

  Warm-up (the first `warmup_steps` steps): Adam on the dense average of the gradients
  (one `psum`), m ← β1 m + (1−β1) ḡ, v ← β2 v + (1−β2) ḡ². Afterwards v is frozen and each
  worker i forms its momentum m_i = β1 m + (1−β1) g_i, compresses m_i + e_i with error feedback
  (scaled sign by default: 1 bit per entry and one scale), and all workers set m to the average
  of the compressed momenta. Both phases emit m / (sqrt(v) + ε) (no bias correction). The phase
  is chosen by a `lax.cond` on the replicated step count, so every worker always enters the
  same collectives.

  Caution: a coordinate whose gradient stayed zero through the warm-up (e.g. a weight into a
  ReLU unit that was dead throughout it) keeps v = 0, yet the 1-bit code sends its zero momentum
  as ±scale, so it steps by η·scale/ε: with a tiny ε that can diverge right after the warm-up,
  and a larger ε trains (docs/results.md, the 1-bit Adam rows).

  Args:
    compressor: the momentum compressor (default `cj.compressors.scaled_sign()`).
    warmup_steps: full-precision steps before v is frozen.
    b1: β1, the first-moment decay.
    b2: β2, the second-moment decay.
    eps: ε, added outside the square root.
    axis_name: the mapped axis indexing workers, or None for one worker.
    dense_axis_name: a fast axis averaged densely first (hierarchical meshes, see
      `cj.error_feedback`): each device compresses the momentum of the chunk it owns.
    wire: the wire strategy of the compressed phase (default `cj.wire.gather()`;
      `cj.wire.two_phase()` is 1-bit Adam's own compressed all-reduce).
    seed: seeds randomized compressors.

  Returns:
    An `optax.GradientTransformation` whose state is a `OneBitAdamState`.

  References:
    Tang, Gan, Rajbhandari, Zhang, He, Li, Li, Huang, Liu, Wu, "1-bit Adam: Communication
    Efficient Large-Scale Training with Adam's Convergence Speed", ICML 2021.
  """
  compressor = scaled_sign() if compressor is None else check_compressor(compressor)
  check_axis_name(axis_name)
  check_axis_name(dense_axis_name, "dense_axis_name")
  check_seed(seed)
  wire = gather() if wire is None else check_wire(wire)
  if isinstance(warmup_steps, bool) or (
    isinstance(warmup_steps, (int, float))
    and (warmup_steps != int(warmup_steps) or warmup_steps < 0)
  ):
    raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}.")
  dense = identity()  # The warm-up's full-precision average: one psum of the gradients.
  marker = dict(sum_invariant=True) if dense_axis_name is None else dict(params_like=False)

  def init_fn(params):
    check_tree(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    value = chunks_like(params, dense_axis_name)
    residual = per_worker_zeros(value, what="1-bit Adam momentum residuals", **marker)
    return OneBitAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=zeros,
      nu=zeros,
      residual=residual,
      wire_state=_average.init(wire, value, axis_name, compressor),
    )

  def warmup(updates, state):
    value = scatter_mean(updates, dense_axis_name)
    gbar = gather_average(dense, encode_tree(dense, value), value, axis_name=axis_name)
    gbar = gather_chunks(gbar, updates, dense_axis_name)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, gbar)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, gbar)
    return mu, nu, state.residual, state.wire_state

  def compressed(updates, state):
    key = step_key(compressor, seed, state.count, axis_name, dense_axis_name)
    value = scatter_mean(updates, dense_axis_name)
    mu = own_chunks(state.mu, dense_axis_name)
    momentum = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, value)
    codec = _average.codec(wire, compressor, axis_name)

    # Send C(m_i + e_i), keep e_i ← m_i + e_i − C(m_i + e_i); every worker takes the average.
    mu, residual, wire_state = _average.compress_and_average(
      wire,
      codec,
      momentum,
      state.residual.value,
      state.wire_state,
      key=key,
      axis_name=axis_name,
      what="scale_by_onebit_adam",
      dense_axis_name=dense_axis_name,
      shard_specs=state.residual.shard_specs,
    )
    mu = jax.tree.map(
      lambda m, v: m.astype(v.dtype), gather_chunks(mu, updates, dense_axis_name), updates
    )
    return mu, state.nu, state.residual.replace(residual), wire_state

  @local_update
  def update_fn(updates, state, params=None):
    del params
    check_updates(updates, state.mu, "scale_by_onebit_adam")
    where = (axis_name, dense_axis_name)
    check_per_worker(updates, state.residual.value, where, "scale_by_onebit_adam")
    mu, nu, residual, wire_state = jax.lax.cond(
      state.count < warmup_steps, warmup, compressed, updates, state
    )
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return out, OneBitAdamState(
      count=optax.safe_increment(state.count),
      mu=mu,
      nu=nu,
      residual=residual,
      wire_state=wire_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)
