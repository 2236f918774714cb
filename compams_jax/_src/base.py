"""The `Compressor` interface: stateless per-array encode/decode with declared properties."""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from compams_jax._src import bucket

Payload = Any  # a pytree of fixed-shape arrays: what travels on the wire.
Deviation = Literal["none", "pointwise", "expected", "unbounded"]
Randomness = Literal["none", "private", "shared"]
Granularity = Literal["leaf", "model"]

_GRANULARITIES = ("leaf", "model")


def check_ratio(ratio: float, name: str = "ratio") -> float:
  """Validates a keep-fraction in (0, 1]."""
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
    raise TypeError(f"{name} must be a float in (0, 1], got {type(ratio).__name__} {ratio!r}.")
  ratio = float(ratio)
  if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
    raise ValueError(f"{name} must be in (0, 1], got {ratio!r}.")
  return ratio


def num_kept(ratio: float, size: int) -> int:
  """k = max(1, ceil(ratio * size)), capped at size (0 for an empty array)."""
  if size == 0:
    return 0
  # The small tolerance keeps ratio*size that is an integer up to float error exact.
  return min(size, max(1, math.ceil(ratio * size - 1e-9)))


def index_dtype(size: int) -> np.dtype:
  """The narrowest unsigned integer dtype that can index an array of `size` elements."""
  if size <= 1 << 8:
    return np.dtype(np.uint8)
  if size <= 1 << 16:
    return np.dtype(np.uint16)
  return np.dtype(np.uint32)


def check_float_leaf(x: Any) -> None:
  """Raises TypeError for leaves that cannot be compressed (integer, bool, complex)."""
  dtype = np.dtype(x.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f"compams_jax compresses real floating-point gradients only; got a leaf of dtype {dtype} "
      f"and shape {tuple(x.shape)}. Mask integer/complex leaves out (e.g. optax.masked) or "
      "cast them."
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Compressor(abc.ABC):
  """A stateless, per-array compression operator C.

  A compressor turns one floating-point array into a *payload* (a pytree of fixed-shape arrays,
  exactly what travels on the wire) and back. Compressors are frozen dataclasses: hashable, so
  they can be static arguments of `jax.jit` and of `optax.inject_hyperparams`.

  Class-level declarations (read by the wire and transform layers and checked by the tests):

  * `deviation`: "none" (lossless), "pointwise" (‖C(x) − x‖² ≤ q²‖x‖² for every x),
    "expected" (E‖C(x) − x‖² ≤ q²‖x‖²), or "unbounded".
  * `unbiased`: E[C(x)] = x.
  * `summable`: payloads of different workers may be added element-wise on the wire and the sum
    decodes to the sum of the decoded vectors (so a `psum` can replace an `all_gather`).
  * `randomness`: "none", "private" (each worker draws its own key), or "shared" (all workers
    use the same key, e.g. shared-seed random-k, which is what makes it summable).
  * `sends_every_entry`: every entry of a non-zero input gets a non-zero decoded value each step
    (sign codes, dense casts); sparsifiers and quantizers that can round to zero do not. With a
    fixed-ρ prediction under error feedback, only such codes are stable (a skipped entry's
    residual is echoed with weight 1 + ρ).
  * `compile_once_per_shape`: the per-array program is large (top-k's and random-k's
    selection), so leaves of one shape run as one `lax.map` and compile once (a transformer's
    layers); cheap elementwise codes run unrolled, which avoids stacking the leaves.

  Attributes:
    granularity: "leaf" (default, the paper's per-layer compression) compresses each pytree leaf
      on its own; "model" flattens the whole pytree into one vector first (one global top-k, one
      sign scale, ...).
  """

  granularity: Granularity = "leaf"

  deviation: ClassVar[Deviation] = "none"
  unbiased: ClassVar[bool] = True
  summable: ClassVar[bool] = False
  randomness: ClassVar[Randomness] = "none"
  sends_every_entry: ClassVar[bool] = False
  compile_once_per_shape: ClassVar[bool] = False

  def __post_init__(self):
    if self.granularity not in _GRANULARITIES:
      raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {self.granularity!r}.")

  @property
  def needs_key(self) -> bool:
    return self.randomness != "none"

  @abc.abstractmethod
  def encode(self, x: jax.Array, key: jax.Array | None = None) -> Payload:
    """Compresses one array into its payload."""

  @abc.abstractmethod
  def decode(self, payload: Payload, like: Any, key: jax.Array | None = None) -> jax.Array:
    """Reconstructs a dense array shaped and typed like `like` from one payload."""

  @abc.abstractmethod
  def wire_bits(self, shape: tuple[int, ...], dtype: Any) -> int:
    """Exact number of bits one payload of an array of this shape/dtype puts on the wire."""

  def batched(self) -> Compressor:
    """The variant to use under `jax.vmap` inside `jax.shard_map` (the two-phase wire).

    The same operator; compressors whose fast path is not vmap-safe there return their exact
    path (top-k's threshold selector uses a custom batching rule that shard_map's
    device-variance checks reject).
    """
    return self

  def q_squared(self, size: int) -> float | None:
    """The declared deviation bound q² for an array of `size` elements (None: no bound)."""
    del size
    return 0.0 if self.deviation == "none" else None

  def decode_sum(self, payloads: Payload, like: Any, key: jax.Array | None = None) -> jax.Array:
    """Σ_i decode(payloads[i]) over the payloads of all workers.

    `payloads` is stacked along a leading worker axis, or `Rows` (a gathered buffer read one
    worker at a time). The default decodes every payload and adds them up, one worker after
    another; compressors override it with something cheaper (top-k scatters all values into
    one buffer). Transient memory stays O(size) whatever n is: never decode all n payloads
    into one (n, size) array, nor copy all n out of a gathered buffer (docs/benchmarks.md).
    """
    total = bucket.rows(payloads).sum(lambda p: self.decode(p, like, key).astype(jnp.float32))
    return total.astype(like.dtype)

  def decode_count(self, payloads: Payload, like: Any, key: jax.Array | None = None) -> jax.Array:
    """Per entry, how many workers' payloads sent it: a float32 array shaped like `like`.

    The averaging over senders (`cj.wire.gather(average="senders")`) divides the sum of the
    decoded payloads by it. The default counts the workers whose decoded payload is non-zero
    there, Σ_i [decode(payloads[i]) ≠ 0], one worker at a time (O(size) memory, as
    `decode_sum`); compressors whose payload names the entries it sends override it (a sparse
    code scatters ones at its indices, so a sent zero counts too). `payloads` as in
    `decode_sum`.
    """
    return bucket.rows(payloads).sum(lambda p: (self.decode(p, like, key) != 0).astype(jnp.float32))

  def decode_mean_over_senders(
    self, payloads: Payload, like: Any, key: jax.Array | None = None
  ) -> jax.Array:
    """Per entry, the mean of the decoded payloads over the workers that sent it.

    Σ_i decode(payloads[i]) / max(1, count), count = `decode_count` (the scatter-mean of
    DeMo and SparseLoCo): an entry no worker sent is 0. `cj.wire.gather(average="senders")`
    calls it. Compressors that send coefficients of a transform override it to average per
    coefficient before transforming back (a DCT-domain top-k: the inverse DCT of the
    per-coefficient scatter-mean). `payloads` as in `decode_sum`; typed like `like`.

    The default decodes each worker's payload once, workers 0..n−1 in order, adding it to the
    sum and its non-zero entries to the count (deterministic on every backend: no scatter of
    several workers' values at once); a compressor with its own `decode_count` gets its
    `decode_sum` and `decode_count` instead.
    """
    wide = jax.ShapeDtypeStruct(tuple(like.shape), jnp.float32)  # no rounding before the divide
    if overrides(self, "decode_count"):
      total = self.decode_sum(payloads, wide, key)
      count = self.decode_count(payloads, wide, key)
    else:

      def term(p):
        x = self.decode(p, wide, key)
        return jnp.stack([x, (x != 0).astype(jnp.float32)])

      total, count = bucket.rows(payloads).sum(term)
    return (total / jnp.maximum(count, 1.0)).astype(like.dtype)

  def residual(self, x: jax.Array, payload: Payload, key: jax.Array | None = None) -> jax.Array:
    """x − decode(payload): what error feedback keeps of x after sending `payload`.

    Compressors whose decoded payload is mostly zeros override it to update x in place (top-k
    subtracts its k values) instead of materialising the decoded array.
    """
    return x - self.decode(payload, x, key)

  def payload_shapes(self, shape: tuple[int, ...], dtype: Any) -> Payload:
    """The payload's ShapeDtypeStructs for an array of this shape/dtype (no computation)."""
    like = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    key = jax.random.key(0) if self.needs_key else None
    return jax.eval_shape(lambda x: self.encode(x, key), like)

  def compress(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """decode(encode(x)): the dense compressed array C(x).

    (A method, not `__call__`: a callable hyperparameter would be taken for a schedule by
    `optax.inject_hyperparams`.)
    """
    return self.decode(self.encode(x, key), x, key)


def overrides(compressor: Compressor, method: str) -> bool:
  """Whether the compressor's class replaces the base class's default `method`."""
  return getattr(type(compressor), method) is not getattr(Compressor, method)


def payload_bits(payload: Payload) -> int:
  """Bits held by a payload pytree of arrays / ShapeDtypeStructs."""
  return sum(
    int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize * 8
    for leaf in jax.tree.leaves(payload)
  )
