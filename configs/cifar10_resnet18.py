"""The paper's appendix setup: ResNet-18 (CIFAR variant, GroupNorm) on CIFAR-10 from a local copy.

Pass dataset.kwargs.path=DIR/cifar-10-batches-py. n = 16 workers, local batch 32. At 11M
parameters this is a GPU/TPU job; on CPU use the smoke variant.
"""

from compams_jax.experiments.config import base_config, smoke


def get_config(variant: str = ""):
  c = base_config(
    name="cifar10_resnet18",
    dataset="cifar10",
    model="resnet18",
    num_workers=16,
    local_batch=32,
    epochs=30,
  )
  if variant == "smoke":
    return smoke(c, max_train_examples=64, max_test_examples=64, num_workers=2, local_batch=8)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
