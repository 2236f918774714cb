"""The GPU checks, in one script that a lent accelerator runs in under 5 minutes.

On whatever devices jax sees (one H200, or several GPUs):

1. The FSDP GPT-2-small optimizer step, compiled for a ("dcn", "fsdp") mesh of the devices
   (2 slices when there are at least 2 devices), fully manual and partial-manual: per-device
   state, transient memory, and the collectives after XLA:GPU's passes (combiners included),
   for dense AMSGrad and COMP-AMS top-k 1% / block-sign (`sharded_scale.fsdp_rows`).
2. Step time of the fully manual FSDP step on real arrays, compressed against dense (median
   of `--repeats` steps after a warm-up).
3. The vmap simulation at paper scale: `cj.data_parallel_step(..., mode="vmap",
   num_workers=16)` on the paper's MNIST CNN (batch 32 per worker), compressed against dense.

    python benchmarks/device_check.py [--repeats 10] [--out PATH]
    python benchmarks/device_check.py --small   # tiny shapes: a quick run of the script on CPU

Writes benchmarks/results/device_check.json. Never part of CI or the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common
import sharded_scale


def _median_seconds(fn, *args, repeats):
  import jax

  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def fsdp_step_times(slices, k, repeats, small):
  """Seconds per fully manual FSDP step on real arrays, per method."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import compams_jax as cj

  mesh = jax.make_mesh((slices, k), ("dcn", "fsdp"))
  shapes = sharded_scale.tiny_shapes() if small else sharded_scale.gpt2_small_shapes()
  specs = jax.tree.map(lambda x: sharded_scale.fsdp_spec(x.shape, k), shapes)
  params = jax.tree.map(
    lambda x, s: jax.device_put(jnp.zeros(x.shape, x.dtype), NamedSharding(mesh, s)),
    shapes,
    specs,
  )
  key = jax.random.key(0)
  grads = jax.tree.map(
    lambda x, s: jax.device_put(
      jax.random.normal(key, (slices, *x.shape), x.dtype), NamedSharding(mesh, P("dcn", *s))
    ),
    shapes,
    specs,
  )
  out = {}
  for name, tx in sharded_scale.methods("dcn", slices).items():
    state = cj.sharding.init(tx, params, mesh=mesh, axis_name="dcn")
    step = jax.jit(sharded_scale.update_step(tx, mesh, state, params, specs, manual=True))
    out[name] = _median_seconds(step, params, state, grads, repeats=repeats)
    print(f"FSDP step {name:38s} {out[name] * 1e3:8.2f} ms", flush=True)
  dense = next(iter(out.values()))
  return {"seconds": out, "over_dense": {m: s / dense for m, s in out.items()}}


def vmap_step_times(workers, repeats):
  import jax
  import jax.numpy as jnp
  import numpy as np

  import compams_jax as cj
  from compams_jax.experiments import models

  model = models.create_model("mnist_cnn", 10)
  x = jnp.zeros((1, 28, 28, 1), jnp.float32)
  params = model.init(jax.random.key(0), x, train=False)["params"]

  def loss(p, batch):
    logits = model.apply({"params": p}, batch["x"], train=False)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1))

  rng = np.random.default_rng(0)
  batch = {
    "x": rng.normal(size=(32 * workers, 28, 28, 1)).astype(np.float32),
    "y": rng.integers(0, 10, size=32 * workers).astype(np.int32),
  }
  txs = {
    "dense (AMSGrad)": cj.comp_ams(1e-3, cj.compressors.identity(), axis_name="w", feedback="none"),
    "COMP-AMS top-k 1%": cj.comp_ams(1e-3, cj.compressors.top_k(0.01), axis_name="w"),
    "COMP-AMS block-sign": cj.comp_ams(1e-3, cj.compressors.block_sign(), axis_name="w"),
  }
  out = {}
  for name, tx in txs.items():
    step = cj.data_parallel_step(loss, tx, axis_name="w", mode="vmap", num_workers=workers)
    p, s = step.init(params)
    run = lambda p, s: step(p, s, batch)[:2]
    p, s = run(p, s)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      p, s = run(p, s)
      jax.block_until_ready((p, s))
      times.append(time.perf_counter() - t0)
    out[name] = statistics.median(times)
    print(f"vmap x{workers} {name:24s} {out[name] * 1e3:8.2f} ms", flush=True)
  dense = out["dense (AMSGrad)"]
  return {"seconds": out, "over_dense": {m: s / dense for m, s in out.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--workers", type=int, default=16, help="vmap-simulated workers")
  parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU dry run)")
  parser.add_argument("--out", default=str(_common.RESULTS / "device_check.json"))
  args = parser.parse_args()
  if args.small:
    _common.force_devices(8)
  import jax

  n = jax.device_count()
  slices = 2 if n >= 2 else 1
  k = n // slices
  result = {
    **_common.run_info("device_check"),
    "devices": [str(d) for d in jax.devices()],
    "small": args.small,
  }
  t0 = time.perf_counter()
  result["fsdp_compiled"] = sharded_scale.fsdp_rows(slices, k, small=args.small)
  _common.write_json(args.out, result)
  result["fsdp_step_time"] = fsdp_step_times(slices, k, args.repeats, args.small)
  _common.write_json(args.out, result)
  result["vmap_step_time"] = vmap_step_times(4 if args.small else args.workers, args.repeats)
  result["seconds"] = time.perf_counter() - t0
  _common.write_json(args.out, result)
  print(f"device check done in {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
  main()
