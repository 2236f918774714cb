"""Deterministic, resumable per-worker batching for data-parallel training.

Every epoch draws one seeded permutation of the training set.  Step ``k``
takes the ``k``-th block of ``num_workers * local_batch`` permuted indices and
deals it out as ``num_workers`` local batches, so the assignment of examples
to workers is i.i.d. uniform (the paper's setting) and no example is seen
twice in an epoch.  The ragged tail (fewer than a full global batch) is
dropped.  Because the permutation depends only on ``(seed, epoch)``, a run
restarted at any step sees exactly the batches the original run would have.
The trainer deals the batches out (``compams_jax.experiments.train.make_batches``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_permutation", "steps_per_epoch"]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of ``range(n)`` used in ``epoch``.

  Args:
    n: number of examples.
    seed: run seed (non-negative int).
    epoch: epoch index (non-negative int).

  Returns:
    int64 permutation ``[n]``, a pure function of ``(n, seed, epoch)``
    (``numpy.random.default_rng([seed, epoch])``, stable across platforms).
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative; got seed={seed}, epoch={epoch}")
  return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, num_workers: int, local_batch: int) -> int:
  """Number of full global batches in an epoch of ``n`` examples.

  Args:
    n: number of examples.
    num_workers: data-parallel workers.
    local_batch: examples per worker per step.

  Returns:
    ``n // (num_workers * local_batch)``.
  """
  if num_workers < 1 or local_batch < 1:
    raise ValueError(f"num_workers and local_batch must be >= 1; got {num_workers}, {local_batch}")
  return n // (num_workers * local_batch)
