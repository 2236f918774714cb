"""Every Python block of README.md and docs/guide.md runs as written, in order, in a fresh
interpreter; each document sets up its own 8 simulated CPU devices."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md"]


def python_blocks(path: pathlib.Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_docs_have_python_blocks():
  assert len(python_blocks(DOCS[0])) >= 5
  assert all(doc.exists() for doc in DOCS), [str(d) for d in DOCS if not d.exists()]


# README.md by default; docs/guide.md (~25 s: a dozen more compiled steps of the API that the
# unit tests cover) in `-m slow`.
@pytest.mark.parametrize(
  "doc",
  [
    pytest.param(d, id=d.name, marks=[pytest.mark.slow] if d.name != "README.md" else [])
    for d in DOCS
  ],
)
def test_python_blocks_run_in_order(doc, tmp_path):
  if not doc.exists():
    pytest.fail(f"{doc} is missing")
  blocks = python_blocks(doc)
  script = "\n\n".join(f"# --- block {i}\n{b}" for i, b in enumerate(blocks))
  (tmp_path / "doc.py").write_text(script)
  # The documents set up their own 8 devices, as they must for a reader: nothing of this
  # process's device setup is inherited. JAX_PLATFORMS keeps the run on the CPU and PJRT_NPROC
  # gives XLA:CPU's thread pool headroom on a loaded machine (a reader's own environment).
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(JAX_PLATFORMS="cpu", PJRT_NPROC="32")
  # This checkout's compams_jax, also where an editable install points at another checkout.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  done = subprocess.run(
    [sys.executable, str(tmp_path / "doc.py")],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-4000:]
