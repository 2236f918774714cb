"""Does temporally-predictive coding lower the rate of DiLoCo's pseudo-gradients?

The rate-distortion measurement of `rate_distortion.py`, applied to the pseudo-gradients
d_i = θ − θ_i of DiLoCo instead of momentum, then the closed loop:

1. Records real pseudo-gradients: dense `cj.diloco` (inner AdamW 3e-3, weight decay 1e-4,
   H = 10 local steps, DiLoCo's outer Nesterov SGD 0.7 / 0.9) on 8 simulated devices, training
   the digits MLP of docs/guide.md (64-128-10, 9,610 parameters; scikit-learn digits, 1,536
   train / 261 test images, global batch 256). Every worker's d_i at every sync is read with the
   library only: just before a sync step, the step runs on a copy of the state whose `count` is
   reset (so that step does not sync); its returned rows are the θ_i the sync would average,
   and d_i = θ − θ_i with θ = `cj.synchronized_params(state)`. Then the real step runs on the
   real state (`donate=False`). The first sync checks the recording: its outer step must be
   −0.7·(1 + 0.9)·mean_i d_i (Nesterov from zero momentum).
2. Rate at equal distortion: `rate_distortion.code` (dithered uniform DPCM, per worker, closed
   loop; empirical entropy per sync) on the recorded sequences (T syncs, 8 workers, S coords),
   over `rate_distortion.DELTA_OVER_SIGMA`, for no prediction, a fixed ρ (default: the pooled
   least-squares lag-1 coefficient measured on the same sequences, rounded to 2 decimals — an
   oracle in hindsight) and the per-worker, per-sync least-squares ρ (32 bits each, counted).
   Also the lag-1 statistics of consecutive pseudo-gradients: per worker, of the average and of
   the workers' deviations from the average; and how well the outer momentum buffer predicts
   the next pseudo-gradient. `--sweep-h` repeats the recording, statistics and rates at other H
   (the same number of syncs, so a larger H also trains longer).
3. Loss at equal bytes: DiLoCo with top-k 10% (per leaf), without and with
   `predictor=cj.predictors.least_squares()`, with error feedback ("ef") and without ("none"),
   the same syncs, data order and seeds (`--seeds`; a seed changes the initialisation and the
   batches); loss of θ on the whole training set, test loss and accuracy after every sync, and
   bytes per worker per sync (`cj.wire_bytes`).

    python benchmarks/pseudo_gradient_rate.py    # ~3 min on 2 busy cores
    python benchmarks/pseudo_gradient_rate.py --syncs 4 --seeds 1 --sweep-h   # smoke, ~20 s

Writes benchmarks/results/pseudo_gradient_rate.json and pseudo_gradient_rate.png.
"""

from __future__ import annotations

import _common

_common.force_devices(8)

import argparse  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from rate_distortion import DELTA_OVER_SIGMA, METHODS, code  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import compams_jax as cj  # noqa: E402

AXIS = "data"
N_WORKERS = 8
INNER_LR = 3e-3
WEIGHT_DECAY = 1e-4
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9  # cj.diloco's default outer optimizer (Nesterov)
GLOBAL_BATCH = 256
TOP_K_RATIO = 0.1

# Training variants: name -> (compressor?, feedback, least-squares predictor?)
VARIANTS = {
  "dense": (False, "none", False),
  "top_k+EF": (True, "ef", False),
  "top_k+EF+LS": (True, "ef", True),
  "top_k": (True, "none", False),
  "top_k+LS": (True, "none", True),
}
DEFAULT_VARIANTS = tuple(VARIANTS)


# ------------------------------------------------------------------------------------------------
# The digits MLP of docs/guide.md
# ------------------------------------------------------------------------------------------------


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


class Problem:
  """Data, model, loss and evaluation of one seed (seed 0 is the guide's exactly)."""

  def __init__(self, seed: int):
    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int32)
    self.x_train, self.y_train = x_all[:1536], y_all[:1536]
    x_test, y_test = jnp.asarray(x_all[1536:]), jnp.asarray(y_all[1536:])
    x_train, y_train = jnp.asarray(self.x_train), jnp.asarray(self.y_train)
    self.seed = seed
    graphdef, self.init_params = nnx.split(MLP(nnx.Rngs(seed)), nnx.Param)

    def loss_fn(params, batch):
      logits = nnx.merge(graphdef, params)(batch["x"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    @jax.jit
    def evaluate(params):
      model = nnx.merge(graphdef, params)
      train_loss = optax.softmax_cross_entropy_with_integer_labels(model(x_train), y_train)
      logits = model(x_test)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
      return train_loss.mean(), loss, jnp.mean(jnp.argmax(logits, -1) == y_test)

    self.loss_fn, self._evaluate = loss_fn, evaluate

  def batch(self, step: int) -> dict:
    rng = np.random.default_rng(step if self.seed == 0 else (self.seed, step))
    idx = rng.permutation(len(self.y_train))[:GLOBAL_BATCH]
    return {"x": self.x_train[idx], "y": self.y_train[idx]}

  def evaluate(self, params) -> tuple[float, float, float]:
    """Loss on the whole training set, test loss, test accuracy."""
    return tuple(float(x) for x in self._evaluate(params))


def flat(tree) -> np.ndarray:
  """The leaves of a pytree, flattened and concatenated (float64)."""
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def flat_rows(tree, n: int) -> np.ndarray:
  """(n, D): each worker's row of a pytree whose leaves carry a leading worker axis."""
  return np.concatenate(
    [np.asarray(x, np.float64).reshape(n, -1) for x in jax.tree.leaves(tree)], 1
  )


def make_tx(variant: str, sync_every: int, outer_momentum: float | None = OUTER_MOMENTUM):
  """The DiLoCo of a variant; outer SGD(0.7) with Nesterov momentum, or none (None)."""
  compressed, feedback, ls = VARIANTS[variant]
  kwargs = {}
  if compressed:
    kwargs = dict(compressor=cj.compressors.top_k(TOP_K_RATIO), feedback=feedback)
    if ls:
      kwargs["predictor"] = cj.predictors.least_squares()
  return cj.diloco(
    optax.adamw(INNER_LR, weight_decay=WEIGHT_DECAY),
    sync_every=sync_every,
    outer=optax.sgd(OUTER_LR, momentum=outer_momentum, nesterov=outer_momentum is not None),
    axis_name=AXIS,
    **kwargs,
  )


def run(problem, tx, mesh, *, sync_every, syncs, coords=None, outer_momentum=OUTER_MOMENTUM):
  """Trains `syncs` syncs of `tx`; train loss, test loss and accuracy of θ after every sync;
  with `coords`, records every worker's pseudo-gradient at every sync (those flat coordinates)."""
  step = cj.data_parallel_step(problem.loss_fn, tx, mesh=mesh, axis_name=AXIS, donate=False)
  params, state = step.init(problem.init_params)
  n = N_WORKERS
  curve, pseudo, check = [], [], None
  t0 = time.time()
  for t in range(sync_every * syncs):
    batch = problem.batch(t)
    syncing = (t + 1) % sync_every == 0  # state.count == t: this step syncs
    if syncing and coords is not None:
      # The same inner step without the sync (count reset): its rows are the θ_i the sync uses.
      probe, _, _ = step(params, state._replace(count=jnp.zeros_like(state.count)), batch)
      theta = flat(cj.synchronized_params(state))
      d = theta[None] - flat_rows(probe, n)
    params, state, _ = step(params, state, batch)
    if syncing:
      new_theta = cj.synchronized_params(state)
      if coords is not None:
        if check is None:  # first sync: θ_new − θ = −lr·(1 + μ)·mean_i d_i
          expected = -OUTER_LR * (1 + (outer_momentum or 0.0)) * d.mean(0)
          moved = flat(new_theta) - theta
          check = float(np.linalg.norm(moved - expected) / np.linalg.norm(expected))
        pseudo.append(d[:, coords].astype(np.float32))
      curve.append(problem.evaluate(new_theta))
  out = {
    "seconds": time.time() - t0,
    "train_loss": curve[-1][0],
    "test_loss": curve[-1][1],
    "test_accuracy": curve[-1][2],
    "best_test_loss": min(c[1] for c in curve),
    "train_loss_per_sync": [c[0] for c in curve],
    "test_loss_per_sync": [c[1] for c in curve],
    "test_accuracy_per_sync": [c[2] for c in curve],
  }
  if coords is not None:
    out["pseudo"] = np.stack(pseudo)
    out["first_sync_check_rel_error"] = check
  return out


# ------------------------------------------------------------------------------------------------
# Temporal statistics of a sequence of vectors
# ------------------------------------------------------------------------------------------------


def lag1(x: np.ndarray) -> dict:
  """x: (T, ..., S). Mean cosine of consecutive vectors, the pooled least-squares coefficient
  ρ = Σ<x_t, x_{t−1}>/Σ‖x_{t−1}‖², and the energy ratio Σ‖x_t‖²/Σ‖x_t − ρ x_{t−1}‖² (t ≥ 1)."""
  cur, prev = x[1:].astype(np.float64), x[:-1].astype(np.float64)
  dot = (cur * prev).sum(-1)
  cos = dot / np.sqrt((cur**2).sum(-1) * (prev**2).sum(-1))
  rho = float(dot.sum() / (prev**2).sum())
  per_sync = cos.reshape(len(cos), -1).mean(-1)  # mean over workers (if any) at each sync
  half = len(per_sync) // 2
  return {
    "mean_cosine": float(cos.mean()),
    "mean_cosine_first_half": float(per_sync[:half].mean()),
    "mean_cosine_second_half": float(per_sync[half:].mean()),
    "cosine_per_sync": [float(c) for c in per_sync],
    "min_cosine": float(cos.min()),
    "max_cosine": float(cos.max()),
    "ls_rho": rho,
    "prediction_gain": float((cur**2).sum() / ((cur - rho * prev) ** 2).sum()),
  }


def temporal_stats(d: np.ndarray) -> dict:
  """Lag-1 statistics of (T, n, S) pseudo-gradients: per worker, of their average, of the
  workers' deviations from it; how much the workers agree; d_{t,i} predicted from
  m_{t−1} = Σ_k μ^k d̄_{t−1−k}, μ = 0.9 (the buffer of the default outer Nesterov optimizer in
  dense DiLoCo, which every worker holds)."""
  d = d.astype(np.float64)
  mean = d.mean(1)
  dev = d - mean[:, None]
  norms = np.sqrt((d**2).sum(-1))  # (T, n)
  coherence = np.sqrt((mean**2).sum(-1)) / np.sqrt((norms**2).mean(-1))
  momentum = np.zeros_like(mean)
  for t in range(1, len(d)):
    momentum[t] = OUTER_MOMENTUM * momentum[t - 1] + mean[t - 1]
  cur, prev = d[1:], np.broadcast_to(momentum[1:, None], d[1:].shape)
  rho_m = float((cur * prev).sum() / (prev**2).sum())
  return {
    "per_worker": lag1(d),
    "average": lag1(mean),
    "deviation": lag1(dev),
    "coherence_mean_over_rms_worker": float(coherence.mean()),
    "coherence_if_independent": 1 / np.sqrt(d.shape[1]),
    "rms_norm_first_last_sync": [
      float(np.sqrt((norms[0] ** 2).mean())),
      float(np.sqrt((norms[-1] ** 2).mean())),
    ],
    "from_outer_momentum": {
      "ls_rho": rho_m,
      "prediction_gain": float((cur**2).sum() / ((cur - rho_m * prev) ** 2).sum()),
    },
  }


# ------------------------------------------------------------------------------------------------


def rate_rows(pseudo: np.ndarray, sigma: float, rho_fixed: float, verbose=False) -> list:
  """`rate_distortion.code` of (T, n, S) sequences at every Δ of the grid, for every method."""
  rows = []
  for ratio in DELTA_OVER_SIGMA:
    delta = ratio * sigma
    row = {"delta_over_sigma": ratio, "delta": delta, "uniform_distortion": delta**2 / 12}
    for method in METHODS:
      row[method] = code(pseudo, delta, method, rho=rho_fixed)
    for method in METHODS[1:]:
      row[f"rate_reduction_{method}"] = (
        row["none"]["bits_per_coord"] / row[method]["bits_per_coord"]
      )
    rows.append(row)
    if verbose:
      print(
        f"Δ = σ·{ratio:<10g} bits/coord: "
        + "  ".join(f"{m} {row[m]['bits_per_coord']:.3f}" for m in METHODS)
        + "  D/(Δ²/12): "
        + ", ".join(f"{row[m]['distortion_per_coord'] / (delta**2 / 12):.3f}" for m in METHODS),
        flush=True,
      )
  return rows


def relative_view(pseudo: np.ndarray, verbose=False) -> dict:
  """Rates at equal RELATIVE distortion per sync: each worker's d_{t,i} is divided by its RMS
  s_{t,i} (sent as one float32 per worker and sync, counted) and the normalised sequence is
  coded with Δ = ratio (its RMS is 1). The pseudo-gradients shrink ~30× over the recorded run,
  so one Δ for the whole run (`rate_rows`) codes the late syncs with few symbols; this view
  weighs every sync alike. Fixed ρ: the pooled lag-1 least-squares ρ of the normalised
  sequences, rounded to 2 decimals."""
  x = pseudo.astype(np.float64)
  scale = np.sqrt(np.mean(x**2, axis=-1, keepdims=True))
  x = x / np.where(scale > 0, scale, 1.0)
  stats = lag1(x)
  stats.pop("cosine_per_sync")  # the cosines do not change with the scale
  rho = round(stats["ls_rho"], 2)
  side = 32.0 / x.shape[-1]
  rows = rate_rows(x, 1.0, rho)
  for r in rows:
    for m in METHODS:
      r[m]["bits_per_coord"] += side
    for m in METHODS[1:]:
      r[f"rate_reduction_{m}"] = r["none"]["bits_per_coord"] / r[m]["bits_per_coord"]
    if verbose:
      print(
        f"  relative Δ = {r['delta_over_sigma']:<10g} bits/coord: "
        + "  ".join(f"{m} {r[m]['bits_per_coord']:.3f}" for m in METHODS),
        flush=True,
      )
  return {"lag1": stats, "fixed_rho": rho, "scale_side_bits_per_coord": side, "rows": rows}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--syncs", type=int, default=40, help="syncs per run (default 40)")
  parser.add_argument("--sync-every", type=int, default=10, help="H, inner steps per sync")
  parser.add_argument("--coords", type=int, default=0, help="recorded coordinates (0: all)")
  parser.add_argument("--seeds", type=int, default=3, help="seeds of the training runs")
  parser.add_argument("--fixed-rho", type=float, default=None, help="default: measured LS ρ")
  parser.add_argument(
    "--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS)
  )
  parser.add_argument(
    "--sweep-h", type=int, nargs="*", default=[2, 5, 20, 50], help="other H: statistics and rates"
  )
  parser.add_argument("--out", default=str(_common.RESULTS / "pseudo_gradient_rate.json"))
  args = parser.parse_args(argv)
  if min([args.sync_every, *args.sweep_h]) < 2:
    raise SystemExit("H must be ≥ 2 (the probe step must not sync)")

  t_start = time.time()
  mesh = jax.make_mesh((N_WORKERS,), (AXIS,), devices=jax.devices()[:N_WORKERS])
  problem = Problem(0)
  dim = int(flat(problem.init_params).size)
  n_coords = dim if args.coords <= 0 else min(args.coords, dim)
  coords = np.sort(np.random.default_rng(0).choice(dim, n_coords, replace=False))

  # 1.–2. Recording (dense DiLoCo, seed 0), statistics and rates; at other H; without outer
  # momentum.
  def record(h, outer_momentum=OUTER_MOMENTUM, verbose=False):
    rec = run(
      problem,
      make_tx("dense", h, outer_momentum),
      mesh,
      sync_every=h,
      syncs=args.syncs,
      coords=coords,
      outer_momentum=outer_momentum,
    )
    pseudo = rec.pop("pseudo")
    sigma = float(np.sqrt(np.mean(pseudo.astype(np.float64) ** 2)))
    stats = temporal_stats(pseudo)
    rho = args.fixed_rho if args.fixed_rho is not None else round(stats["per_worker"]["ls_rho"], 2)
    print(
      f"H = {h}, outer momentum {outer_momentum}: recorded {pseudo.shape} in "
      f"{rec['seconds']:.0f} s; θ test acc {rec['test_accuracy']:.4f} loss "
      f"{rec['test_loss']:.4f}; RMS {sigma:.3g}; first-sync check "
      f"{rec['first_sync_check_rel_error']:.1e}",
      flush=True,
    )
    for part in ("per_worker", "average", "deviation"):
      st = stats[part]
      print(
        f"  lag-1 {part:10s} cos {st['mean_cosine']:+.3f} [{st['min_cosine']:+.3f}, "
        f"{st['max_cosine']:+.3f}]  LS ρ {st['ls_rho']:+.3f}  energy ÷ "
        f"{st['prediction_gain']:.3f}",
        flush=True,
      )
    print(
      f"  coherence ‖d̄‖/RMS‖d_i‖ {stats['coherence_mean_over_rms_worker']:.3f} "
      f"(independent: {stats['coherence_if_independent']:.3f}); from the momentum buffer: "
      f"ρ {stats['from_outer_momentum']['ls_rho']:+.3f} energy ÷ "
      f"{stats['from_outer_momentum']['prediction_gain']:.3f}",
      flush=True,
    )
    t1 = time.time()
    rows = rate_rows(pseudo, sigma, rho, verbose=verbose)
    relative = relative_view(pseudo, verbose=verbose)
    if not verbose:
      fine, rel = rows[5], relative["rows"][5]  # Δ = σ/16
      print(
        "  bits/coord at Δ = σ/16: "
        + " ".join(f"{m} {fine[m]['bits_per_coord']:.3f}" for m in METHODS)
        + "; relative: "
        + " ".join(f"{m} {rel[m]['bits_per_coord']:.3f}" for m in METHODS),
        flush=True,
      )
    return {
      "sync_every": h,
      "outer_momentum": outer_momentum,
      "recording": rec,
      "pseudo_gradient_rms": sigma,
      "temporal": stats,
      "fixed_rho": rho,
      "fixed_rho_source": "argument" if args.fixed_rho is not None else "measured LS ρ",
      "rows": rows,
      "relative": relative,
      "code_seconds": round(time.time() - t1, 1),
    }

  def compact(entry):  # the sweeps keep the rates only, and no per-sync curves
    for r in entry["rows"] + entry["relative"]["rows"]:
      for m in METHODS:
        r[m] = r[m]["bits_per_coord"]
    entry["recording"] = {k: v for k, v in entry["recording"].items() if "_per_sync" not in k}
    return entry

  main_rec = record(args.sync_every, verbose=True)
  rec = main_rec.pop("recording")
  result = {
    **_common.run_info("pseudo_gradient_rate"),
    "model": "digits MLP 64-128-10 (docs/guide.md)",
    "dataset": "scikit-learn digits (1,536 train / 261 test)",
    "num_params": dim,
    "workers": N_WORKERS,
    "syncs": args.syncs,
    "inner": f"optax.adamw({INNER_LR}, weight_decay={WEIGHT_DECAY})",
    "outer": f"optax.sgd({OUTER_LR}, momentum={OUTER_MOMENTUM}, nesterov=True)",
    "global_batch": GLOBAL_BATCH,
    "recorded_coords": n_coords,
    "recording": rec,
    **main_rec,
  }
  result["sync_every_sweep"] = [compact(record(h)) for h in args.sweep_h]
  result["no_outer_momentum"] = compact(record(args.sync_every, None))

  # 3. Loss at equal bytes, with the default outer optimizer and without outer momentum.
  result["training"] = {"top_k_ratio": TOP_K_RATIO, "seeds": args.seeds}
  for outer_name, outer_momentum in (
    ("nesterov", OUTER_MOMENTUM),
    ("no_outer_momentum", None),
  ):
    print(f"training, outer optimizer: {outer_name}", flush=True)
    variants = result["training"][outer_name] = {}
    for variant in args.variants:
      tx = make_tx(variant, args.sync_every, outer_momentum)
      runs = []
      for seed in range(args.seeds):
        if variant == "dense" and seed == 0 and outer_name == "nesterov":
          r = {k: v for k, v in rec.items() if k != "first_sync_check_rel_error"}
        else:
          r = run(Problem(seed), tx, mesh, sync_every=args.sync_every, syncs=args.syncs)
        runs.append({"seed": seed, **r})
      keys = ("train_loss", "test_loss", "best_test_loss", "test_accuracy")
      entry = {
        "wire_bytes_per_sync": int(cj.wire_bytes(tx, problem.init_params)),
        **{f"mean_{k}": float(np.mean([r[k] for r in runs])) for k in keys},
        "runs": runs,
      }
      variants[variant] = entry
      print(
        f"  {variant:12s} {entry['wire_bytes_per_sync']:6d} B/sync  "
        + "  ".join(f"{k} " + " ".join(f"{r[k]:.4f}" for r in runs) for k in keys)
        + f"  ({np.mean([r['seconds'] for r in runs]):.0f} s/run)",
        flush=True,
      )
  result["wall_seconds"] = round(time.time() - t_start, 1)
  path = _common.write_json(args.out, result)
  plot(result, pathlib.Path(path).with_suffix(".png"))
  print(f"wrote {path} ({result['wall_seconds']:.0f} s)")


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4.2))
  sigma2 = result["pseudo_gradient_rms"] ** 2
  labels = {
    "none": "no prediction",
    "fixed": f"fixed ρ = {result['fixed_rho']}",
    "least_squares": "least-squares ρ",
  }
  for method in METHODS:
    d = [r[method]["distortion_per_coord"] / sigma2 for r in result["rows"]]
    bits = [r[method]["bits_per_coord"] for r in result["rows"]]
    ax.plot(bits, d, "o-", label=labels[method])
  ax.set_yscale("log")
  ax.set_xlabel("rate (entropy, bits per coordinate)")
  ax.set_ylabel("distortion / pseudo-gradient power")
  ax.set_title(
    f"Dithered uniform coding of DiLoCo pseudo-gradients (H = {result['sync_every']})",
    fontsize=9,
  )
  ax.grid(True, alpha=0.3)
  ax.legend()

  for i, (name, entry) in enumerate(result["training"]["nesterov"].items()):
    for outer, style in (("nesterov", "-"), ("no_outer_momentum", ":")):
      runs = result["training"][outer][name]["runs"]
      curves = np.array([r["train_loss_per_sync"] for r in runs])
      bx.plot(
        np.arange(1, curves.shape[1] + 1),
        curves.mean(0),
        style,
        color=f"C{i}",
        label=f"{name} ({entry['wire_bytes_per_sync']} B/sync)" if outer == "nesterov" else None,
      )
  bx.set_yscale("log")
  bx.set_xlabel("sync")
  bx.set_ylabel(f"training loss of θ (mean of {result['training']['seeds']} seeds)")
  bx.set_title(
    f"DiLoCo on digits, top-k {result['training']['top_k_ratio']:.0%}; solid: outer Nesterov "
    "0.7/0.9, dotted: outer SGD 0.7",
    fontsize=9,
  )
  bx.grid(True, alpha=0.3)
  bx.legend(fontsize=8)

  sweep = [
    {"sync_every": result["sync_every"], "temporal": result["temporal"]},
    *result["sync_every_sweep"],
  ]
  sweep.sort(key=lambda e: e["sync_every"])
  hs = [e["sync_every"] for e in sweep]
  for part, label in (
    ("per_worker", "per worker"),
    ("average", "average"),
    ("deviation", "deviation d_i − d̄"),
  ):
    cx.plot(hs, [e["temporal"][part]["mean_cosine"] for e in sweep], "o-", label=label)
  cx.set_xscale("log")
  cx.set_xticks(hs, [str(h) for h in hs])
  cx.minorticks_off()
  cx.set_xlabel("H (inner steps per sync)")
  cx.set_ylabel("mean cosine of consecutive pseudo-gradients")
  cx.set_title(f"Lag-1 correlation, dense DiLoCo, {result['syncs']} syncs", fontsize=9)
  cx.grid(True, alpha=0.3)
  cx.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
