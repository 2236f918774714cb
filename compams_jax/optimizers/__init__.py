"""Optimizers: thin factories chaining compams_jax transforms with optax."""

from compams_jax.optimizers._baselines import onebit_adam, qadam
from compams_jax.optimizers._comp_ams import comp_ams
from compams_jax.optimizers._demo import demo
from compams_jax.optimizers._diloco import DiLoCoState, diloco
from compams_jax.optimizers._momentum_sgd import compressed_momentum_sgd

__all__ = [
  "DiLoCoState",
  "comp_ams",
  "compressed_momentum_sgd",
  "demo",
  "diloco",
  "onebit_adam",
  "qadam",
]
