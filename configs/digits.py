"""The embedded default: scikit-learn digits (1,797 real 8x8 digits), 8 simulated workers.

Full-precision AMSGrad, COMP-AMS top-k 1% and COMP-AMS block-sign side by side, in about a
minute on 2 CPU cores: `compams-train --config configs/digits.py`.
"""

from compams_jax.experiments.config import base_config, smoke


def get_config(variant: str = ""):
  c = base_config(
    name="digits",
    dataset="digits",
    model="mnist_cnn",
    num_workers=8,
    local_batch=16,
    epochs=15,
    log_every=5,
    checkpoint_every=100,
    variants=("amsgrad", "comp_ams_top_k", "comp_ams_block_sign"),
  )
  if variant == "smoke":
    return smoke(c, max_train_examples=0, max_test_examples=0, epochs=3)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
