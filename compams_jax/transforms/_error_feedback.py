"""Compressed averaging over workers, with and without worker-side error feedback."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.base import Compressor
from compams_jax._src.feedback import compress_with_feedback
from compams_jax._src.keys import step_key
from compams_jax._src.tree import check_tree, encode_tree, flat_spec, flatten_tree, unflatten_tree
from compams_jax._src.validate import (
  check_axis_name,
  check_compressor,
  check_seed,
  check_updates,
  warn_if_not_contractive,
)
from compams_jax._src.workers import PerWorker, local, per_worker_zeros, to_per_worker
from compams_jax.wire import average, chunk_size, two_phase_average
from compams_jax.wire import num_workers as num_workers_of

TOPOLOGIES = ("gather", "two_phase")


class ErrorFeedbackState(NamedTuple):
  """State of `error_feedback`.

  Attributes:
    residual: each worker's error residual e (per worker; leading worker axis).
    count: steps taken (replicated); with the seed it determines the step's PRNG keys.
    server_residual: with `topology="two_phase"`, each device's residual of the chunk it
      reduces and recompresses (per device: a flat vector of ceil(size / n) elements); else None.
  """

  residual: PerWorker
  count: jax.Array
  server_residual: PerWorker | None = None


class CompressedMeanState(NamedTuple):
  """State of `compressed_mean`: the step count that derives the PRNG keys (replicated)."""

  count: jax.Array


def error_feedback(
  compressor: Compressor,
  *,
  axis_name: str | None = None,
  seed: int = 0,
  residual_dtype: Any = None,
  topology: str = "gather",
  num_workers: int | None = None,
) -> optax.GradientTransformation:
  """Compresses each worker's gradient with error feedback and averages over workers.

  Per worker i at step t (e₀ = 0)::

      g̃ = C(g + e);   e ← e + g − g̃;   send g̃
      output (1/n) Σ_i g̃_i          # identical on every worker

  The average is computed by a collective that carries the compressed payloads. Two topologies:

  * "gather" (default): the paper's algorithm. Summable payloads travel by `psum`, the others
    by an `all_gather` of the compact payloads (`compams_jax.wire.average`): per device, n
    payloads arrive, so the received bytes grow with n.
  * "two_phase": a compressed all-reduce whose bytes do not grow with n
    (`compams_jax.wire.two_phase_average`). The error-corrected gradients are flattened into one
    vector and split into n chunks; each chunk is a block of the compressor (this replaces the
    per-leaf layout). Device j averages every worker's chunk j and RECOMPRESSES the average with
    its own server-side residual s_j (s_j ← s_j + avg_j − C(avg_j + s_j)) before an
    `all_gather`. The output is therefore C(avg + s) rather than avg C(g_i + e_i): a second
    compression with its own error feedback, as in 1-bit Adam's compressed all-reduce.
    Needs `num_workers` (the size of the axis) to size the server residual at init.

  Chain it with `optax.scale_by_amsgrad` for COMP-AMS.

  Args:
    compressor: a `compams_jax.compressors` compressor.
    axis_name: the mapped axis (of `jax.shard_map` or `jax.pmap`) that indexes workers, or None
      for a single worker.
    seed: seeds the PRNG keys of randomized compressors (derived per step, and per worker for
      private randomness).
    residual_dtype: dtype of the residuals (default: the parameters' dtype).
    topology: "gather" or "two_phase" (see above).
    num_workers: the number of workers on `axis_name`; required for "two_phase".

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
    >>> state[0].residual.value["w"][0]
    Array([0.1, 0. , 0. , 0.2], dtype=float32)

  References:
    Li, Karimi, Li, "On Distributed Adaptive Optimization with Gradient Compression", ICLR 2022;
    Karimireddy et al., "Error Feedback Fixes SignSGD...", ICML 2019.
  """
  check_compressor(compressor)
  check_axis_name(axis_name)
  check_seed(seed)
  if topology not in TOPOLOGIES:
    raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}.")
  if topology == "two_phase":
    if axis_name is None:
      num_workers = 1
    elif isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
      raise ValueError(
        "error_feedback(topology='two_phase') needs num_workers=<size of axis "
        f"{axis_name!r}> (a positive int), got {num_workers!r}."
      )
  workers = num_workers

  def init_fn(params):
    check_tree(params)
    warn_if_not_contractive(compressor, params, "error_feedback")
    server = None
    if topology == "two_phase":
      flat = flat_spec(params)
      server = PerWorker(
        jnp.zeros((1, chunk_size(flat.shape[0], workers)), flat.dtype),
        what="two-phase server residuals (tied to the chunk layout of the worker count)",
        params_like=False,
      )
    return ErrorFeedbackState(
      residual=per_worker_zeros(
        params, residual_dtype, what="error-feedback residuals", sum_invariant=True
      ),
      count=jnp.zeros([], jnp.int32),
      server_residual=server,
    )

  def update_fn(updates, state, params=None):
    del params
    residual = local(state.residual)
    check_updates(updates, residual, "error_feedback")
    key = step_key(compressor, seed, state.count, axis_name)
    if topology == "two_phase":
      corrected = jax.tree.map(lambda g, e: g.astype(e.dtype) + e, updates, residual)
      return _two_phase_update(corrected, updates, state, key)
    out = compress_with_feedback(compressor, updates, residual, key)
    mean = average(
      compressor,
      out.payload,
      updates,
      axis_name=axis_name,
      key=key,
      decoded=jax.tree.map(lambda c, u: c.astype(u.dtype), out.sent, updates),
    )
    return mean, ErrorFeedbackState(
      residual=to_per_worker(out.residual, state.residual), count=optax.safe_increment(state.count)
    )

  def _two_phase_update(corrected, updates, state, key):
    n = num_workers_of(axis_name)
    if n != workers:
      raise ValueError(
        f"error_feedback(topology='two_phase') was built for num_workers="
        f"{workers}, but axis {axis_name!r} has {n} workers."
      )
    if not jax.tree.leaves(corrected):
      return updates, state._replace(count=optax.safe_increment(state.count))
    mean, server, own = two_phase_average(
      compressor,
      flatten_tree(corrected),
      state.server_residual.value[0],
      axis_name=axis_name,
      key=key,
    )
    sent = unflatten_tree(own, corrected)
    new_residual = jax.tree.map(lambda c, s: c - s, corrected, sent)
    return unflatten_tree(mean, updates), ErrorFeedbackState(
      residual=to_per_worker(new_residual, state.residual),
      count=optax.safe_increment(state.count),
      server_residual=state.server_residual.replace(server[None]),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def compressed_mean(
  compressor: Compressor, *, axis_name: str | None = None, seed: int = 0
) -> optax.GradientTransformation:
  """Averages C(g_i) over workers, without error feedback.

  Args:
    compressor: a `compams_jax.compressors` compressor.
    axis_name: the mapped axis that indexes workers, or None for a single worker.
    seed: seeds the PRNG keys of randomized compressors.

  Returns:
    An `optax.GradientTransformation` whose state is a `CompressedMeanState`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.compressed_mean(cj.compressors.block_sign())
    >>> g = {"w": jnp.array([1.0, -3.0])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([ 2., -2.], dtype=float32)
  """
  check_compressor(compressor)
  check_axis_name(axis_name)
  check_seed(seed)

  def init_fn(params):
    check_tree(params)
    return CompressedMeanState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    check_tree(updates)
    key = step_key(compressor, seed, state.count, axis_name)
    payload = encode_tree(compressor, updates, key)
    mean = average(compressor, payload, updates, axis_name=axis_name, key=key)
    return mean, CompressedMeanState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
