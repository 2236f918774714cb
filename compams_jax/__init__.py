"""compams_jax: communication-compressed data-parallel optimizers for JAX and Optax.

Compressors (`compams_jax.compressors`) turn gradients into compact payloads; the wire
(`compams_jax.wire`) averages them over workers with collectives that carry those payloads;
transforms (`error_feedback`, `compressed_mean`, `decoupled_momentum`) are optax
GradientTransformations; optimizers chain them with optax (`comp_ams` with AMSGrad, `demo` with
sign descent).

Examples:
  >>> import optax, compams_jax as cj
  >>> tx = cj.comp_ams(1e-3, cj.compressors.top_k(0.01), axis_name="data")
  >>> isinstance(tx, optax.GradientTransformation)
  True
"""

from compams_jax import compressors, predictors, sharding, transforms, wire
from compams_jax._src.workers import GlobalParams, PerWorker, apply_updates, synchronized_params
from compams_jax.compressors import Compressor
from compams_jax.devices import simulate_cpu_devices
from compams_jax.optimizers import (
  DiLoCoState,
  comp_ams,
  compressed_momentum_sgd,
  demo,
  diloco,
  onebit_adam,
  qadam,
)
from compams_jax.step import DataParallelStep, data_parallel_step
from compams_jax.transforms import (
  CompressedMeanState,
  DenseWarmupState,
  ErrorFeedbackState,
  OneBitAdamState,
  PowerSGDState,
  PredictiveState,
  SkipNonFiniteState,
  StagedState,
  WorkerAdamState,
  WorkerMomentumState,
  compressed_mean,
  decoupled_momentum,
  dense_warmup,
  error_feedback,
  powersgd,
  predictive_compression,
  scale_by_onebit_adam,
  skip_nonfinite,
  staged,
  worker_adam,
  worker_momentum,
)
from compams_jax.wire import CollectiveBytes, collective_bytes, wire_bytes

__version__ = "0.1.0"

__all__ = [
  "CollectiveBytes",
  "CompressedMeanState",
  "DataParallelStep",
  "DenseWarmupState",
  "DiLoCoState",
  "GlobalParams",
  "Compressor",
  "ErrorFeedbackState",
  "OneBitAdamState",
  "PerWorker",
  "PowerSGDState",
  "PredictiveState",
  "SkipNonFiniteState",
  "StagedState",
  "WorkerAdamState",
  "WorkerMomentumState",
  "apply_updates",
  "collective_bytes",
  "comp_ams",
  "compressed_mean",
  "compressed_momentum_sgd",
  "compressors",
  "data_parallel_step",
  "decoupled_momentum",
  "demo",
  "dense_warmup",
  "diloco",
  "error_feedback",
  "onebit_adam",
  "powersgd",
  "predictive_compression",
  "predictors",
  "qadam",
  "scale_by_onebit_adam",
  "sharding",
  "simulate_cpu_devices",
  "skip_nonfinite",
  "staged",
  "synchronized_params",
  "transforms",
  "wire",
  "wire_bytes",
  "worker_adam",
  "worker_momentum",
]
