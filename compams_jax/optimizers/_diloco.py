"""DiLoCo: local SGD whose periodic pseudo-gradient exchange may be compressed (SparseLoCo)."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.axis import _names, varying_axes
from compams_jax._src.validate import check_axis_name
from compams_jax._src.workers import GlobalParams, PerWorker, restore, strip
from compams_jax.compressors import Compressor, identity
from compams_jax.optimizers._communicate import communicate
from compams_jax.predictors import Predictor
from compams_jax.wire import Wire, agree, all_of_worker, all_workers, mean_over

DILOCO_FEEDBACKS = ("ef", "none")

# DiLoCo's outer optimizer (the paper; torchtitan and MaxText use the same values).
NESTEROV_OUTER = optax.sgd(0.7, momentum=0.9, nesterov=True)


class DiLoCoState(NamedTuple):
  """State of `diloco`.

  Attributes:
    count: inner steps taken (replicated); a synchronization follows every `sync_every`-th.
    inner_state: each worker's inner optimizer state (per worker), kept across syncs.
    params: θ, the synchronized parameters (replicated; `GlobalParams`).
    sync_state: the state of `optax.chain(averaging, outer)`: the exchange's (residuals per
      worker) and the outer optimizer's (momentum, replicated).
    skipped: syncs skipped because a pseudo-gradient was not finite (replicated).
    disagreements: syncs after which the workers' θ differed (`check_agreement=True`; else 0).
  """

  count: jax.Array
  inner_state: PerWorker
  params: GlobalParams
  sync_state: Any
  skipped: jax.Array
  disagreements: jax.Array


def fingerprint(tree: Any) -> jax.Array:
  """A position-sensitive uint32 checksum of a pytree's bits (wrapping arithmetic)."""
  total = jnp.zeros([], jnp.uint32)
  for i, x in enumerate(jax.tree.leaves(tree)):
    x = jnp.ravel(x)
    if x.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = x.astype(jnp.uint32)
    weights = (jnp.arange(x.size, dtype=jnp.uint32) % jnp.uint32(65521)) * 2 + jnp.uint32(1)
    total = (
      total * jnp.uint32(16777619) + jnp.uint32(i + 1) + jnp.sum(bits * weights, dtype=jnp.uint32)
    )
  return total


def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones([], jnp.bool_)


def diloco(
  inner: optax.GradientTransformation,
  *,
  sync_every: int,
  outer: optax.GradientTransformation = NESTEROV_OUTER,
  compressor: Compressor | None = None,
  feedback: str = "ef",
  feedback_decay: float = 1.0,
  axis_name: str | None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  predictor: Predictor | None = None,
  seed: int = 0,
  stacked: Any = None,
  check_agreement: bool = False,
) -> optax.GradientTransformation:
  """DiLoCo: H local steps of `inner` per worker, then an outer step on the averaged
  pseudo-gradient; with a compressor and error feedback it is SparseLoCo.

  Every step each worker i takes one `inner` step on its own gradient, on its own parameters
  θ_i (the `params` passed to `update`; inner state per worker, kept across syncs). After every
  `sync_every`-th inner step::

      d_i = θ − θ_i                                   # the pseudo-gradient
      e_i ← β·e_i + d_i;   c_i = C(e_i);   e_i ← e_i − c_i     # compressor, feedback="ef"
      c_i = C(d_i)                                    # compressor, feedback="none"
      c_i = d_i                                       # no compressor (dense DiLoCo)
      d̄ = (1/n) Σ_i c_i                               # over axis_name, by the wire strategy
      θ ← θ + outer.update(d̄)
      θ_i ← θ                                         # every worker restarts from θ

  (β = `feedback_decay`.) Nothing is communicated between syncs: the exchange sits in a
  `lax.cond` on the replicated step count. On the sync step the update is θ − θ_i; apply it
  with `cj.apply_updates(params, updates, state)`, which returns θ exactly (params + (θ −
  params) is not θ bit for bit); `cj.data_parallel_step` does, so after every sync all
  workers' parameters are equal, bit for bit.

  With `dense_axis_name` (a hierarchical mesh: slices on `axis_name`, fast links inside on
  `dense_axis_name`) the inner gradient is averaged densely over the fast axis every step, so
  a slice's devices hold one model; the sync then compresses each device's chunk of it (the
  hierarchical mode of `cj.error_feedback`).

  A sync at which any worker's pseudo-gradient is not finite is skipped by every worker (one
  `pmin` of a flag): θ, residuals and outer state stay as they were, every worker restarts
  from θ, and a worker whose inner state holds a NaN or Inf restarts it (`inner.init(θ)`).

  Args:
    inner: the inner optimizer, e.g. `optax.adamw(4e-4, weight_decay=0.1)`; purely local
      (no collective).
    sync_every: H ≥ 1, inner steps between synchronizations.
    outer: the outer optimizer on the pseudo-gradient; default `optax.sgd(0.7, momentum=0.9,
      nesterov=True)` (DiLoCo's Nesterov SGD; SparseLoCo: `optax.sgd(0.6)` with error feedback in place of momentum).
    compressor: compresses each worker's (error-corrected) pseudo-gradient, e.g.
      `cj.compressors.chunked_top_k(64, value_bits=2)`; None sends it dense (a psum).
    feedback: "ef" (worker-side error feedback) or "none" (compressed mean), with a compressor.
    feedback_decay: β in (0, 1], the residual's decay (SparseLoCo: 0.95).
    axis_name: the worker axis (mesh axis, pmap or vmap axis_name), or None for one worker.
    dense_axis_name: a fast axis averaged densely every inner step, or None.
    wire: the wire strategy of the exchange (default `cj.wire.gather()`).
    predictor: code each worker's pseudo-gradient as the innovation against a prediction
      both ends form from the previous syncs (`cj.predictive_compression`), e.g.
      `cj.predictors.least_squares()`; needs a compressor.
    seed: seeds randomized compressors (keys derived per sync).
    stacked: which leaves stack layers along axis 0 (see `cj.error_feedback`).
    check_agreement: after every sync, compare a checksum of θ across workers (two 4-byte
      collectives) and count the syncs after which they differed in `disagreements` (they
      never should: every worker decodes the same payloads in the same order).

  Returns:
    An `optax.GradientTransformation` whose state is a `DiLoCoState`. Its `update` needs
    `params` (this worker's θ_i).

  Examples:
    >>> import jax.numpy as jnp, optax, compams_jax as cj
    >>> tx = cj.diloco(optax.adam(1e-2), sync_every=4, axis_name=None)
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    ...   params = cj.apply_updates(params, updates, state)
    >>> bool(state.params.fresh), bool(jnp.all(params["w"] == state.params.value["w"]))
    (True, True)

  References:
    Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
    arXiv 2311.08105; Sarfi et al., "SparseLoCo: Communication-Efficient Training with Sparse
    Pseudo-Gradients", arXiv 2508.15706.
  """
  if (
    isinstance(sync_every, bool)
    or not isinstance(sync_every, numbers.Integral)
    or int(sync_every) < 1
  ):
    raise ValueError(f"diloco: sync_every must be an int ≥ 1, got {sync_every!r}.")
  sync_every = int(sync_every)
  if feedback not in DILOCO_FEEDBACKS:
    raise ValueError(f"diloco: feedback must be one of {DILOCO_FEEDBACKS}, got {feedback!r}.")
  if (
    isinstance(feedback_decay, bool)
    or not isinstance(feedback_decay, numbers.Real)
    or not 0.0 < float(feedback_decay) <= 1.0
  ):
    raise ValueError(f"diloco: feedback_decay must be in (0, 1], got {feedback_decay!r}.")
  check_axis_name(axis_name)
  check_axis_name(dense_axis_name, "dense_axis_name")
  for name, tx in (("inner", inner), ("outer", outer)):
    if not isinstance(tx, optax.GradientTransformation):
      raise TypeError(f"diloco: {name} must be an optax.GradientTransformation, got {tx!r}.")
  if compressor is None:
    if predictor is not None:
      raise ValueError("diloco: predictor= codes a compressed innovation: it needs a compressor.")
    if feedback_decay != 1.0:
      raise ValueError("diloco: feedback_decay decays an error residual: it needs a compressor.")
    # Dense DiLoCo: the pseudo-gradients are summed by one psum (identity is summable).
    compressor, feedback = identity(), "none"
  elif feedback == "none" and feedback_decay != 1.0:
    raise ValueError("diloco: feedback_decay needs feedback='ef' (there is no residual).")
  elif predictor is not None and feedback_decay != 1.0:
    raise ValueError("diloco: feedback_decay is not supported with a predictor.")
  extra = {"decay": float(feedback_decay)} if feedback_decay != 1.0 else {}
  exchange = communicate(
    compressor,
    feedback=feedback,
    predictor=predictor,
    axis_name=axis_name,
    dense_axis_name=dense_axis_name,
    wire=wire,
    seed=seed,
    stacked=stacked,
    **extra,
  )
  # Every device agrees on the skip: with a dense axis, each device holds its own copy of its
  # slice's model (equal in value, device-varying in type).
  every = axis_name if dense_axis_name is None else (axis_name, dense_axis_name)
  sync_tx = optax.chain(exchange, outer)

  def init_fn(params):
    inner_state = jax.tree.map(lambda x: jnp.asarray(x)[None], inner.init(params))
    return DiLoCoState(
      count=jnp.zeros([], jnp.int32),
      inner_state=PerWorker(inner_state, what="DiLoCo inner optimizer state", params_like=False),
      params=GlobalParams(jax.tree.map(jnp.array, params), jnp.zeros([], jnp.bool_)),
      sync_state=sync_tx.init(params),
      skipped=jnp.zeros([], jnp.int32),
      disagreements=jnp.zeros([], jnp.int32),
    )

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("diloco: update needs params (this worker's parameters θ_i).")
    if dense_axis_name is not None:
      grads = mean_over(grads, dense_axis_name)  # the fast links: one model per slice
    inner_updates, inner_state = inner.update(grads, strip(state.inner_state).value, params)
    count = optax.safe_increment(state.count)
    theta = state.params.value

    # The inner state stays out of the conditional (only this worker's finiteness flag goes in)
    # and is selected after it, elementwise. The inner updates go in and the updates come out:
    # between syncs the same buffer, at a sync θ − θ_i written over it.
    finite = _all_finite(inner_state)

    def sync(updates, sync_state):
      local = optax.apply_updates(params, updates)
      pseudo_gradient = jax.tree.map(lambda t, x: t - x, theta, local)
      # Every device agrees (one pmin) to skip the exchange if any pseudo-gradient is not
      # finite: θ, residuals and outer state stay as they were.
      ok = all_workers(_all_finite(pseudo_gradient), every)

      def exchange(sync_state):
        step, sync_state = sync_tx.update(pseudo_gradient, sync_state, theta)
        return sync_state, optax.apply_updates(theta, step)

      sync_state, new_theta = jax.lax.cond(ok, exchange, lambda s: (s, theta), sync_state)
      # A worker whose inner state is no longer finite restarts it from θ.
      restart = ~all_of_worker(finite, every)
      differ = jnp.zeros([], jnp.bool_)
      if check_agreement:
        differ = ~agree(fingerprint(new_theta), axis_name)
      updates = jax.tree.map(lambda t, p: t - p, new_theta, params)
      return updates, sync_state, new_theta, restart, ~ok, differ

    def carry_on(updates, sync_state):
      # False, typed as the sync branch's flag: varying over the worker axes it varies along.
      axes = varying_axes(finite) & set(() if every is None else _names(every))
      no = jnp.zeros([], jnp.bool_)
      no = jax.lax.pcast(no, tuple(sorted(axes)), to="varying") if axes else no
      return updates, sync_state, theta, no, jnp.zeros([], jnp.bool_), jnp.zeros([], jnp.bool_)

    synced = count % sync_every == 0
    updates, sync_state, theta, restart, skip, differ = jax.lax.cond(
      synced, sync, carry_on, inner_updates, state.sync_state
    )
    fresh = jax.tree.map(lambda x, y: jnp.asarray(x, y.dtype), inner.init(theta), inner_state)
    inner_state = jax.tree.map(lambda r, o: jnp.where(restart, r, o), fresh, inner_state)
    return updates, DiLoCoState(
      count=count,
      inner_state=restore(strip(state.inner_state).replace(inner_state)),
      params=GlobalParams(theta, synced),
      sync_state=sync_state,
      skipped=state.skipped + skip.astype(jnp.int32),
      disagreements=state.disagreements + differ.astype(jnp.int32),
    )

  return optax.GradientTransformation(init_fn, update_fn)
