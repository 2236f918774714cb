"""Flax (linen) models for the experiments of Li, Karimi & Li (ICLR 2022).

"On Distributed Adaptive Optimization with Gradient Compression" trains

* a small CNN on MNIST ("2 conv + 2 FC layers, dropout 0.5")  -> :class:`MnistCNN`
* LeNet-5 on Fashion-MNIST / CIFAR-10                           -> :class:`LeNet5`
* ResNet-18 on CIFAR-10                                         -> :class:`ResNet18`
* a one-layer LSTM on IMDB sentiment                            -> :class:`TextLSTM`

Conventions shared by every model here:

* Images are channel-last ``[N, H, W, C]``; inputs are cast to float32 and all
  parameters are float32.  Text is ``int32`` token ids ``[N, T]`` with ``0`` as
  the padding id (see :mod:`compams_jax.experiments.data`).
* ``model.apply(variables, x, train=..., rngs=...)`` is purely functional: the
  models hold no mutable collections (no ``batch_stats``), so a training step
  is a pure function of ``(params, batch, rng)`` and can run unchanged under
  ``jax.shard_map`` / ``jax.jit``.
* ``train`` is keyword-only.  Dropout (where present) draws from the
  ``'dropout'`` rng stream and is only active when ``train=True``; with
  ``train=False`` no rng is needed and the output is deterministic.
* Outputs are unnormalised logits ``[N, num_classes]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
  "MnistCNN",
  "LeNet5",
  "BasicBlock",
  "ResNet18",
  "TextLSTM",
  "MODEL_NAMES",
  "create_model",
  "count_params",
  "sequence_lengths",
]


def _check_images(x: jax.Array, model: str) -> jax.Array:
  """Validate an NHWC image batch and cast it to float32.

  Args:
    x: array of shape ``[N, H, W, C]``.
    model: model name used in the error message.

  Returns:
    ``x`` as float32.

  Raises:
    ValueError: if ``x`` is not 4-D.
  """
  if x.ndim != 4:
    raise ValueError(
      f"{model} expects channel-last images [N, H, W, C]; got shape {x.shape}. "
      "Add a trailing channel axis for grayscale images (x[..., None])."
    )
  return jnp.asarray(x, jnp.float32)


class MnistCNN(nn.Module):
  """The PyTorch-examples MNIST CNN ("2 conv + 2 FC, dropout").

  Layout (``VALID`` convolutions, exactly the ``pytorch/examples`` MNIST net)::

      conv3x3(32) - relu - conv3x3(64) - relu - maxpool2 - dropout(0.25)
      - flatten - dense(128) - relu - dropout(0.5) - dense(num_classes)

  The dense layer infers its input size, so the same module runs on 28x28x1
  MNIST (9216 flattened features, 1,199,882 parameters) and on 8x8x1
  scikit-learn digits (8 -> 6 -> 4 -> pool -> 2x2x64 = 256 features,
  53,002 parameters).  Inputs need ``H, W >= 6``.

  Attributes:
    num_classes: number of output logits.
    conv_dropout: dropout rate after the pooling layer.
    fc_dropout: dropout rate after the first dense layer (the paper's 0.5).
  """

  num_classes: int = 10
  conv_dropout: float = 0.25
  fc_dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Compute logits.

    Args:
      x: images ``[N, H, W, C]`` (any real dtype; cast to float32).
      train: enables dropout (needs the ``'dropout'`` rng).

    Returns:
      Logits ``[N, num_classes]``.
    """
    x = _check_images(x, "MnistCNN")
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128, name="fc1")(x))
    x = nn.Dropout(self.fc_dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc2")(x)


class LeNet5(nn.Module):
  """LeNet-5 (ReLU / max-pool variant).

  Layout::

      conv5x5(6) - relu - maxpool2 - conv5x5(16) - relu - maxpool2 - flatten
      - dense(120) - relu - dense(84) - relu - dense(num_classes)

  The first convolution's padding defaults to ``'SAME'`` for inputs smaller
  than 32x32 (28x28 MNIST / Fashion-MNIST, the classic "pad to 32" trick) and
  ``'VALID'`` for 32x32 and larger (CIFAR-10), so both reach the classic
  5x5x16 = 400 flattened features: 61,706 parameters on 28x28x1 and 62,006 on
  32x32x3.  The second convolution is always ``'VALID'``.  No dropout.

  Attributes:
    num_classes: number of output logits.
    first_conv_padding: ``'SAME'``, ``'VALID'`` or ``None`` (automatic, see above).
  """

  num_classes: int = 10
  first_conv_padding: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Compute logits.

    Args:
      x: images ``[N, H, W, C]`` with ``H, W >= 16`` (28x28 or 32x32 typical).
      train: accepted for a uniform interface; LeNet-5 has no dropout.

    Returns:
      Logits ``[N, num_classes]``.
    """
    del train  # no stochastic layers
    x = _check_images(x, "LeNet5")
    pad = self.first_conv_padding
    if pad is None:
      pad = "SAME" if min(x.shape[1], x.shape[2]) < 32 else "VALID"
    x = nn.relu(nn.Conv(6, (5, 5), padding=pad, name="conv1")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    if min(x.shape[1], x.shape[2]) < 5:
      raise ValueError(
        f"LeNet5 input spatial size too small for the second 5x5 conv "
        f"(feature map {x.shape[1:3]} after the first pool); use >= 16x16 inputs."
      )
    x = nn.relu(nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(120, name="fc1")(x))
    x = nn.relu(nn.Dense(84, name="fc2")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)


# He (fan-out) init for convolutions, as torchvision's ResNets use.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 convs with a (projected) identity shortcut.

  Attributes:
    features: output channels.
    strides: stride of the first conv (2 to downsample).
    norm: factory returning a fresh normalisation module.
  """

  features: int
  strides: int = 1
  norm: Callable[..., nn.Module] = nn.GroupNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Apply the block to ``x`` ``[N, H, W, C_in]``; returns ``[N, H/s, W/s, features]``."""
    s = (self.strides, self.strides)
    y = nn.Conv(self.features, (3, 3), s, padding=1, use_bias=False, kernel_init=_conv_init)(x)
    y = nn.relu(self.norm()(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init)(y)
    y = self.norm()(y)
    if x.shape != y.shape:
      x = nn.Conv(
        self.features, (1, 1), s, use_bias=False, kernel_init=_conv_init, name="shortcut_conv"
      )(x)
      x = self.norm(name="shortcut_norm")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """CIFAR-style ResNet-18 with GroupNorm instead of BatchNorm.

  Layout: 3x3 stem conv (64, stride 1, no max-pool) - norm - relu - four
  stages of two :class:`BasicBlock` each with 64/128/256/512 channels (stages
  2-4 downsample by 2) - global average pool - dense(num_classes).  With 10
  classes this has 11,173,962 parameters, the same count as the usual
  BatchNorm CIFAR ResNet-18 (a norm layer's scale and bias are the same size
  either way).

  Why not BatchNorm: under data parallelism each worker would compute batch
  statistics on its own shard and carry ``batch_stats`` as mutable state;
  keeping them consistent across workers needs its own cross-worker sync,
  separate from (and uncompressed by) the gradient compression under study.
  Data-parallel compression papers' CIFAR ResNets commonly keep BatchNorm
  with per-worker statistics, but here we keep the step function stateless
  (params in, params out), so we normalise per example with GroupNorm
  (``num_groups=32``; ``num_groups=1`` gives a LayerNorm over H, W, C).

  Attributes:
    num_classes: number of output logits.
    num_groups: GroupNorm groups (must divide 64).
    stage_sizes: blocks per stage.
    width: channels of the first stage (doubled at each later stage).
  """

  num_classes: int = 10
  num_groups: int = 32
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Compute logits.

    Args:
      x: images ``[N, H, W, C]`` (32x32x3 for CIFAR-10; any size >= 8 works).
      train: accepted for a uniform interface; no dropout, and GroupNorm
        behaves identically in training and evaluation.

    Returns:
      Logits ``[N, num_classes]``.
    """
    del train
    x = _check_images(x, "ResNet18")
    norm = lambda **kw: nn.GroupNorm(num_groups=self.num_groups, **kw)
    x = nn.Conv(
      self.width, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init, name="stem_conv"
    )(x)
    x = nn.relu(norm(name="stem_norm")(x))
    for stage, n_blocks in enumerate(self.stage_sizes):
      for block in range(n_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(
          self.width * 2**stage, strides, norm, name=f"stage{stage + 1}_block{block + 1}"
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def sequence_lengths(tokens: jax.Array) -> jax.Array:
  """Valid lengths of right-padded token sequences (padding id 0).

  The length is the position of the last non-zero token plus one, clipped
  below at 1 so that an all-padding row still has a well-defined (if
  meaningless) final state.

  Args:
    tokens: integer ids ``[N, T]``.

  Returns:
    int32 lengths ``[N]`` in ``[1, T]``.
  """
  positions = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.int32)
  last = jnp.max(jnp.where(tokens != 0, positions[None, :], 0), axis=1)
  return jnp.maximum(last, 1).astype(jnp.int32)


class TextLSTM(nn.Module):
  """Embedding + one-layer LSTM + 2 dense layers for text classification.

  Layout: embed(vocab_size, embed_dim) - LSTM(hidden) - hidden state at the
  last valid time step - [dropout] - dense(hidden) - relu - [dropout] -
  dense(num_classes).

  Inputs are right-padded int32 ids with 0 = padding (1 = OOV by the data
  loaders' convention, an ordinary id here).  The LSTM runs over the whole
  padded array but the returned state is taken at each row's last non-pad
  position (``nn.RNN(..., seq_lengths=...)``), so trailing padding does not
  change the logits.  Ids must be ``< vocab_size`` (out-of-range ids embed
  to NaN under ``jnp.take``'s fill mode).

  Under ``jax.shard_map`` the zero initial state takes its device variance
  from the embedded inputs, which are varying whenever the token batch is
  sharded or the parameters were ``pcast`` to varying (as a data-parallel
  step that differentiates per-worker copies does).

  Attributes:
    vocab_size: embedding rows (ids ``0 .. vocab_size-1``).
    embed_dim: embedding width.
    hidden: LSTM cells and width of the first dense layer.
    num_classes: number of output logits.
    dropout_rate: dropout before each dense layer when training (default
      0.0, the plain embed-LSTM-2xFC architecture; the ``'dropout'`` rng is
      only needed when it is positive).
  """

  vocab_size: int = 2000
  embed_dim: int = 32
  hidden: int = 64
  num_classes: int = 2
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """Compute logits.

    Args:
      tokens: int ids ``[N, T]`` right-padded with 0.
      train: enables dropout (needs the ``'dropout'`` rng if ``dropout_rate > 0``).

    Returns:
      Logits ``[N, num_classes]``.
    """
    if tokens.ndim != 2:
      raise ValueError(f"TextLSTM expects token ids [N, T]; got shape {tokens.shape}")
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = sequence_lengths(tokens)
    emb = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
    # Zero initial (c, h) built with zeros_like from the inputs, so that it has
    # the same device variance as the inputs under jax.shard_map: a scan's
    # carry must have the same type going in and coming out, and the LSTM
    # state is device-varying whenever the data or the parameters are (a
    # plain jnp.zeros carry fails there with "carry input and carry output
    # must have equal types").
    zeros = jnp.zeros_like(emb[:, 0, :1]) + jnp.zeros((emb.shape[0], self.hidden), emb.dtype)
    cell = nn.OptimizedLSTMCell(self.hidden, name="lstm")
    (_, h), _ = nn.RNN(cell, return_carry=True)(
      emb, initial_carry=(zeros, zeros), seq_lengths=lengths
    )
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc2")(x)


MODEL_NAMES: tuple[str, ...] = ("mnist_cnn", "lenet5", "resnet18", "text_lstm")

_REGISTRY: dict[str, type[nn.Module]] = {
  "mnist_cnn": MnistCNN,
  "lenet5": LeNet5,
  "resnet18": ResNet18,
  "text_lstm": TextLSTM,
}


def create_model(name: str, num_classes: int, **kw: Any) -> nn.Module:
  """Build a model by name.

  Args:
    name: one of :data:`MODEL_NAMES` (``"mnist_cnn"``, ``"lenet5"``,
      ``"resnet18"``, ``"text_lstm"``); case-insensitive, ``-`` and ``_``
      are interchangeable.
    num_classes: number of output logits.
    **kw: further module attributes, e.g. ``vocab_size=`` for ``text_lstm``.

  Returns:
    An unbound flax module; call ``.init`` / ``.apply`` on it.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
  """
  key = name.lower().replace("-", "_")
  if key not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  return _REGISTRY[key](num_classes=num_classes, **kw)


def count_params(params: Any) -> int:
  """Total number of scalars in a pytree of arrays.

  Works on ``params``, on the full ``variables`` dict, and on the
  ``jax.ShapeDtypeStruct`` tree returned by ``jax.eval_shape(model.init, ...)``
  (so large models can be counted without allocating them).

  Args:
    params: any pytree whose leaves have a ``.shape``.

  Returns:
    The sum of the leaves' element counts.
  """
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
