"""The COMP-AMS paper's compressed-Adam baselines: 1-bit Adam and QAdam."""

from __future__ import annotations

import optax

from compams_jax.compressors import Compressor, qsgd
from compams_jax.optimizers._communicate import communicate
from compams_jax.transforms import scale_by_onebit_adam, worker_adam
from compams_jax.wire import Wire


def onebit_adam(
  learning_rate: optax.ScalarOrSchedule,
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
  """1-bit Adam (Tang et al., 2021): full-precision warm-up, then frozen variance and 1-bit momentum.

  It is `optax.chain(cj.scale_by_onebit_adam(compressor, ...),
  optax.scale_by_learning_rate(learning_rate))`; see `cj.scale_by_onebit_adam` for the
  algorithm and its caution about ε.

  Args:
    learning_rate: η, a float or a schedule.
    compressor: the momentum compressor (default `cj.compressors.scaled_sign()`).
    warmup_steps: full-precision steps before v is frozen.
    b1: β1, the first-moment decay.
    b2: β2, the second-moment decay.
    eps: ε, added outside the square root.
    axis_name: the mapped axis indexing workers, or None for one worker.
    dense_axis_name: a fast axis averaged densely first (hierarchical meshes).
    wire: the wire strategy of the compressed phase (default `cj.wire.gather()`).
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
  return optax.chain(
    scale_by_onebit_adam(
      compressor,
      warmup_steps=warmup_steps,
      b1=b1,
      b2=b2,
      eps=eps,
      axis_name=axis_name,
      dense_axis_name=dense_axis_name,
      wire=wire,
      seed=seed,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )


def qadam(
  learning_rate: optax.ScalarOrSchedule,
  compressor: Compressor | None = None,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  feedback: str = "ef",
  seed: int = 0,
) -> optax.GradientTransformation:
  """QAdam (Chen et al., 2021): workers run Adam locally and send the compressed update.

  Worker i keeps its own moments m_i, v_i from its own gradients, forms δ_i = m_i/(sqrt(v_i)+ε),
  compresses δ_i + e_i with error feedback, and all workers step with the average:
  θ ← θ − η (1/n) Σ_i C(δ_i + e_i). It is `optax.chain(cj.worker_adam(b1=b1, b2=b2, eps=eps, axis_name=axis_name),
  cj.error_feedback(compressor, axis_name=axis_name), optax.scale_by_learning_rate(η))`.
  With `dense_axis_name`, every device runs its own local Adam and the local updates are
  averaged densely over the fast axis before compression.

  Args:
    learning_rate: η, a float or a schedule.
    compressor: compresses the local updates (default `cj.compressors.qsgd(levels=127)`).
    b1: β1, the first-moment decay.
    b2: β2, the second-moment decay.
    eps: ε, added outside the square root.
    axis_name: the mapped axis indexing workers, or None for one worker.
    dense_axis_name: a fast axis averaged densely before compression (hierarchical meshes).
    wire: the wire strategy (default `cj.wire.gather()`).
    feedback: "ef" (default, the paper's error feedback), "ef21" or "none" (see `cj.comp_ams`).
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
    worker_adam(b1=b1, b2=b2, eps=eps, axis_name=axis_name),
    communicate(
      compressor,
      feedback=feedback,
      axis_name=axis_name,
      dense_axis_name=dense_axis_name,
      wire=wire,
      seed=seed,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )
