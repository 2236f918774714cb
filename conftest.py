"""Loaded by pytest before anything runs a JAX operation.

* 8 simulated CPU devices for tests and doctests, set up by the library's own
  `cj.simulate_cpu_devices` (jax_num_cpu_devices, with PJRT_NPROC headroom for XLA:CPU's thread
  pool).
* Cheap compiles: XLA compile time, not run time, dominates the suite on CPU, so
  `jax_disable_most_optimizations` is on (LLVM at -O0, no expensive passes; the HLO passes, hence
  the collectives and their byte counts, are unchanged). It is set through the environment so
  the subprocesses the tests start (fresh interpreters, notebook kernels, worker processes)
  compile the same way. A test that depends on the optimized program is marked
  `@pytest.mark.optimized` (see the fixture below); JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns the
  default off for a whole run.
* No program compiled twice in one process: JAX's persistent compilation cache in a private
  temporary directory per test process (removed at exit), so a test that builds the same step
  again (a resumed training run, a second trainer variant, ...) loads the executable instead of
  recompiling it. It is set by `jax.config`, not the environment: subprocesses the tests start
  compile for themselves (test_determinism's fresh process compiles from scratch), and no two
  processes share a directory. A JAX_COMPILATION_CACHE_DIR of your own is used instead.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # first jax, then the device count, as the helper asks

import compams_jax as cj

cj.simulate_cpu_devices(8)

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _XLA_CACHE = tempfile.mkdtemp(prefix="compams_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


@pytest.fixture(autouse=True)
def _optimized_compiles(request):
  """`@pytest.mark.optimized`: this test's programs are compiled with XLA's optimizations.

  The flag is not part of JAX's compilation cache key, so a marked test must build its own
  jitted functions (not reuse ones that an unmarked test compiled)."""
  if request.node.get_closest_marker("optimized") is None:
    yield
    return
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
