"""The GPT decoder (flax nnx, scanned layers): shapes, causality, the stacked layer axis, the
GPT-2 small parameter count, and training with nnx.Optimizer and on a ("dcn", "fsdp") mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compams_jax as cj
from compams_jax.experiments import lm

TINY = lm.GPTConfig(vocab_size=256, context_length=16, d_model=32, num_heads=4, num_layers=3)


def test_shapes_and_stacked_layer_axis():
  model = lm.GPT(TINY, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 10), jnp.int32)
  assert model(tokens).shape == (2, 10, 256)
  params = nnx.state(model, nnx.Param)
  blocks = jax.tree.leaves(params["blocks"])
  assert blocks and all(x.shape[0] == TINY.num_layers for x in blocks)
  assert params["blocks"]["qkv"]["kernel"].shape == (3, 32, 96)
  assert params["blocks"]["fc"]["kernel"].shape == (3, 32, 128)
  # One leaf per parameter kind: 4 linears x (kernel, bias) + 2 LayerNorms x (scale, bias).
  assert len(blocks) == 12
  mask = lm.stacked_mask(params)

  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, flag in zip(paths, jax.tree.leaves(mask)):
    assert flag == ("blocks" in path)
  with pytest.raises(ValueError, match="context_length"):
    model(jnp.zeros((1, 17), jnp.int32))


def test_layers_differ():  # split_rngs gives every layer its own initialization
  kernel = nnx.state(lm.GPT(TINY, rngs=nnx.Rngs(0)), nnx.Param)["blocks"]["qkv"]["kernel"][...]
  assert not np.allclose(kernel[0], kernel[1])


def test_causal_masking():
  model = lm.GPT(TINY, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, size=(2, 12)), jnp.int32)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 256)
  a, b = model(tokens), model(changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)
  assert not np.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_gpt2_small_parameter_count():
  model = nnx.eval_shape(lambda: lm.GPT(lm.gpt2_small(), rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  # GPT-2 small with the head tied to the token embedding (as GPT-2): 124,439,808.
  assert lm.param_count(params) == 124_439_808
  assert params["blocks"]["qkv"]["kernel"].shape == (12, 768, 2304)
  assert params["wte"]["embedding"].shape == (50257, 768)
  assert params["wpe"]["embedding"].shape == (1024, 768)


def test_fsdp_specs():
  P = jax.sharding.PartitionSpec
  params = nnx.state(nnx.eval_shape(lambda: lm.GPT(TINY, rngs=nnx.Rngs(0))), nnx.Param)
  specs = lm.fsdp_specs(params, axis_size=4)
  assert specs["blocks"]["qkv"]["kernel"] == P(None, "fsdp", None)
  assert specs["blocks"]["qkv"]["bias"] == P()
  assert specs["wte"]["embedding"] == P("fsdp", None)
  assert specs["ln_f"]["scale"] == P()
  odd = lm.fsdp_specs(params, axis_size=3)  # 256 rows do not split 3 ways
  assert odd["wte"]["embedding"] == P()


def test_nnx_optimizer_with_comp_ams():
  model = lm.GPT(TINY, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = cj.comp_ams(3e-3, cj.compressors.top_k(0.1), stacked=lm.stacked_mask(params))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(0)
  text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, np.uint8)

  @nnx.jit
  def train_step(model, optimizer, batch):
    def loss_fn(model):
      return lm.next_token_loss(model(batch[:, :-1]), batch[:, 1:])

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  from compams_jax.experiments.data import sample_windows

  losses = [
    float(train_step(model, optimizer, sample_windows(text, 8, 16, rng))) for _ in range(30)
  ]
  assert losses[-1] < losses[0] - 1.0, losses
  residual = optimizer.opt_state[0].residual.value
  assert residual["blocks"]["qkv"]["kernel"].shape == (1, 3, 32, 96)  # (workers, layers, ...)
