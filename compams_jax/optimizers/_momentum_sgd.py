"""Distributed momentum SGD whose (predicted) momentum is what travels, compressed."""

from __future__ import annotations

import optax

from compams_jax.compressors import Compressor
from compams_jax.optimizers._communicate import communicate
from compams_jax.predictors import Predictor, least_squares
from compams_jax.transforms import worker_momentum
from compams_jax.wire import Wire


def compressed_momentum_sgd(
  learning_rate: optax.ScalarOrSchedule,
  compressor: Compressor,
  *,
  momentum: float = 0.9,
  predictive: bool | Predictor = True,
  feedback: str = "ef",
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  seed: int = 0,
) -> optax.GradientTransformation:
  """Momentum SGD where each worker keeps its momentum and sends it compressed.

  Worker i: m_i ← β m_i + g_i, then m_i is compressed, with predictive coding against its last
  reconstruction (the setting of Adikari & Draper) or directly; with or without error
  feedback. All workers step with θ ← θ − η · (average reconstruction).

  `predictive=True` uses the least-squares predictor (ρ fitted per leaf and step, shared by all
  workers). A fixed ρ = β is available as `predictive=cj.predictors.fixed(β)`; combined with
  error feedback it is unstable for sparse and randomized compressors (see
  `cj.predictive_compression`), so it is not the default.

  Args:
    learning_rate: η, a float or an optax schedule.
    compressor: the compressor of the (innovation of the) momentum.
    momentum: β.
    predictive: True for predictive coding with the least-squares predictor, a `cj.predictors`
      predictor, or False to compress the momentum itself.
    feedback: "ef" (default) keeps worker-side residuals (error feedback), "none" keeps none,
      "ef21" sends C(m − m̂) against the shared estimate m̂ (needs `predictive=False`).
    axis_name: the mapped axis indexing workers, or None for one worker.
    dense_axis_name: a fast axis averaged densely before compression (see `cj.error_feedback`).
    wire: the wire strategy (default `cj.wire.gather()`; predictive coding needs it).
    seed: seeds the PRNG keys of randomized compressors.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, compams_jax as cj
    >>> tx = cj.compressed_momentum_sgd(0.1, cj.compressors.top_k(0.5))
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0, -4.0])}
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   grads = jax.grad(lambda p: 0.5 * jnp.sum(p["w"] ** 2))(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.abs(params["w"]).max() < 0.05)
    True

  References:
    Adikari, Draper, "Compressing gradients by exploiting temporal correlation in momentum-SGD",
    IEEE JSAIT 2021.
  """
  if predictive is True:
    predictor = least_squares()
  elif predictive is False or predictive is None:
    predictor = None
  elif isinstance(predictive, Predictor):
    predictor = predictive
  else:
    raise TypeError(f"predictive must be a bool or a cj.predictors predictor, got {predictive!r}.")
  where = dict(axis_name=axis_name, dense_axis_name=dense_axis_name, wire=wire, seed=seed)
  return optax.chain(
    worker_momentum(momentum, axis_name=axis_name),
    communicate(compressor, feedback=feedback, predictor=predictor, **where),
    optax.scale_by_learning_rate(learning_rate),
  )
