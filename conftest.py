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
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # first jax, then the device count, as the helper asks

import compams_jax as cj

cj.simulate_cpu_devices(8)


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
