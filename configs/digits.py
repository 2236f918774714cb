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
    # Local SGD (--variant diloco) syncs every 10 steps: 1,438 examples / (8 × 16) = 11 steps
    # an epoch, so about one sync per epoch, 16 in the 165 steps of a full run and 3 in the
    # smoke's 33; the DiLoCo papers' H of 30-500 would leave this short run 0-5 syncs.
    # Only local-SGD optimizers read it.
    optimizer__sync_every=10,
  )
  if variant == "smoke":
    return smoke(c, max_train_examples=0, max_test_examples=0, epochs=3)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
