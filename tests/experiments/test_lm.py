"""The GPT decoder (flax nnx, scanned layers): shapes, causality, the stacked layer axis, the
GPT-2 small parameter count, and training with nnx.Optimizer and on a ("dcn", "fsdp") mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compams_jax as cj
from compams_jax.experiments import data as D
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

  losses = [
    float(train_step(model, optimizer, D.sample_windows(text, 8, 16, rng))) for _ in range(30)
  ]
  assert losses[-1] < losses[0] - 1.0, losses
  residual = optimizer.opt_state[0].residual.value
  assert residual["blocks"]["qkv"]["kernel"].shape == (1, 3, 32, 96)  # (workers, layers, ...)


@pytest.mark.skipif(not D.PYTHON_DOCS_DIR.is_dir(), reason="apt-get install python3.11-doc")
def test_mesh_training_slices_x_fsdp():
  """2 slices x 4-way FSDP: COMP-AMS top-k 1% across slices on the corpus; shardings kept."""
  from compams_jax.experiments import lm_train

  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((2, 4), ("dcn", "fsdp"))
  cfg = lm.GPTConfig(vocab_size=256, context_length=32, d_model=32, num_heads=4, num_layers=2)
  graphdef, params = nnx.split(lm.GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = lm_train.shard_params(params, mesh)
  tx = cj.comp_ams(
    3e-3, cj.compressors.top_k(0.01), axis_name="dcn", stacked=lm.stacked_mask(params)
  )
  opt_state = cj.sharding.init(tx, params, mesh=mesh, axis_name="dcn")
  step = lm_train.make_step(graphdef, tx, mesh, opt_state)
  corpus = D.load_python_docs(max_files=40)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(30):
    batch = lm_train._put_batch(D.sample_windows(corpus.train, 16, 32, rng), mesh)
    params, opt_state, loss = step(params, opt_state, batch)
    assert loss.shape == (2,)  # each slice's loss: no collective across slices for a metric
    losses.append(float(np.mean(loss)))
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < losses[0] - 1.0, losses
  assert params["blocks"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp", None)
  assert params["wte"]["embedding"].sharding.spec == P("fsdp", None)
  assert params["blocks"]["qkv"]["bias"].sharding.spec in (P(), P(None, None))
  residual = opt_state[0].residual.value
  assert residual["blocks"]["qkv"]["kernel"].shape == (2, 2, 32, 96)  # (slices, layers, ...)
  assert residual["blocks"]["qkv"]["kernel"].sharding.spec == P("dcn", None, "fsdp", None)
  assert residual["wte"]["embedding"].sharding.spec == P("dcn", "fsdp", None)
  # The two slices' residuals differ (each keeps what its own compression dropped).
  r = np.asarray(residual["blocks"]["fc"]["kernel"])
  assert not np.allclose(r[0], r[1])
  # A validation pass on the mesh outside shard_map.
  rows = D.windows(corpus.validation, 32)[:32]
  val = lm_train.evaluate(lm_train.make_eval(graphdef), params, rows, 16, mesh)
  assert np.isfinite(val) and val < losses[0]


@pytest.mark.skipif(not D.PYTHON_DOCS_DIR.is_dir(), reason="apt-get install python3.11-doc")
def test_compams_train_runs_the_language_model_config(capsys):
  """`compams-train --config configs/lm_small.py` is the language-model trainer's job."""
  import pathlib

  from compams_jax.experiments import cli

  config = pathlib.Path(__file__).resolve().parents[2] / "configs" / "lm_small.py"
  argv = ["--config", f"{config}:smoke", "steps=2", "methods=('comp_ams_top_k',)"]
  assert cli.train_main([*argv, "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "comp_ams_top_k" in out and "perplexity" in out


@pytest.mark.skipif(not D.PYTHON_DOCS_DIR.is_dir(), reason="apt-get install python3.11-doc")
def test_language_model_config_trains_diloco_per_slice(capsys):
  """The LM config's diloco method: every slice trains its own FSDP-sharded copy, synced every
  `sync_every` steps; validated on θ; the table shows the bytes per sync."""
  import pathlib

  from compams_jax.experiments import config as config_lib
  from compams_jax.experiments import lm_train

  P = jax.sharding.PartitionSpec
  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "lm_small.py"
  config = config_lib.apply_overrides(
    config_lib.load_config_file(f"{path}:smoke"), ["steps=3", "sync_every=2", "log_every=1"]
  )
  mesh = jax.make_mesh((2, 4), ("dcn", "fsdp"))
  corpus = D.load_python_docs(max_files=config.max_files)
  r = lm_train.train_method("diloco", config, corpus, mesh, progress=False)
  params, theta = r["params"], cj.synchronized_params(r["opt_state"])
  kernel = params["blocks"]["qkv"]["kernel"]
  assert kernel.shape == (2, *theta["blocks"]["qkv"]["kernel"].shape)  # (slices, layers, ...)
  assert kernel.sharding.spec == P("dcn", None, "fsdp", None)
  assert theta["blocks"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp", None)
  # Step 3 is one step after the sync at step 2: the slices' copies have drifted apart.
  k = np.asarray(kernel)
  assert not np.array_equal(k[0], k[1])
  assert np.isfinite(r["val_loss"]) and r["val_loss"] < r["train_losses"][0][1]
  # Bytes: one f32 per parameter entry a device owns, plus the 4-byte finiteness flag, per sync.
  owned = sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in jax.tree.leaves(theta))
  assert r["sync_every"] == 2 and r["bytes_per_sync"] == 4 * owned + 4
  assert r["bytes_per_step"] == r["bytes_per_sync"] / 2
  table = lm_train.format_table([r])
  assert "bytes/sync" in table and f"{4 * owned + 4:,d}" in table and "diloco H=2" in table


@pytest.mark.slow
@pytest.mark.skipif(not D.PYTHON_DOCS_DIR.is_dir(), reason="apt-get install python3.11-doc")
def test_language_model_runs_the_sparseloco_and_demo_presets(capsys):
  import pathlib

  from compams_jax.experiments import cli

  config = pathlib.Path(__file__).resolve().parents[2] / "configs" / "lm_small.py"
  argv = ["--config", f"{config}:smoke", "steps=2", "sync_every=2"]
  assert cli.train_main([*argv, "methods=('sparseloco', 'demo')", "--no-progress"]) == 0
  out = capsys.readouterr().out
  rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
  assert rows["sparseloco"][-2] != "-" and rows["demo"][-2] == "-"  # bytes/sync: local SGD only
  assert all(np.isfinite(float(rows[m][1])) for m in ("sparseloco", "demo"))
