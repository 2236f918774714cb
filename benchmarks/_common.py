"""What every benchmark sets up the same way: simulated devices, the import path, the compressors
to run (from `cj.compressors.REGISTRY`), run metadata and JSON output.

Call `force_devices(n)` before any JAX operation: XLA reads the device count once, when its CPU
backend starts. Nothing here imports jax at module level.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere: use this checkout
  sys.path.insert(0, str(ROOT))


def force_devices(n: int) -> None:
  """n simulated CPU devices for this process: `cj.simulate_cpu_devices(n)` (which also gives
  XLA:CPU's thread pool headroom), on the CPU platform (JAX_PLATFORMS=cpu unless set). Call it
  before any JAX operation."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import compams_jax as cj  # pylint: disable=import-outside-toplevel

  cj.simulate_cpu_devices(n)


# ----------------------------------------------------------------- compressors from the registry


class Spec(NamedTuple):
  """One compressor setting: a registry name and its factory's keyword arguments."""

  name: str
  kwargs: dict[str, Any]

  @property
  def label(self) -> str:
    """A shell-friendly name: "top_k_0.01", "cast_bfloat16", "block_sign_exact_zeros"."""
    return "_".join([self.name, *(_word(k, v) for k, v in sorted(self.kwargs.items()))])

  def build(self, **overrides: Any):
    """The compressor, with `overrides` for the arguments its factory takes (others dropped)."""
    import compams_jax as cj  # pylint: disable=import-outside-toplevel

    params = cj.compressors.REGISTRY[self.name].parameters
    kwargs = {**self.kwargs, **{k: v for k, v in overrides.items() if k in params}}
    return cj.compressors.get(self.name, **kwargs)

  def jsonable(self) -> dict[str, Any]:
    return {"name": self.name, "kwargs": {k: _jsonable_value(v) for k, v in self.kwargs.items()}}


def _jsonable_value(v: Any) -> Any:
  if isinstance(v, (bool, int, float, str)) or v is None:
    return v
  import numpy as np  # pylint: disable=import-outside-toplevel

  try:
    return np.dtype(v).name
  except TypeError:
    return repr(v)


def _word(key: str, value: Any) -> str:
  if value is True:
    return key
  if value is False:
    return f"no_{key}"
  if isinstance(value, float):
    return f"{value:g}"
  return str(_jsonable_value(value))


def parse_spec(text: str) -> Spec:
  """ "top_k" (its registry examples are used) or "top_k:ratio=0.05,method='exact'"."""
  name, _, args = text.partition(":")
  kwargs = {}
  for item in filter(None, args.split(",")):
    key, _, value = item.partition("=")
    try:
      kwargs[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      kwargs[key.strip()] = value.strip()  # e.g. dtype=bfloat16
  return Spec(name.strip(), kwargs)


def compressor_specs(names=None, *, all_examples: bool = False) -> list[Spec]:
  """The settings to run: for each registry name (default: every registered compressor) its
  first example (or every example); "name:arg=value,..." gives one setting explicitly."""
  import compams_jax as cj  # pylint: disable=import-outside-toplevel

  registry = cj.compressors.REGISTRY
  out = []
  for text in names or list(registry):
    spec = parse_spec(text)
    if spec.name not in registry:
      raise SystemExit(f"unknown compressor {spec.name!r}; registered: {', '.join(registry)}")
    if ":" in text:
      out.append(spec)
      continue
    examples = registry[spec.name].examples
    out.extend(Spec(spec.name, dict(kw)) for kw in (examples if all_examples else examples[:1]))
  return _unique(out)


def _unique(specs: list[Spec]) -> list[Spec]:
  seen, out = set(), []
  for s in specs:
    if s.label not in seen:
      seen.add(s.label)
      out.append(s)
  return out


def add_compressor_args(parser: argparse.ArgumentParser, default_help: str = "every one") -> None:
  """--compressors NAME[:ARG=VALUE,...] ... and --all-examples."""
  parser.add_argument(
    "--compressors",
    nargs="+",
    default=None,
    metavar="NAME[:ARG=VALUE,...]",
    help="registry names (cj.compressors.REGISTRY; default: "
    f"{default_help}), each run at its first registry example, or with explicit arguments "
    "(e.g. top_k:ratio=0.05)",
  )
  parser.add_argument(
    "--all-examples",
    action="store_true",
    help="run every registry example of each named compressor, not only the first",
  )


# ----------------------------------------------------------------- run metadata and JSON


def git_state() -> dict[str, Any] | None:
  """HEAD commit and uncommitted library files of the checkout the numbers were measured on."""
  try:
    head = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--short", "compams_jax"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.split("\n")
    return {"commit": head, "dirty_library_files": [d for d in dirty if d.strip()]}
  except (OSError, subprocess.CalledProcessError):
    return None


def loadavg() -> list[float] | None:
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def run_info(benchmark: str) -> dict[str, Any]:
  """Command, date, versions, machine, devices, load and git state of this run."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  return {
    "benchmark": benchmark,
    "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax_version": jax.__version__,
    "optax_version": optax.__version__,
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "device_count": jax.device_count(),
    "num_cpu_devices": jax.config.jax_num_cpu_devices,  # set by force_devices (-1: not set)
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "loadavg_at_start": loadavg(),
    "git": git_state(),
  }


def sanitize(obj: Any) -> Any:
  """JSON-safe: NumPy scalars to Python, non-finite floats to strings ("inf", "nan")."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  if isinstance(obj, dict):
    return {k: sanitize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [sanitize(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(obj) else str(float(obj))
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> pathlib.Path:
  """Writes `sanitize(obj)` to path (creating its folder); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(sanitize(obj), indent=indent, allow_nan=False))
  return path
