"""Optimizers: thin factories chaining compams_jax transforms with optax."""

from compams_jax.optimizers._comp_ams import comp_ams

__all__ = ["comp_ams"]
