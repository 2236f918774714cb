"""The one feedback switch of the optimizers: which transform communicates the gradients."""

from __future__ import annotations

from typing import Any

import optax

from compams_jax.compressors import Compressor
from compams_jax.predictors import Predictor, fixed
from compams_jax.transforms import compressed_mean, error_feedback, predictive_compression

FEEDBACKS = ("ef", "ef21", "none")


def check_feedback(feedback: Any, predictor: Predictor | None) -> None:
  if feedback not in FEEDBACKS:
    raise ValueError(f"feedback must be one of {FEEDBACKS}, got {feedback!r}.")
  if predictor is not None and feedback == "ef21":
    raise ValueError(
      "feedback='ef21' is predictive coding with rho = 1 of its own: it takes no predictor "
      "(use feedback='ef' or 'none' with a predictor)."
    )


def communicate(
  compressor: Compressor, *, feedback: str, predictor: Predictor | None = None, **where: Any
) -> optax.GradientTransformation:
  """The averaging transform for `feedback` ("ef", "ef21", "none") and an optional predictor.

  "ef": error feedback (e ← g + e − C(g + e)); "ef21": send C(g − ĝ) and keep the estimate
  ĝ ← ĝ + C(g − ĝ) that every receiver shares (predictive coding with ρ = 1, no residual);
  "none": plain compressed averaging. With a predictor, workers code the innovation against
  it, with ("ef") or without ("none") a residual.
  """
  check_feedback(feedback, predictor)
  if where.get("residual_dtype") is not None and feedback != "ef":
    raise ValueError("residual_dtype= sets the error-feedback residual: it needs feedback='ef'.")
  if where.get("residual_dtype") is not None and predictor is not None:
    raise ValueError("residual_dtype= is not supported with a predictor.")
  if where.get("decay", 1.0) != 1.0 and (feedback != "ef" or predictor is not None):
    raise ValueError("a residual decay needs feedback='ef' and no predictor.")
  for name in ("stacked", "residual_dtype"):
    if where.get(name) is None:
      where.pop(name, None)
  if feedback == "ef21":
    return predictive_compression(compressor, predictor=fixed(1.0), feedback="none", **where)
  if predictor is not None:
    return predictive_compression(compressor, predictor=predictor, feedback=feedback, **where)
  if feedback == "none":
    return compressed_mean(compressor, **where)
  return error_feedback(compressor, **where)
