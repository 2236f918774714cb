"""The data-parallel training loop: n workers on a `jax.shard_map` mesh axis "data"."""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from compams_jax.experiments import checkpoints
from compams_jax.experiments.data import epoch_permutation, load_dataset, steps_per_epoch
from compams_jax.experiments.models import count_params, create_model
from compams_jax.experiments.optim import build_optimizer, bytes_sent_by_step

AXIS = "data"


def put_global(array: Any, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
  """A global array from a host value every process holds in full (works across processes)."""
  array = np.asarray(array)
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) global array, on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_mesh(num_workers: int) -> jax.sharding.Mesh:
  """A 1-D mesh of `num_workers` devices named "data"."""
  devices = jax.devices()
  if len(devices) < num_workers:
    raise RuntimeError(
      f"the run needs {num_workers} devices (one per worker) but jax sees {len(devices)}. "
      "On CPU, simulate them by setting XLA_FLAGS=--xla_force_host_platform_device_count="
      f"{num_workers} before jax starts (compams-train does this for you)."
    )
  return jax.make_mesh((num_workers,), (AXIS,), devices=devices[:num_workers])


@dataclasses.dataclass
class RunResult:
  """What `train` returns: the summary (also in summary.json) and the final training state."""

  summary: dict[str, Any]
  params: Any
  opt_state: Any


@dataclasses.dataclass
class Meters:
  """Running sums of the current epoch's training metrics (checkpointed, so resume is exact)."""

  loss: float = 0.0
  accuracy: float = 0.0
  count: int = 0

  def add(self, loss: float, accuracy: float) -> None:
    self.loss += loss
    self.accuracy += accuracy
    self.count += 1

  def means(self) -> tuple[float, float]:
    c = max(self.count, 1)
    return self.loss / c, self.accuracy / c


def _meta(config, params=None) -> dict[str, Any]:
  meta = {
    "model": config.model.name,
    "dataset": config.dataset.name,
    "num_workers": int(config.num_workers),
    "optimizer": json.loads(config.optimizer.to_json()),
  }
  if params is not None:
    meta["param_shapes"] = {
      jax.tree_util.keystr(k): list(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
  return meta


def _limit(dataset, max_train: int, max_test: int, seed: int):
  """A seeded random subset of the splits (0 = keep all), for smoke runs."""

  def take(x, y, m, salt):
    if not m or m >= len(y):
      return x, y
    idx = np.sort(np.random.default_rng([seed, salt]).permutation(len(y))[:m])
    return x[idx], y[idx]

  x_train, y_train = take(dataset.x_train, dataset.y_train, max_train, 1)
  x_test, y_test = take(dataset.x_test, dataset.y_test, max_test, 2)
  return dataclasses.replace(
    dataset, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
  )


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Drops metric lines written after `step` (by a run that died before its next checkpoint)."""
  if not path.exists():
    return
  kept = [
    line
    for line in path.read_text().splitlines()
    if line.strip() and json.loads(line)["step"] <= step
  ]
  path.write_text("".join(line + "\n" for line in kept))


def train(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  *,
  resume: bool = False,
  stop_after: int | None = None,
  progress: bool = True,
  elastic: bool = False,
) -> RunResult:
  """Trains `config` in `workdir` and returns the run summary.

  Writes `workdir/metrics.jsonl` (train lines every `log_every` steps, eval lines every epoch),
  `workdir/summary.json`, `workdir/run_meta.json`, `workdir/final_state.npz` (every parameter
  and optimizer-state leaf, keyed by its pytree path) and orbax checkpoints of the parameters, the
  full optimizer state (every worker's residuals), the step (the data position: batches and
  dropout keys derive from seed and step) and the epoch's running metrics.

  Args:
    config: an experiment config (see `configs/`).
    workdir: the run directory.
    resume: continue from the latest checkpoint in `workdir` (its config must match).
    stop_after: stop (with a checkpoint) after this many total steps, as an interruption would.
    progress: show a progress bar.
    elastic: allow resuming a checkpoint made with a different `num_workers`: the error
      residuals are redistributed with their sum preserved (`cj.sharding.resize_workers`;
      state without such an invariant is refused). The step count carries on; the data order
      from then on is that of the new worker count.

  Returns:
    A `RunResult`: the summary (also written to `summary.json`), final params and optimizer
    state (global view: per-worker leaves stacked along their leading axis).
  """
  workdir = pathlib.Path(workdir)
  saved_meta = checkpoints.read_meta(workdir)
  must_match = ("model", "dataset", "optimizer") + (() if elastic else ("num_workers",))
  if resume and saved_meta is not None:  # Refuse a mismatched run before any expensive setup.
    checkpoints.check_meta(saved_meta, _meta(config), workdir, keys=must_match)
  n = int(config.num_workers)
  mesh = make_mesh(n)
  dataset = load_dataset(config.dataset.name, **dict(config.dataset.get("kwargs", {}) or {}))
  dataset = _limit(
    dataset,
    int(config.get("max_train_examples", 0)),
    int(config.get("max_test_examples", 0)),
    int(config.seed),
  )
  model = create_model(
    config.model.name, dataset.num_classes, **dict(config.model.get("kwargs", {}) or {})
  )
  seed = int(config.seed)
  init_key = jax.random.key(seed)
  params = model.init({"params": init_key}, jnp.asarray(dataset.x_train[:1]), train=False)["params"]
  params = jax.tree.map(lambda x: put_global(x, mesh, P()), params)
  tx = build_optimizer(config.optimizer, axis_name=AXIS)
  opt_state = cj.sharding.init(tx, params, mesh=mesh, axis_name=AXIS)
  specs = cj.sharding.state_specs(opt_state, AXIS)
  dropout_key = jax.random.fold_in(init_key, 1)

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), specs, P(AXIS), P(AXIS), P()),
    out_specs=(P(), specs, P(AXIS), P(AXIS)),
  )
  def train_step(params, opt_state, x, y, step):
    x, y = x[0], y[0]
    rng = jax.random.fold_in(jax.random.fold_in(dropout_key, step), jax.lax.axis_index(AXIS))

    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    # Differentiate w.r.t. a device-varying copy: the gradient of a replicated parameter inside
    # shard_map would otherwise be summed over workers before compression.
    varying = jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to="varying"), params)
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(varying)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss[None], acc[None]

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(AXIS))
  )
  def eval_chunk(params, x, y):
    logits = model.apply({"params": params}, x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses, (jnp.argmax(logits, -1) == y).astype(jnp.float32)

  def evaluate(params):
    x, y = dataset.x_test, dataset.y_test
    chunk = n * 64
    total = math.ceil(len(y) / chunk) * chunk
    pad = total - len(y)
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    yp = np.concatenate([y, np.zeros((pad,), y.dtype)])
    losses, correct = [], []
    for i in range(0, total, chunk):
      put = lambda a: put_global(a[i : i + chunk], mesh, P(AXIS))
      l, c = eval_chunk(params, put(xp), put(yp))
      losses.append(to_host(l))
      correct.append(to_host(c))
    losses, correct = np.concatenate(losses)[: len(y)], np.concatenate(correct)[: len(y)]
    return float(losses.mean()), float(correct.mean())

  local_batch = int(config.local_batch)
  per_epoch = steps_per_epoch(len(dataset.y_train), n, local_batch)
  if per_epoch == 0:
    raise ValueError(
      f"{len(dataset.y_train)} training examples cannot fill one global batch of "
      f"{n} workers × {local_batch}."
    )
  total_steps = int(config.epochs) * per_epoch

  def batch(step):
    epoch, k = divmod(step, per_epoch)
    idx = epoch_permutation(len(dataset.y_train), seed, epoch)[
      k * n * local_batch : (k + 1) * n * local_batch
    ].reshape(n, local_batch)
    put = lambda a: put_global(a, mesh, P(AXIS))
    return put(dataset.x_train[idx]), put(dataset.y_train[idx])

  # What the optimizer's collectives send, read from the compiled step's HLO.
  x0, y0 = batch(0)
  step0 = jnp.zeros([], jnp.int32)
  hlo = cj.collective_bytes(train_step.lower(params, opt_state, x0, y0, step0).compile())
  bytes_per_step = hlo.total
  sent_after, steady_bytes = bytes_sent_by_step(config.optimizer, params, bytes_per_step)
  static_bytes = cj.wire_bytes(tx, params)
  num_params = count_params(params)
  dense_bytes = 4 * num_params

  # Run directory and resume.
  lead = jax.process_index() == 0  # Across processes, process 0 writes the run's files.
  workdir.mkdir(parents=True, exist_ok=True)
  meta = _meta(config, params)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
  metrics_path = workdir / "metrics.jsonl"
  start, meters = 0, Meters()
  try:
    latest = ckpt.latest_step()
    if latest is not None and not resume:
      raise checkpoints.CheckpointError(
        f"{workdir} already holds a run (checkpoint at step {latest}); pass --resume to "
        "continue it or choose another --workdir (nothing was overwritten)."
      )
    if resume and latest is not None:
      if saved_meta is None:
        raise checkpoints.CheckpointError(
          f"{workdir} has checkpoints but no {checkpoints.META_FILE}."
        )
      checkpoints.check_meta(saved_meta, meta, workdir, keys=must_match + ("param_shapes",))
      saved_n = int(saved_meta["num_workers"])
      like_state = opt_state
      if saved_n != n:  # Elastic: restore the old worker count's shapes, replicated, then resize.
        like_state = jax.tree.map(
          lambda x, sp: jax.ShapeDtypeStruct(
            ((saved_n,) + x.shape[1:]) if sp and sp[0] == AXIS else x.shape,
            x.dtype,
            sharding=NamedSharding(mesh, P()),
          ),
          opt_state,
          specs,
        )
      like = {
        "params": params,
        "opt_state": like_state,
        "step": 0,
        "meters": dataclasses.asdict(Meters()),
      }
      restored = ckpt.restore(latest, like)
      params, opt_state = restored["params"], restored["opt_state"]
      if saved_n != n:
        opt_state = jax.tree.map(
          lambda x, sp: put_global(to_host(x), mesh, sp),
          cj.sharding.resize_workers(opt_state, n),
          specs,
        )
      start, meters = (
        int(restored["step"]),
        Meters(**{k: type(getattr(Meters(), k))(v) for k, v in restored["meters"].items()}),
      )
      if lead:
        _truncate_metrics(metrics_path, start)
    elif lead:
      metrics_path.write_text("")
    if lead:
      (workdir / checkpoints.META_FILE).write_text(json.dumps(meta, indent=1))
      (workdir / "config.json").write_text(config.to_json(indent=1))

    end = total_steps if stop_after is None else min(total_steps, int(stop_after))
    bar = None
    progress = progress and lead
    if progress:
      from tqdm.auto import tqdm

      # A live bar on a terminal; on a log (no tty) one line per epoch instead.
      bar = tqdm(
        total=total_steps,
        initial=start,
        desc=str(config.get("variant", "train")),
        unit="step",
        dynamic_ncols=True,
        leave=True,
        mininterval=0.5,
        disable=None,
      )
    t0 = time.time()
    log_every = int(config.log_every)
    ckpt_every = int(config.checkpoint_every)
    target = float(config.get("target_train_loss", 0.0))
    recent = collections.deque(maxlen=max(int(config.get("target_loss_window", 10)), 1))
    if target and recent.maxlen > total_steps:
      raise ValueError(
        f"target_loss_window={recent.maxlen} is longer than the whole run ({total_steps} steps)."
      )
    reached_target = None
    test_loss = test_acc = float("nan")
    with open(metrics_path if lead else os.devnull, "a") as log:
      for step in range(start, end):
        x, y = batch(step)
        params, opt_state, loss, acc = train_step(
          params, opt_state, x, y, jnp.asarray(step, jnp.int32)
        )
        loss, acc = float(np.mean(to_host(loss))), float(np.mean(to_host(acc)))
        if not math.isfinite(loss):
          raise FloatingPointError(f"training loss became {loss} at step {step}.")
        meters.add(loss, acc)
        recent.append(loss)
        done = step + 1
        if (
          target
          and reached_target is None
          and len(recent) == recent.maxlen
          and sum(recent) / len(recent) <= target
        ):
          reached_target = done
          end = done
        sent = sent_after(done) * 8
        if done % log_every == 0:
          log.write(
            json.dumps(
              {
                "kind": "train",
                "step": done,
                "epoch": done / per_epoch,
                "loss": loss,
                "accuracy": acc,
                "bits_sent": sent,
              }
            )
            + "\n"
          )
        if done % per_epoch == 0:
          test_loss, test_acc = evaluate(params)
          train_loss, train_acc = meters.means()
          meters = Meters()
          log.write(
            json.dumps(
              {
                "kind": "eval",
                "step": done,
                "epoch": done // per_epoch,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "bits_sent": sent,
              }
            )
            + "\n"
          )
          if progress and (bar is None or bar.disable):
            print(
              f"[{config.get('variant', 'train')}] epoch {done // per_epoch}/"
              f"{config.epochs}: train loss {train_loss:.4f}, test acc {test_acc:.4f}, "
              f"{sent / 8e6:.2f} MB sent per worker",
              flush=True,
            )
        log.flush()
        if done % ckpt_every == 0 or done == end:
          ckpt.save(
            done,
            {
              "params": params,
              "opt_state": opt_state,
              "step": done,
              "meters": dataclasses.asdict(meters),
            },
          )
        if bar is not None:
          bar.update(1)
          bar.set_postfix(
            loss=f"{loss:.3f}",
            acc=f"{acc:.3f}",
            test_acc=f"{test_acc:.3f}",
            sent=f"{sent / 8e6:.2f}MB",
          )
        if reached_target is not None:
          break
    if bar is not None:
      bar.close()
    if math.isnan(test_acc) or (reached_target is not None and end % per_epoch):
      test_loss, test_acc = evaluate(params)
  finally:
    ckpt.close()

  summary = {
    "variant": config.get("variant", "run"),
    "config": json.loads(config.to_json()),
    "steps": end,
    "total_steps": total_steps,
    "epochs_done": end / per_epoch,
    "num_workers": n,
    "num_params": num_params,
    "train_examples": len(dataset.y_train),
    "test_examples": len(dataset.y_test),
    "test_loss": test_loss,
    "test_accuracy": test_acc,
    "bytes_per_step_hlo": bytes_per_step,
    "bytes_per_step_static": static_bytes,
    "dense_f32_bytes": dense_bytes,
    "bytes_per_step_steady": steady_bytes,
    "compression_ratio": dense_bytes / steady_bytes if steady_bytes else float("inf"),
    "collectives": hlo.by_op,
    "seconds": time.time() - t0,
    "finished": end == total_steps or reached_target is not None,
    "target_train_loss": target or None,
    "steps_to_target": reached_target,
  }
  # The final training state as plain arrays (global view), for analysis and comparisons.
  flat = {
    f"params{jax.tree_util.keystr(k)}": to_host(v)
    for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  flat.update(
    {
      f"opt_state{jax.tree_util.keystr(k)}": to_host(v)
      for k, v in jax.tree_util.tree_leaves_with_path(opt_state)
    }
  )
  if lead:
    np.savez(workdir / "final_state.npz", **flat)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  return RunResult(summary=summary, params=params, opt_state=opt_state)
