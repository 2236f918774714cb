"""Predictors for `cj.predictive_compression`: fixed ρ, or a shared least-squares ρ per leaf."""

from compams_jax.transforms._predictors import Fixed, LeastSquares, Predictor, fixed, least_squares

__all__ = ["Fixed", "LeastSquares", "Predictor", "fixed", "least_squares"]
