"""Paper setup: LeNet-5 on CIFAR-10 (python batches from a local copy).

Pass dataset.kwargs.path=DIR/cifar-10-batches-py. n = 16 workers, local batch 32.
"""

from compams_jax.experiments.config import base_config, smoke


def get_config(variant: str = ""):
  c = base_config(
    name="cifar10_lenet",
    dataset="cifar10",
    model="lenet5",
    num_workers=16,
    local_batch=32,
    epochs=20,
  )
  if variant == "smoke":
    return smoke(c)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
