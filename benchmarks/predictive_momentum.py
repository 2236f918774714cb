"""Predictive coding of REAL momentum sequences: distortion, rate (fixed and entropy), accuracy.

What it does (8 simulated CPU workers under `jax.shard_map`, MnistCNN on scikit-learn digits):

1. Records real momentum: trains the CNN with uncompressed momentum SGD (β = 0.9) and stores
   every worker's momentum vector m_{t,i} (flattened, 53,002 float32) at every step.
2. Replays those sequences through the compression transforms, for every compressor of
   `cj.compressors.REGISTRY` (its first example; `--compressors` / `--all-examples` choose, e.g.
   `--compressors top_k top_k:ratio=0.05 qsgd:levels=2`) and
   method (no prediction / fixed ρ = 0.9 / least-squares ρ, with and without error feedback),
   and measures the relative distortion Σ_t‖x̄̂_t − x̄_t‖² / Σ_t‖x̄_t‖² of the averaged output
   against the true average momentum x̄_t = (1/n) Σ_i m_{t,i}.
3. Rate: fixed bytes per worker per step from the compiled HLO of the transform's update
   (`cj.collective_bytes`) and from `cj.wire_bytes`; and the empirical entropy of the payload
   symbols the encoder actually produced over the run (per-leaf histograms over all steps and
   workers), i.e. the rate an ideal static entropy coder would reach.
4. Final test accuracy of `cj.compressed_momentum_sgd` for each compressor: no prediction and
   least-squares prediction, each with and without error feedback, and fixed ρ = 0.9 without
   error feedback; same epochs / learning rate / data order as the recording run.

Run from the repository root:

    python benchmarks/predictive_momentum.py            # full run
    python benchmarks/predictive_momentum.py --quick    # smoke version (~1-2 min)

Writes benchmarks/results/predictive_momentum.json (or --out) and prints the tables.
"""

from __future__ import annotations

import _common

_common.force_devices(8)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import compams_jax as cj  # noqa: E402
from compams_jax.experiments import config as config_lib  # noqa: E402
from compams_jax.experiments import train  # noqa: E402
from compams_jax.experiments.data import load_dataset  # noqa: E402
from compams_jax.experiments.models import create_model  # noqa: E402

AXIS = "data"
N_WORKERS = 8
BETA = 0.9
# Cheaper XLA compiles for the replays (compile time, not run time, dominates on CPU). The HLO
# byte counts are read from separate compiles with default options.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Replays and accuracy runs take their compressors from the registry (see --compressors).
QUICK_COMPRESSORS = ("top_k", "random_k", "qsgd", "block_sign")
QUICK_ACC_COMPRESSORS = ("top_k", "block_sign")

# Replay methods: name -> (predictor: None | "fixed" | "ls", error_feedback)
METHODS = {
  "none": (None, False),  # cj.compressed_mean: the mean of C(m_i)
  "fixed0.9": ("fixed", False),  # predictive, p = 0.9 x̂_{t-1}
  "ls": ("ls", False),  # predictive, least-squares ρ
  "none+EF": (None, True),  # cj.error_feedback
  "ls+EF": ("ls", True),  # predictive + error feedback, least-squares ρ
  "fixed0.9+EF": ("fixed", True),  # documented unstable: top_k only, as evidence
}
FIXED_EF_ONLY_FOR = ("top_k",)
# The method whose HLO bytes are also read from a separate compile of one update (a cross-check
# of the bytes read from the replay program).
CROSS_CHECK_METHOD = "ls"

# Accuracy variants: name -> (predictive argument, error_feedback)
ACC_VARIANTS = {
  "none": (False, False),
  "none+EF": (False, True),
  "ls": (True, False),
  "ls+EF": (True, True),
  "fixed0.9": ("fixed", False),
}

# Uniform value quantizer for the entropy of sparse payloads: step = RMS of the leaf's true
# per-worker momentum over the run, divided by this (one constant per leaf, the same for every
# method, so equal quantization error and the entropy compares magnitudes).
UNIFORM_DIVISOR = 16.0
# Floating-point value symbols: sign + 8 exponent bits + this many leading mantissa bits.
MANTISSA_BITS = 8


# ------------------------------------------------------------------------------------------------
# Setup
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  mesh: jax.sharding.Mesh
  dataset: object
  dataset_name: str
  leaf_shapes: list
  leaf_names: list
  treedef: object
  params_like: object  # ShapeDtypeStructs

  @property
  def leaf_sizes(self):
    return [int(np.prod(s)) for s in self.leaf_shapes]

  @property
  def dim(self):
    return sum(self.leaf_sizes)

  def unflatten(self, flat):
    out, start = [], 0
    for shape, size in zip(self.leaf_shapes, self.leaf_sizes):
      out.append(flat[start : start + size].reshape(shape))
      start += size
    return jax.tree.unflatten(self.treedef, out)


def make_setup(dataset_name="digits", max_train_examples=None):
  """The mesh, data and model of a recording run (default: MnistCNN on scikit-learn digits)."""
  if jax.device_count() < N_WORKERS:
    raise RuntimeError(
      f"need {N_WORKERS} devices, jax sees {jax.device_count()} (cj.simulate_cpu_devices "
      "must run before any JAX operation)."
    )
  mesh = jax.make_mesh((N_WORKERS,), (AXIS,), devices=jax.devices()[:N_WORKERS])
  dataset = load_dataset(dataset_name)
  if max_train_examples is not None:
    dataset = dataclasses.replace(
      dataset,
      x_train=dataset.x_train[:max_train_examples],
      y_train=dataset.y_train[:max_train_examples],
    )
  model = create_model("mnist_cnn", dataset.num_classes)
  params = model.init({"params": jax.random.key(0)}, jnp.asarray(dataset.x_train[:1]), train=False)[
    "params"
  ]
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  return Setup(
    mesh=mesh,
    dataset=dataset,
    dataset_name=dataset_name,
    leaf_shapes=[tuple(v.shape) for _, v in leaves_with_path],
    leaf_names=[jax.tree_util.keystr(k) for k, _ in leaves_with_path],
    treedef=treedef,
    params_like=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
  )


def make_compressor(spec):
  return spec.build()


# ------------------------------------------------------------------------------------------------
# Training (recording run and accuracy runs)
# ------------------------------------------------------------------------------------------------


def momentum_sgd(spec, predictive, error_feedback):
  """The `optimizer` config section of compressed momentum SGD (β = BETA) with the compressor
  `spec`, `predictive` False / True (least-squares ρ) / "fixed" (ρ = β) and error feedback."""
  return dict(
    name="momentum_sgd",
    momentum=BETA,
    compressor=spec.name,
    compressor_kwargs=dict(spec.kwargs),
    predictor={False: "none", True: "least_squares", "fixed": "fixed"}[predictive],
    error_feedback=error_feedback,
  )


UNCOMPRESSED = momentum_sgd(_common.Spec("identity", {}), False, False)


def train_run(setup, optimizer, *, lr, epochs, local_batch, seed, record=False, coords=None):
  """Trains the setup's model with the experiments' trainer (`train.make_setup`, its
  `train.train_step`) and the `optimizer` config section; optionally records the momentum.

  Returns dict(test_accuracy, test_loss, final_train_loss, diverged, steps, seconds[, momentum]).
  momentum: (T, n, D) float32 numpy, worker i's momentum after step t (flattened leaves), or
  only the flat coordinates `coords` of it (T, n, len(coords)). A run whose loss stops being
  finite trains on (the trainer itself would stop) and is marked diverged.
  """
  config = config_lib.base_config(
    name="predictive_momentum",
    dataset=setup.dataset_name,
    model="mnist_cnn",
    num_workers=N_WORKERS,
    local_batch=local_batch,
    epochs=epochs,
    seed=seed,
    **{f"optimizer__{k}": v for k, v in {**optimizer, "learning_rate": lr}.items()},
  )
  with warnings.catch_warnings():  # the documented warning of fixed ρ with error feedback
    warnings.simplefilter("ignore", UserWarning)
    run = train.make_setup(config, dataset=setup.dataset, measure_bytes=False)
  n = N_WORKERS
  t0, moms, losses = time.time(), [], []
  state = run.state
  for step in range(run.total_steps):
    state, loss, _ = train.train_step(run, state, step)
    losses.append(loss)
    if record:  # every worker's momentum after this step (state of cj.worker_momentum)
      m = [np.asarray(leaf) for leaf in jax.tree.leaves(state.opt_state[0].momentum.value)]
      flat = np.concatenate([leaf.reshape(n, -1) for leaf in m], axis=1)
      moms.append(flat if coords is None else flat[:, coords])
  test_loss, test_acc = run.evaluate(state.params)
  out = dict(
    test_accuracy=float(test_acc),
    test_loss=float(test_loss),
    final_train_loss=float(np.mean(losses[-run.per_epoch :])),
    diverged=not all(math.isfinite(l) for l in losses),
    steps=len(losses),
    seconds=time.time() - t0,
  )
  if record:
    out["momentum"] = np.stack(moms)
  return out


# ------------------------------------------------------------------------------------------------
# Replay of recorded momentum through the transforms
# ------------------------------------------------------------------------------------------------


def capturing(compressor):
  """A copy of `compressor` (same class name, fields and properties) that captures payloads.

  Its `encode` appends every payload it produces to `sink` (traced values: the replay reads them
  back inside the same traced scan body and returns them as outputs, so they are exactly the
  payloads the transform sent).
  """
  base = type(compressor)
  sink = []

  def encode(self, x, key=None):
    payload = base.encode(self, x, key)
    sink.append(payload)
    return payload

  # Named like its base: the library's warnings (recorded with each replay) name the class.
  capturing_class = type(base.__name__, (base,), {"encode": encode})
  fields = {f.name: getattr(compressor, f.name) for f in dataclasses.fields(compressor)}
  return capturing_class(**fields), sink


class CapturingLeastSquares(cj.predictors.LeastSquares):
  """The least-squares predictor, also capturing the ρ it returns (per leaf) into `sink`."""

  def __init__(self, sink):
    super().__init__()
    object.__setattr__(self, "_sink", sink)

  def coefficients(self, target, previous, axis_name):
    rho = super().coefficients(target, previous, axis_name)
    self._sink.append(rho)
    return rho


def make_transform(compressor, predictor, error_feedback, rho_sink=None):
  """The transform of one replay method; returns (tx, warning messages raised at construction)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if predictor is None:
      tx = (
        cj.error_feedback(compressor, axis_name=AXIS)
        if error_feedback
        else cj.compressed_mean(compressor, axis_name=AXIS)
      )
    else:
      if predictor == "fixed":
        pred = cj.predictors.fixed(BETA)
      else:
        pred = (
          CapturingLeastSquares(rho_sink) if rho_sink is not None else cj.predictors.least_squares()
        )
      tx = cj.predictive_compression(
        compressor,
        predictor=pred,
        feedback="ef" if error_feedback else "none",
        axis_name=AXIS,
      )
  return tx, [str(w.message) for w in caught]


def hlo_bytes(setup, tx):
  """Per-device collective bytes of ONE compiled `tx.update` under shard_map (default options)."""
  state = jax.eval_shape(tx.init, setup.params_like)
  specs = cj.sharding.state_specs(state, AXIS)
  pspec = jax.tree.map(lambda _: P(AXIS), setup.params_like)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), setup.params_like)
  global_x = jax.device_put(
    jax.tree.map(lambda z: jnp.stack([z] * N_WORKERS), zeros), NamedSharding(setup.mesh, P(AXIS))
  )
  global_state = cj.sharding.init(tx, zeros, mesh=setup.mesh, axis_name=AXIS)

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=setup.mesh,
    in_specs=(pspec, specs),
    out_specs=(jax.tree.map(lambda _: P(), setup.params_like), specs),
  )
  def update(x, s):
    return tx.update(jax.tree.map(lambda a: a[0], x), s)

  return cj.collective_bytes(update.lower(global_x, global_state).compile())


def replay(setup, seq_dev, mean_dev, compressor, predictor, error_feedback):
  """Runs one method over the recorded sequence; returns per-step errors, payloads and ρ."""
  cap, sink = capturing(compressor)
  rho_sink = [] if predictor == "ls" else None
  tx, warns = make_transform(cap, predictor, error_feedback, rho_sink)
  state0 = cj.sharding.init(
    tx,
    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), setup.params_like),
    mesh=setup.mesh,
    axis_name=AXIS,
  )
  specs = cj.sharding.state_specs(state0, AXIS)
  to_flat = lambda tree: jnp.concatenate([l.reshape(-1) for l in jax.tree.leaves(tree)])

  def body(carry, inp):
    state, cum = carry
    x_flat, mean = inp
    sink.clear()
    if rho_sink is not None:
      rho_sink.clear()
    out, state = tx.update(setup.unflatten(x_flat[0]), state)
    diff = to_flat(out) - mean
    cum = cum + diff  # error of the running sum Σ_s x̄̂_s − Σ_s x̄_s (the parameter trajectory)
    blocks = 1 if compressor.granularity == "model" else len(setup.leaf_sizes)
    if len(sink) != blocks:
      raise RuntimeError(
        f"expected one encode per block ({blocks}), the update encoded {len(sink)} payloads"
      )
    payload = [jax.tree.map(lambda a: a[None], p) for p in sink]  # one payload per leaf
    rho = jnp.stack(jax.tree.leaves(rho_sink[0])) if rho_sink else jnp.zeros((0,), jnp.float32)
    return (state, cum), (jnp.sum(diff * diff), jnp.sum(cum * cum), rho, payload)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  @functools.partial(
    jax.shard_map,
    mesh=setup.mesh,
    in_specs=(specs, P(None, AXIS), P()),
    out_specs=(P(), P(), P(), P(None, AXIS)),
  )
  def run(state, seq, means):
    cum = jnp.zeros((setup.dim,), jnp.float32)
    _, (err, cum_err, rho, payload) = jax.lax.scan(body, (state, cum), (seq, means))
    return err, cum_err, rho, payload

  compiled = run.lower(state0, seq_dev, mean_dev).compile()
  # The program's only collectives are those of tx.update inside the scan body (the true mean
  # comes in replicated, the error is computed locally): its HLO holds one step's collectives.
  hlo = cj.collective_bytes(compiled)
  err, cum_err, rho, payload = compiled(state0, seq_dev, mean_dev)
  payload = jax.tree.map(np.asarray, payload)  # leaves: (T, n, ...)
  return np.asarray(err), np.asarray(cum_err), np.asarray(rho), payload, warns, hlo


# ------------------------------------------------------------------------------------------------
# Entropy of payload symbols
# ------------------------------------------------------------------------------------------------


def entropy_bits(symbols):
  """Empirical zeroth-order entropy (bits/symbol) of an array of discrete symbols."""
  symbols = np.asarray(symbols).reshape(-1)
  if symbols.size == 0:
    return 0.0
  if symbols.dtype.kind in "iub":
    lo, hi = int(symbols.min()), int(symbols.max())
    if hi - lo < (1 << 22):  # dense histogram: much faster than np.unique on 10⁸ symbols
      counts = np.bincount((symbols.astype(np.int64) - lo), minlength=1)
      counts = counts[counts > 0]
      p = counts / counts.sum()
      return float(-(p * np.log2(p)).sum())
  _, counts = np.unique(symbols, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def log2_binomial(n, k):
  """log2 C(n, k), elementwise for array k."""
  from scipy.special import gammaln  # pylint: disable=import-outside-toplevel

  k = np.asarray(k, np.float64)
  return (gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)) / math.log(2.0)


def fp_symbols(values):
  """float32 -> sign + exponent + MANTISSA_BITS leading mantissa bits (truncated), as ints."""
  bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
  return bits >> np.uint32(23 - MANTISSA_BITS)


def payload_kind(payload):
  """How to read a payload (a list of per-leaf dicts) for its entropy, from its fields: sparse
  values + indices, values only, QSGD levels + norm, sign bits + scale, or anything else."""
  keys = set(payload[0]) if payload else set()
  if keys == {"values", "indices"}:
    return "top_k"
  if keys == {"values"}:
    return "random_k"
  if keys == {"levels", "norm"}:
    return "qsgd"
  if keys == {"negative", "scale"}:
    return "block_sign"
  return "generic"


def _symbols(a):
  """Discrete symbols of a payload array: integers as they are, floats as fp_symbols."""
  a = np.asarray(a)
  return a if a.dtype.kind in "iub" else fp_symbols(a.astype(np.float32))


def payload_entropy(kind, payload, leaf_sizes, steps_uniform):
  """Ideal (static, per-leaf) entropy-coded bits per worker per step of the captured payloads.

  Returns a dict of bits per worker per step: `fixed` (payload bits as sent), and the entropy
  estimates; per-leaf histograms pooled over all steps and workers. `kind` is `payload_kind`'s.
  """
  T, n = None, None
  out = dict(fixed=0.0, entropy=0.0)
  detail = {}
  if kind == "generic":  # every payload array coded on its own, symbol by symbol
    for leaf in payload:
      for name, arr in leaf.items():
        per_step = int(np.prod(np.shape(arr)[2:], dtype=np.int64))  # (T, n, ...) captured
        fixed = per_step * np.asarray(arr).dtype.itemsize * 8
        ent = per_step * entropy_bits(_symbols(arr))
        detail[f"{name}_fixed"] = detail.get(f"{name}_fixed", 0.0) + fixed
        detail[f"{name}_entropy"] = detail.get(f"{name}_entropy", 0.0) + ent
        out["fixed"] += fixed
        out["entropy"] += ent
    detail["generic"] = True
  elif kind == "top_k":
    fp = uni = idx_gap = idx_fixed = idx_ideal = val_fixed = idx_cond = 0.0
    overlap_num = overlap_den = 0.0
    for leaf, d, delta in zip(payload, leaf_sizes, steps_uniform):
      vals, idx = leaf["values"], leaf["indices"]
      T, n, k = vals.shape
      val_fixed += k * 32
      idx_fixed += k * idx.dtype.itemsize * 8
      fp += k * entropy_bits(fp_symbols(vals))
      uni += k * entropy_bits(np.rint(vals / delta).astype(np.int64))
      srt = np.sort(idx.astype(np.int64), axis=-1)
      gaps = np.diff(np.concatenate([np.full((T, n, 1), -1), srt], axis=-1), axis=-1)
      idx_gap += k * entropy_bits(gaps)
      # log2 C(d, k): the best any index code can do for a uniformly random k-subset.
      idx_ideal += log2_binomial(d, k)
      # Inter-step code: which of the previous step's k indices recur (r of them), then the new
      # ones among the other d − k positions: log2(k+1) + log2 C(k, r) + log2 C(d − k, k − r).
      if T > 1 and k < d:
        mask = np.zeros((T, n, d), bool)
        np.put_along_axis(mask, idx.astype(np.int64), True, axis=-1)
        r = np.take_along_axis(mask[:-1], idx[1:].astype(np.int64), axis=-1).sum(-1)  # (T-1, n)
        bits = math.log2(k + 1) + log2_binomial(k, r) + log2_binomial(d - k, k - r)
        idx_cond += float(bits.mean())  # first step excluded (no previous set)
        overlap_num += float(r.sum())
        overlap_den += float(r.size * k)
      else:
        idx_cond += log2_binomial(d, k)
    out.update(fixed=val_fixed + idx_fixed, entropy=fp + idx_gap, entropy_uniform=uni + idx_gap)
    detail = dict(
      values_fixed=val_fixed,
      values_fp=fp,
      values_uniform=uni,
      indices_fixed=idx_fixed,
      indices_gap_entropy=idx_gap,
      indices_log2_binomial=idx_ideal,
      indices_inter_step=idx_cond,
      index_overlap_with_previous_step=overlap_num / max(overlap_den, 1.0),
    )
  elif kind == "random_k":
    fp = uni = val_fixed = 0.0
    for leaf, delta in zip(payload, steps_uniform):
      vals = leaf["values"]
      k = vals.shape[-1]
      val_fixed += k * 32
      fp += k * entropy_bits(fp_symbols(vals))
      uni += k * entropy_bits(np.rint(vals / delta).astype(np.int64))
    out.update(fixed=val_fixed, entropy=fp, entropy_uniform=uni)
    detail = dict(values_fixed=val_fixed, values_fp=fp, values_uniform=uni)
  elif kind == "qsgd":
    lv = norms = fixed = 0.0
    zero_frac = []
    for leaf in payload:
      levels = leaf["levels"]
      d = levels.shape[-1]
      fixed += d * levels.dtype.itemsize * 8 + 32
      lv += d * entropy_bits(levels)
      norms += 32
      zero_frac.append(float(np.mean(levels == 0)))
    out.update(fixed=fixed, entropy=lv + norms)
    detail = dict(levels_entropy=lv, norms_raw=norms, zero_fraction_per_leaf=zero_frac)
  elif kind == "block_sign":
    sg = fixed = 0.0
    neg_frac = []
    for leaf, d in zip(payload, leaf_sizes):
      packed = leaf["negative"]
      bits = np.unpackbits(packed, axis=-1, bitorder="little")[..., :d]
      fixed += packed.shape[-1] * 8 + 32
      sg += d * entropy_bits(bits)
      neg_frac.append(float(bits.mean()))
    out.update(fixed=fixed, entropy=sg + 32 * len(leaf_sizes))
    detail = dict(
      signs_entropy=sg, scales_raw=32 * len(leaf_sizes), negative_fraction_per_leaf=neg_frac
    )
  out["detail"] = detail
  return out


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def fmt(x, spec=".3g"):
  if x is None:
    return "-"
  if isinstance(x, str):
    return x
  if not math.isfinite(x):
    return str(x)
  return format(x, spec)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: 2 epochs, 4 compressors, accuracy of 3 variants for 2 compressors (~1-2 min)",
  )
  parser.add_argument(
    "--epochs",
    type=int,
    default=None,
    help="epochs of the recording run and of every accuracy run (default 15, "
    "as configs/digits.py; quick 2)",
  )
  parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
  parser.add_argument(
    "--local-batch",
    type=int,
    default=16,
    help="examples per worker per step (default 16, as configs/digits.py: 11 steps per epoch)",
  )
  parser.add_argument(
    "--seeds", type=int, default=None, help="accuracy runs per variant, seeds 0..S-1 (default 1)"
  )
  _common.add_compressor_args(parser, "every one; quick: " + " ".join(QUICK_COMPRESSORS))
  parser.add_argument(
    "--acc-compressors",
    nargs="*",
    default=None,
    metavar="NAME[:ARG=VALUE,...]",
    help="compressors of the accuracy runs, as --compressors (default: --compressors; quick: "
    + " ".join(QUICK_ACC_COMPRESSORS)
    + ")",
  )
  parser.add_argument(
    "--acc-variants",
    nargs="*",
    default=None,
    choices=list(ACC_VARIANTS),
    help="accuracy variants (default all 5; quick: none+EF ls+EF fixed0.9)",
  )
  parser.add_argument("--skip-accuracy", action="store_true", help="skip the training runs")
  parser.add_argument(
    "--out",
    default=None,
    help="results JSON (default benchmarks/results/predictive_momentum.json; "
    "quick: predictive_momentum_quick.json in the temp directory)",
  )
  args = parser.parse_args(argv)

  epochs = args.epochs or (2 if args.quick else 15)
  seeds = args.seeds or 1
  specs = _common.compressor_specs(
    args.compressors or (list(QUICK_COMPRESSORS) if args.quick else None),
    all_examples=args.all_examples,
  )
  if args.acc_compressors is not None:
    acc_specs = _common.compressor_specs(args.acc_compressors, all_examples=args.all_examples)
  elif args.quick:
    acc_specs = _common.compressor_specs(list(QUICK_ACC_COMPRESSORS))
  else:
    acc_specs = specs
  acc_names = [s.label for s in acc_specs]
  acc_variants = (
    args.acc_variants
    if args.acc_variants is not None
    else (["none+EF", "ls+EF", "fixed0.9"] if args.quick else list(ACC_VARIANTS))
  )
  if args.skip_accuracy:
    acc_specs, acc_names = [], []
  here = pathlib.Path(__file__).resolve().parent
  if args.out:
    out_path = pathlib.Path(args.out)
  elif args.quick:  # a smoke run never overwrites the recorded results
    out_path = pathlib.Path(tempfile.gettempdir()) / "predictive_momentum_quick.json"
  else:
    out_path = here / "results" / "predictive_momentum.json"
  t_start, cpu_start = time.time(), time.process_time()
  git_start = _common.git_state() or {}
  setup = make_setup()
  print(
    f"jax {jax.__version__}, {jax.device_count()} devices; MnistCNN on digits "
    f"({len(setup.dataset.y_train)} train / {len(setup.dataset.y_test)} test), "
    f"{setup.dim} params in {len(setup.leaf_sizes)} leaves; {N_WORKERS} workers x "
    f"{args.local_batch}, lr {args.lr}, beta {BETA}, {epochs} epochs",
    flush=True,
  )

  # 1. Record the real momentum sequences.
  t0 = time.time()
  rec = train_run(
    setup,
    UNCOMPRESSED,
    lr=args.lr,
    epochs=epochs,
    local_batch=args.local_batch,
    seed=0,
    record=True,
  )
  seq = rec.pop("momentum").astype(np.float32)  # (T, n, D)
  T = seq.shape[0]
  mean = seq.mean(axis=1)  # (T, D): the true average momentum x̄_t
  mean_sq = (mean.astype(np.float64) ** 2).sum(axis=1)
  cum_sq = (np.cumsum(mean.astype(np.float64), axis=0) ** 2).sum(axis=1)
  # Temporal correlation of the recorded momentum: per-worker lag-1 least-squares coefficient.
  num = np.einsum("tnd,tnd->", seq[1:].astype(np.float64), seq[:-1].astype(np.float64))
  den = np.einsum("tnd,tnd->", seq[:-1].astype(np.float64), seq[:-1].astype(np.float64))
  rho_lag1 = num / den
  resid = seq[1:].astype(np.float64) - rho_lag1 * seq[:-1]
  pred_gain = float((seq[1:].astype(np.float64) ** 2).sum() / (resid**2).sum())
  # Per-leaf RMS of the per-worker momentum: the uniform quantizer steps.
  starts = np.cumsum([0] + setup.leaf_sizes)
  leaf_rms = [
    float(np.sqrt(np.mean(seq[:, :, a:b].astype(np.float64) ** 2)))
    for a, b in zip(starts[:-1], starts[1:])
  ]
  steps_uniform = [r / UNIFORM_DIVISOR for r in leaf_rms]
  model_rms = float(np.sqrt(np.mean(seq.astype(np.float64) ** 2)))
  record_info = dict(
    steps=T,
    seconds=time.time() - t0,
    test_accuracy=rec["test_accuracy"],
    test_loss=rec["test_loss"],
    final_train_loss=rec["final_train_loss"],
    lag1_rho=float(rho_lag1),
    lag1_prediction_gain=pred_gain,
    leaf_names=setup.leaf_names,
    leaf_sizes=setup.leaf_sizes,
    leaf_rms=leaf_rms,
    mean_over_workers_norm_ratio=float(
      np.sqrt(
        (mean.astype(np.float64) ** 2).sum() / (seq.astype(np.float64) ** 2).sum() * N_WORKERS
      )
    ),
  )
  print(
    f"[record] {T} steps x {N_WORKERS} workers x {setup.dim} in {record_info['seconds']:.1f}s;"
    f" test acc {rec['test_accuracy']:.4f}; lag-1 rho of m_t {rho_lag1:.3f} "
    f"(prediction gain {pred_gain:.1f}x)",
    flush=True,
  )

  seq_dev = jax.device_put(seq, NamedSharding(setup.mesh, P(None, AXIS)))
  mean_dev = jax.device_put(mean, NamedSharding(setup.mesh, P()))
  del seq

  # 2.-3. Replays: distortion, ρ, fixed bytes, payload entropy.
  replays = []
  for spec in specs:
    cname = spec.label
    comp = make_compressor(spec)
    for mname, (predictor, ef) in METHODS.items():
      if mname == "fixed0.9+EF" and spec.name not in FIXED_EF_ONLY_FOR:
        continue
      t0 = time.time()
      err, cum_err, rho, payload, warns, hlo = replay(setup, seq_dev, mean_dev, comp, predictor, ef)
      tx_plain, _ = make_transform(comp, predictor, ef)
      static = cj.wire_bytes(tx_plain, setup.params_like)
      single = None
      if mname == CROSS_CHECK_METHOD and not args.quick:
        # one update compiled on its own (default XLA options)
        single = hlo_bytes(setup, tx_plain).total
        if single != hlo.total:
          print(
            f"WARNING: {cname} {mname}: HLO bytes of the replay program {hlo.total} != "
            f"{single} of a single compiled update",
            flush=True,
          )
      with np.errstate(all="ignore"):  # diverged runs carry inf/nan payloads
        if comp.granularity == "model":  # one block: the whole model
          sizes, steps = [setup.dim], [model_rms / UNIFORM_DIVISOR]
        else:
          sizes, steps = setup.leaf_sizes, steps_uniform
        ent = payload_entropy(payload_kind(payload), payload, sizes, steps)
      per_step = err / np.maximum(mean_sq, 1e-30)
      row = dict(
        compressor=cname,
        method=mname,
        predictor=predictor,
        error_feedback=ef,
        distortion=float(err.sum() / mean_sq.sum()),
        distortion_cumulative=float(cum_err.sum() / cum_sq.sum()),
        nonfinite_steps=int((~np.isfinite(err)).sum()),
        distortion_per_step=per_step.tolist(),
        distortion_by_epoch=[
          float(err[a : a + T // epochs].sum() / mean_sq[a : a + T // epochs].sum())
          for a in range(0, T - T // epochs + 1, T // epochs)
        ],
        rho_mean=(rho.mean(axis=0).tolist() if rho.size else None),
        rho_first_last=(rho[[0, 1, -1]].mean(axis=1).tolist() if rho.size else None),
        hlo_bytes=hlo.total,
        hlo_by_op=hlo.by_op,
        hlo_bytes_single_update=single,
        wire_bytes=static,
        payload_fixed_bytes=ent["fixed"] / 8,
        entropy_bytes=ent["entropy"] / 8,
        entropy_uniform_bytes=(ent["entropy_uniform"] / 8 if "entropy_uniform" in ent else None),
        entropy_detail_bits=ent["detail"],
        warnings=warns,
        seconds=time.time() - t0,
      )
      replays.append(row)
      print(
        f"[replay] {cname:12s} {mname:12s} distortion {fmt(row['distortion']):>9s} "
        f"cum {fmt(row['distortion_cumulative']):>9s}  hlo {hlo.total:6d} B  "
        f"wire {static:6d} B  entropy {row['entropy_bytes']:8.0f} B"
        + (
          f" / uniform {row['entropy_uniform_bytes']:7.0f} B"
          if row["entropy_uniform_bytes"] is not None
          else ""
        )
        + (f"  rho~{np.mean(row['rho_mean']):.2f}" if row["rho_mean"] else "")
        + ("  [warned]" if warns else "")
        + f"  ({row['seconds']:.1f}s)",
        flush=True,
      )
      del payload

  # 4. Accuracy.
  accuracy = []
  if acc_names:
    for seed in range(seeds):
      if seed > 0:  # seed 0 of the uncompressed baseline is the recording run
        base = train_run(
          setup,
          UNCOMPRESSED,
          lr=args.lr,
          epochs=epochs,
          local_batch=args.local_batch,
          seed=seed,
        )
      else:
        base = dict(
          test_accuracy=rec["test_accuracy"],
          test_loss=rec["test_loss"],
          final_train_loss=rec["final_train_loss"],
          diverged=False,
          steps=T,
          seconds=record_info["seconds"],
        )
      accuracy.append(dict(compressor="identity", variant="uncompressed", seed=seed, **base))
      for spec in acc_specs:
        cname = spec.label
        for vname in acc_variants:
          pred, ef = ACC_VARIANTS[vname]
          r = train_run(
            setup,
            momentum_sgd(spec, pred, ef),
            lr=args.lr,
            epochs=epochs,
            local_batch=args.local_batch,
            seed=seed,
          )
          accuracy.append(dict(compressor=cname, variant=vname, seed=seed, **r))
          print(
            f"[train] seed {seed} {cname:12s} {vname:9s} test acc {r['test_accuracy']:.4f} "
            f"loss {r['test_loss']:.4f} ({r['seconds']:.1f}s)",
            flush=True,
          )

  total = time.time() - t_start
  cpu_total = time.process_time() - cpu_start
  print_tables(replays, accuracy, acc_names, acc_variants, total)
  result = dict(
    command=" ".join([sys.executable.split("/")[-1]] + sys.argv),
    argv=sys.argv[1:],
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    jax_version=jax.__version__,
    optax_version=optax.__version__,
    compams_jax_version=cj.__version__,
    git_commit=git_start.get("commit"),
    git_uncommitted_library_changes=git_start.get("dirty_library_files"),
    git_commit_at_end=(_common.git_state() or {}).get("commit"),
    python=platform.python_version(),
    machine=platform.machine(),
    cpu_count=os.cpu_count(),
    devices=jax.device_count(),
    settings=dict(
      workers=N_WORKERS,
      beta=BETA,
      lr=args.lr,
      local_batch=args.local_batch,
      epochs=epochs,
      steps=T,
      seeds=seeds,
      compressors=[s.jsonable() for s in specs],
      accuracy_compressors=[s.jsonable() for s in acc_specs],
      accuracy_variants=acc_variants,
      uniform_step=f"leaf RMS of per-worker momentum over the run / {UNIFORM_DIVISOR:g}",
      fp_symbols=f"sign + 8 exponent bits + {MANTISSA_BITS} mantissa bits",
      dense_f32_bytes=4 * setup.dim,
    ),
    record=record_info,
    replays=replays,
    accuracy=accuracy,
    accuracy_summary=acc_summary(accuracy),
    seconds_total=total,
    cpu_seconds_total=cpu_total,
    load_average_at_end=list(os.getloadavg()),
  )
  _common.write_json(out_path, result)
  print(f"wrote {out_path} ({total:.0f}s wall, {cpu_total:.0f}s CPU of this process)")


def acc_summary(accuracy):
  groups = {}
  for r in accuracy:
    groups.setdefault((r["compressor"], r["variant"]), []).append(r)
  out = []
  for (c, v), rs in groups.items():
    accs = [r["test_accuracy"] for r in rs]
    out.append(
      dict(
        compressor=c,
        variant=v,
        seeds=len(rs),
        test_accuracy_mean=float(np.mean(accs)),
        test_accuracy_min=float(np.min(accs)),
        test_accuracy_max=float(np.max(accs)),
        test_loss_mean=float(np.mean([r["test_loss"] for r in rs])),
        diverged=sum(bool(r["diverged"]) for r in rs),
      )
    )
  return out


def print_tables(replays, accuracy, acc_names, acc_variants, total):
  print(
    "\nDistortion Σ‖x̄̂−x̄‖²/Σ‖x̄‖² of the averaged momentum (cumulative: of its running sum); "
    "bytes per worker per step: HLO, wire_bytes, ideal entropy coder (fp values / uniform "
    "values)"
  )
  head = (
    f"{'compressor':12s} {'method':12s} {'distortion':>10s} {'cumulative':>10s} "
    f"{'HLO B':>7s} {'wire B':>7s} {'entropy B':>9s} {'uniform B':>9s} {'rho':>5s}"
  )
  print(head)
  print("-" * len(head))
  for r in replays:
    rho = f"{np.mean(r['rho_mean']):.2f}" if r["rho_mean"] else "-"
    uni = f"{r['entropy_uniform_bytes']:.0f}" if r["entropy_uniform_bytes"] is not None else "-"
    print(
      f"{r['compressor']:12s} {r['method']:12s} {fmt(r['distortion']):>10s} "
      f"{fmt(r['distortion_cumulative']):>10s} {r['hlo_bytes']:7d} {r['wire_bytes']:7d} "
      f"{r['entropy_bytes']:9.0f} {uni:>9s} {rho:>5s}"
    )
  print(
    "\nRate breakdown, bytes per worker per step (fixed = as sent; entropy = ideal static "
    "coder; top_k indices: gaps = per-payload gap entropy, C(d,k) = log2 C(d,k), "
    "inter = inter-step code, overlap = fraction of indices also sent the step before)"
  )
  for r in replays:
    d = {k: v for k, v in r["entropy_detail_bits"].items()}
    b = lambda key: f"{d[key] / 8:.0f}"
    if d.get("generic"):
      line = " | ".join(
        f"{k[: -len('_fixed')]} fixed {d[k] / 8:.0f}, entropy {d[k[: -len('_fixed')] + '_entropy'] / 8:.0f}"
        for k in d
        if k.endswith("_fixed")
      )
    elif "indices_fixed" in d:
      line = (
        f"values fixed {b('values_fixed')}, fp {b('values_fp')}, uniform "
        f"{b('values_uniform')} | indices fixed {b('indices_fixed')}, gaps "
        f"{b('indices_gap_entropy')}, C(d,k) {b('indices_log2_binomial')}, inter "
        f"{b('indices_inter_step')}, overlap {d['index_overlap_with_previous_step']:.2f}"
      )
    elif "values_fixed" in d:
      line = (
        f"values fixed {b('values_fixed')}, fp {b('values_fp')}, uniform "
        f"{b('values_uniform')} | no indices (dense, or shared-seed positions)"
      )
    elif "levels_entropy" in d:
      line = (
        f"levels fixed {r['payload_fixed_bytes'] - d['norms_raw'] / 8:.0f}, entropy "
        f"{b('levels_entropy')} | norms {b('norms_raw')}"
      )
    else:
      line = (
        f"signs fixed {r['payload_fixed_bytes'] - d['scales_raw'] / 8:.0f}, entropy "
        f"{b('signs_entropy')} | scales {b('scales_raw')}"
      )
    print(f"{r['compressor']:12s} {r['method']:12s} {line}")
  if accuracy:
    summ = {(s["compressor"], s["variant"]): s for s in acc_summary(accuracy)}
    print("\nTest accuracy, mean over seeds (test loss); ! = a run diverged (non-finite loss)")
    print(f"{'compressor':12s} " + " ".join(f"{v:>16s}" for v in acc_variants))
    base = summ.get(("identity", "uncompressed"))
    if base:
      print(f"{'uncompressed':12s} {base['test_accuracy_mean']:.4f} ({base['test_loss_mean']:.3f})")
    for c in acc_names:
      cells = []
      for v in acc_variants:
        s = summ.get((c, v))
        if s is None:
          cells.append(f"{'-':>16s}")
          continue
        loss = fmt(s["test_loss_mean"], ".3f")
        cell = f"{s['test_accuracy_mean']:.4f} ({loss})" + ("!" if s["diverged"] else "")
        cells.append(f"{cell:>16s}")
      print(f"{c:12s} " + " ".join(cells))
  print(f"\ntotal {total:.0f}s")


if __name__ == "__main__":
  main()
