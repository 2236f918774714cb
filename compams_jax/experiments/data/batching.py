"""Deterministic, resumable per-worker batching for data-parallel training.

Every epoch draws one seeded permutation of the training set.  Step ``k``
takes the ``k``-th block of ``num_workers * local_batch`` permuted indices and
deals it out as ``num_workers`` local batches, so the assignment of examples
to workers is i.i.d. uniform (the paper's setting) and no example is seen
twice in an epoch.  The ragged tail (fewer than a full global batch) is
dropped.  Because the permutation depends only on ``(seed, epoch)``, a run
restarted at ``(epoch, start_step)`` sees exactly the batches the original
run would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["epoch_permutation", "steps_per_epoch", "worker_batches"]


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


def worker_batches(
  x: np.ndarray,
  y: np.ndarray,
  *,
  num_workers: int,
  local_batch: int,
  seed: int,
  epoch: int,
  start_step: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yield the per-worker batches of one epoch.

  Args:
    x: inputs ``[N, ...]``.
    y: labels ``[N, ...]``.
    num_workers: data-parallel workers (leading axis of each yielded array).
    local_batch: examples per worker per step.
    seed: run seed.
    epoch: epoch index; with ``seed`` it fixes the permutation.
    start_step: first step to yield (``0 <= start_step <= steps_per_epoch``),
      for resuming mid-epoch; steps before it are skipped without copying data.

  Yields:
    ``(xb, yb)`` with shapes ``(num_workers, local_batch, *x.shape[1:])`` and
    ``(num_workers, local_batch, *y.shape[1:])``; worker ``w`` of step ``k``
    gets permuted positions ``k*G + w*local_batch .. + local_batch`` where
    ``G = num_workers * local_batch``.

  Raises:
    ValueError: if ``x`` and ``y`` differ in length, the global batch is
      larger than the dataset, or ``start_step`` is out of range (raised
      at call time, before iteration starts).
  """
  n = len(x)
  if len(y) != n:
    raise ValueError(f"x and y must have the same length; got {n} and {len(y)}")
  steps = steps_per_epoch(n, num_workers, local_batch)
  if steps == 0:
    raise ValueError(
      f"global batch {num_workers} x {local_batch} = "
      f"{num_workers * local_batch} exceeds the {n} examples"
    )
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step must be in [0, {steps}]; got {start_step}")
  perm = epoch_permutation(n, seed, epoch)
  return _iterate(x, y, perm, num_workers, local_batch, start_step, steps)


def _iterate(x, y, perm, num_workers, local_batch, start_step, steps):
  """Generator behind :func:`worker_batches` (arguments already validated)."""
  g = num_workers * local_batch
  for k in range(start_step, steps):
    idx = perm[k * g : (k + 1) * g]
    yield (
      x[idx].reshape((num_workers, local_batch) + x.shape[1:]),
      y[idx].reshape((num_workers, local_batch) + y.shape[1:]),
    )
