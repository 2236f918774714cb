"""Executes the notebooks under notebooks/ top to bottom; any cell error fails the test.

Each notebook runs in its own Jupyter kernel: a separate process started from this Python
(`ipykernel`'s "python3" kernel, which jupyter_client launches with `sys.executable`), with the
working directory set to notebooks/. The kernel inherits none of this process's device setup
(XLA_FLAGS, JAX_PLATFORMS, PJRT_NPROC are removed from its environment): the notebooks' own first
cell has to set them, as it must for a user. It does inherit JAX_DISABLE_MOST_OPTIMIZATIONS (the
root conftest.py's cheap compiles).
"""

import json
import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell; the notebooks take well under a minute in total

# Appended to the executed copy (never to the file): reports which Python the kernel runs and
# whether it imports compams_jax.
_KERNEL_CHECK = (
  "import json, sys, compams_jax\nprint(json.dumps([sys.prefix, compams_jax.__file__]))"
)


def _kernel_env(tmp_path: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ)
  env["TMPDIR"] = str(tmp_path)  # 02_reproduction writes its smoke runs to a temporary directory
  # The kernel imports this checkout's compams_jax (as this process does), also where the
  # environment's editable install points at another checkout of the repository.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  # The notebook must set these itself, before importing jax, as it must for a user.
  for name in ("XLA_FLAGS", "JAX_PLATFORMS", "PJRT_NPROC", "MPLBACKEND"):
    env.pop(name, None)
  return env


def _execute(path: pathlib.Path, tmp_path: pathlib.Path) -> nbformat.NotebookNode:
  """Runs a fresh copy of the notebook; CellExecutionError on the first failing cell."""
  for attempt in range(2):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_KERNEL_CHECK))
    client = NotebookClient(
      nb,
      kernel_name="python3",
      timeout=CELL_TIMEOUT,
      allow_errors=False,
      resources={"metadata": {"path": str(path.parent)}},
    )
    try:
      client.execute(env=_kernel_env(tmp_path))
      return nb
    except DeadKernelError:
      # The kernel process died (no Python error). XLA:CPU aborts a process whose collective
      # waits 40 s for a participant ("Termination timeout for `all reduce RendezvousKey...`"),
      # which a heavily loaded machine can cause; the notebooks' PJRT_NPROC makes it rare. Run
      # once more; a cell error is never retried.
      if attempt:
        raise
  raise AssertionError("unreachable")


# Executing a notebook starts a kernel and compiles its steps (the quickstart ~12 s, the
# reproduction ~20 s of trainer smoke runs, which tests/experiments cover): both in `-m slow`,
# which CI runs. Both are checked as stored executed by default.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_reproduction.ipynb"])
def test_notebook_runs(name, tmp_path):
  path = NOTEBOOK_DIR / name
  nb = _execute(path, tmp_path)
  outputs = nb.cells[-1].outputs
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  kernel_prefix, package_file = json.loads(text.strip().splitlines()[-1])
  assert pathlib.Path(kernel_prefix).resolve() == pathlib.Path(sys.prefix).resolve(), (
    f"the notebook kernel ran {kernel_prefix}, not this Python ({sys.prefix}): a 'python3' "
    "kernelspec elsewhere on the Jupyter path shadows ipykernel's own"
  )
  import compams_jax

  assert pathlib.Path(package_file).resolve() == pathlib.Path(compams_jax.__file__).resolve()


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_reproduction.ipynb"])
def test_notebook_is_stored_executed(name):
  """A reader sees the results: every code cell ran, in order, without an error output."""
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  nbformat.validate(nb)
  counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
  assert all(isinstance(k, int) for k in counts), f"{name} has cells that never ran"
  assert counts == sorted(counts), f"{name} was not executed top to bottom"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert all(o.get("output_type") != "error" for o in cell.outputs), name
      text = "".join(o.get("text", "") for o in cell.outputs)
      assert "/work/" not in text and "/tmp/" not in text, f"{name} shows a machine path"
