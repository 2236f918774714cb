"""Local SGD (`cj.diloco`) against data parallelism: bytes per sync, memory, compile and step time.

Part 1, GPT-2 small (abstract shapes, 16 workers on a 1-D "data" mesh, every worker its own
parameters): one compiled optimizer step of DiLoCo (dense f32, dense bf16, top-k 1% and
SparseLoCo's chunked top-k with 2-bit values, both with error feedback) and of dense
data-parallel AdamW (a pmean of the f32 or bf16 gradients): the bytes each worker hands to
collectives (from the HLO: for DiLoCo they all sit in the sync branch), the per-step equivalent
at H = 30, the ratio to dense f32 data parallelism (HLO) and to bf16 data parallelism (its
declared payload: XLA:CPU widens a bf16 all-reduce to f32), the step's transient memory against
the parameter bytes, and its compile time against the dense step's.

Part 2, time on 8 simulated CPU workers (a small MLP, real arrays): the inner step and the sync
step of DiLoCo (dense and SparseLoCo) against a dense data-parallel AdamW step, interleaved,
medians, as ratios measured in the same run.

    python benchmarks/local_sgd.py [--small] [--out PATH]

Writes benchmarks/results/local_sgd.json (--small: a 2-block model, for a dry run).
"""

from __future__ import annotations

import argparse
import math
import time

import _common
from scale import gpt2_small_shapes
from sharded_scale import tiny_shapes

H = 30


def methods(axis_name):
  """name -> (optimizer, whether it is local SGD)."""
  import jax.numpy as jnp
  import optax

  import compams_jax as cj

  inner = optax.adamw(4e-4, weight_decay=0.1)

  def ddp(dtype):
    mean = cj.compressed_mean(cj.compressors.cast(dtype), axis_name=axis_name)
    return optax.chain(mean, inner)

  out = {
    "data parallel AdamW f32": (ddp(jnp.float32), False),
    "data parallel AdamW bf16": (ddp(jnp.bfloat16), False),
    "DiLoCo dense f32": (cj.diloco(inner, sync_every=H, axis_name=axis_name), True),
    "DiLoCo dense bf16": (
      cj.diloco(
        inner,
        sync_every=H,
        axis_name=axis_name,
        compressor=cj.compressors.cast(jnp.bfloat16),
        feedback="none",
      ),
      True,
    ),
    "DiLoCo top-k 1% + EF": (
      cj.diloco(inner, sync_every=H, axis_name=axis_name, compressor=cj.compressors.top_k(0.01)),
      True,
    ),
  }
  if "chunked_top_k" in cj.compressors.REGISTRY:
    sparse = cj.compressors.get("chunked_top_k", k=64, chunk=64, value_bits=2)
    out["SparseLoCo 64/4096 2-bit"] = (
      cj.diloco(
        inner,
        sync_every=H,
        axis_name=axis_name,
        compressor=sparse,
        feedback_decay=0.95,
        outer=optax.sgd(0.6),
      ),
      True,
    )
  return out


def update_step(tx, mesh, params, own):
  """(params, state, grads) -> (params, state): one worker's optimizer step under shard_map;
  with `own`, every worker's params carry a leading worker axis."""
  import jax
  from jax.sharding import PartitionSpec as P

  import compams_jax as cj

  state = cj.sharding.init_specs(tx, params, mesh=mesh, axis_name="data")

  def replica(p, s, g):
    g = jax.tree.map(lambda x: x[0], g)
    if own:
      p = jax.tree.map(lambda x: x[0], p)
    u, s = tx.update(g, s, p)
    p = cj.apply_updates(p, u, s)
    return (jax.tree.map(lambda x: x[None], p) if own else p), s

  pspec = P("data") if own else P()
  return jax.shard_map(
    replica, mesh=mesh, in_specs=(pspec, state, P("data")), out_specs=(pspec, state)
  )


def gpt2_rows(workers, small):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import compams_jax as cj

  mesh = jax.make_mesh((workers,), ("data",))
  shapes = tiny_shapes() if small else gpt2_small_shapes()
  param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))

  def stacked(x, spec):
    return jax.ShapeDtypeStruct(
      (workers,) + x.shape, x.dtype, sharding=NamedSharding(mesh, P(*spec))
    )

  grads = jax.tree.map(lambda x: stacked(x, ("data",)), shapes)
  rows = {}
  for name, (tx, own) in methods("data").items():
    params = jax.tree.map(lambda x: stacked(x, ("data",)), shapes) if own else shapes
    state = jax.eval_shape(
      lambda p, tx=tx: cj.sharding.init(tx, p, mesh=mesh, axis_name="data"), shapes
    )
    t0 = time.perf_counter()
    step = jax.jit(update_step(tx, mesh, shapes, own), donate_argnums=(0, 1))
    compiled = step.lower(params, state, grads).compile()
    seconds = time.perf_counter() - t0
    found = cj.collective_bytes(compiled)
    mem = compiled.memory_analysis()
    sent = found.total
    rows[name] = {
      "local_sgd": own,
      "bytes_per_sync" if own else "bytes_per_step": sent,
      "bytes_per_step_equivalent": sent / H if own else sent,
      "collectives": len(found.collectives),
      "wire_bytes": cj.wire_bytes(tx, shapes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "temp_over_params": mem.temp_size_in_bytes / param_bytes,
      "compile_seconds": seconds,
    }
    print(f"{name:30s} {rows[name]}", flush=True)
  f32 = rows["data parallel AdamW f32"]["bytes_per_step"]
  # XLA:CPU widens a bf16 all-reduce to f32 (GPU/TPU do not): bf16 data parallelism is taken
  # at its declared payload, the bytes it sends on an accelerator.
  bf16 = rows["data parallel AdamW bf16"]["wire_bytes"]
  dense_compile = rows["data parallel AdamW f32"]["compile_seconds"]
  for row in rows.values():
    sent = row.get("bytes_per_sync", row.get("bytes_per_step"))
    row["fewer_bytes_than_f32_per_exchange"] = f32 / sent
    row["fewer_bytes_than_f32_per_step"] = f32 / row["bytes_per_step_equivalent"]
    row["fewer_bytes_than_bf16_per_step"] = bf16 / row["bytes_per_step_equivalent"]
    row["compile_over_dense"] = row["compile_seconds"] / dense_compile
  return {"param_bytes": param_bytes, "workers": workers, "H": H, "methods": rows}


def time_rows(repeats, small):
  """Inner and sync step time of DiLoCo vs a dense data-parallel step, 8 workers, real arrays."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import compams_jax as cj

  n, width = 8, (128 if small else 512)
  rng = np.random.default_rng(0)
  params = {
    "w1": jnp.asarray(rng.normal(size=(64, width)) * 0.1, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(width, width)) * 0.05, jnp.float32),
    "w3": jnp.asarray(rng.normal(size=(width, 10)) * 0.1, jnp.float32),
  }
  batch = {
    "x": rng.normal(size=(n * 32, 64)).astype(np.float32),
    "y": rng.integers(0, 10, n * 32).astype(np.int32),
  }

  def loss(p, b):
    h = jax.nn.relu(jax.nn.relu(b["x"] @ p["w1"]) @ p["w2"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w3"], b["y"]).mean()

  mesh = jax.make_mesh((n,), ("data",))
  chosen = {
    k: v
    for k, v in methods("data").items()
    if k in ("data parallel AdamW f32", "DiLoCo dense f32", "SparseLoCo 64/4096 2-bit")
  }
  runs = {}
  for name, (tx, own) in chosen.items():
    step = cj.data_parallel_step(loss, tx, mesh=mesh, axis_name="data", donate=False)
    p, s = step.init(params)
    p, s, _ = step(p, s, batch)  # compile
    runs[name] = (step, p, s, own)
  times = {}
  for _ in range(repeats):
    for name, (step, p, s, own) in runs.items():
      phases = [("inner", H - 1), ("sync", H)] if own else [("step", 1)]
      for phase, count in phases:
        if own:
          s = s._replace(count=jnp.asarray(count - 1, jnp.int32))
        jax.block_until_ready((p, s))
        t0 = time.perf_counter()
        out = step(p, s, batch)
        jax.block_until_ready(out)
        times.setdefault(f"{name}: {phase}", []).append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  dense = med["data parallel AdamW f32: step"]
  return {
    "workers": n,
    "repeats": repeats,
    "median_seconds": med,
    "over_dense_step": {k: v / dense for k, v in med.items()},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workers", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--small", action="store_true", help="a 2-block model: a quick dry run")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  _common.force_devices(args.workers)
  out = args.out or str(
    _common.RESULTS / ("local_sgd_small.json" if args.small else "local_sgd.json")
  )
  result = {**_common.run_info("local_sgd"), "model": "GPT-2 small (abstract shapes)"}
  if args.small:
    result["model"] = "2-block GPT-2-shaped model (d = 64)"
  result["gpt2"] = gpt2_rows(args.workers, args.small)
  _common.write_json(out, result)
  result["time"] = time_rows(args.repeats, args.small)
  _common.write_json(out, result)
  for k, v in result["time"]["over_dense_step"].items():
    print(f"{k:45s} {v:6.2f}x the dense step")


if __name__ == "__main__":
  main()
