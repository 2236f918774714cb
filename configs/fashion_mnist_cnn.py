"""Paper setup (a): Fashion-MNIST, the paper's MNIST CNN (2 conv + 2 FC, dropout 0.5).

n = 16 workers, local batch 32, as Li, Karimi & Li (ICLR 2022); learning rates from `lr_grid`.
Data: `apt-get install dataset-fashion-mnist` (or dataset.kwargs.path=DIR with the IDX files).
"""

from compams_jax.experiments.config import base_config, smoke


def get_config(variant: str = ""):
  c = base_config(
    name="fashion_mnist_cnn",
    dataset="fashion_mnist",
    model="mnist_cnn",
    num_workers=16,
    local_batch=32,
    epochs=10,
  )
  if variant == "smoke":
    return smoke(c, max_train_examples=4096, local_batch=16)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
