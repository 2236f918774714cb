"""A byte-level language-modelling corpus: the reStructuredText sources of Python's docs.

Debian's ``python3.11-doc`` package installs the Sphinx sources of the Python
3.11 documentation as ``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``
(497 files, about 12 MB of UTF-8 text).  :func:`load_python_docs` reads them
as bytes (vocabulary 256, no tokenizer to download), splits them into train
and validation BY FILE (a document never contributes to both) and cuts
fixed-length sequences.

Split: a file goes to validation when the SHA-256 of its path relative to the
corpus root, read as an integer, is ``0 mod validation_every``; the choice of
one file never depends on which other files exist, so it is the same on every
machine and stable when files are added.  Files are read in sorted order and
each is followed by :data:`EOD` (byte 0, which does not occur in the text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from ._common import Dataset

__all__ = [
  "PYTHON_DOCS_DIR",
  "EOD",
  "VOCAB_SIZE",
  "Corpus",
  "load_python_docs",
  "load_python_docs_dataset",
  "is_validation_file",
  "encode_bytes",
  "decode_bytes",
  "windows",
  "sample_windows",
]

PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
EOD = 0  # end-of-document byte appended after every file
VOCAB_SIZE = 256
_PATTERN = "*.rst.txt"
_HINT = (
  "The Python documentation sources come with Debian's python3.11-doc package: "
  "apt-get install python3.11-doc (or pass path= a directory of *.rst.txt files)."
)


def encode_bytes(text: str) -> np.ndarray:
  """UTF-8 bytes of ``text`` as int32 token ids in ``[0, 256)``."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode_bytes(tokens: np.ndarray) -> str:
  """Inverse of :func:`encode_bytes` (invalid UTF-8 is replaced, not raised)."""
  return np.asarray(tokens, np.uint8).tobytes().decode("utf-8", errors="replace")


def is_validation_file(relpath: str, validation_every: int) -> bool:
  """Whether the file at ``relpath`` (POSIX, relative to the root) is held out."""
  digest = hashlib.sha256(relpath.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % validation_every == 0


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """Train and validation byte streams of a file-split text corpus.

  Attributes:
    train: uint8 ``[T]``, the train files' bytes in sorted path order, each
      followed by :data:`EOD`.
    validation: uint8 ``[V]``, likewise for the validation files.
    train_files: relative POSIX paths of the train files, sorted.
    validation_files: relative paths of the validation files, sorted.
    name: registry name.
    note: provenance.
  """

  train: np.ndarray
  validation: np.ndarray
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]
  name: str = "python_docs"
  note: str = ""

  vocab_size = VOCAB_SIZE

  def split(self, which: str) -> np.ndarray:
    """The byte stream of ``"train"`` or ``"validation"``."""
    if which not in ("train", "validation"):
      raise ValueError(f"split must be 'train' or 'validation'; got {which!r}")
    return self.train if which == "train" else self.validation

  def summary(self) -> str:
    """A one-line description of the split sizes."""
    return (
      f"{self.name}: train {len(self.train_files)} files / {self.train.size:,} bytes, "
      f"validation {len(self.validation_files)} files / {self.validation.size:,} bytes"
    )


def windows(tokens: np.ndarray, context_length: int) -> np.ndarray:
  """Consecutive, non-overlapping sequences of a token stream (the ragged tail dropped).

  Args:
    tokens: ``[T]`` token ids.
    context_length: model context; each row holds ``context_length + 1`` tokens so
      that ``row[:-1]`` are the inputs and ``row[1:]`` the next-token targets
      (neighbouring rows share one token).

  Returns:
    int32 ``[N, context_length + 1]`` with ``N = (T - 1) // context_length``.
  """
  if context_length < 1:
    raise ValueError(f"context_length must be >= 1; got {context_length}")
  tokens = np.asarray(tokens)
  n = (tokens.size - 1) // context_length
  if n < 1:
    raise ValueError(f"{tokens.size} tokens are too few for one sequence of {context_length + 1}")
  starts = np.arange(n) * context_length
  return tokens[starts[:, None] + np.arange(context_length + 1)].astype(np.int32)


def sample_windows(
  tokens: np.ndarray, batch_size: int, context_length: int, rng: np.random.Generator
) -> np.ndarray:
  """``batch_size`` sequences of ``context_length + 1`` tokens at uniform random offsets.

  Returns:
    int32 ``[batch_size, context_length + 1]``.
  """
  tokens = np.asarray(tokens)
  high = tokens.size - context_length
  if high < 1:
    raise ValueError(f"{tokens.size} tokens are too few for one sequence of {context_length + 1}")
  starts = rng.integers(0, high, size=batch_size)
  return tokens[starts[:, None] + np.arange(context_length + 1)].astype(np.int32)


def load_python_docs(
  path: str | os.PathLike | None = None,
  validation_every: int = 10,
  max_files: int | None = None,
) -> Corpus:
  """The Python 3.11 documentation sources as a byte-level corpus, split by file.

  Args:
    path: directory searched recursively for ``*.rst.txt`` files; default
      :data:`PYTHON_DOCS_DIR` (``apt-get install python3.11-doc``).
    validation_every: about one file in ``validation_every`` is held out
      (chosen by a hash of its relative path, see the module docstring).
    max_files: keep only the first ``max_files`` files in sorted order (before
      splitting), for quick runs; ``None`` keeps all.

  Returns:
    A :class:`Corpus` (497 files, about 11.5 MB, with the default path).

  Raises:
    FileNotFoundError: if the directory is absent or holds no ``*.rst.txt`` file;
      the message names ``apt-get install python3.11-doc``.
    ValueError: if ``validation_every < 2`` or either split comes out empty.
  """
  if validation_every < 2:
    raise ValueError(f"validation_every must be >= 2; got {validation_every}")
  root = PYTHON_DOCS_DIR if path is None else Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"{root} does not exist. " + _HINT)
  files = sorted(p.relative_to(root).as_posix() for p in root.rglob(_PATTERN) if p.is_file())
  if not files:
    raise FileNotFoundError(f"{root} holds no {_PATTERN} files. " + _HINT)
  if max_files is not None:
    files = files[:max_files]
  split = {"train": [], "validation": []}
  for rel in files:
    split["validation" if is_validation_file(rel, validation_every) else "train"].append(rel)
  for which, names in split.items():
    if not names:
      raise ValueError(
        f"{root}: the {which} split is empty ({len(files)} files, validation_every="
        f"{validation_every}); use more files or another validation_every"
      )

  def stream(names: list[str]) -> np.ndarray:
    eod = bytes([EOD])
    return np.frombuffer(b"".join((root / n).read_bytes() + eod for n in names), np.uint8)

  return Corpus(
    train=stream(split["train"]),
    validation=stream(split["validation"]),
    train_files=tuple(split["train"]),
    validation_files=tuple(split["validation"]),
    name="python_docs",
    note=(
      f"reStructuredText sources of the Python documentation ({root}), {len(files)} files, "
      f"byte-level (vocabulary 256), split by file: sha256(relative path) % "
      f"{validation_every} == 0 -> validation."
    ),
  )


def load_python_docs_dataset(
  path: str | os.PathLike | None = None,
  context_length: int = 128,
  validation_every: int = 10,
  max_files: int | None = None,
) -> Dataset:
  """:func:`load_python_docs` cut into :func:`windows`, as a :class:`Dataset`.

  The registry form (``load_dataset("python_docs")``): ``x_*`` are int32
  ``[N, context_length]`` input bytes, ``y_*`` the int32 ``[N, context_length]``
  next bytes (``x`` shifted by one), ``num_classes`` 256; the test split is
  the validation files.
  """
  corpus = load_python_docs(path, validation_every=validation_every, max_files=max_files)
  train = windows(corpus.train, context_length)
  val = windows(corpus.validation, context_length)
  return Dataset(
    x_train=train[:, :-1],
    y_train=train[:, 1:],
    x_test=val[:, :-1],
    y_test=val[:, 1:],
    num_classes=VOCAB_SIZE,
    name="python_docs",
    note=corpus.note + f" Non-overlapping sequences of {context_length} + 1 bytes.",
  )
