"""benchmarks/reproduce.py's queue: invocations sharing it never train the same run twice."""

import fcntl
import importlib
import os
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def reproduce(monkeypatch):
  """The module, imported without letting its XLA_FLAGS setting leak into other tests."""
  monkeypatch.syspath_prepend(str(BENCH))
  env = dict(os.environ)
  try:
    yield importlib.import_module("reproduce")
  finally:
    os.environ.clear()
    os.environ.update(env)
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
