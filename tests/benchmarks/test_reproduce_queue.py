"""benchmarks/reproduce.py's queue: invocations sharing it never train the same run twice."""

import fcntl
import importlib
import json
import os
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def reproduce(monkeypatch):
  """The module. Importing it sets nothing up (`run` sets up its devices with
  `cj.simulate_cpu_devices`), so nothing leaks into other tests."""
  monkeypatch.syspath_prepend(str(BENCH))
  env = dict(os.environ)
  try:
    module = importlib.import_module("reproduce")
    assert dict(os.environ) == env
    yield module
  finally:
    sys.modules.pop("reproduce", None)


def test_a_run_locked_by_another_invocation_is_left_to_it(tmp_path, reproduce):
  workdir = tmp_path / "study" / "amsgrad" / "lr0.001_seed0"
  workdir.parent.mkdir(parents=True)
  with open(workdir.parent / f"{workdir.name}.lock", "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the other invocation holds it
    record = reproduce._train_one("configs/does_not_matter.py", "amsgrad", [], workdir)
  assert record["test_accuracy"] is None
  assert record["missing"] == "trained by another invocation"
  assert not workdir.exists()  # nothing of the other invocation's run was touched


def test_a_finished_run_is_read_not_locked_or_retrained(tmp_path, reproduce):
  workdir = tmp_path / "study" / "amsgrad" / "lr0.001_seed0"
  workdir.mkdir(parents=True)
  (workdir / "summary.json").write_text('{"finished": true, "test_accuracy": 0.5}')
  (workdir / "metrics.jsonl").write_text('{"kind": "eval", "epoch": 1}\n')
  with open(workdir.parent / f"{workdir.name}.lock", "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = reproduce._train_one("configs/does_not_matter.py", "amsgrad", [], workdir)
  assert record["test_accuracy"] == 0.5 and record["evals"] == [{"kind": "eval", "epoch": 1}]


def _fake_training(calls, accuracy, missing=()):
  """A `_train_one` that records its calls and returns `accuracy[lr]` (or a missing run)."""

  def train_one(spec, variant, overrides, workdir, export_only=False):
    lr = float(next(o for o in overrides if o.startswith("optimizer.learning_rate=")).split("=")[1])
    calls.append((variant, lr))
    if lr in missing:
      return {"variant": variant, "missing": "trained by another invocation", "test_accuracy": None}
    return {
      "test_accuracy": accuracy[lr],
      "test_loss": 0.1,
      "steps": 1,
      "seconds": 1.0,
      "evals": [],
      "config": {"local_batch": 1, "epochs": 1, "dataset": {"name": "d"}, "model": {"name": "m"}},
    }

  return train_one


def _study(reproduce, tmp_path, centre):
  (tmp_path / "short.json").write_text(json.dumps({"variants": {v: {"lr": centre} for v in "ab"}}))
  return reproduce.Study(
    "s", "S", "c.py", ("a", "b"), (), seeds=(0,), lr_around="short", extend_edges=True
  )


def test_grid_centres_come_first_and_an_edge_best_is_extended(tmp_path, reproduce, monkeypatch):
  calls = []
  accuracy = {1e-4: 0.5, 3e-4: 0.6, 1e-3: 0.7, 3e-3: 0.8, 1e-2: 0.75}  # best past the grid's edge
  monkeypatch.setattr(reproduce, "_train_one", _fake_training(calls, accuracy))
  monkeypatch.setattr(reproduce, "_host", lambda: {})
  result = reproduce.run_study(_study(reproduce, tmp_path, 3e-4), tmp_path / "runs", tmp_path)
  assert calls[:2] == [("a", 3e-4), ("b", 3e-4)]  # every variant's centre before any other rate
  assert [lr for v, lr in calls if v == "a"] == [3e-4, 1e-4, 1e-3, 3e-3, 1e-2]
  assert result["variants"]["a"]["lr"] == 3e-3 and result["complete"]


def test_a_grid_with_a_run_left_to_another_invocation_is_not_extended(
  tmp_path, reproduce, monkeypatch
):
  calls = []
  accuracy = {1e-4: 0.5, 3e-4: 0.6, 1e-3: 0.7, 3e-3: 0.8}
  monkeypatch.setattr(reproduce, "_train_one", _fake_training(calls, accuracy, missing={1e-4}))
  monkeypatch.setattr(reproduce, "_host", lambda: {})
  result = reproduce.run_study(_study(reproduce, tmp_path, 3e-4), tmp_path / "runs", tmp_path)
  assert [lr for v, lr in calls if v == "a"] == [3e-4, 1e-4, 1e-3]  # its edge is not known yet
  assert not result["complete"]  # no verdict until the other invocation's run is in
