"""Multi-process training through jax.distributed on localhost: 2 processes x 4 CPU devices."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from compams_jax.experiments import cli

CONFIG = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "digits.py") + ":smoke"
ARGS = ["--no-progress", "--variant", "comp_ams_block_sign", "num_workers=8", "epochs=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # The CLI sets the device count for each process itself.
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cli(*args):
  return [sys.executable, "-m", "compams_jax.experiments.cli", "--config", CONFIG, *args]


# 18 s (two interpreters compiling the trainer): in -m slow. The library's two-process
# bit-identity (tests/test_hierarchical.py) runs by default.
@pytest.mark.slow
def test_two_processes_match_one_process_bit_for_bit(tmp_path):
  # The one-process reference runs the same CLI in this process (8 devices, as the CLI would
  # set up for num_workers=8): one interpreter start and compile fewer than a third process.
  assert cli.train_main(["--config", CONFIG, "--workdir", str(tmp_path / "one"), *ARGS]) == 0
  port = _free_port()
  procs = [
    subprocess.Popen(
      _cli(
        "--workdir",
        str(tmp_path / "two"),
        *ARGS,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
      ),
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a = np.load(tmp_path / "one" / "final_state.npz")
  b = np.load(tmp_path / "two" / "final_state.npz")
  assert sorted(a.files) == sorted(b.files) and any("residual" in f for f in a.files)
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert (tmp_path / "one" / "metrics.jsonl").read_text() == (
    tmp_path / "two" / "metrics.jsonl"
  ).read_text()


@pytest.mark.slow
def test_killed_process_fails_fast_and_resume_is_bit_identical(tmp_path):
  """Kill one of two processes mid-run: the other exits non-zero with JAX's message within the
  heartbeat timeout (no hang); relaunching both with --resume ends bit-identical to an
  uninterrupted run."""
  args = [
    "--no-progress",
    "--variant",
    "comp_ams_top_k",
    "num_workers=8",
    "epochs=6",
    "checkpoint_every=11",
  ]
  ref = subprocess.run(
    _cli("--workdir", str(tmp_path / "ref"), *args),
    env=_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert ref.returncode == 0, ref.stderr[-3000:]

  def launch(port, *extra):
    return [
      subprocess.Popen(
        _cli(
          "--workdir",
          str(tmp_path / "run"),
          *args,
          *extra,
          "--coordinator",
          f"127.0.0.1:{port}",
          "--num-processes",
          "2",
          "--process-id",
          str(i),
        ),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for i in range(2)
    ]

  procs = launch(_free_port())
  ckpts = tmp_path / "run" / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and not any(
    p.name.isdigit() and int(p.name) >= 22 for p in ckpts.glob("*")
  ):
    time.sleep(0.5)
  assert procs[0].poll() is None, "the run finished before it could be interrupted"
  procs[1].kill()
  t0 = time.time()
  _, err = procs[0].communicate(timeout=180)
  assert procs[0].returncode != 0
  assert time.time() - t0 < 120
  assert "another task died" in err or "unhealthy" in err, err[-2000:]
  procs[1].communicate()
  # Every checkpoint directory that exists is complete (orbax commits atomically).
  for step_dir in ckpts.glob("*"):
    if step_dir.name.isdigit():
      assert (step_dir / "_CHECKPOINT_METADATA").exists(), step_dir

  procs = launch(_free_port(), "--resume")
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  a = np.load(tmp_path / "ref" / "final_state.npz")
  b = np.load(tmp_path / "run" / "final_state.npz")
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (
    tmp_path / "run" / "metrics.jsonl"
  ).read_text()
