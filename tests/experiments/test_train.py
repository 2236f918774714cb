"""The training harness: smoke runs on real data, exact resume, and clear errors."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

import compams_jax as cj
from compams_jax.experiments import checkpoints, cli, train
from compams_jax.experiments import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _digits(*overrides, variant="comp_ams_top_k"):
  return config_lib.resolve(
    str(CONFIGS / "digits.py") + ":smoke", ["num_workers=8", *overrides], [variant]
  )[0]


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def _stopped_run(tmp_path_factory):
  """A run of `_digits("epochs=1")` stopped (with its checkpoint) after 3 steps, trained once."""
  workdir = tmp_path_factory.mktemp("stopped_run")
  train.train(_digits("epochs=1"), workdir, progress=False, stop_after=3)
  return workdir


@pytest.fixture
def stopped_run(_stopped_run, tmp_path):
  """A private copy of the stopped run (tests change or corrupt it)."""
  shutil.copytree(_stopped_run, tmp_path, dirs_exist_ok=True)
  return tmp_path


# comp_ams_block_sign in `-m slow`: the trainer runs it by default in
# test_cli_trains_prints_table_and_plots and test_multiprocess, and COMP-AMS learns with block_sign
# in test_compressors' least-squares runs.
@pytest.mark.parametrize(
  "variant",
  [
    "amsgrad",
    "comp_ams_top_k",
    pytest.param("comp_ams_block_sign", marks=pytest.mark.slow),
    "momentum_sgd_top_k_predictive",
  ],
)
def test_digits_smoke_learns(variant, tmp_path):
  overrides = ["optimizer.learning_rate=0.1"] if variant.startswith("momentum") else []
  result = train.train(_digits(*overrides, variant=variant), tmp_path, progress=False)
  s = result.summary
  chance = np.log(10)
  evals = [
    json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in l
  ]
  assert evals[-1]["train_loss"] < 0.5 * chance, evals[-1]
  assert s["test_accuracy"] > 0.5
  # Bytes read from the compiled step's HLO agree with the payload accounting.
  assert s["bytes_per_step_hlo"] == s["bytes_per_step_static"]
  if variant == "amsgrad":
    assert s["bytes_per_step_hlo"] == s["dense_f32_bytes"]
  else:
    assert s["compression_ratio"] > 25


def test_resume_is_bit_identical(tmp_path):
  cfg = _digits("epochs=2", "checkpoint_every=1000")  # 2 epochs = 22 steps with 8 × 16
  straight = train.train(cfg, tmp_path / "straight", progress=False)
  k = straight.summary["steps"] // 2 + 1  # stop mid-epoch
  first = train.train(cfg, tmp_path / "resumed", stop_after=k, progress=False)
  assert first.summary["steps"] == k and not first.summary["finished"]
  resumed = train.train(cfg, tmp_path / "resumed", resume=True, progress=False)
  assert resumed.summary["finished"]
  _assert_trees_equal(straight.params, resumed.params)
  _assert_trees_equal(straight.opt_state, resumed.opt_state)
  # Every worker's residual survived: they differ across workers and are non-zero.
  residual = resumed.opt_state[0].residual.value
  leaf = np.asarray(jax.tree.leaves(residual)[0])
  assert leaf.shape[0] == 8 and np.abs(leaf[0] - leaf[1]).max() > 0
  # The metrics log of the resumed run equals the uninterrupted one.
  strip = lambda p: [{k: v for k, v in json.loads(l).items()} for l in p.read_text().splitlines()]
  assert strip(tmp_path / "straight" / "metrics.jsonl") == strip(
    tmp_path / "resumed" / "metrics.jsonl"
  )


def test_existing_run_is_not_overwritten_without_resume(stopped_run):
  # Any checkpointed run (stopped or finished: the trainer checks for a checkpoint) is kept.
  tmp_path = stopped_run
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  assert (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(checkpoints.CheckpointError, match="--resume"):
    train.train(_digits("epochs=1"), tmp_path, progress=False)
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
  "override,match",
  [
    ("model.name=resnet18", "model"),
    ("num_workers=4", "num_workers"),
    ("optimizer.learning_rate=0.5", "optimizer"),
  ],
)
def test_resume_refuses_a_different_run(override, match, stopped_run):
  tmp_path = stopped_run
  assert (tmp_path / "checkpoints" / "3").is_dir()
  snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  with pytest.raises(checkpoints.CheckpointError, match=match):
    train.train(_digits("epochs=1", override), tmp_path, resume=True, progress=False)
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot


def test_corrupt_checkpoint_is_a_clear_error(stopped_run):
  tmp_path = stopped_run
  step_dir = tmp_path / "checkpoints" / "3"
  for f in step_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "ocdbt" not in f.name and "manifest" in str(f):
      f.write_bytes(b"garbage")
  data_files = [f for f in step_dir.rglob("*") if f.is_file() and "d" in f.parent.name]
  for f in data_files:
    f.write_bytes(b"\x00" * 7)
  with pytest.raises(checkpoints.CheckpointError, match="unreadable"):
    train.train(_digits("epochs=1"), tmp_path, resume=True, progress=False)


def test_config_errors_name_the_problem():
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'optimizer.lr'"):
    _digits("optimizer.lr=1e-3")
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'bogus'"):
    _digits("bogus=1")
  with pytest.raises(config_lib.ConfigError, match="unknown variant"):
    config_lib.resolve(str(CONFIGS / "digits.py"), [], ["nope"])
  with pytest.raises(config_lib.ConfigError, match="not of the form key=value"):
    _digits("epochs")
  with pytest.raises(config_lib.ConfigError, match="epochs"):
    _digits("epochs='many'")
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.load_config_file("configs/nope.py")


def test_unknown_compressor_name_is_a_clear_error(tmp_path):
  cfg = _digits("optimizer.compressor=top_q")
  with pytest.raises(ValueError, match="unknown compressor 'top_q'; valid names"):
    train.train(cfg, tmp_path, progress=False)


def test_cli_trains_prints_table_and_plots(tmp_path, capsys):
  rc = cli.train_main(
    [
      "--config",
      str(CONFIGS / "digits.py") + ":smoke",
      "--workdir",
      str(tmp_path / "runs"),
      "--no-progress",
      "--variant",
      "amsgrad",
      "--variant",
      "comp_ams_block_sign",
      "epochs=1",
      "num_workers=8",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0
  assert "comp_ams_block_sign" in out and "bytes/step" in out
  png = tmp_path / "fig.png"
  assert (
    cli.plot_main(
      [
        str(tmp_path / "runs" / "amsgrad"),
        str(tmp_path / "runs" / "comp_ams_block_sign"),
        "--out",
        str(png),
      ]
    )
    == 0
  )
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
  rc = cli.train_main(
    [
      "--config",
      str(CONFIGS / "digits.py") + ":smoke",
      "--workdir",
      str(tmp_path),
      "--no-progress",
      "--variant",
      "amsgrad",
      "num_workers=8",
      "dataset.name=nope",
    ]
  )
  assert rc == 2
  assert "unknown dataset 'nope'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.train_main(["--config", str(CONFIGS / "digits.py"), "nosuchkey=1"])


def test_cli_reports_a_diverged_run_as_an_error(tmp_path, capsys):
  rc = cli.train_main(
    [
      "--config",
      str(CONFIGS / "digits.py") + ":smoke",
      "--workdir",
      str(tmp_path),
      "--no-progress",
      "--variant",
      "momentum_sgd",
      "num_workers=8",
      "optimizer.learning_rate=1e6",
    ]
  )
  assert rc == 2
  assert "training loss became" in capsys.readouterr().err


SMOKE_CONFIGS = [
  "fashion_mnist_cnn",
  "fashion_mnist_momentum",
  "mnist5k_lenet",
  "rotten_tomatoes_lstm",
]


# By default the LeNet (mnist5k) and LSTM (rotten_tomatoes) configs. In `-m slow` the two
# Fashion-MNIST ones (~40 s each: 64 CNN steps at 28x28): their model is the digits config's
# (test_digits_smoke_learns), their loader test_data's test_fashion_mnist_real, and the
# momentum-SGD variant of fashion_mnist_momentum is test_digits_smoke_learns's too.
# The LSTM on the review snippets (13 s): its model and loader run by default in test_models and
# the data tests.
SLOW_SMOKE_CONFIGS = ("fashion_mnist_cnn", "fashion_mnist_momentum", "rotten_tomatoes_lstm")


@pytest.mark.parametrize(
  "name",
  [
    pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_SMOKE_CONFIGS else [])
    for n in SMOKE_CONFIGS
  ],
)
def test_paper_config_smoke_runs_below_chance(name, tmp_path):
  cfg = config_lib.resolve(str(CONFIGS / f"{name}.py") + ":smoke", [])[1]  # a compressed variant
  try:
    result = train.train(cfg, tmp_path, progress=False)
  except FileNotFoundError as e:
    pytest.skip(f"dataset not installed here: {e}")
  evals = [
    json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in l
  ]
  num_classes = 2 if "rotten" in name else 10
  assert evals[-1]["train_loss"] < 0.9 * np.log(num_classes), evals
  assert result.summary["bytes_per_step_hlo"] < result.summary["dense_f32_bytes"] / 25


# 10 s (two trainer runs): in -m slow; cj.sharding.resize_workers, which it drives, is checked by
# default in tests/test_reliability.py.
@pytest.mark.slow
def test_elastic_resume_on_fewer_workers(tmp_path):
  train.train(_digits("epochs=2"), tmp_path, progress=False, stop_after=5)
  with pytest.raises(checkpoints.CheckpointError, match="num_workers"):
    train.train(_digits("epochs=2", "num_workers=4"), tmp_path, resume=True, progress=False)
  result = train.train(
    _digits("epochs=2", "num_workers=4"), tmp_path, resume=True, progress=False, elastic=True
  )
  assert result.summary["finished"] and result.summary["num_workers"] == 4
  assert jax.tree.leaves(result.opt_state[0].residual.value)[0].shape[0] == 4
  assert result.summary["test_accuracy"] > 0.3


def test_stops_once_the_windowed_training_loss_reaches_the_target(tmp_path):
  c = _digits("target_train_loss=1.8", "target_loss_window=4", "log_every=1")
  s = train.train(c, tmp_path, progress=False).summary
  losses = [
    json.loads(l)["loss"]
    for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
    if '"train"' in l
  ]
  # Independent check: the first step whose 4-step mean is <= 1.8 (chance is ln 10 = 2.30).
  first = next(i + 1 for i in range(3, len(losses)) if np.mean(losses[i - 3 : i + 1]) <= 1.8)
  assert s["steps_to_target"] == first == s["steps"] == len(losses)
  assert s["steps"] < s["total_steps"] and s["finished"]
  assert np.isfinite(s["test_accuracy"])


def test_target_window_longer_than_the_run_is_refused(tmp_path):
  with pytest.raises(ValueError, match="target_loss_window"):
    train.train(
      _digits("target_train_loss=0.5", "target_loss_window=100000"), tmp_path, progress=False
    )


# Local SGD (the diloco preset): 2 epochs = 22 steps, a sync every 4; the stopped run stops at
# step 5, one step into the second period, and the straight run ends at 22, two steps into the
# sixth.
DILOCO = ("epochs=2", "optimizer.sync_every=4", "checkpoint_every=1000")


@pytest.fixture(scope="module")
def _diloco_runs(tmp_path_factory):
  """An uninterrupted diloco run and one stopped (with its checkpoint) mid-period at step 5."""
  base = tmp_path_factory.mktemp("diloco")
  cfg = _digits(*DILOCO, variant="diloco")
  straight = train.train(cfg, base / "straight", progress=False)
  train.train(cfg, base / "stopped", progress=False, stop_after=5)
  return base, straight


def _accuracy(params, dataset):
  from compams_jax.experiments.models import create_model

  model = create_model("mnist_cnn", dataset.num_classes)
  logits = model.apply({"params": params}, dataset.x_test, train=False)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == dataset.y_test))


def test_diloco_learns_is_evaluated_on_theta_and_reports_bytes_per_sync(_diloco_runs):
  from compams_jax.experiments.data import load_dataset
  from compams_jax.experiments.models import count_params

  base, straight = _diloco_runs
  s = straight.summary
  evals = [
    json.loads(l)
    for l in (base / "straight" / "metrics.jsonl").read_text().splitlines()
    if '"eval"' in l
  ]
  assert [e["step"] for e in evals] == [11, 22]
  assert evals[1]["train_loss"] < evals[0]["train_loss"] < np.log(10)
  assert evals[1]["test_loss"] < evals[0]["test_loss"]
  assert s["test_accuracy"] > 0.3  # chance: 0.1
  # Every worker its own params; step 22 is 2 steps after a sync: they differ from θ.
  theta = cj.synchronized_params(straight.opt_state)
  w, t = np.asarray(jax.tree.leaves(straight.params)[-1]), jax.tree.leaves(theta)[-1]
  assert w.shape == (8, *t.shape)
  assert not np.array_equal(w[0], w[1]) and not np.array_equal(w[0], t)
  # The test accuracy is θ's (recomputed here), not a worker's.
  dataset = load_dataset("digits")
  assert abs(_accuracy(theta, dataset) - s["test_accuracy"]) < 1e-6
  assert s["num_params"] == count_params(theta)
  # Bytes: the dense pseudo-gradient (f32 per parameter) and a 4-byte finiteness flag, once per
  # sync; the compiled step's collectives (in its sync branch) agree.
  per_sync = 4 * count_params(theta) + 4
  assert s["bytes_per_sync"] == s["bytes_per_step_hlo"] == s["bytes_per_step_static"] == per_sync
  assert s["sync_every"] == 4 and s["bytes_per_step_steady"] == per_sync / 4
  assert [e["bits_sent"] for e in evals] == [8 * per_sync * 2, 8 * per_sync * 5]
  table = cli._format_table([s])
  head, _, row = table.splitlines()[:3]
  assert "bytes/step" in head and "bytes/sync" in head
  per_step = f"{per_sync // 4:,d}" if per_sync % 4 == 0 else f"{per_sync / 4:,.1f}"
  assert f" {per_sync:,d} " in row and f" {per_step} " in row
  assert "diloco H=4" in table


def test_diloco_resume_mid_period_is_bit_identical(_diloco_runs, tmp_path):
  base, straight = _diloco_runs
  shutil.copytree(base / "stopped", tmp_path, dirs_exist_ok=True)
  stopped = np.load(tmp_path / "final_state.npz")
  w = stopped[next(k for k in stopped.files if k.startswith("params"))]
  assert w.shape[0] == 8 and not np.array_equal(w[0], w[1])  # mid-period: the workers differ
  resumed = train.train(_digits(*DILOCO, variant="diloco"), tmp_path, resume=True, progress=False)
  assert resumed.summary["finished"] and resumed.summary["steps"] == 22
  # Per-worker params, θ, the inner AdamW states, the outer momentum and the step count.
  _assert_trees_equal(straight.params, resumed.params)
  _assert_trees_equal(straight.opt_state, resumed.opt_state)
  assert (base / "straight" / "metrics.jsonl").read_text() == (
    tmp_path / "metrics.jsonl"
  ).read_text()


def test_diloco_elastic_resume_is_refused(_diloco_runs, tmp_path):
  base, _ = _diloco_runs
  shutil.copytree(base / "stopped", tmp_path, dirs_exist_ok=True)
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  cfg = _digits(*DILOCO, "num_workers=4", variant="diloco")
  with pytest.raises(checkpoints.CheckpointError, match="not supported for local-SGD") as e:
    train.train(cfg, tmp_path, resume=True, progress=False, elastic=True)
  assert "num_workers=8" in str(e.value)
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# In -m slow: the diloco trainer path runs by default above, and test_optim checks that these
# presets build the library's SparseLoCo and DeMo.
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sparseloco", "demo"])
def test_sparseloco_and_demo_presets_train_on_digits(variant, tmp_path):
  result = train.train(_digits(variant=variant), tmp_path, progress=False)
  s = result.summary
  evals = [
    json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in l
  ]
  assert evals[-1]["train_loss"] < evals[0]["train_loss"]
  assert evals[-1]["test_loss"] < evals[0]["test_loss"] and s["test_accuracy"] > 0.12
  # The payload of the preset's compressor, as the compiled step's HLO sends it: per sync (with
  # a 4-byte finiteness flag) for SparseLoCo, every step for DeMo.
  theta = cj.synchronized_params(result.opt_state)
  preset = config_lib.PRESETS[variant]
  compressor = cj.compressors.get(preset["compressor"], **preset["compressor_kwargs"])
  payload = cj.wire_bytes(compressor, result.params if theta is None else theta)
  assert s["bytes_per_step_hlo"] == s["bytes_per_step_static"]
  if variant == "sparseloco":
    assert s["bytes_per_sync"] == payload + 4 and s["bytes_per_step_steady"] == (payload + 4) / 10
  else:
    assert theta is None and s["bytes_per_sync"] is None
    assert s["bytes_per_step_steady"] == payload
  assert s["compression_ratio"] > 50
