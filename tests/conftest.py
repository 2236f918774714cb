"""Fixtures; the repository-root conftest.py sets up 8 simulated CPU devices
(`cj.simulate_cpu_devices(8)`) before any JAX operation runs."""

import jax
import pytest

NUM_DEVICES = 8


@pytest.fixture(scope="session")
def n_devices():
  assert jax.device_count() == NUM_DEVICES, (
    f"tests need {NUM_DEVICES} simulated devices, got {jax.device_count()}: jax's backend "
    "started before the repository conftest.py called cj.simulate_cpu_devices"
  )
  return NUM_DEVICES


@pytest.fixture(scope="session")
def mesh(n_devices):
  return jax.make_mesh((n_devices,), ("data",))
