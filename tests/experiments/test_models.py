"""Tests for compams_jax.experiments.models (shapes, dropout, param counts, padding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

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

KEY = jax.random.key(0)


def _init(model, x):
    return model.init({"params": KEY, "dropout": KEY}, x, train=False)


def _shape_count(model, x) -> int:
    """Parameter count without allocating (eval_shape)."""
    return count_params(jax.eval_shape(lambda: _init(model, x))["params"])


def _images(shape, seed=1):
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


# ------------------------------------------------------------------ MnistCNN


@pytest.mark.parametrize("hw", [28, 8])
def test_mnist_cnn_shapes(hw):
    model = MnistCNN(num_classes=10)
    x = _images((3, hw, hw, 1))
    variables = _init(model, x)
    out = model.apply(variables, x, train=False)
    assert out.shape == (3, 10) and out.dtype == jnp.float32
    assert set(variables) == {"params"}  # stateless: no batch_stats etc.


def test_mnist_cnn_param_counts():
    # conv 320 + conv 18,496 + dense 9216*128+128 + dense 1,290 (PyTorch example net).
    assert _shape_count(MnistCNN(), jnp.zeros((1, 28, 28, 1))) == 1_199_882
    assert _shape_count(MnistCNN(), jnp.zeros((1, 8, 8, 1))) == 53_002


def test_mnist_cnn_dropout():
    model = MnistCNN()
    x = _images((4, 28, 28, 1))
    v = _init(model, x)
    a = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    a2 = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a2)
    # Evaluation needs no rng and is deterministic.
    e1 = model.apply(v, x, train=False)
    e2 = model.apply(v, x, train=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(e1, e2)
    assert not np.allclose(a, e1)


def test_train_requires_dropout_rng():
    model = MnistCNN()
    x = _images((2, 8, 8, 1))
    v = _init(model, x)
    with pytest.raises(Exception, match="dropout"):
        model.apply(v, x, train=True)


def test_train_flag_is_keyword_only():
    model = MnistCNN()
    x = _images((2, 8, 8, 1))
    with pytest.raises(TypeError):
        model.init(KEY, x, False)


def test_rejects_non_nhwc():
    with pytest.raises(ValueError, match="channel-last"):
        _init(MnistCNN(), jnp.zeros((2, 28, 28)))


# -------------------------------------------------------------------- LeNet5


@pytest.mark.parametrize("shape,count", [((2, 28, 28, 1), 61_706), ((2, 32, 32, 3), 62_006)])
def test_lenet5_shapes_and_counts(shape, count):
    model = LeNet5(num_classes=10)
    x = _images(shape)
    v = _init(model, x)
    assert count_params(v["params"]) == count
    out = model.apply(v, x, train=False)
    assert out.shape == (2, 10)
    # No dropout: train and eval agree, and train needs no rng.
    np.testing.assert_array_equal(out, model.apply(v, x, train=True))


def test_lenet5_too_small_input():
    with pytest.raises(ValueError, match="too small"):
        _init(LeNet5(), jnp.zeros((1, 8, 8, 1)))


# ------------------------------------------------------------------ ResNet18


def test_resnet18_param_count():
    n = _shape_count(ResNet18(num_classes=10), jnp.zeros((1, 32, 32, 3)))
    assert 10_500_000 <= n <= 11_500_000
    assert n == 11_173_962  # same as the BatchNorm CIFAR ResNet-18


def test_resnet18_forward_and_batch_independence():
    model = ResNet18(num_classes=10)
    x = _images((2, 32, 32, 3))
    v = jax.jit(lambda x: _init(model, x))(x)
    assert set(v) == {"params"}
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True))
    out = apply(v, x)
    assert out.shape == (2, 10)
    assert np.all(np.isfinite(out))
    # GroupNorm normalises per example: an example's logits do not depend on
    # the rest of its batch (unlike BatchNorm in training mode).
    single = apply(v, x[:1])
    np.testing.assert_allclose(single[0], out[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ TextLSTM


def test_sequence_lengths():
    tokens = jnp.array([[5, 6, 7, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(sequence_lengths(tokens), [3, 1, 1, 5])


def test_text_lstm_shapes_and_count():
    model = TextLSTM(vocab_size=2000, embed_dim=32, hidden=64, num_classes=2)
    x = jax.random.randint(jax.random.key(1), (3, 12), 1, 2000)
    v = _init(model, x)
    # embed 64,000 + LSTM 4*(32*64 + 64*64 + 64) = 24,832 + dense 4,160 + dense 130
    assert count_params(v["params"]) == 93_122
    out = model.apply(v, x, train=False)
    assert out.shape == (3, 2) and out.dtype == jnp.float32


def test_text_lstm_ignores_padding():
    model = TextLSTM(vocab_size=50, num_classes=3)
    seqs = [[5, 6, 7], [9, 1, 4, 8, 2, 3], [11]]
    short = np.zeros((3, 6), np.int32)
    long = np.zeros((3, 40), np.int32)
    for i, s in enumerate(seqs):
        short[i, : len(s)] = s
        long[i, : len(s)] = s
    v = _init(model, short)
    a = model.apply(v, short, train=False)
    b = model.apply(v, long, train=False)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # A row is unaffected by the other rows' lengths.
    alone = model.apply(v, np.array([[5, 6, 7]], np.int32), train=False)
    np.testing.assert_allclose(alone[0], a[0], rtol=1e-6, atol=1e-6)
    # ...but the content does matter.
    other = short.copy()
    other[0, 1] = 8
    assert not np.allclose(model.apply(v, other, train=False)[0], a[0])


def test_text_lstm_dropout():
    model = TextLSTM(vocab_size=30, dropout_rate=0.5)
    x = jax.random.randint(jax.random.key(1), (4, 7), 1, 30)
    v = _init(model, x)
    a = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(v, x, train=False), model.apply(v, x, train=False))
    # Default (rate 0): train=True is deterministic and needs no rng.
    m0 = TextLSTM(vocab_size=30)
    v0 = _init(m0, x)
    np.testing.assert_array_equal(m0.apply(v0, x, train=True), m0.apply(v0, x, train=False))


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
    out = jax.eval_shape(lambda: model.apply(_init(model, x), x, train=False))
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


def test_grad_step_under_shard_map():
    """A pure data-parallel step (dropout rng folded per worker) runs under shard_map."""
    model = MnistCNN()
    mesh = Mesh(np.array(jax.devices()[:1]), ("w",))
    x = _images((1, 4, 8, 8, 1))  # (workers, local_batch, H, W, C)
    y = jnp.zeros((1, 4), jnp.int32)
    params = _init(model, x[0])["params"]

    def loss(p, xb, yb, rng):
        logits = model.apply({"params": p}, xb, train=True, rngs={"dropout": rng})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

    def step(p, xb, yb, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index("w"))
        l, g = jax.value_and_grad(loss)(p, xb[0], yb[0], rng)
        return jax.lax.pmean(l, "w"), jax.lax.pmean(g, "w")

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("w"), P("w"), P()),
                              out_specs=(P(), P())))
    l, g = f(params, x, y, jax.random.key(5))
    assert np.isfinite(l)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
