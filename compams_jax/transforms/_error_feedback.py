"""Compressed averaging over workers, with and without worker-side error feedback."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.axis import AxisName
from compams_jax._src.base import Compressor
from compams_jax._src.keys import step_key
from compams_jax._src.shards import leaf_axes, leaf_specs, map_shards, sharded_axes
from compams_jax._src.tree import check_tree, stacked_flags
from compams_jax._src.validate import (
  check_axis_name,
  check_compressor,
  check_decay,
  check_per_worker,
  check_seed,
  check_updates,
  warn_if_not_contractive,
)
from compams_jax._src.workers import PerWorker, local_update, per_worker_zeros
from compams_jax.transforms import _average
from compams_jax.wire import Wire, check_wire, chunks_like, gather, gather_chunks, scatter_mean


class ErrorFeedbackState(NamedTuple):
  """State of `error_feedback`.

  Attributes:
    residual: each worker's error residual e (per worker; leading worker axis). On a
      hierarchical mesh it is the residual of the device's chunk (1/k of each leaf).
    count: steps taken (replicated); with the seed it determines the step's PRNG keys.
    wire_state: the wire strategy's own state (the two-phase server residuals), or None.
  """

  residual: PerWorker
  count: jax.Array
  wire_state: PerWorker | None = None


class CompressedMeanState(NamedTuple):
  """State of `compressed_mean`.

  Attributes:
    count: the step count that derives the PRNG keys (replicated).
    wire_state: the wire strategy's own state, or None.
  """

  count: jax.Array
  wire_state: PerWorker | None = None


def _residual_marker(dense_axis_name: AxisName | None) -> dict[str, Any]:
  if dense_axis_name is None:
    return dict(what="error-feedback residuals", sum_invariant=True)
  return dict(
    what="hierarchical error-feedback residuals (tied to the chunk layout of the dense axis)",
    params_like=False,
    per_device="leaves",
  )


def _stacked_layers(stacked: Any, dense_axis_name: AxisName | None):
  """value -> per-leaf stacked flags (None without a spec)."""
  if stacked is not None and dense_axis_name is not None:
    raise ValueError(
      "stacked= compresses each layer on its own, but dense_axis_name splits every leaf into "
      "flat chunks; use one or the other."
    )
  return lambda value: stacked_flags(stacked, value)


def _averaging(compressor, wire, *, seed, axis_name, dense_axis_name, stacked, what, decay=1.0):
  """The checked wire (default gather) and the step the averaging transforms take: (updates,
  residual or None, wire state, count, the residual's shard specs) -> (the average over
  workers, the new residual, the wire state)."""
  check_compressor(compressor)
  check_axis_name(axis_name)
  check_axis_name(dense_axis_name, "dense_axis_name")
  check_seed(seed)
  wire = gather() if wire is None else check_wire(wire)
  layers = _stacked_layers(stacked, dense_axis_name)

  def average(updates, residual, wire_state, count, shard_specs=None):
    key = step_key(compressor, seed, count, axis_name, dense_axis_name)
    if dense_axis_name is not None and sharded_axes(updates, shard_specs):
      return _hierarchical_on_shards(
        chunked, updates, residual, wire_state, key, axis_name, dense_axis_name, what, shard_specs
      )
    return chunked(updates, residual, wire_state, key, shard_specs)

  def chunked(updates, residual, wire_state, key, shard_specs=None):
    value = scatter_mean(updates, dense_axis_name)  # hierarchical: this device's chunk
    if residual is not None:
      check_updates(value, residual, what)
    if not jax.tree.leaves(value):
      return updates, residual, wire_state
    codec = _average.codec(wire, compressor, axis_name, layers(value))
    # Send C(g + e) and keep e ← g + e − C(g + e) (no residual: send C(g), keep nothing), then
    # average what the workers sent (on each device's own shards when the parameters are
    # sharded inside a worker).
    mean, new_residual, wire_state = _average.compress_and_average(
      wire,
      codec,
      value,
      residual,
      wire_state,
      key=key,
      axis_name=axis_name,
      what=what,
      dense_axis_name=dense_axis_name,
      shard_specs=shard_specs,
      decay=decay,
    )
    return gather_chunks(mean, updates, dense_axis_name), new_residual, wire_state

  return wire, average


def _hierarchical_on_shards(
  chunked, updates, residual, wire_state, key, axis_name, dense_axis_name, what, specs
):
  """The hierarchical average of parameters sharded over other mesh axes: on each device's own
  shard of every leaf (through one nested `shard_map` over the sharding axes), the shard is
  the leaf that is reduce-scattered over the dense axis, compressed chunk-wise, averaged over
  the worker axis and all-gathered back; each leaf's chunk residual is the device's own
  (`PerWorker.per_device == "leaves"`, split over the leaf's axes)."""
  if wire_state is not None:
    raise ValueError(
      f"{what}: cj.wire.two_phase() with dense_axis_name={dense_axis_name!r} on parameters "
      f"sharded over {sharded_axes(updates, specs)} is not supported; use cj.wire.gather()."
    )
  axes = leaf_axes(leaf_specs(updates, specs))
  r_leaves = [] if residual is None else jax.tree.leaves(residual)
  if residual is not None and len(r_leaves) != len(axes):
    raise ValueError(f"{what}: {len(r_leaves)} residuals for {len(axes)} gradient leaves.")

  def fn(trees, k, flat):
    r = None if residual is None else jax.tree.unflatten(jax.tree.structure(residual), list(flat))
    mean, new_residual, _ = chunked(trees[0], r, None, k)
    return (mean, *([] if residual is None else jax.tree.leaves(new_residual)))

  outs = map_shards(
    fn,
    (updates,),
    key,
    outputs=1,
    worker_axes=(axis_name, dense_axis_name),
    what=what,
    specs=specs,
    flat=tuple(zip(r_leaves, axes)),
  )
  new_residual = (
    None if residual is None else jax.tree.unflatten(jax.tree.structure(residual), list(outs[1:]))
  )
  return outs[0], new_residual, None


def error_feedback(
  compressor: Compressor,
  *,
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  seed: int = 0,
  residual_dtype: Any = None,
  stacked: Any = None,
  decay: float = 1.0,
) -> optax.GradientTransformation:
  """Compresses each worker's gradient with error feedback and averages over workers.

  Per worker i at step t (e₀ = 0)::

      g̃ = C(g + e);   e ← e + g − g̃;   send g̃
      output (1/n) Σ_i g̃_i          # identical on every worker

  With `decay` β < 1 the residual decays before it is added (SparseLoCo's e ← β·e + g, then
  g̃ = C(e), e ← e − g̃).

  The average is computed by the `wire` strategy, whose collectives carry the compressed
  payloads: `cj.wire.gather()` (default; the paper's algorithm) or `cj.wire.two_phase()` (a
  compressed all-reduce whose bytes do not grow with n; see its docstring).

  With `dense_axis_name` (a hierarchical mesh, e.g. ("dcn", "ici")), the gradient is first
  averaged densely over the fast axis by a reduce-scatter: each device then compresses, with
  its own residual, only the chunk it owns (each leaf flattened, zero-padded to a multiple of
  k = |dense axis|, split into k contiguous chunks; the chunk is the compressor's block), the
  chunks are averaged over `axis_name` by the wire strategy, and a dense all-gather over the
  fast axis rebuilds the whole update. Only the slow axis carries compressed bytes.

  Chain it with `optax.scale_by_amsgrad` for COMP-AMS.

  Args:
    compressor: a `compams_jax.compressors` compressor.
    axis_name: the mapped axis (of `jax.shard_map`, `jax.pmap` or `jax.vmap`) that indexes
      workers, or None for a single worker.
    dense_axis_name: a fast axis reduced densely before compression, or None.
    wire: the wire strategy (default `cj.wire.gather()`).
    seed: seeds the PRNG keys of randomized compressors (derived per step, and per worker for
      private randomness).
    residual_dtype: dtype of the residuals (default: the parameters' dtype), e.g. float32
      for bfloat16 parameters.
    stacked: which leaves stack layers along axis 0 (`nnx.scan`, linen `scan`, scanned
      layers): a pytree prefix of the parameters of bools, e.g. `{"blocks": True, "embed":
      False}`. Each layer of a stacked leaf is then its own block (one top-k budget, one sign
      scale per layer), through one vmap over the layers. None: no leaf is stacked.
    decay: β in [0, 1], the residual's decay (1: the paper's error feedback).

  Returns:
    An `optax.GradientTransformation` whose state is an `ErrorFeedbackState`.

  Examples:
    >>> import jax.numpy as jnp, optax, compams_jax as cj
    >>> tx = optax.chain(cj.error_feedback(cj.compressors.top_k(0.5)), optax.sgd(0.1))
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.1, -0.4, 0.3, 0.2])}, state, params)
    >>> updates["w"]
    Array([-0.  ,  0.04, -0.03, -0.  ], dtype=float32)
    >>> cj.sharding.worker_state(state, 0)[0].residual.value["w"]   # worker 0's residual
    Array([0.1, 0. , 0. , 0.2], dtype=float32)

  References:
    Li, Karimi, Li, "On Distributed Adaptive Optimization with Gradient Compression", ICLR 2022;
    Karimireddy et al., "Error Feedback Fixes SignSGD...", ICML 2019.
  """
  wire, average = _averaging(
    compressor,
    wire,
    seed=seed,
    axis_name=axis_name,
    dense_axis_name=dense_axis_name,
    stacked=stacked,
    what="error_feedback",
    decay=check_decay(decay),
  )

  def init_fn(params):
    check_tree(params)
    value = chunks_like(params, dense_axis_name)
    warn_if_not_contractive(compressor, value, "error_feedback")
    residual = per_worker_zeros(value, residual_dtype, **_residual_marker(dense_axis_name))
    return ErrorFeedbackState(
      residual=residual,
      count=jnp.zeros([], jnp.int32),
      wire_state=_average.init(wire, value, axis_name, compressor),
    )

  @local_update
  def update_fn(updates, state, params=None):
    del params
    residual = state.residual.value
    check_per_worker(updates, residual, (axis_name, dense_axis_name), "error_feedback")
    mean, new_residual, wire_state = average(
      updates, residual, state.wire_state, state.count, state.residual.shard_specs
    )
    return mean, ErrorFeedbackState(
      residual=state.residual.replace(new_residual),
      count=optax.safe_increment(state.count),
      wire_state=wire_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def compressed_mean(
  compressor: Compressor,
  *,
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  seed: int = 0,
  stacked: Any = None,
) -> optax.GradientTransformation:
  """Averages C(g_i) over workers, without error feedback.

  Args:
    compressor: a `compams_jax.compressors` compressor.
    axis_name: the mapped axis that indexes workers, or None for a single worker.
    dense_axis_name: a fast axis reduced densely before compression (see `error_feedback`).
    wire: the wire strategy (default `cj.wire.gather()`).
    seed: seeds the PRNG keys of randomized compressors.
    stacked: which leaves stack layers along axis 0 (see `error_feedback`).

  Returns:
    An `optax.GradientTransformation` whose state is a `CompressedMeanState`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.compressed_mean(cj.compressors.block_sign())
    >>> g = {"w": jnp.array([1.0, -3.0])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([ 2., -2.], dtype=float32)
  """
  wire, average = _averaging(
    compressor,
    wire,
    seed=seed,
    axis_name=axis_name,
    dense_axis_name=dense_axis_name,
    stacked=stacked,
    what="compressed_mean",
  )

  def init_fn(params):
    check_tree(params)
    value = chunks_like(params, dense_axis_name)
    return CompressedMeanState(
      count=jnp.zeros([], jnp.int32), wire_state=_average.init(wire, value, axis_name, compressor)
    )

  @local_update
  def update_fn(updates, state, params=None):
    del params
    check_tree(updates)
    check_per_worker(updates, None, (axis_name, dense_axis_name), "compressed_mean")
    mean, _, wire_state = average(updates, None, state.wire_state, state.count)
    return mean, CompressedMeanState(count=optax.safe_increment(state.count), wire_state=wire_state)

  return optax.GradientTransformation(init_fn, update_fn)
