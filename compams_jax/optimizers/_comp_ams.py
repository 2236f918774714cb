"""COMP-AMS: compressed gradient averaging with error feedback, then AMSGrad."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import optax

from compams_jax.compressors import Compressor
from compams_jax.optimizers._communicate import check_feedback, communicate
from compams_jax.predictors import Predictor
from compams_jax.transforms import dense_warmup, staged
from compams_jax.wire import Wire


def comp_ams(
  learning_rate: optax.ScalarOrSchedule,
  compressor: Compressor,
  *,
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps_root: float = 1e-8,
  seed: int = 0,
  predictor: Predictor | None = None,
  feedback: str = "ef",
  dense_warmup_steps: int = 0,
  compressor_stages: Sequence[tuple[int, Compressor]] = (),
  stacked: Any = None,
  residual_dtype: Any = None,
) -> optax.GradientTransformation:
  """COMP-AMS (Li, Karimi & Li, ICLR 2022), exactly as the paper states it.

  Workers compress their gradients with error feedback; the average of the compressed
  gradients ḡ drives AMSGrad, identically on every worker::

      m ← β1 m + (1 − β1) ḡ;   v ← β2 v + (1 − β2) ḡ²;   v̂ ← max(v̂, v)
      θ ← θ − η m / sqrt(v̂ + ε)          # ε inside the root, no bias correction

  It is `optax.chain(error_feedback(compressor, axis_name=...), optax.scale_by_amsgrad(b1, b2,
  eps=0, eps_root=eps_root, bias_correction_mu=False, bias_correction_nu=False),
  optax.scale_by_learning_rate(learning_rate))`.

  Args:
    learning_rate: η, a float or an optax schedule.
    compressor: the gradient compressor, e.g. `cj.compressors.top_k(0.01)` or
      `cj.compressors.block_sign()`.
    axis_name: the mapped axis indexing workers (`jax.shard_map` mesh axis, `jax.pmap` or
      `jax.vmap` axis_name), or None for one worker.
    b1: β1, the first-moment decay.
    b2: β2, the second-moment decay.
    eps_root: ε, added to v̂ inside the square root (the paper's ε; optax's `eps_root`).
    seed: seeds the PRNG keys of randomized compressors.
    predictor: if given (e.g. `cj.predictors.least_squares()`), workers compress the innovation
      of their error-corrected gradient against this prediction
      (`cj.predictive_compression(..., feedback="ef")`) instead of the gradient itself.
      It helps when consecutive gradients are correlated (large batches, small learning rates,
      smooth losses); on noise-dominated gradients the least-squares ρ falls to ≈ 0 and it
      costs only two scalars per leaf. A fixed ρ on uncorrelated gradients makes things worse.
    feedback: what each worker keeps of what compression dropped: "ef" (default, the paper's
      error feedback: e ← g + e − C(g + e)), "ef21" (EF21, Richtárik et al. 2021: send
      C(g − ĝ) and keep the estimate ĝ ← ĝ + C(g − ĝ) that every receiver shares, i.e.
      predictive coding with ρ = 1 and no residual) or "none" (plain compressed averaging).
    dense_warmup_steps: send the dense gradient for this many first steps
      (`cj.dense_warmup`), then compress.
    compressor_stages: (steps, compressor) pairs used first to last before `compressor`
      (after any dense warm-up), with the same feedback and one shared residual
      (`cj.staged`); e.g. a top-k ratio annealed from 10% down to `compressor`'s 1%.
    dense_axis_name: a fast axis averaged densely before compression (hierarchical meshes:
      compressed bytes only on the slow `axis_name`; see `cj.error_feedback`).
    stacked: which leaves stack layers along axis 0 (scanned layers): a pytree prefix of the
      parameters of bools; each layer is then compressed as its own block, as the paper's
      per-layer compression intends (see `cj.error_feedback`).
    residual_dtype: dtype of the error-feedback residuals (default: the parameters'), e.g.
      `jnp.float32` for bfloat16 parameters and gradients: what compression drops then
      accumulates in float32, while the wire keeps the compressor's value dtype.
    wire: the wire strategy: `cj.wire.gather()` (default, the paper's algorithm) or
      `cj.wire.two_phase()` (a compressed all-reduce whose bytes per device do not grow with n).

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, compams_jax as cj
    >>> tx = cj.comp_ams(1e-2, cj.compressors.top_k(0.5))
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0, -4.0])}
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["w"]  # no bias correction: first step is η·√10
    Array([ 1.      , -2.      ,  2.968377, -3.968377], dtype=float32)

  References:
    Li, Karimi, Li, "On Distributed Adaptive Optimization with Gradient Compression", ICLR 2022;
    Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically
    Faster Error Feedback", NeurIPS 2021.
  """
  where = dict(
    axis_name=axis_name,
    dense_axis_name=dense_axis_name,
    wire=wire,
    seed=seed,
    stacked=stacked,
    residual_dtype=residual_dtype,
  )
  check_feedback(feedback, predictor)

  def communicate_with(c):
    return communicate(c, feedback=feedback, predictor=predictor, **where)

  averaging = communicate_with(compressor)
  if compressor_stages:
    steps = [int(n) for n, _ in compressor_stages]
    if any(n <= 0 for n in steps):
      raise ValueError(f"compressor_stages steps must be positive, got {steps}.")
    averaging = staged(
      [communicate_with(c) for _, c in compressor_stages] + [averaging],
      list(itertools.accumulate(steps)),
    )
  if not (isinstance(dense_warmup_steps, int) and dense_warmup_steps == 0):  # may be traced
    averaging = dense_warmup(
      averaging, dense_warmup_steps, axis_name=axis_name, dense_axis_name=dense_axis_name
    )
  return optax.chain(
    averaging,
    optax.scale_by_amsgrad(
      b1=b1, b2=b2, eps=0.0, eps_root=eps_root, bias_correction_mu=False, bias_correction_nu=False
    ),
    optax.scale_by_learning_rate(learning_rate),
  )
