"""The embedded default: scikit-learn digits (1,797 real 8x8 digits), 8 simulated workers.

Runs full-precision AMSGrad, COMP-AMS top-k 1% and COMP-AMS block-sign side by side.
`compams-train --config configs/digits.py` (about a minute on 2 CPU cores).
"""

import ml_collections


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.name = "digits"
  c.dataset = ml_collections.ConfigDict({"name": "digits", "kwargs": {}})
  c.model = ml_collections.ConfigDict({"name": "mnist_cnn", "kwargs": {}})
  c.num_workers = 8
  c.local_batch = 16
  c.epochs = 15
  c.seed = 0
  c.log_every = 5
  c.checkpoint_every = 100
  c.optimizer = ml_collections.ConfigDict({
      "name": "comp_ams", "learning_rate": 1e-3, "compressor": "top_k",
      "compressor_kwargs": {"ratio": 0.01}, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
      "momentum": 0.9, "predictor": "none", "error_feedback": True, "seed": 0})
  c.variants = ("amsgrad", "comp_ams_top_k", "comp_ams_block_sign")
  if variant == "smoke":
    c.epochs = 2
    c.num_workers = 4
  elif variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
