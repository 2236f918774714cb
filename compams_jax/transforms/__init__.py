"""Transforms: optax GradientTransformations with compressed communication and their state."""

from compams_jax.transforms._demo import decoupled_momentum
from compams_jax.transforms._error_feedback import (
  CompressedMeanState,
  ErrorFeedbackState,
  compressed_mean,
  error_feedback,
)
from compams_jax.transforms._momentum import WorkerMomentumState, worker_momentum
from compams_jax.transforms._nonfinite import SkipNonFiniteState, skip_nonfinite
from compams_jax.transforms._onebit_adam import OneBitAdamState, scale_by_onebit_adam
from compams_jax.transforms._powersgd import PowerSGDState, powersgd
from compams_jax.transforms._predictive import PredictiveState, predictive_compression
from compams_jax.transforms._warmup import DenseWarmupState, StagedState, dense_warmup, staged
from compams_jax.transforms._worker_adam import WorkerAdamState, worker_adam

__all__ = [
  "CompressedMeanState",
  "DenseWarmupState",
  "ErrorFeedbackState",
  "OneBitAdamState",
  "PowerSGDState",
  "PredictiveState",
  "SkipNonFiniteState",
  "StagedState",
  "WorkerAdamState",
  "WorkerMomentumState",
  "compressed_mean",
  "decoupled_momentum",
  "dense_warmup",
  "error_feedback",
  "powersgd",
  "predictive_compression",
  "scale_by_onebit_adam",
  "skip_nonfinite",
  "staged",
  "worker_adam",
  "worker_momentum",
]
