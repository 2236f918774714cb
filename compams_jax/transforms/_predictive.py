"""Predictive (innovation) compression: send C(x_t − p_t), p_t formed from past reconstructions."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax._src.base import Compressor
from compams_jax._src.feedback import TreeCodec, compress_with_feedback
from compams_jax._src.keys import step_key
from compams_jax._src.shards import map_shards, sharded_axes
from compams_jax._src.tree import check_tree, stacked_flags
from compams_jax._src.validate import (
  check_axis_name,
  check_compressor,
  check_per_worker,
  check_seed,
  check_updates,
  warn_if_not_contractive,
)
from compams_jax._src.workers import PerWorker, local_update, per_worker_zeros
from compams_jax.predictors import Fixed, Predictor, fixed
from compams_jax.wire import (
  Wire,
  check_wire,
  chunks_like,
  gather,
  gather_chunks,
  num_workers,
  scatter_mean,
)


class PredictiveState(NamedTuple):
  """State of `predictive_compression`.

  Attributes:
    reconstruction: each worker's last reconstruction x̂_{t−1,i} (encoder side; per worker).
    residual: each worker's error-feedback residual (per worker), or None without feedback.
    average: the receivers' average reconstruction x̄_{t−1} (replicated; what was output).
    count: steps taken (replicated); derives the PRNG keys.
  """

  reconstruction: PerWorker
  residual: PerWorker | None
  average: Any
  count: jax.Array


def predictive_compression(
  compressor: Compressor,
  *,
  predictor: Predictor | None = None,
  feedback: str = "ef",
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  seed: int = 0,
  stacked: Any = None,
) -> optax.GradientTransformation:
  """Compresses the innovation of each worker's vector against a shared-knowledge prediction.

  Sender i and every receiver hold x̂_{t−1,i}, the last reconstruction (receivers only through
  the average, see `Predictor`). At step t with input x_t (gradient or momentum)::

      p = ρ_t ⊙ x̂_{t−1}                     # ρ_t from the predictor, the same on all workers
      u = x_t + e − p     (e = 0 without error feedback)
      send C(u);   x̂_t = p + C(u);   e ← x_t + e − x̂_t
      output x̄_t = ρ_t x̄_{t−1} + (1/n) Σ_i C(u_i)   # = (1/n) Σ_i x̂_{t,i}

  Without error feedback, closed-loop prediction alone keeps the compression error from
  accumulating: the error of x̂_t is that of one compression of the innovation, never a sum.
  Randomized compressors with error bounded only in expectation (unscaled random-k, qsgd) are
  admissible, with or without error feedback (Adikari & Draper), provided they contract:
  E‖C(x) − x‖² ≤ q²‖x‖² with q < 1. Per-leaf qsgd with few levels does not on large leaves
  (q² = min(d/s², √d/s), e.g. 90 for s = 2 on a 32,768-entry kernel): with error feedback or a
  fixed ρ it diverges (docs/predictive.md); `init` warns when q² ≥ 1.

  Caution — error feedback with a FIXED ρ > 0 is unstable for sparse and randomized
  compressors. The prediction ρ x̂_{t−1} already lacks the last error (x̂_{t−1} = x_{t−1} +
  e_{t−2} − e_{t−1}), and the residual adds it again, so the innovation carries
  (1 + ρ) e_{t−1} − ρ e_{t−2}; a coordinate that top-k/random-k skips grows by up to 1/(1 − ρ)
  per echo; codes that send every coordinate (block-sign) stay stable (docs/predictive.md,
  "What the fixed-ρ + error-feedback instability looks like"). The least-squares
  predictor is stable with error feedback (it lowers ρ when the echo would grow), and fixed ρ
  is fine without error feedback. Constructing the unstable combination warns.

  Every receiver computes x̄ with the same operations on the same gathered payloads, so x̄ is
  bit-identical on all devices; with one worker it is the sender's own x̂. With n workers x̄
  equals the mean of the senders' x̂ up to floating-point summation order.

  Memory per device: the encoder reconstruction, the residual (with feedback) and the receiver
  average: three parameter-sized buffers, independent of the number of workers.

  Args:
    compressor: compresses the innovation.
    predictor: `cj.predictors.fixed(rho)` (default ρ = 0.9) or `cj.predictors.least_squares()`.
    feedback: "ef" (default) keeps a worker-side residual of what compression dropped (error
      feedback); "none" keeps none (closed-loop prediction alone).
    axis_name: the mapped axis indexing workers, or None for one worker.
    dense_axis_name: a fast axis reduced densely first (see `cj.error_feedback`): every device
      codes the innovation of the chunk it owns; the receiver average stays whole.
    wire: the wire strategy; it must declare `exact_mean` (default `cj.wire.gather()`;
      not two-phase, nor gather's `average="senders"` or `clip="median"`).
    seed: seeds the PRNG keys of randomized compressors.
    stacked: which leaves stack layers along axis 0 (a pytree prefix of bools, as for
      `cj.error_feedback`): each layer is then its own block, with its own ρ.

  Returns:
    An `optax.GradientTransformation` with a `PredictiveState`.

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.predictive_compression(cj.compressors.top_k(0.5),
    ...                                predictor=cj.predictors.fixed(1.0), feedback="none")
    >>> x = {"w": jnp.array([4.0, 3.0, 2.0, 1.0])}
    >>> state = tx.init(x)
    >>> out, state = tx.update(x, state)    # step 1: predicts 0, sends [4, 3, 0, 0]
    >>> out, state = tx.update(x, state)    # step 2: sends the innovation's top half
    >>> out["w"]
    Array([4., 3., 2., 1.], dtype=float32)

  References:
    Adikari, Draper, "Compressing gradients by exploiting temporal correlation in momentum-SGD",
    IEEE JSAIT 2021.
  """
  check_compressor(compressor)
  check_axis_name(axis_name)
  check_axis_name(dense_axis_name, "dense_axis_name")
  check_seed(seed)
  if feedback not in ("ef", "none"):
    raise ValueError(f"predictive_compression feedback must be 'ef' or 'none', got {feedback!r}.")
  error_feedback = feedback == "ef"
  wire = gather() if wire is None else check_wire(wire)
  if not wire.exact_mean:
    raise ValueError(
      f"predictive_compression needs a wire strategy whose output is the mean of what the "
      f"workers sent (exact_mean): its receivers rebuild the senders' reconstructions from "
      f"that mean. Use cj.wire.gather() with its default average='mean' and clip=None (an "
      f"average over senders or a clipped average is not the mean); got {wire!r}."
    )
  if dense_axis_name is None:
    every_device = axis_name
  elif axis_name is None:
    every_device = dense_axis_name
  else:
    every_device = (axis_name, dense_axis_name)  # the predictor's statistics sum every chunk
  marker = {} if dense_axis_name is None else {"params_like": False}
  predictor = fixed() if predictor is None else predictor
  if not isinstance(predictor, Predictor):
    raise TypeError(
      "predictor must be cj.predictors.fixed(rho) or "
      f"cj.predictors.least_squares(), got {predictor!r}."
    )
  if (
    error_feedback
    and isinstance(predictor, Fixed)
    and predictor.rho != 0
    and compressor.deviation != "none"
    and not compressor.sends_every_entry
  ):
    warnings.warn(
      f"predictive_compression with feedback='ef' and a fixed rho={predictor.rho} is "
      f"unstable for {type(compressor).__name__} (the residual is fed back with weight "
      "1 + rho); use cj.predictors.least_squares() or feedback='none'.",
      UserWarning,
      stacklevel=2,
    )

  def init_fn(params):
    check_tree(params)
    value = chunks_like(params, dense_axis_name)
    if error_feedback or isinstance(predictor, Fixed):
      warn_if_not_contractive(compressor, value, "predictive_compression")
    return PredictiveState(
      reconstruction=per_worker_zeros(value, what="predictive encoder reconstructions", **marker),
      residual=per_worker_zeros(value, what="predictive error-feedback residuals", **marker)
      if error_feedback
      else None,
      average=jax.tree.map(jnp.zeros_like, params),
      count=jnp.zeros([], jnp.int32),
    )

  if stacked is not None and dense_axis_name is not None:
    raise ValueError(
      "stacked= codes each layer on its own, but dense_axis_name splits every leaf into flat "
      "chunks; use one or the other."
    )

  def scale(r, h):
    """ρ·h, with a per-layer ρ broadcast over its layer's entries."""
    return (jnp.reshape(r, jnp.shape(r) + (1,) * (h.ndim - jnp.ndim(r))) * h).astype(h.dtype)

  def code(target, previous, key, layers):
    """(the `Compressed` of one step: payload, ρ·x̂ + C(·), residual; ρ)."""
    rho = predictor.coefficients(target, previous, every_device, layers)
    prediction = jax.tree.map(scale, rho, previous)
    # The error-feedback kernel with the prediction as offset: it sends C(target − prediction),
    # reconstructs prediction + C(·) and owes target − reconstruction.
    codec = TreeCodec(compressor, layers)
    out = compress_with_feedback(codec, target, None, key, offset=prediction)
    return out, rho

  def step(value, previous, residual, average, key):
    """(reconstruction, new residual or None, mean of what was sent or None with one worker,
    ρ), on whole leaves or on shards."""
    target = value
    if error_feedback:
      target = jax.tree.map(lambda x, e: x + e, value, residual)
    layers = stacked_flags(stacked, value)
    out, rho = code(target, previous, key, layers)
    if num_workers(axis_name) == 1:
      # The receiver is the sender: take its reconstruction rather than recompute it (XLA may
      # contract ρ·x̄ + c into a fused multiply-add on one side only, 1 ulp apart).
      mean_sent = None
    else:
      mean_sent = wire.average(
        compressor, out.payload, value, axis_name=axis_name, key=key, stacked=layers
      )
    return out.sent, (out.residual if error_feedback else None), mean_sent, rho

  @local_update
  def update_fn(updates, state, params=None):
    del params
    where = (axis_name, dense_axis_name)
    check_per_worker(updates, state.reconstruction.value, where, "predictive_compression")
    previous = state.reconstruction.value
    value = scatter_mean(updates, dense_axis_name)
    check_updates(value, previous, "predictive_compression")
    key = step_key(compressor, seed, state.count, axis_name, dense_axis_name)
    residual = state.residual.value if error_feedback else None

    def finish(reconstruction, mean_sent, rho, average):
      if mean_sent is None:
        own = jax.tree.map(lambda h, u: h.astype(u.dtype), reconstruction, value)
        return own
      return jax.tree.map(lambda r, a, c: scale(r, a) + c, rho, average, mean_sent)

    if sharded_axes(value, state.reconstruction.shard_specs):
      if dense_axis_name is not None:
        raise ValueError(
          f"predictive_compression: dense_axis_name={dense_axis_name!r} reduces whole leaves "
          f"densely over a fast axis, but the gradients are sharded over {sharded_axes(value)}: "
          "with parameters sharded inside a slice, use axis_name alone."
        )
      if compressor.granularity == "model":
        raise ValueError(
          f"predictive_compression: {type(compressor).__name__} with granularity='model' "
          "compresses the model as one block, but the gradients are sharded and no device "
          "holds the model; use a per-leaf code."
        )

      # Compression follows the parameter sharding: every device codes its shard of every leaf
      # (the shard is the block: its own ρ, its own budget) and averages it over the workers.
      def on_shard(trees, k):
        v, prev, avg = trees[:3]
        res = trees[3] if error_feedback else None
        reconstruction, new_residual, mean_sent, rho = step(v, prev, res, avg, k)
        new_average = finish(reconstruction, mean_sent, rho, avg)
        return (new_average, reconstruction) + ((new_residual,) if error_feedback else ())

      trees = (value, previous, state.average) + ((residual,) if error_feedback else ())
      outs = map_shards(
        on_shard,
        trees,
        key,
        outputs=3 if error_feedback else 2,
        worker_axes=where,
        what="predictive_compression",
        specs=state.reconstruction.shard_specs,
      )
      new_average, reconstruction = outs[:2]
      new_residual = outs[2] if error_feedback else None
    else:
      reconstruction, new_residual, mean_sent, rho = step(
        value, previous, residual, state.average, key
      )
      if mean_sent is not None:
        mean_sent = gather_chunks(mean_sent, updates, dense_axis_name)
      new_average = finish(reconstruction, mean_sent, rho, state.average)
      if mean_sent is None:
        new_average = gather_chunks(new_average, updates, dense_axis_name)
    return new_average, PredictiveState(
      reconstruction=state.reconstruction.replace(reconstruction),
      residual=state.residual.replace(new_residual) if error_feedback else None,
      average=new_average,
      count=optax.safe_increment(state.count),
    )

  return optax.GradientTransformation(init_fn, update_fn)
