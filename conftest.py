"""Loaded by pytest before anything imports jax: 8 simulated CPU devices for tests and doctests."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU sizes its thread pool as max(PJRT_NPROC or #cores, #devices): with exactly one thread
# per simulated device a collective can wait for a device that never gets a thread and abort
# ("Termination timeout for all reduce RendezvousKey"). Give it headroom.
os.environ.setdefault("PJRT_NPROC", "32")
