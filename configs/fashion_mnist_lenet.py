"""Fashion-MNIST (full 60k) with LeNet-5, trained 20 epochs (the parity and speedup studies).

n = 16 workers, local batch 32, as Li, Karimi & Li (ICLR 2022); learning rates from `lr_grid`.
Data: `apt-get install dataset-fashion-mnist` (or dataset.kwargs.path=DIR with the IDX files).
"""

from compams_jax.experiments.config import base_config, smoke


def get_config(variant: str = ""):
  c = base_config(
    name="fashion_mnist_lenet",
    dataset="fashion_mnist",
    model="lenet5",
    num_workers=16,
    local_batch=32,
    epochs=20,
  )
  if variant == "smoke":
    return smoke(c, max_train_examples=4096, local_batch=16)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
