"""Byte-level GPT (d 128, 4 layers, 4 heads, context 128) on the Python docs' rst sources,
2 slices x 4-way FSDP on 8 simulated CPU devices, COMP-AMS across slices:
`compams-train --config configs/lm_small.py` (the same as `python -m
compams_jax.experiments.lm_train --config configs/lm_small.py`; needs
`apt-get install python3.11-doc`)."""

import ml_collections


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.task = "lm"  # compams-train runs it with the language-model trainer
  c.name = "lm_small"
  c.seed = 0
  c.corpus_path = ""  # "" = /usr/share/doc/python3.11/html/_sources
  c.max_files = 0  # 0 = all files
  c.mesh_shape = (2, 4)  # (dcn slices, fsdp shards per slice)
  c.context_length = 128
  c.d_model = 128
  c.num_heads = 4
  c.num_layers = 4
  c.batch_per_slice = 8
  c.steps = 120
  c.log_every = 10
  c.eval_sequences = 256
  c.eval_every = 0  # > 0: also validate every `eval_every` steps (the result's `val_curve`)
  c.learning_rate = 2e-3
  c.top_k_ratio = 0.01
  c.sync_every = 30  # local SGD (methods "diloco"): inner steps between synchronizations
  # Also "adamw" (dense data-parallel AdamW), "diloco", "sparseloco", "sparseloco_predictive"
  # (local SGD, every `sync_every` steps) and "demo": the experiments' optimizer presets
  # (lm_train.PRESET_METHODS).
  c.methods = ("amsgrad", "comp_ams_top_k", "comp_ams_block_sign")
  if variant == "smoke":
    c.max_files = 40
    c.context_length = 32
    c.d_model = 32
    c.num_layers = 2
    c.batch_per_slice = 8
    c.steps = 30
    c.eval_sequences = 64
  elif variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
