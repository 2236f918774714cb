"""Loaded by pytest before anything runs a JAX operation: 8 simulated CPU devices for tests and
doctests, set up by the library's own `cj.simulate_cpu_devices` (jax_num_cpu_devices, with
PJRT_NPROC headroom for XLA:CPU's thread pool)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: F401  (first jax, then the device count, as the helper asks)

import compams_jax as cj

cj.simulate_cpu_devices(8)
