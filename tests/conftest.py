"""Fixtures; the repository-root conftest.py sets 8 simulated CPU devices before jax starts."""

import jax
import pytest

NUM_DEVICES = 8


@pytest.fixture(scope="session")
def n_devices():
  assert jax.device_count() == NUM_DEVICES, (
    f"tests need {NUM_DEVICES} simulated devices, got {jax.device_count()}: jax was "
    "initialised before the repository conftest.py set XLA_FLAGS"
  )
  return NUM_DEVICES


@pytest.fixture(scope="session")
def mesh(n_devices):
  return jax.make_mesh((n_devices,), ("data",))
