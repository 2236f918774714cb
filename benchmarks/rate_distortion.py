"""The temporal paper's claim: prediction lowers the communication RATE at equal distortion.

Records the real momentum of the Fashion-MNIST CNN (8 simulated workers, uncompressed momentum
SGD with β = 0.9, the trainer's step), then codes every worker's momentum sequence with a
fixed-step quantizer and measures the rate an entropy coder needs:

- The code is subtractively dithered uniform quantization with step Δ: the symbol is
  k = round((e + u)/Δ) with u ~ U[-Δ/2, Δ/2) drawn from a seed both ends share, and the
  decoder outputs kΔ - u. Its error is uniform on [-Δ/2, Δ/2) and independent of the signal, so
  every method has the SAME distortion Δ²/12 per coordinate at a given Δ (checked empirically
  and reported): comparing rates at equal Δ is comparing rates at equal distortion.
- Without prediction e = m_t (each worker codes its momentum). With prediction (closed-loop
  DPCM, as `cj.predictive_compression`): e = m_t - ρ·m̂_{t-1}, where m̂ is the reconstruction
  both ends hold; ρ = β (fixed) or the least-squares ρ_t = <m_t, m̂_{t-1}>/‖m̂_{t-1}‖² per worker
  and step (sent as one float32 per worker and step, counted in the rate).
- Rate: the empirical entropy of the symbols of each step (pooled over workers and the
  recorded coordinates), averaged over steps: bits per coordinate for an ideal entropy coder
  adapted per step.

The momentum of a random subset of coordinates (`--coords`, default 65,536 of the 1.2M) is
recorded: the quantizer is scalar and ρ is fitted on what is recorded, so the subset gives the
per-coordinate rate and distortion without holding T × 8 × 1.2M floats.

    python benchmarks/rate_distortion.py [--steps 128] [--coords 65536] [--out PATH]

Writes benchmarks/results/rate_distortion.json and rate_distortion.png.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import _common
import numpy as np
from predictive_momentum import (  # forces 8 devices
  BETA,
  N_WORKERS,
  UNCOMPRESSED,
  make_setup,
  train_run,
)

# Steps relative to the RMS σ of the recorded momentum: from coarse (2σ) to fine (σ/256).
DELTA_OVER_SIGMA = tuple(2.0**-j for j in range(-1, 9))
METHODS = ("none", "fixed", "least_squares")


def entropy_bits(symbols: np.ndarray) -> float:
  """Empirical entropy (bits per symbol) of an integer array."""
  _, counts = np.unique(symbols, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def code(momentum: np.ndarray, delta: float, method: str, seed: int = 0, rho: float = BETA) -> dict:
  """Dithered uniform DPCM of every worker's sequence (T, n, S); rate and distortion.

  `rho` is the coefficient of the "fixed" method (default β, the momentum's own)."""
  steps, n, s = momentum.shape
  rng = np.random.default_rng(seed)
  recon = np.zeros((n, s), np.float64)
  rates, sq_err, rho_bits = [], 0.0, 0.0
  for t in range(steps):
    m = momentum[t].astype(np.float64)
    if method == "none" or t == 0:
      pred = np.zeros_like(m)
    elif method == "fixed":
      pred = rho * recon
    else:
      num = np.einsum("ij,ij->i", m, recon)
      den = np.einsum("ij,ij->i", recon, recon)
      rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).astype(np.float32)
      pred = rho[:, None].astype(np.float64) * recon
      rho_bits += 32.0 * n
    u = (rng.random((n, s)) - 0.5) * delta
    k = np.round((m - pred + u) / delta)
    recon = pred + k * delta - u
    sq_err += float(((recon - m) ** 2).sum())
    rates.append(entropy_bits(k.astype(np.int64)))
  coords = steps * n * s
  return {
    "bits_per_coord": float(np.mean(rates)) + rho_bits / coords,
    "distortion_per_coord": sq_err / coords,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=128, help="recorded steps (default 128)")
  parser.add_argument("--coords", type=int, default=65536, help="recorded coordinates")
  parser.add_argument("--train-examples", type=int, default=16384)
  parser.add_argument("--lr", type=float, default=0.1, help="momentum SGD rate (default 0.1)")
  parser.add_argument("--out", default=str(_common.RESULTS / "rate_distortion.json"))
  args = parser.parse_args(argv)

  setup = make_setup("fashion_mnist", args.train_examples)
  local_batch = 32
  per_epoch = args.train_examples // (N_WORKERS * local_batch)
  epochs = -(-args.steps // per_epoch)
  coords = np.sort(np.random.default_rng(0).choice(setup.dim, args.coords, replace=False))
  t0 = time.time()
  rec = train_run(
    setup,
    UNCOMPRESSED,  # uncompressed momentum SGD, β = BETA, no error feedback
    lr=args.lr,
    epochs=epochs,
    local_batch=local_batch,
    seed=0,
    record=True,
    coords=coords,
  )
  momentum = rec["momentum"][: args.steps]
  record_seconds = time.time() - t0
  sigma = float(np.sqrt(np.mean(momentum.astype(np.float64) ** 2)))
  print(
    f"recorded {momentum.shape} in {record_seconds:.0f} s; test acc {rec['test_accuracy']:.4f}; "
    f"momentum RMS {sigma:.3g}",
    flush=True,
  )
  result = {
    **_common.run_info("rate_distortion"),
    "model": "mnist_cnn",
    "dataset": "fashion_mnist",
    "num_params": setup.dim,
    "workers": N_WORKERS,
    "beta": BETA,
    "lr": args.lr,
    "local_batch": local_batch,
    "steps": int(momentum.shape[0]),
    "recorded_coords": int(args.coords),
    "record_seconds": round(record_seconds, 1),
    "recording_test_accuracy": rec["test_accuracy"],
    "momentum_rms": sigma,
    "rows": [],
  }
  t1 = time.time()
  for ratio in DELTA_OVER_SIGMA:
    delta = ratio * sigma
    row = {"delta_over_sigma": ratio, "delta": delta, "uniform_distortion": delta**2 / 12}
    for method in METHODS:
      row[method] = code(momentum, delta, method)
    for method in METHODS[1:]:
      row[f"rate_reduction_{method}"] = (
        row["none"]["bits_per_coord"] / row[method]["bits_per_coord"]
      )
    result["rows"].append(row)
    print(
      f"Δ = σ·{ratio:<8g} D/σ² = {delta**2 / 12 / sigma**2:.2e}  bits/coord: "
      + "  ".join(f"{m} {row[m]['bits_per_coord']:.3f}" for m in METHODS)
      + f"  reduction (ls) {row['rate_reduction_least_squares']:.2f}x",
      flush=True,
    )
  result["code_seconds"] = round(time.time() - t1, 1)
  path = _common.write_json(args.out, result)
  plot(result, pathlib.Path(path).with_suffix(".png"))
  print(f"wrote {path}")


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 4))
  sigma2 = result["momentum_rms"] ** 2
  labels = {
    "none": "no prediction",
    "fixed": f"ρ = β = {result['beta']}",
    "least_squares": "least-squares ρ",
  }
  for method in METHODS:
    d = [r[method]["distortion_per_coord"] / sigma2 for r in result["rows"]]
    bits = [r[method]["bits_per_coord"] for r in result["rows"]]
    ax.plot(bits, d, "o-", label=labels[method])
  ax.set_yscale("log")
  ax.set_xlabel("rate (entropy, bits per coordinate)")
  ax.set_ylabel("distortion / momentum power")
  ax.set_title("Dithered uniform coding of real momentum (Fashion-MNIST CNN)", fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
