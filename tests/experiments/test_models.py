"""Tests for compams_jax.experiments.models (shapes, dropout, param counts, padding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from compams_jax.experiments.models import (
  MODEL_NAMES,
  LeNet5,
  MnistCNN,
  ResNet18,
  TextLSTM,
  count_params,
  create_model,
  sequence_lengths,
)

# XLA compiles of threefry random-number code dominate the run time of these
# tests on CPU (~1 s per distinct shape), so the tests (a) use the cheap "rbg"
# PRNG for keys, (b) mostly build parameters with numpy from the shapes that
# ``jax.eval_shape(model.init)`` traces (which exercises the whole init code
# path without compiling it), and (c) call the real ``model.init`` only in a
# few places.  Semantics are the same for any PRNG implementation.


def _key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl="rbg")


KEY = _key(0)


def _init(model, x):
  """The real (compiled) init."""
  return jax.jit(lambda x: model.init({"params": KEY, "dropout": KEY}, x, train=False))(x)


def _shapes(model, x):
  return jax.eval_shape(lambda: model.init({"params": KEY, "dropout": KEY}, x, train=False))


def _shape_count(model, x) -> int:
  """Parameter count without allocating (eval_shape)."""
  return count_params(_shapes(model, x)["params"])


def _np_init(model, x, seed: int = 0):
  """Variables with the real tree/shapes, filled by numpy (no XLA compile).

  Kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales 1, biases 0.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = 1 if name == "embedding" else int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _shapes(model, x))


def _images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _tokens(shape, high, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(1, high, size=shape), jnp.int32)


# ------------------------------------------------------------------ MnistCNN


@pytest.mark.parametrize("hw", [28, 8])
def test_mnist_cnn_shapes(hw):
  model = MnistCNN(num_classes=10)
  x = _images((3, hw, hw, 1))
  variables = _np_init(model, x)
  out = model.apply(variables, x, train=False)
  assert out.shape == (3, 10) and out.dtype == jnp.float32
  assert set(variables) == {"params"}  # stateless: no batch_stats etc.


def test_mnist_cnn_real_init():
  model = MnistCNN()
  x = _images((2, 8, 8, 1))
  v = _init(model, x)
  assert set(v) == {"params"}
  assert count_params(v) == 53_002
  kernels = [
    leaf for path, leaf in jax.tree_util.tree_leaves_with_path(v) if path[-1].key == "kernel"
  ]
  assert all(float(jnp.std(k)) > 0 for k in kernels)
  assert np.all(np.isfinite(model.apply(v, x, train=False)))


def test_mnist_cnn_param_counts():
  # conv 320 + conv 18,496 + dense 9216*128+128 + dense 1,290 (PyTorch example net).
  assert _shape_count(MnistCNN(), jnp.zeros((1, 28, 28, 1))) == 1_199_882
  assert _shape_count(MnistCNN(), jnp.zeros((1, 8, 8, 1))) == 53_002


def test_mnist_cnn_dropout():
  model = MnistCNN()
  x = _images((4, 28, 28, 1))
  v = _np_init(model, x)
  apply = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={"dropout": k}))
  a = apply(v, x, _key(1))
  b = apply(v, x, _key(2))
  a2 = apply(v, x, _key(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, a2)
  # Evaluation needs no rng and is deterministic.
  e1 = model.apply(v, x, train=False)
  e2 = model.apply(v, x, train=False, rngs={"dropout": _key(3)})
  np.testing.assert_array_equal(e1, e2)
  assert not np.allclose(a, e1)


def test_train_requires_dropout_rng():
  model = MnistCNN()
  x = _images((2, 8, 8, 1))
  v = _np_init(model, x)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda: model.apply(v, x, train=True))


def test_train_flag_is_keyword_only():
  model = MnistCNN()
  x = _images((2, 8, 8, 1))
  with pytest.raises(TypeError):
    jax.eval_shape(lambda: model.init(KEY, x, False))


def test_rejects_non_nhwc():
  with pytest.raises(ValueError, match="channel-last"):
    _shapes(MnistCNN(), jnp.zeros((2, 28, 28)))


# -------------------------------------------------------------------- LeNet5


@pytest.mark.parametrize("shape,count", [((2, 28, 28, 1), 61_706), ((2, 32, 32, 3), 62_006)])
def test_lenet5_shapes_and_counts(shape, count):
  model = LeNet5(num_classes=10)
  x = _images(shape)
  v = _np_init(model, x)
  assert count_params(v["params"]) == count
  out = model.apply(v, x, train=False)
  assert out.shape == (2, 10)
  # No dropout: train and eval agree, and train needs no rng.
  np.testing.assert_array_equal(out, model.apply(v, x, train=True))


def test_lenet5_too_small_input():
  with pytest.raises(ValueError, match="too small"):
    _shapes(LeNet5(), jnp.zeros((1, 8, 8, 1)))


# ------------------------------------------------------------------ ResNet18


def test_resnet18_param_count():
  n = _shape_count(ResNet18(num_classes=10), jnp.zeros((1, 32, 32, 3)))
  assert 10_500_000 <= n <= 11_500_000
  assert n == 11_173_962  # same as the BatchNorm CIFAR ResNet-18


def test_resnet18_forward_and_batch_independence():
  model = ResNet18(num_classes=10)
  x = _images((2, 32, 32, 3))
  v = _np_init(model, x)
  assert set(v) == {"params"}
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True))  # one compile, two calls
  out = apply(v, x)
  assert out.shape == (2, 10)
  assert np.all(np.isfinite(out))
  # GroupNorm normalises per example: an example's logits do not depend on
  # the rest of its batch (unlike BatchNorm in training mode).
  x_other = x.at[1].set(_images((32, 32, 3), seed=7))
  out_other = apply(v, x_other)
  np.testing.assert_allclose(out_other[0], out[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out_other[1], out[1])


# ------------------------------------------------------------------ TextLSTM


def test_sequence_lengths():
  tokens = jnp.array([[5, 6, 7, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(sequence_lengths(tokens), [3, 1, 1, 5])


def test_text_lstm_shapes_and_count():
  model = TextLSTM(vocab_size=2000, embed_dim=32, hidden=64, num_classes=2)
  x = _tokens((3, 12), 2000)
  v = _shapes(model, x)
  # embed 64,000 + LSTM 4*(32*64 + 64*64 + 64) = 24,832 + dense 4,160 + dense 130
  assert count_params(v["params"]) == 93_122
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), v)
  assert out.shape == (3, 2) and out.dtype == jnp.float32


def test_text_lstm_ignores_padding():
  model = TextLSTM(vocab_size=50, num_classes=3)
  seqs = [[5, 6, 7], [9, 1, 4, 8, 2, 3], [11]]
  short = np.zeros((3, 6), np.int32)
  long = np.zeros((3, 40), np.int32)
  for i, s in enumerate(seqs):
    short[i, : len(s)] = s
    long[i, : len(s)] = s
  v = _np_init(model, short)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))  # compiles once per width
  a = apply(v, short)
  b = apply(v, long)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # A row is unaffected by the other rows' contents and lengths...
  mixed = short.copy()
  mixed[1] = [4, 4, 0, 0, 0, 0]
  mixed[2] = [2, 3, 4, 5, 6, 7]
  c = apply(v, mixed)
  np.testing.assert_allclose(c[0], a[0], rtol=1e-6, atol=1e-6)
  # ...but its own content does matter.
  assert not np.allclose(c[1], a[1]) and not np.allclose(c[2], a[2])


def test_text_lstm_dropout():
  model = TextLSTM(vocab_size=30, dropout_rate=0.5)
  m0 = TextLSTM(vocab_size=30)  # default rate 0
  x = _tokens((4, 7), 30)
  v = _np_init(model, x)

  @jax.jit
  def run(v, x, k1, k2):
    return (
      model.apply(v, x, train=True, rngs={"dropout": k1}),
      model.apply(v, x, train=True, rngs={"dropout": k2}),
      model.apply(v, x, train=False),
      m0.apply(v, x, train=True),
    )  # rate 0: no rng needed

  a, b, e, t0 = run(v, x, _key(1), _key(2))
  assert not np.allclose(a, b)
  assert not np.allclose(a, e)
  a2, _, e2, _ = run(v, x, _key(1), _key(3))
  np.testing.assert_array_equal(a, a2)
  np.testing.assert_array_equal(e, e2)
  np.testing.assert_array_equal(t0, e)


# ----------------------------------------------------------- registry / utils


@pytest.mark.parametrize(
  "name,x",
  [
    ("mnist_cnn", jnp.zeros((1, 8, 8, 1))),
    ("lenet5", jnp.zeros((1, 28, 28, 1))),
    ("resnet18", jnp.zeros((1, 32, 32, 3))),
    ("text_lstm", jnp.zeros((1, 5), jnp.int32)),
  ],
)
def test_create_model(name, x):
  model = create_model(name, num_classes=7)
  out = jax.eval_shape(
    lambda: model.apply(model.init({"params": KEY, "dropout": KEY}, x, train=False), x, train=False)
  )
  assert out.shape == (1, 7)


def test_create_model_kwargs_and_aliases():
  m = create_model("Text-LSTM", num_classes=2, vocab_size=123)
  assert isinstance(m, TextLSTM) and m.vocab_size == 123
  assert set(MODEL_NAMES) == {"mnist_cnn", "lenet5", "resnet18", "text_lstm"}


def test_create_model_unknown():
  with pytest.raises(ValueError) as e:
    create_model("vgg16", 10)
  for name in MODEL_NAMES:
    assert name in str(e.value)


def test_count_params_on_arrays_and_shapes():
  tree = {"a": jnp.zeros((3, 4)), "b": [np.ones(5), jax.ShapeDtypeStruct((2, 2), jnp.float32)]}
  assert count_params(tree) == 12 + 5 + 4
  assert count_params({}) == 0


@pytest.mark.parametrize("varying_params", [True, False])
def test_lstm_grad_step_under_shard_map(varying_params):
  """A data-parallel step of the LSTM (a scan) differentiates under shard_map.

  With ``varying_params`` the step differentiates a device-varying copy of
  the replicated parameters (``pcast(..., to="varying")``), as the training
  harness does so that gradients stay per-worker until compression; without
  it the parameters are replicated and only the token batch is sharded.
  Either way the LSTM's carry becomes device-varying, so its initial state
  must be too.  (The CNNs have no scan; the training-harness tests run them
  under shard_map.)
  """
  model = TextLSTM(vocab_size=20, num_classes=3, dropout_rate=0.5)
  w = min(2, jax.device_count())  # tests/conftest.py simulates 8 CPU devices
  mesh = Mesh(np.array(jax.devices()[:w]), ("w",))
  x = _tokens((w, 4, 9), 20).at[..., -3:].set(0)  # (workers, local_batch, T), padded
  y = jnp.zeros((w, 4), jnp.int32)
  params = _np_init(model, x[0])["params"]

  def loss(p, xb, yb, rng):
    logits = model.apply({"params": p}, xb, train=True, rngs={"dropout": rng})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

  def step(p, xb, yb, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index("w"))
    if varying_params:
      p = jax.tree.map(lambda a: jax.lax.pcast(a, "w", to="varying"), p)
    l, g = jax.value_and_grad(loss)(p, xb[0], yb[0], rng)
    return jax.lax.pmean(l, "w"), jax.lax.pmean(g, "w")

  f = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P("w"), P("w"), P()), out_specs=(P(), P()))
  )
  l, g = f(params, x, y, _key(5))
  assert np.isfinite(l)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
