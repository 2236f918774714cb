"""Simulated CPU devices: n workers on one machine, set up before JAX creates its backends."""

from __future__ import annotations

import os

import jax


def simulate_cpu_devices(n: int) -> None:
  """Makes JAX's CPU backend expose `n` devices (call right after `import jax`).

  Sets `jax_num_cpu_devices` and gives XLA:CPU's thread pool headroom: it sizes the pool as
  max(PJRT_NPROC or #cores, #devices), and with exactly one thread per simulated device a
  collective can wait for a device that never gets a thread and abort ("Termination timeout
  for all reduce RendezvousKey"). A `PJRT_NPROC` already in the environment is kept. Tests,
  benchmarks, the CLI and the notebooks all set their devices through this one function.

  Args:
    n: the number of CPU devices (simulated workers).

  Raises:
    ValueError: if `n` is not a positive int.
    RuntimeError: if JAX's backends already exist with another device count (something ran a
      JAX operation first).

  Examples:
    >>> import jax, compams_jax as cj
    >>> cj.simulate_cpu_devices(8)   # in tests, 8 devices are already set up: nothing changes
    >>> jax.device_count("cpu")
    8
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"simulate_cpu_devices(n) needs a positive int, got {n!r}.")
  from jax._src import xla_bridge  # Whether the backends exist; no public query for it.

  if xla_bridge.backends_are_initialized():
    have = jax.device_count("cpu")
    if have != n:
      raise RuntimeError(
        f"simulate_cpu_devices({n}): JAX's CPU backend already exists with {have} devices. "
        "Call it right after `import jax`, before any JAX operation."
      )
    return
  os.environ.setdefault("PJRT_NPROC", str(max(32, 2 * n)))
  jax.config.update("jax_num_cpu_devices", n)
