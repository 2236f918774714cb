"""The COMP-AMS paper's compressed-Adam baselines: 1-bit Adam and QAdam."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compams_jax.compressors import (
  Compressor,
  decode_tree,
  encode_tree,
  identity,
  qsgd,
  scaled_sign,
)
from compams_jax.compressors._tree import check_tree
from compams_jax.transforms import error_feedback, worker_adam
from compams_jax.transforms._state import (
  PerWorker,
  local,
  per_worker_zeros,
  step_key,
  to_per_worker,
)
from compams_jax.transforms._validate import check_axis_name, check_compressor, check_updates
from compams_jax.wire import average, decode_key


class OneBitAdamState(NamedTuple):
  """State of `onebit_adam`.

  Attributes:
    count: steps taken (replicated).
    mu: the averaged first moment m (replicated).
    nu: the second moment v, frozen after warm-up (replicated).
    residual: each worker's error-feedback residual of its momentum (per worker).
  """

  count: jax.Array
  mu: Any
  nu: Any
  residual: PerWorker


def onebit_adam(
  learning_rate: optax.ScalarOrSchedule,
  *,
  warmup_steps: int = 100,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  compressor: Compressor | None = None,
  axis_name: str | None = None,
  seed: int = 0,
) -> optax.GradientTransformation:
  """1-bit Adam (Tang et al., 2021): full-precision warm-up, then frozen variance and 1-bit momentum.

  Warm-up (the first `warmup_steps` steps): Adam on the dense average of the gradients
  (one `psum`), m ← β1 m + (1−β1) ḡ, v ← β2 v + (1−β2) ḡ². Afterwards v is frozen and each
  worker i forms its momentum m_i = β1 m + (1−β1) g_i, compresses m_i + e_i (scaled sign by
  default: 1 bit per entry and one scale), keeps the error e_i, and all workers set m to the
  average of the compressed momenta. Both phases step θ ← θ − η m / (sqrt(v) + ε) (no bias
  correction). The phase is chosen by a `lax.cond` on the replicated step count, so every
  worker always enters the same collectives.

  Caution: a coordinate whose gradient stayed zero through the warm-up (e.g. a weight into a
  ReLU unit that was dead throughout it) keeps v = 0, yet the 1-bit code sends its zero momentum
  as ±scale, so it steps by η·scale/ε. With ε = 1e-8 that diverged on LeNet-5/MNIST right after
  the warm-up, whatever the rate or warm-up length tried; ε = 1e-4 trained (docs/results.md).

  Args:
    learning_rate: η, a float or a schedule.
    warmup_steps: full-precision steps before v is frozen.
    b1: β1. b2: β2. eps: ε.
    compressor: the momentum compressor (default `cj.compressors.scaled_sign()`).
    axis_name: the mapped axis indexing workers, or None for one worker.
    seed: seeds randomized compressors.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, compams_jax as cj
    >>> tx = cj.onebit_adam(0.02, warmup_steps=20)
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   g = jax.grad(lambda p: 0.5 * jnp.sum(p["w"] ** 2))(params)
    ...   u, state = tx.update(g, state, params)
    ...   params = optax.apply_updates(params, u)
    >>> bool(jnp.abs(params["w"]).max() < 0.05)
    True

  References:
    Tang, Gan, Rajbhandari, Zhang, He, Li, Li, Huang, Liu, Wu, "1-bit Adam: Communication
    Efficient Large-Scale Training with Adam's Convergence Speed", ICML 2021.
  """
  compressor = scaled_sign() if compressor is None else check_compressor(compressor)
  check_axis_name(axis_name)
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}.")
  dense = identity()  # The warm-up's full-precision average: one psum of the gradients.
  lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    check_tree(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return OneBitAdamState(
      count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros, residual=per_worker_zeros(params)
    )

  def warmup(updates, state):
    gbar = average(dense, encode_tree(dense, updates), updates, axis_name=axis_name)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, gbar)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, gbar)
    return mu, nu, state.residual.value

  def compressed(updates, state):
    key = step_key(compressor, seed, state.count, axis_name)
    residual = local(state.residual)
    target = jax.tree.map(lambda m, g, e: b1 * m + (1 - b1) * g + e, state.mu, updates, residual)
    payload = encode_tree(compressor, target, key)
    sent = decode_tree(compressor, payload, target, decode_key(compressor, key))
    mu = average(compressor, payload, updates, axis_name=axis_name, key=key)
    new_res = jax.tree.map(lambda t, s: t - s, target, sent)
    return mu, state.nu, to_per_worker(new_res).value

  def update_fn(updates, state, params=None):
    del params
    check_updates(updates, state.mu, "onebit_adam")
    mu, nu, residual = jax.lax.cond(state.count < warmup_steps, warmup, compressed, updates, state)
    step_lr = lr(state.count)
    out = jax.tree.map(lambda m, v: -step_lr * m / (jnp.sqrt(v) + eps), mu, nu)
    return out, OneBitAdamState(
      count=optax.safe_increment(state.count), mu=mu, nu=nu, residual=PerWorker(residual)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def qadam(
  learning_rate: optax.ScalarOrSchedule,
  compressor: Compressor | None = None,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  axis_name: str | None = None,
  seed: int = 0,
) -> optax.GradientTransformation:
  """QAdam (Chen et al., 2021): workers run Adam locally and send the compressed update.

  Worker i keeps its own moments m_i, v_i from its own gradients, forms δ_i = m_i/(sqrt(v_i)+ε),
  compresses δ_i + e_i with error feedback, and all workers step with the average:
  θ ← θ − η (1/n) Σ_i C(δ_i + e_i). It is `optax.chain(cj.worker_adam(b1, b2, eps),
  cj.error_feedback(compressor), optax.scale_by_learning_rate(η))`.

  Args:
    learning_rate: η, a float or a schedule.
    compressor: compresses the local updates (default `cj.compressors.qsgd(levels=127)`).
    b1: β1. b2: β2. eps: ε.
    axis_name: the mapped axis indexing workers, or None for one worker.
    seed: seeds randomized compressors.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import compams_jax as cj
    >>> tx = cj.qadam(1e-3, cj.compressors.top_k(0.01), axis_name="data")

  References:
    Chen, Shen, Huang, Liu, "Quantized Adam with Error Feedback", ACM TIST 2021.
  """
  compressor = qsgd(127) if compressor is None else compressor
  return optax.chain(
    worker_adam(b1, b2, eps),
    error_feedback(compressor, axis_name=axis_name, seed=seed),
    optax.scale_by_learning_rate(learning_rate),
  )
