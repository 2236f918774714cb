"""Bit-for-bit reproducibility of COMP-AMS on 8 simulated workers.

* The same seed gives bit-identical parameters and optimizer state when a run is repeated from
  scratch (a new optimizer, a new jitted step, a new state), in this process and in a fresh one.
* A different `seed=` changes a randomized compressor's run (qsgd), and nothing else (top_k).
* `jax.pmap` and `jax.shard_map` compute the same run bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import compams_jax as cj
from tests import harness

C = cj.compressors
STEPS = 10
LR = 0.05
SHAPES = {"conv": (3, 3, 2, 4), "dense": (24, 10), "bias": (10,)}

COMPRESSORS = {
  "top_k": lambda: C.top_k(0.1),
  "block_sign": C.block_sign,
  "qsgd": lambda: C.qsgd(4),  # private randomness: keys from (seed, step, worker index)
}


@pytest.fixture(autouse=True, scope="module")
def _compile_from_scratch():
  """Every run here compiles its step (nothing is written to conftest.py's compilation cache
  while this module runs, so the second of two identical runs cannot load the first's)."""
  before = jax.config.values["jax_persistent_cache_min_compile_time_secs"]
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  yield
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def problem(n, seed=0):
  return harness.problem(SHAPES, n, STEPS, seed)


def flat_state(params, state, *, pmap: bool) -> dict[str, np.ndarray]:
  """Every leaf of (params, state) as a host array, keyed by its path, in one layout.

  pmap keeps a leading device axis on everything: replicated leaves are taken from device 0
  (after checking all devices agree) and per-worker leaves (n, 1, ...) become (n, ...), the
  shard_map global view.
  """
  out = {}
  per_worker = lambda x: isinstance(x, cj.PerWorker)

  def visit(prefix, tree):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=per_worker):
      name = prefix + jax.tree_util.keystr(path)
      if isinstance(leaf, cj.PerWorker):
        for sub, x in jax.tree_util.tree_leaves_with_path(leaf.value):
          x = np.asarray(x)
          out[name + ".value" + jax.tree_util.keystr(sub)] = x[:, 0] if pmap else x
        continue
      x = np.asarray(leaf)
      if pmap:
        assert all(x[i].tobytes() == x[0].tobytes() for i in range(len(x))), name
        x = x[0]
      out[name] = x

  visit("params", params)
  visit("state", state)
  return out


def run_shard_map(tx, params, grads, mesh):
  """A fresh state and a fresh jitted shard_map step (a new function: traced and compiled)."""
  p, states = harness.run(tx, params, grads, mesh, STEPS)
  return flat_state(p, states[-1], pmap=False)


def run_pmap(tx, params, grads, n):
  return flat_state(*harness.run_pmap(tx, params, grads, n, STEPS), pmap=True)


def assert_bitwise_equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    if a[k].tobytes() != b[k].tobytes():
      diff = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))
      raise AssertionError(
        f"{k}: not bit-identical, max |diff| {diff.max():.3g} at "
        f"{np.unravel_index(diff.argmax(), diff.shape)}"
      )


def differs(a: dict, b: dict) -> list[str]:
  return [k for k in a if a[k].tobytes() != b[k].tobytes()]


@functools.cache
def shard_map_result(name, seed, mesh, repeat=0):
  """A cached run (repeat > 0 makes an independent one for the same arguments)."""
  del repeat
  params, grads = problem(mesh.size)
  tx = cj.comp_ams(LR, COMPRESSORS[name](), axis_name="data", seed=seed)
  return run_shard_map(tx, params, grads, mesh)


# ----------------------------------------------------------------- same seed, same bits


@pytest.mark.parametrize("name", ["top_k", "qsgd"])
def test_same_seed_is_bit_identical_from_scratch(name, mesh):
  first = shard_map_result(name, 0, mesh, repeat=1)
  second = shard_map_result(name, 0, mesh, repeat=2)
  assert_bitwise_equal(first, second)
  # The runs did something: parameters moved and residuals are non-zero.
  params, _ = problem(mesh.size)
  for k in SHAPES:
    assert np.abs(first["params['" + k + "']"] - params[k]).max() > 0.05
  residuals = [v for k, v in first.items() if ".residual.value" in k]
  assert residuals and all(np.any(r != 0) for r in residuals)


def test_seed_changes_qsgd_and_only_qsgd(mesh):
  base = shard_map_result("qsgd", 0, mesh, repeat=1)
  other = shard_map_result("qsgd", 1, mesh)
  changed = differs(base, other)
  assert any(k.startswith("params") for k in changed), changed
  assert any(".residual.value" in k for k in changed), changed
  # top_k draws no randomness: the seed is ignored, bit for bit.
  assert_bitwise_equal(
    shard_map_result("top_k", 0, mesh, repeat=1), shard_map_result("top_k", 7, mesh)
  )


_SUBPROCESS = textwrap.dedent("""
    import json, os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    import compams_jax as cj
    cj.simulate_cpu_devices(8)
    from tests import test_determinism as td
    mesh = jax.make_mesh((8,), ("data",))
    out = td.shard_map_result(sys.argv[2], int(sys.argv[3]), mesh)
    print(json.dumps({k: v.tobytes().hex() for k, v in out.items()}))
""")


@pytest.mark.parametrize("name", ["qsgd"])
def test_same_seed_is_bit_identical_in_a_fresh_process(name, mesh):
  """No hidden process state (hash seeds, thread scheduling, allocation addresses) leaks in."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The child sets up its own 8 devices (cj.simulate_cpu_devices); nothing device-related is
  # inherited from this process.
  drop = ("XLA_FLAGS", "PJRT_NPROC", "PYTHONHASHSEED")
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env["PYTHONHASHSEED"] = "12345"  # differs from this process's (random) hash seed
  proc = subprocess.run(
    [sys.executable, "-c", _SUBPROCESS, root, name, "0"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  theirs = json.loads(proc.stdout.strip().splitlines()[-1])
  mine = shard_map_result(name, 0, mesh, repeat=1)
  assert theirs.keys() == mine.keys()
  bad = [k for k in mine if mine[k].tobytes().hex() != theirs[k]]
  assert not bad, bad


# ----------------------------------------------------------------- pmap == shard_map

# Measured (XLA:CPU, jax 0.10): pmap and shard_map lower the step to the same HLO arithmetic,
# and everything that compams_jax computes — every worker's residual, the compressed averages
# (hence AMSGrad's nu and nu_max), the counters — is bit-identical. AMSGrad's first moment
# m ← 0.9·m + 0.1·ḡ (HLO: 0.9·m + 0.0125·Σḡ) is not: LLVM contracts it into a fused multiply-
# add in both programs, but around DIFFERENT products — shard_map rounds fma(0.9, m,
# fl(0.0125·Σḡ)), pmap rounds fma(0.0125, Σḡ, fl(0.9·m)) (checked element for element against
# both formulas on step 2). Step 1 is bit-identical (m = 0); from step 2, m and then the
# parameters differ by about one ulp of the leaf's largest entry (≤ 1.6·eps·max|leaf| over
# three compressors × two problems, 10 steps); 4·eps·max|leaf| is asserted. That is with XLA's
# optimizations (the `optimized` test below, in -m slow). The suite's default cheap compiles
# (LLVM at -O0, conftest.py) contract nothing: m is bit-identical too, and the parameter update
# still rounds differently in the two programs (measured: every params leaf differs for
# block_sign, qsgd and top_k), within the same bound.
FMA_SENSITIVE = ("params[", "state[1].mu[")


def _assert_pmap_and_shard_map_agree(via_pmap, via_shard_map):
  assert via_pmap.keys() == via_shard_map.keys()
  exact = {k: v for k, v in via_pmap.items() if not k.startswith(FMA_SENSITIVE)}
  assert any(".residual.value" in k for k in exact) and any(".nu_max" in k for k in exact)
  assert_bitwise_equal(exact, {k: via_shard_map[k] for k in exact})
  eps = float(np.finfo(np.float32).eps)
  for k in via_pmap.keys() - exact.keys():
    a, b = via_pmap[k].astype(np.float64), via_shard_map[k].astype(np.float64)
    assert np.max(np.abs(a - b)) <= 4 * eps * np.max(np.abs(b)), k


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_pmap_and_shard_map_agree(name, n_devices, mesh):
  params, grads = problem(n_devices)
  tx = cj.comp_ams(LR, COMPRESSORS[name](), axis_name="data")
  via_pmap = run_pmap(tx, params, grads, n_devices)
  _assert_pmap_and_shard_map_agree(via_pmap, shard_map_result(name, 0, mesh, repeat=1))


@pytest.mark.slow
@pytest.mark.optimized
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_pmap_and_shard_map_agree_optimized(name, n_devices, mesh):
  """The same, both programs compiled with XLA's optimizations (the FMA contraction above)."""
  params, grads = problem(n_devices)
  tx = cj.comp_ams(LR, COMPRESSORS[name](), axis_name="data")
  via_pmap = run_pmap(tx, params, grads, n_devices)
  _assert_pmap_and_shard_map_agree(via_pmap, run_shard_map(tx, params, grads, mesh))
