"""Wall-clock time of a full data-parallel training step: COMP-AMS (top-k 1%, block-sign) vs dense.

The paper's MNIST CNN (`MnistCNN`, 28x28x1 inputs, 1,199,882 parameters), local batch 32, on 8
simulated CPU workers (`--xla_force_host_platform_device_count=8`) under `jax.shard_map`. One
step is exactly the training loop's step (compams_jax/experiments/train.py): forward with
dropout, backward w.r.t. `jax.lax.pcast(params, "data", to="varying")`, `tx.update`,
`optax.apply_updates`. The variants are timed in the SAME process, interleaved: every variant is
compiled and warmed up first, then each repeat runs `--steps` steps of every variant in turn
(the order rotates each repeat); per-step times are medians over repeats, and the ratios are
given both as a ratio of medians and as the median of per-repeat (paired) ratios.

Variants (all `cj.comp_ams`, lr 1e-3):
  dense       identity() compressor: one psum of the float32 gradients (= AMSGrad on the mean)
  top_k       top_k(0.01), all-gather of values + indices
  block_sign  block_sign(), all-gather of packed sign bits + one scale per layer
  block_sign_2p  block_sign() with topology="two_phase" (each device decodes O(d) instead of
                 O(n·d)); top_k_2p (top_k, two-phase) only with --variants: at this commit the
                 library's default top-k selection fails inside the two-phase vmap under
                 shard_map for chunks of >= 65,536 elements (add --top-k-method exact)

CAVEAT: on a 2-core CPU the 8 "devices" are XLA:CPU threads sharing the same 2 cores, so the 8
workers' forward/backward run largely one after another and the "collectives" are memory copies.
The ratios therefore measure the compute overhead of compression (top-k selection, packing,
decoding n payloads) relative to the model's compute, not network savings; see
benchmarks/network_model.py for the communication side.

It also measures, for the network model, the per-WORKER compute time: the same step jitted on
ONE device with local batch 32 and `axis_name=None` (no collective at all), for the dense
optimizer and for each compressor (then the step includes one encode + decode), on the MNIST CNN
and (unless --no-resnet) on ResNet-18 with 32x32x3 inputs.

Run from the repository root:

    python benchmarks/step_time.py            # ~2 min at load 5, ~7 min at load 15 (2 cores)
    python benchmarks/step_time.py --quick    # smoke run (~40 s)

Writes benchmarks/results/step_time.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys

N_WORKERS = 8
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_WORKERS}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compams_jax as cj  # noqa: E402
from compams_jax.experiments.models import count_params, create_model  # noqa: E402

C = cj.compressors
LR = 1e-3
AXIS = "data"

TOP_K_KW: dict = {}  # set from --top-k-method

COMPRESSORS = {
  "dense": (C.identity, "gather"),
  "top_k": (lambda: C.top_k(0.01, **TOP_K_KW), "gather"),
  "block_sign": (C.block_sign, "gather"),
  "top_k_2p": (lambda: C.top_k(0.01, **TOP_K_KW), "two_phase"),
  "block_sign_2p": (C.block_sign, "two_phase"),
}
INPUTS = {"mnist_cnn": (28, 28, 1), "resnet18": (32, 32, 3)}


def make_tx(name, axis_name, n):
  make, topology = COMPRESSORS[name]
  if topology == "two_phase":
    return cj.comp_ams(LR, make(), axis_name=axis_name, topology="two_phase", num_workers=n)
  return cj.comp_ams(LR, make(), axis_name=axis_name)


def _data(rng, shape, num_classes=10):
  x = rng.normal(size=shape).astype(np.float32)
  y = rng.integers(0, num_classes, size=shape[:-3]).astype(np.int32)
  return x, y


def build_parallel_step(model, params, tx, mesh):
  """The data-parallel train step of compams_jax.experiments.train, on synthetic batches."""
  opt_state = cj.sharding.init(tx, params, mesh=mesh, axis_name=AXIS)
  specs = cj.sharding.state_specs(opt_state, AXIS)
  dropout_key = jax.random.key(1)

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), specs, P(AXIS), P(AXIS), P()),
    out_specs=(P(), specs, P(AXIS)),
  )
  def step(params, opt_state, x, y, t):
    x, y = x[0], y[0]
    rng = jax.random.fold_in(jax.random.fold_in(dropout_key, t), jax.lax.axis_index(AXIS))

    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    varying = jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to="varying"), params)
    loss, grads = jax.value_and_grad(loss_fn)(varying)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss[None]

  return step, opt_state


def build_single_step(model, params, tx):
  """One worker's step on one device: forward, backward, tx.update (no collective), apply."""
  dropout_key = jax.random.key(1)

  @jax.jit
  def step(params, opt_state, x, y, t):
    rng = jax.random.fold_in(dropout_key, t)

    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, tx.init(params)


class Runner:
  """Holds one variant's compiled step and state; `run(k)` times k steps."""

  def __init__(self, step, params, opt_state, x, y):
    self.step, self.params, self.opt_state, self.x, self.y = step, params, opt_state, x, y
    self.t = 0

  def run(self, k):
    t0 = time.perf_counter()
    for _ in range(k):
      self.params, self.opt_state, loss = self.step(
        self.params, self.opt_state, self.x, self.y, jnp.int32(self.t)
      )
      self.t += 1
    jax.block_until_ready((self.params, self.opt_state, loss))
    return (time.perf_counter() - t0) / k


def interleaved(runners, repeats, steps, warmup):
  """Per-step seconds of every runner: warm-up, then `repeats` rounds in rotating order."""
  compile_s = {}
  for name, r in runners.items():
    t0 = time.perf_counter()
    r.run(1)  # compile + first step
    compile_s[name] = time.perf_counter() - t0
    if warmup > 1:
      r.run(warmup - 1)
  times = {name: [] for name in runners}
  names = list(runners)
  for rep in range(repeats):
    order = names[rep % len(names) :] + names[: rep % len(names)]
    for name in order:
      times[name].append(runners[name].run(steps))
    print(
      f"  repeat {rep + 1}/{repeats}: "
      + "  ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
      flush=True,
    )
  return times, compile_s


def summarize(times, base="dense"):
  med = {k: statistics.median(v) for k, v in times.items()}
  out = {
    k: {"median_s": med[k], "min_s": min(v), "max_s": max(v), "all_s": v} for k, v in times.items()
  }
  if base in times:
    for k, v in times.items():
      out[k]["ratio_of_medians_vs_dense"] = med[k] / med[base]
      out[k]["median_paired_ratio_vs_dense"] = statistics.median(
        a / b for a, b in zip(v, times[base])
      )
  return out


def init_params(model, input_shape, seed=0):
  return model.init({"params": jax.random.key(seed)}, jnp.zeros((1,) + input_shape), train=False)[
    "params"
  ]


def parallel_benchmark(args, rng):
  model = create_model("mnist_cnn", 10)
  params = init_params(model, INPUTS["mnist_cnn"])
  mesh = jax.make_mesh((N_WORKERS,), (AXIS,))
  x, y = _data(rng, (N_WORKERS, args.batch) + INPUTS["mnist_cnn"])
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
  x, y = put(x, P(AXIS)), put(y, P(AXIS))
  runners, hlo = {}, {}
  for name in args.variants:
    tx = make_tx(name, AXIS, N_WORKERS)
    step, opt_state = build_parallel_step(model, params, tx, mesh)
    p = jax.tree.map(lambda a: put(a, P()), params)
    runners[name] = Runner(step, p, opt_state, x, y)
    cb = cj.collective_bytes(step.lower(p, opt_state, x, y, jnp.int32(0)).compile())
    hlo[name] = {"operand_bytes": cb.total, "received_bytes": cb.received, "by_op": cb.by_op}
  print(
    f"# MnistCNN 28x28x1, {count_params(params):,} params, {N_WORKERS} workers x local batch "
    f"{args.batch}: {args.repeats} repeats x {args.steps} steps, interleaved",
    flush=True,
  )
  times, compile_s = interleaved(runners, args.repeats, args.steps, args.warmup)
  res = summarize(times)
  for k in res:
    res[k]["compile_and_first_step_s"] = compile_s[k]
    res[k]["hlo_bytes_per_device"] = hlo[k]
  return res, count_params(params)


def single_worker_benchmark(model_name, names, batch, repeats, steps, warmup, rng):
  model = create_model(model_name, 10)
  params = init_params(model, INPUTS[model_name])
  dev = jax.devices()[0]
  x, y = _data(rng, (batch,) + INPUTS[model_name])
  x, y = jax.device_put(x, dev), jax.device_put(y, dev)
  runners = {}
  for name in names:
    step, opt_state = build_single_step(model, params, make_tx(name, None, 1))
    runners[name] = Runner(step, jax.device_put(params, dev), jax.device_put(opt_state, dev), x, y)
  print(
    f"# one worker, {model_name} {INPUTS[model_name]}, batch {batch}, no collectives: "
    f"{repeats} repeats x {steps} steps",
    flush=True,
  )
  times, compile_s = interleaved(runners, repeats, steps, warmup)
  res = summarize(times)
  for k in res:
    res[k]["compile_and_first_step_s"] = compile_s[k]
  return {
    "num_params": count_params(params),
    "batch": batch,
    "variants": res,
    "compute_s": res["dense"]["median_s"],
    "codec_overhead_s": {
      k: max(0.0, v["median_s"] - res["dense"]["median_s"]) for k, v in res.items() if k != "dense"
    },
  }


def git_state():
  """Commit and dirty library files of the checkout the numbers were measured on."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--short", "compams_jax"],
      cwd=root,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.split("\n")
    return {"commit": head, "dirty_library_files": [d for d in dirty if d.strip()]}
  except (OSError, subprocess.CalledProcessError):
    return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument(
    "--variants",
    nargs="+",
    default=["dense", "top_k", "block_sign", "block_sign_2p"],
    choices=list(COMPRESSORS),
  )
  ap.add_argument("--batch", type=int, default=32, help="local batch per worker")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (incl. compile)")
  ap.add_argument("--single-repeats", type=int, default=7)
  ap.add_argument("--resnet-repeats", type=int, default=3)
  ap.add_argument(
    "--no-resnet", action="store_true", help="skip the single-worker ResNet-18 compute measurement"
  )
  ap.add_argument("--quick", action="store_true", help="smoke run: 3 repeats x 2 steps, no ResNet")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--top-k-method",
    default=None,
    help="passed as top_k(..., method=...) if given (default: the library's)",
  )
  ap.add_argument(
    "--out",
    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "step_time.json"),
  )
  args = ap.parse_args(argv)
  if args.quick:
    args.repeats, args.steps, args.warmup, args.single_repeats, args.no_resnet = 3, 2, 2, 3, True
  if args.top_k_method:
    TOP_K_KW["method"] = args.top_k_method
  if "dense" not in args.variants:
    args.variants = ["dense"] + args.variants
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  result = {
    "benchmark": "step_time",
    "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax_version": jax.__version__,
    "optax_version": optax.__version__,
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "device_count": jax.device_count(),
    "loadavg_at_start": load,
    "top_k": repr(C.top_k(0.01, **TOP_K_KW)),
    "git": git_state(),
    "setup": {
      "model": "mnist_cnn",
      "input": list(INPUTS["mnist_cnn"]),
      "workers": N_WORKERS,
      "local_batch": args.batch,
      "repeats": args.repeats,
      "steps_per_block": args.steps,
      "warmup_steps": args.warmup,
      "learning_rate": LR,
    },
    "caveat": (
      "8 simulated XLA:CPU devices share the machine's CPU cores: the workers' "
      "compute runs largely serially and collectives are memory copies, so the "
      "ratios measure compression's compute overhead, not network savings."
    ),
  }
  par, num_params = parallel_benchmark(args, rng)
  result["parallel_8_workers"] = par
  result["num_params"] = num_params
  single_names = [v for v in args.variants if not v.endswith("_2p")]
  result["single_worker"] = {
    "mnist_cnn": single_worker_benchmark(
      "mnist_cnn", single_names, args.batch, args.single_repeats, args.steps, args.warmup, rng
    )
  }
  if not args.no_resnet:
    result["single_worker"]["resnet18"] = single_worker_benchmark(
      "resnet18", single_names, args.batch, args.resnet_repeats, 1, 1, rng
    )
  try:
    result["loadavg_at_end"] = os.getloadavg()
  except OSError:
    pass
  targets = {"top_k": 1.25, "block_sign": 1.15}
  result["targets"] = {
    k: {
      "target_ratio_le": t,
      "ratio_of_medians": par[k]["ratio_of_medians_vs_dense"],
      "median_paired_ratio": par[k]["median_paired_ratio_vs_dense"],
      "met": par[k]["ratio_of_medians_vs_dense"] <= t,
    }
    for k, t in targets.items()
    if k in par
  }
  result["runtime_seconds"] = round(time.perf_counter() - start, 1)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)

  print(
    "\n| variant (8 workers, CNN, batch 32/worker) | median step | ratio of medians vs dense "
    "| median paired ratio |\n|---|---|---|---|"
  )
  for k, v in par.items():
    print(
      f"| {k} | {v['median_s'] * 1e3:.0f} ms | {v['ratio_of_medians_vs_dense']:.3f} | "
      f"{v['median_paired_ratio_vs_dense']:.3f} |"
    )
  print(
    "\n| model (one worker, no collectives) | "
    + " | ".join(single_names)
    + " |\n|---|"
    + "---|" * len(single_names)
  )
  for m, s in result["single_worker"].items():
    print(
      f"| {m} | "
      + " | ".join(f"{s['variants'][k]['median_s'] * 1e3:.1f} ms" for k in single_names)
      + " |"
    )
  print(json.dumps(result["targets"], indent=1))
  print(f"total {result['runtime_seconds']:.0f}s; wrote {args.out}")


if __name__ == "__main__":
  main()
