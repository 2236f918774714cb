"""compams-train's command line: up-front validation, --resume, --variant, the results table,
the compams-plot hint, --help, and the simulated (vmap) and hierarchical layouts."""

import json
import pathlib
import shlex

import numpy as np
import pytest

from compams_jax.experiments import checkpoints, cli, train
from compams_jax.experiments import config as config_lib
from compams_jax.experiments.config import PRESETS

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
SMOKE = str(CONFIGS / "digits.py") + ":smoke"
# 256 examples / (4 workers × 16) = 4 steps.
TINY = ["epochs=1", "max_train_examples=256", "max_test_examples=128", "num_workers=4"]


def _cli(workdir, *args):
  return cli.train_main(["--config", SMOKE, "--workdir", str(workdir), "--no-progress", *args])


def _tiny(*overrides, variant="comp_ams_top_k"):
  return config_lib.resolve(SMOKE, [*TINY, *overrides], [variant])[0]


def _error_lines(err):
  return [line for line in err.splitlines() if line.strip()]


def _plot_hint(out):
  """The run directories that the printed compams-plot hint names."""
  (line,) = [line for line in out.splitlines() if line.startswith("plot with: ")]
  words = shlex.split(line.removeprefix("plot with: "))
  assert words[0] == "compams-plot"
  return [pathlib.Path(w) for w in words[1:]]


def _rows(out):
  return {
    line.split()[0]: line
    for line in out.splitlines()
    if line.split()[:1] in (["amsgrad"], ["comp_ams_top_k"])
  }


@pytest.mark.parametrize(
  "override,key",
  [
    ("optimizer.learning_rate=-1e-3", "optimizer.learning_rate"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate"),
    ("optimizer.learning_rate=inf", "optimizer.learning_rate"),
    ("optimizer.learning_rate=-inf", "optimizer.learning_rate"),
    ("num_workers=0", "num_workers"),
    ("local_batch=0", "local_batch"),
    ("epochs=0", "epochs"),
    ("max_train_examples=-1", "max_train_examples"),
    ("log_every=0", "log_every"),
    ("checkpoint_every=0", "checkpoint_every"),
    ("optimizer.b1=1.0", "optimizer.b1"),
    ("optimizer.b1=-0.1", "optimizer.b1"),
    ("optimizer.b2=1", "optimizer.b2"),
    ("optimizer.eps=-1e-8", "optimizer.eps"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps"),
    ("optimizer.momentum=1.0", "optimizer.momentum"),
    ("optimizer.momentum=-0.5", "optimizer.momentum"),
    ("mesh.shape=(2,3)", "mesh.shape"),
    ("--config.optimizer.learning_rate=-1", "optimizer.learning_rate"),  # config_flags' spelling
    ("--config.mesh.shape=(2, 3)", "mesh.shape"),
  ],
)
def test_impossible_values_are_one_error_line_before_training(override, key, tmp_path, capsys):
  workdir = tmp_path / "run"
  rc = _cli(workdir, "--variant", "amsgrad,comp_ams_top_k", *TINY, override)
  out, err = capsys.readouterr()
  assert rc == 2
  (line,) = _error_lines(err)
  assert line.startswith("compams-train: error: invalid config: ") and f"{key}=" in line, line
  assert out == "" and not workdir.exists()  # nothing trained, nothing written


def test_every_impossible_value_is_named_in_one_message():
  c = _tiny("epochs=0", "optimizer.learning_rate=nan", "optimizer.b2=1.5")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)
  for key in ("epochs=0", "optimizer.learning_rate=nan", "optimizer.b2=1.5"):
    assert key in str(e.value)


def test_train_validates_before_any_setup(tmp_path, monkeypatch):
  def no_setup(config):
    raise AssertionError("setup ran for an impossible config")

  monkeypatch.setattr(train, "make_setup", no_setup)
  with pytest.raises(config_lib.ConfigError, match="optimizer.learning_rate"):
    train.train(_tiny("optimizer.learning_rate=0"), tmp_path / "run", progress=False)
  with pytest.raises(config_lib.ConfigError, match="local_batch"):
    train.train(_tiny("local_batch=-4"), tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_shipped_configs_pass_validation(name):
  for spec in (str(CONFIGS / f"{name}.py"), str(CONFIGS / f"{name}.py") + ":smoke"):
    for c in config_lib.resolve(spec, []):
      config_lib.validate(c)


@pytest.mark.parametrize("layout", ["missing", "empty", "empty_checkpoints"])
def test_resume_without_a_checkpoint_is_an_error(layout, tmp_path, capsys):
  workdir = tmp_path / "run"
  if layout != "missing":
    workdir.mkdir()
  if layout == "empty_checkpoints":
    (workdir / "checkpoints").mkdir()
  before = sorted(tmp_path.rglob("*"))
  rc = _cli(workdir, "--resume", "--variant", "comp_ams_top_k", *TINY)
  out, err = capsys.readouterr()
  assert rc == 2
  (line,) = _error_lines(err)
  assert line.startswith("compams-train: error: --resume: ") and "no checkpoint" in line, line
  assert sorted(tmp_path.rglob("*")) == before  # nothing created
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
    train.train(_tiny(), workdir, resume=True, progress=False)
  assert sorted(tmp_path.rglob("*")) == before


def test_help_lists_the_variants_and_the_defaults(capsys):
  with pytest.raises(SystemExit) as e:
    cli.train_main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for name in PRESETS:
    assert f"  {name} " in out, name
  assert "runs/CONFIG_NAME" in out  # the default workdir
  assert "`variants` field" in out  # where the default variants come from
  assert "--variant a,b" in out
  assert "train all epochs" in out  # --stop-after's default


@pytest.mark.parametrize("value", ["amsgrad,nope", "nope", ","])
def test_unknown_variant_lists_the_valid_ones(value, capsys):
  with pytest.raises(SystemExit) as e:
    cli.train_main(["--config", SMOKE, "--variant", value])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "valid: " + ", ".join(PRESETS) in err
  if "nope" in value:
    assert "'nope'" in err and "'amsgrad'" not in err


def test_comma_variants_stopped_run_table_and_plot_hint(tmp_path, capsys):
  rc = _cli(tmp_path, "--variant", "amsgrad,comp_ams_top_k", "--stop-after", "2", *TINY)
  out = capsys.readouterr().out
  assert rc == 0
  # --variant a,b runs both, each in its own subfolder.
  summaries = {
    v: json.loads((tmp_path / v / "summary.json").read_text())
    for v in ("amsgrad", "comp_ams_top_k")
  }
  for v, s in summaries.items():
    assert s["variant"] == v and s["steps"] == 2 and s["total_steps"] == 4 and not s["finished"]
  # Rows, and the final line, say the runs stopped.
  rows = _rows(out)
  assert set(rows) == {"amsgrad", "comp_ams_top_k"}
  for row in rows.values():
    assert row.endswith("stopped at step 2/4"), row
  last = out.strip().splitlines()[-1]
  assert "NOT finished" in last and "stopped at step 2/4" in last and "--resume" in last, last
  # The time column says what it measures.
  lines = out.splitlines()
  head = next(line for line in lines if line.startswith("variant"))
  assert "loop s" in head and "time s" not in head
  note = next(line for line in lines if line.startswith("loop s:"))
  assert "training loop" in note and "compiling" in note
  # The hint names exactly the run directories, each with its metrics.
  hinted = _plot_hint(out)
  assert hinted == [tmp_path / "amsgrad", tmp_path / "comp_ams_top_k"]
  assert all((d / "metrics.jsonl").is_file() for d in hinted)


def test_resume_continues_checkpointed_variants_and_starts_the_others(tmp_path, capsys):
  """A multi-variant run killed before its second variant began: --resume finishes the first
  and starts the second (neither a silent fresh start of all, nor a refusal of all)."""
  first = train.train(_tiny(variant="amsgrad"), tmp_path / "amsgrad", stop_after=2, progress=False)
  assert not first.summary["finished"]
  rc = _cli(tmp_path, "--resume", "--variant", "amsgrad", "--variant", "comp_ams_top_k", *TINY)
  out = capsys.readouterr().out
  assert rc == 0
  assert f"{tmp_path / 'comp_ams_top_k'} has no checkpoint; comp_ams_top_k starts fresh" in out
  rows = _rows(out)
  assert all(row.endswith("done") for row in rows.values()), rows
  assert out.strip().splitlines()[-1] == "all 2 run(s) finished."
  steps = [
    json.loads(line)["step"]
    for line in (tmp_path / "amsgrad" / "metrics.jsonl").read_text().splitlines()
    if '"train"' in line
  ]
  assert steps == [2, 4]  # log_every=2: the line before the stop survived the resume
  assert _plot_hint(out) == [tmp_path / "amsgrad", tmp_path / "comp_ams_top_k"]


def test_single_variant_on_devices_and_under_vmap_report_the_same_bytes(tmp_path, capsys):
  runs = {}
  for name, extra in (("devices", []), ("vmap", ["mesh.simulate=vmap"])):
    workdir = tmp_path / name
    assert _cli(workdir, "--variant", "comp_ams_top_k", *TINY, *extra) == 0
    out = capsys.readouterr().out
    # One variant trains in the workdir itself: the hint is that directory, not workdir/*.
    assert _plot_hint(out) == [workdir]
    assert (workdir / "metrics.jsonl").is_file()
    assert out.strip().splitlines()[-1] == "all 1 run(s) finished."
    runs[name] = json.loads((workdir / "summary.json").read_text())
  dev, vmap = runs["devices"], runs["vmap"]
  assert dev["finished"] and vmap["finished"]
  assert vmap["bytes_per_step_hlo"] == 0  # every worker on one device: no collectives in the HLO
  assert dev["bytes_per_step_hlo"] == dev["bytes_per_step_static"]
  for key in ("bytes_per_step_steady", "bytes_per_step_static", "compression_ratio"):
    assert vmap[key] == dev[key], key
  assert np.isfinite(vmap["test_accuracy"])


def test_hierarchical_mesh_run_finishes(tmp_path):
  s = train.train(_tiny("mesh.shape=(2,2)"), tmp_path, progress=False).summary
  assert s["finished"] and s["steps"] == s["total_steps"] == 4
  assert s["num_workers"] == 4 and np.isfinite(s["test_accuracy"])
  assert 0 < s["bytes_per_step_steady"] == s["bytes_per_step_static"] < s["dense_f32_bytes"]


def test_stop_after_below_one_is_refused(tmp_path, capsys):
  assert _cli(tmp_path / "run", "--stop-after", "0", "--variant", "amsgrad", *TINY) == 2
  (line,) = _error_lines(capsys.readouterr().err)
  assert line == "compams-train: error: --stop-after=0 must be >= 1."
  assert not (tmp_path / "run").exists()
