"""Compressed momentum SGD with and without predictive coding on Fashion-MNIST (Adikari & Draper).

Workers keep their momentum (β = 0.9) and send it top-k compressed with error feedback, either
directly or as the innovation against ρ·(last reconstruction), ρ = β.
"""

from compams_jax.experiments.config import base_config, smoke


def get_config(variant: str = ""):
  c = base_config(
    name="fashion_mnist_momentum",
    dataset="fashion_mnist",
    model="mnist_cnn",
    num_workers=16,
    local_batch=32,
    epochs=10,
    optimizer__learning_rate=0.05,
    variants=("momentum_sgd", "momentum_sgd_top_k", "momentum_sgd_top_k_predictive"),
    lr_grid=(0.01, 0.03, 0.1),
  )
  if variant == "smoke":
    return smoke(c, max_train_examples=4096, local_batch=16)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
