"""Test configuration: 8 simulated CPU devices, set before jax initialises."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU sizes its thread pool as max(PJRT_NPROC or #cores, #devices): with exactly one thread
# per simulated device a collective can wait for a device that never gets a thread and abort
# ("Termination timeout for all reduce RendezvousKey"). Give it headroom.
os.environ.setdefault("PJRT_NPROC", "32")

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_DEVICES = 8


@pytest.fixture(scope="session")
def n_devices():
  assert jax.device_count() == NUM_DEVICES, (
      f"tests need {NUM_DEVICES} simulated devices, got {jax.device_count()}: jax was "
      "initialised before tests/conftest.py set XLA_FLAGS")
  return NUM_DEVICES


@pytest.fixture(scope="session")
def mesh(n_devices):
  return jax.make_mesh((n_devices,), ("data",))
