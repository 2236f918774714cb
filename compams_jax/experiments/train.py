"""The data-parallel training loop: n workers on a `jax.shard_map` mesh axis "data".

`train` orchestrates: `make_setup` (`create_train_state`: model, parameters and optimizer state
on the mesh; `cj.data_parallel_step` and `make_eval_step`: the jitted data-parallel steps;
`evaluate`; the bytes sent), and `_fit` (the loop over `train_step`: metrics, progress,
checkpoints and the windowed loss-target stop).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from compams_jax.experiments import checkpoints, optim
from compams_jax.experiments import config as config_lib
from compams_jax.experiments.data import epoch_permutation, load_dataset, steps_per_epoch
from compams_jax.experiments.models import count_params, create_model

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


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the workers live: a device mesh (1-D "data", or hierarchical ("dcn", "ici")), or
  all of them simulated on one device with `jax.vmap`.

  Attributes:
    mesh: the device mesh, or None when simulated.
    axes: the worker axes of the step: ("data",) or ("dcn", "ici").
    sizes: the number of workers along each axis.
    axis_name: the optimizer's (slow) worker axis.
    dense_axis_name: the fast axis averaged densely first, or None.
  """

  mesh: jax.sharding.Mesh | None
  axes: tuple[str, ...]
  sizes: tuple[int, ...]
  axis_name: str
  dense_axis_name: str | None

  @property
  def num_workers(self) -> int:
    return math.prod(self.sizes)

  @property
  def simulated(self) -> bool:
    return self.mesh is None


def make_layout(config) -> Layout:
  """The workers' layout from `num_workers` and the `mesh` config section.

  `mesh.shape` () is a 1-D mesh of `num_workers` devices named "data"; a 2-D shape such as
  (2, 4) is a hierarchical ("dcn", "ici") mesh whose fast axis `mesh.dense_axis` ("ici") is
  averaged densely before compression (on several processes, one slice per process).
  `mesh.simulate="vmap"` runs the same layout on one device.
  """
  n = int(config.num_workers)
  section = config.get("mesh", None) or {}
  shape = tuple(int(k) for k in (section.get("shape", ()) or ()))
  simulate = str(section.get("simulate", "") or "")
  if simulate not in ("", "vmap"):
    raise ValueError(f"mesh.simulate must be '' or 'vmap', got {simulate!r}.")
  if not shape:
    shape = (n,)
  if math.prod(shape) != n:
    raise ValueError(f"mesh.shape={shape} has {math.prod(shape)} devices, num_workers={n}.")
  if len(shape) == 1:
    axes, axis_name, dense = (AXIS,), AXIS, None
  elif len(shape) == 2:
    dense = str(section.get("dense_axis", "ici") or "ici")
    if dense not in ("ici", "dcn"):
      raise ValueError(f"mesh.dense_axis must be 'ici' or 'dcn', got {dense!r}.")
    axes, axis_name = ("dcn", "ici"), ("dcn" if dense == "ici" else "ici")
  else:
    raise ValueError(f"mesh.shape must have 1 or 2 axes, got {shape}.")
  if simulate:
    return Layout(None, axes, shape, axis_name, dense)
  devices = jax.devices()
  if len(devices) < n:
    raise RuntimeError(
      f"the run needs {n} devices (one per worker) but jax sees {len(devices)}. "
      f"On CPU, simulate them with cj.simulate_cpu_devices({n}) right after `import jax` "
      "(compams-train does this for you), or set mesh.simulate=vmap."
    )
  # Row-major over jax.devices(): with several processes, each process's devices form a row
  # (one slice per process along "dcn").
  mesh = jax.sharding.Mesh(np.asarray(devices[:n]).reshape(shape), axes)
  return Layout(mesh, axes, shape, axis_name, dense)


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


@dataclasses.dataclass(frozen=True)
class TrainState:
  """What a checkpoint holds: the parameters (for a local-SGD optimizer every worker's own,
  behind a leading worker axis), the full optimizer state (every worker's residuals; for local
  SGD also θ, the inner optimizers' states and the position in the period), the step (the data
  position: batches and dropout keys derive from seed and step) and the epoch's running
  metrics."""

  params: Any
  opt_state: Any
  step: int = 0
  meters: Meters = dataclasses.field(default_factory=Meters)

  def checkpoint_item(self) -> dict[str, Any]:
    return {
      "params": self.params,
      "opt_state": self.opt_state,
      "step": self.step,
      "meters": dataclasses.asdict(self.meters),
    }


def model_params(state: TrainState, layout: Layout) -> Any:
  """The model a run trains, to evaluate and to measure: θ, the synchronized parameters, for a
  local-SGD optimizer (`cj.diloco`: between syncs every worker trains its own copy, and
  `state.params` carries a leading worker axis), else `state.params`."""
  theta = cj.synchronized_params(state.opt_state)
  if theta is None:
    return state.params
  if layout.simulated:  # the vmap layout: every optimizer-state leaf has the worker axis
    return jax.tree.map(lambda x: x[0], theta)
  return theta


def _load_data(config):
  """The config's dataset, cut to `max_train_examples` / `max_test_examples` (0 = all)."""
  dataset = load_dataset(config.dataset.name, **dict(config.dataset.get("kwargs", {}) or {}))
  return _limit(
    dataset,
    int(config.get("max_train_examples", 0)),
    int(config.get("max_test_examples", 0)),
    int(config.seed),
  )


def _epoch_length(config, dataset) -> int:
  """Steps per epoch: full global batches of `num_workers` × `local_batch` examples."""
  n, local_batch = int(config.num_workers), int(config.local_batch)
  per_epoch = steps_per_epoch(len(dataset.y_train), n, local_batch)
  if per_epoch == 0:
    raise ValueError(
      f"{len(dataset.y_train)} training examples cannot fill one global batch of "
      f"{n} workers × {local_batch}."
    )
  return per_epoch


def create_train_state(config, dataset, layout: Layout, key: jax.Array):
  """The model, the data-parallel step (`cj.data_parallel_step`) and the initial `TrainState`:
  parameters on the mesh, optimizer state laid out per worker."""
  model = create_model(
    config.model.name, dataset.num_classes, **dict(config.model.get("kwargs", {}) or {})
  )
  params = model.init({"params": key}, jnp.asarray(dataset.x_train[:1]), train=False)["params"]
  tx = optim.build_optimizer(
    config.optimizer, axis_name=layout.axis_name, dense_axis_name=layout.dense_axis_name
  )

  def loss_fn(p, batch, rng):
    logits = model.apply({"params": p}, batch["x"], train=True, rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch["y"])

  step = cj.data_parallel_step(
    loss_fn,
    tx,
    mesh=layout.mesh,
    axis_name=layout.axes,
    mode="vmap" if layout.simulated else "shard_map",
    num_workers=layout.sizes,
    has_aux=True,
  )
  params, opt_state = step.init(params)
  return model, tx, step, TrainState(params, opt_state)


def make_eval_step(model, layout: Layout):
  """The jitted `(params, x, y) -> (losses, correct)`, per example, the batch split over the
  workers (or one device when simulated)."""

  def eval_step(params, x, y):
    logits = model.apply({"params": params}, x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses, (jnp.argmax(logits, -1) == y).astype(jnp.float32)

  if layout.simulated:
    return jax.jit(eval_step)
  spec = P(layout.axes)
  return jax.jit(
    jax.shard_map(eval_step, mesh=layout.mesh, in_specs=(P(), spec, spec), out_specs=(spec, spec))
  )


def _put(a: Any, layout: Layout) -> Any:
  """Host data split over the workers' devices (every process holds it in full)."""
  return jnp.asarray(a) if layout.simulated else put_global(a, layout.mesh, P(layout.axes))


def evaluate(eval_step, params, dataset, layout: Layout) -> tuple[float, float]:
  """Mean test loss and accuracy over the whole test split, in chunks of 64 per worker."""
  x, y = dataset.x_test, dataset.y_test
  chunk = layout.num_workers * 64
  total = math.ceil(len(y) / chunk) * chunk
  pad = total - len(y)
  xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  yp = np.concatenate([y, np.zeros((pad,), y.dtype)])
  losses, correct = [], []
  for i in range(0, total, chunk):
    l, c = eval_step(params, _put(xp[i : i + chunk], layout), _put(yp[i : i + chunk], layout))
    losses.append(to_host(l))
    correct.append(to_host(c))
  losses, correct = np.concatenate(losses)[: len(y)], np.concatenate(correct)[: len(y)]
  return float(losses.mean()), float(correct.mean())


def make_batches(dataset, layout: Layout, seed: int, local_batch: int, per_epoch: int):
  """`batch(step)`: the step's global batch {"x", "y"} (worker-major: worker w's examples are
  rows w·local_batch … (w+1)·local_batch − 1), split over the workers.

  A pure function of seed and step: each epoch deals out one seeded permutation of the training
  set (`epoch_permutation`), so a resumed run sees exactly the batches of an uninterrupted one.
  """
  n = layout.num_workers

  def batch(step):
    epoch, k = divmod(step, per_epoch)
    idx = epoch_permutation(len(dataset.y_train), seed, epoch)[
      k * n * local_batch : (k + 1) * n * local_batch
    ]
    return {"x": _put(dataset.x_train[idx], layout), "y": _put(dataset.y_train[idx], layout)}

  return batch


def _communication(config, tx, step, state: TrainState, batch0, layout: Layout):
  """What the optimizer sends: `sent_after(step)`, the bytes one worker has sent after `step`
  steps, and the summary's byte fields, read from the compiled step's HLO and from the traced
  transforms (`cj.wire_bytes`).

  An optimizer that sends the same every step sends the HLO's bytes (on a 1-D device mesh) or
  `cj.wire_bytes` of its transform. A local-SGD optimizer (`cj.diloco`, found by the θ in its
  state) sends those bytes once per sync, after every `sync_every`-th step; its bytes per step
  are their per-step equivalent, bytes per sync / `sync_every`. One whose compiled step holds
  several phases (a warm-up, annealed stages) sends each phase's bytes during its steps:
  `optim.phases` gives a transform per phase, and together they must account for every byte of
  the optimizer's transform. On a hierarchical mesh the HLO also holds the dense collectives of
  the fast axis; the bytes "sent" are those of the slow (worker) axis. Simulated workers have
  no collectives at all: their bytes are read from the traced transforms.
  """
  key0 = jax.random.key(0)
  hlo = cj.collective_bytes(step.lower(state.params, state.opt_state, batch0, key0).compile())
  sizes = dict(zip(layout.axes, layout.sizes))
  model = model_params(state, layout)

  def measure(transform):  # bytes per step (per sync, local SGD) of a transform on this layout
    return cj.wire_bytes(
      transform,
      model,
      num_workers=sizes[layout.axis_name],
      dense_workers=sizes.get(layout.dense_axis_name, 1),
    )

  static = measure(tx)
  before, steady_tx = optim.phases(
    config.optimizer, axis_name=layout.axis_name, dense_axis_name=layout.dense_axis_name
  )
  if before:
    per_phase = [(n, measure(t)) for n, t in before]
    steady = measure(steady_tx)
    if sum(b for _, b in per_phase) + steady != static:
      raise RuntimeError(
        f"the phases of {config.optimizer.name} send {[b for _, b in per_phase]} then {steady} "
        f"bytes per step, which does not account for the {static} bytes of its transform; "
        "compams_jax/experiments/optim.py's phases no longer match the library's optimizer."
      )
  else:
    per_phase = []
    steady = hlo.total if (layout.dense_axis_name is None and not layout.simulated) else static
  sent_after = optim.bytes_sent_by_step(per_phase, steady)
  sync_every = per_sync = None
  if cj.synchronized_params(state.opt_state) is not None:  # local SGD: bytes once per sync
    sync_every = optim.sync_every(config.optimizer)
    if sync_every is None or per_phase:
      raise RuntimeError(
        f"{config.optimizer.name} trains per-worker parameters (local SGD) but the experiments' "
        "registry gives it no sync_every (or several phases); see compams_jax/experiments/optim.py."
      )
    per_sync, steady = steady, steady / sync_every
    sent_after = lambda done: (done // sync_every) * per_sync
  dense = 4 * count_params(model)
  return sent_after, {
    "bytes_per_step_hlo": hlo.total,
    "bytes_per_step_static": static,
    "dense_f32_bytes": dense,
    "bytes_per_step_steady": steady,
    "sync_every": sync_every,
    "bytes_per_sync": per_sync,
    "compression_ratio": dense / steady if steady else float("inf"),
    "collectives": hlo.by_op,
  }


class Setup(NamedTuple):
  """Everything `train` builds from the config before it touches the run directory."""

  layout: Layout
  dataset: Any
  state: TrainState  # The initial state.
  train_step: Callable  # The `cj.data_parallel_step`.
  evaluate: Callable  # params -> (test loss, test accuracy); called on `model_params`
  batch: Callable  # step -> {"x", "y"}
  dropout_key: jax.Array
  per_epoch: int
  total_steps: int
  sent_after: Callable | None  # step -> bytes one worker has sent
  comm: dict[str, Any] | None  # The summary's byte fields.


def make_setup(
  config: ml_collections.ConfigDict, *, dataset: Any = None, measure_bytes: bool = True
) -> Setup:
  """Layout, data, initial state, jitted steps and byte accounting (no run directory yet).

  Args:
    config: an experiment config.
    dataset: the data to train on instead of the config's dataset (as `load_dataset` returns).
    measure_bytes: read the bytes sent from the compiled step (`sent_after`, `comm`; None if
      not: it compiles the step once more).
  """
  layout = make_layout(config)
  dataset = _load_data(config) if dataset is None else dataset
  init_key = jax.random.key(int(config.seed))
  model, tx, step, state = create_train_state(config, dataset, layout, init_key)
  eval_step = make_eval_step(model, layout)
  per_epoch = _epoch_length(config, dataset)
  batch = make_batches(dataset, layout, int(config.seed), int(config.local_batch), per_epoch)
  sent_after, comm = (
    _communication(config, tx, step, state, batch(0), layout) if measure_bytes else (None, None)
  )
  return Setup(
    layout=layout,
    dataset=dataset,
    state=state,
    train_step=step,
    evaluate=functools.partial(evaluate, eval_step, dataset=dataset, layout=layout),
    batch=batch,
    dropout_key=jax.random.fold_in(init_key, 1),
    per_epoch=per_epoch,
    total_steps=int(config.epochs) * per_epoch,
    sent_after=sent_after,
    comm=comm,
  )


def restore_train_state(ckpt, step: int, like: TrainState, saved_workers: int, setup: Setup):
  """The `TrainState` checkpointed at `step`, laid out like `like`.

  A checkpoint of another worker count (elastic resume) is restored replicated and resized by
  `cj.sharding.resize_workers` (error residuals redistributed with their sum preserved); a
  local-SGD run's (per-worker parameters and inner optimizer states) is refused.
  """
  layout = setup.layout
  n = layout.num_workers
  if saved_workers == n:
    restored = ckpt.restore(step, like.checkpoint_item())
    opt_state = restored["opt_state"]
  else:
    if cj.synchronized_params(like.opt_state) is not None:
      raise checkpoints.CheckpointError(
        f"cannot resume the checkpoint of {saved_workers} workers in {ckpt.directory} on "
        f"{n} workers: elastic resume (another num_workers) is not supported for local-SGD "
        "optimizers (diloco): each worker's own parameters and inner optimizer state have no "
        f"sum to preserve. Resume with num_workers={saved_workers} (nothing was overwritten)."
      )
    if layout.simulated:
      raise checkpoints.CheckpointError(
        "an elastic resume (another num_workers) needs a device mesh, not mesh.simulate=vmap."
      )
    mesh = layout.mesh
    specs = jax.tree.map(lambda x: x.sharding.spec, like.opt_state)
    per_worker = lambda sp: bool(sp) and sp[0] == P(layout.axes)[0]
    # Restore the old worker count's shapes, replicated, then resize.
    like_state = jax.tree.map(
      lambda x, sp: jax.ShapeDtypeStruct(
        ((saved_workers,) + x.shape[1:]) if per_worker(sp) else x.shape,
        x.dtype,
        sharding=NamedSharding(mesh, P()),
      ),
      like.opt_state,
      specs,
    )
    restored = ckpt.restore(step, TrainState(like.params, like_state).checkpoint_item())
    opt_state = jax.tree.map(
      lambda x, sp: put_global(to_host(x), mesh, sp),
      cj.sharding.resize_workers(restored["opt_state"], n),
      specs,
    )
  meters = {k: type(getattr(Meters(), k))(v) for k, v in restored["meters"].items()}
  return TrainState(restored["params"], opt_state, int(restored["step"]), Meters(**meters))


def _resume_or_start(ckpt, setup: Setup, config, workdir, resume, saved_meta, must_match, lead):
  """The state to train from: the initial one, or with `resume` the latest checkpoint's.
  Process 0 (`lead`) empties metrics.jsonl (or cuts it back to the resumed step) and writes
  run_meta.json and config.json."""
  meta = _meta(config, model_params(setup.state, setup.layout))
  latest = ckpt.latest_step()
  if latest is not None and not resume:
    raise checkpoints.CheckpointError(
      f"{workdir} already holds a run (checkpoint at step {latest}); pass --resume to "
      "continue it or choose another --workdir (nothing was overwritten)."
    )
  state, metrics_path = setup.state, workdir / "metrics.jsonl"
  if resume and latest is not None:
    if saved_meta is None:
      raise checkpoints.CheckpointError(
        f"{workdir} has checkpoints but no {checkpoints.META_FILE}."
      )
    checkpoints.check_meta(saved_meta, meta, workdir, keys=must_match + ("param_shapes",))
    saved_workers = int(saved_meta["num_workers"])
    state = restore_train_state(ckpt, latest, state, saved_workers, setup)
    if lead:
      _truncate_metrics(metrics_path, state.step)
  elif lead:
    metrics_path.write_text("")
  if lead:
    (workdir / checkpoints.META_FILE).write_text(json.dumps(meta, indent=1))
    (workdir / "config.json").write_text(config.to_json(indent=1))
  return state


class _LossTarget:
  """The windowed loss-target stop: reached at the first step where the mean training loss of
  the last `target_loss_window` steps is at most `target_train_loss` (0 = train all epochs)."""

  def __init__(self, config, total_steps: int):
    self.target = float(config.get("target_train_loss", 0.0))
    self.recent = collections.deque(maxlen=max(int(config.get("target_loss_window", 10)), 1))
    if self.target and self.recent.maxlen > total_steps:
      raise ValueError(
        f"target_loss_window={self.recent.maxlen} is longer than the whole run ({total_steps} steps)."
      )
    self.reached: int | None = None  # The step that reached the target.

  def update(self, loss: float, step: int) -> bool:
    """Records `step`'s training loss; True if the target is reached (first) at this step."""
    self.recent.append(loss)
    if (
      self.target
      and self.reached is None
      and len(self.recent) == self.recent.maxlen
      and sum(self.recent) / len(self.recent) <= self.target
    ):
      self.reached = step
      return True
    return False


class _Progress:
  """A live bar on a terminal; on a log (no tty) one line per epoch instead; or nothing."""

  def __init__(self, config, *, show: bool, total_steps: int, start: int):
    self.config, self.bar = config, None
    if show:
      from tqdm.auto import tqdm

      self.bar = tqdm(
        total=total_steps,
        initial=start,
        desc=str(config.get("variant", "train")),
        unit="step",
        dynamic_ncols=True,
        leave=True,
        mininterval=0.5,
        disable=None,
      )

  def epoch(self, epoch: int, train_loss: float, test_acc: float, sent: int) -> None:
    if self.bar is not None and self.bar.disable:
      print(
        f"[{self.config.get('variant', 'train')}] epoch {epoch}/"
        f"{self.config.epochs}: train loss {train_loss:.4f}, test acc {test_acc:.4f}, "
        f"{sent / 8e6:.2f} MB sent per worker",
        flush=True,
      )

  def step(self, loss: float, acc: float, test_acc: float, sent: int) -> None:
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix(
        loss=f"{loss:.3f}", acc=f"{acc:.3f}", test_acc=f"{test_acc:.3f}", sent=f"{sent / 8e6:.2f}MB"
      )

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _write_line(log, **record) -> None:
  log.write(json.dumps(record) + "\n")


def train_step(setup: Setup, state: TrainState, step: int):
  """One step of the training loop: `state` advanced by step `step`'s batch and dropout key (its
  meters added to in place), with the step's mean training loss and accuracy over the workers.
  `train` stops at a non-finite loss; the step itself does not."""
  key = jax.random.fold_in(setup.dropout_key, step)  # each worker folds in its index
  params, opt_state, metrics = setup.train_step(
    state.params, state.opt_state, setup.batch(step), key
  )
  loss = float(np.mean(to_host(metrics["loss"])))
  acc = float(np.mean(to_host(metrics["aux"])))
  state.meters.add(loss, acc)
  return dataclasses.replace(state, params=params, opt_state=opt_state, step=step + 1), loss, acc


def _end_epoch(state: TrainState, epoch: int, test, sent: int, log, progress) -> TrainState:
  """Logs and shows the epoch's metrics; the state with the next epoch's (empty) meters."""
  train_loss, train_acc = state.meters.means()
  _write_line(
    log,
    kind="eval",
    step=state.step,
    epoch=epoch,
    train_loss=train_loss,
    train_accuracy=train_acc,
    test_loss=test[0],
    test_accuracy=test[1],
    bits_sent=sent,
  )
  progress.epoch(epoch, train_loss, test[1], sent)
  return dataclasses.replace(state, meters=Meters())


def _fit(setup: Setup, state: TrainState, end: int, config, ckpt, log, progress, stop):
  """Trains from `state.step` to `end` (sooner if `stop` is reached), writing metric lines to
  `log` and checkpoints to `ckpt`. Returns the final state, the step it ended at and the last
  epoch's (test loss, test accuracy) (NaN if no epoch ended)."""
  log_every, ckpt_every = int(config.log_every), int(config.checkpoint_every)
  per_epoch = setup.per_epoch
  test = (float("nan"), float("nan"))
  for step in range(state.step, end):
    state, loss, acc = train_step(setup, state, step)
    if not math.isfinite(loss):
      raise FloatingPointError(f"training loss became {loss} at step {step}.")
    done = state.step
    if stop.update(loss, done):
      end = done
    sent = setup.sent_after(done) * 8
    if done % log_every == 0:
      _write_line(
        log,
        kind="train",
        step=done,
        epoch=done / per_epoch,
        loss=loss,
        accuracy=acc,
        bits_sent=sent,
      )
    if done % per_epoch == 0:
      test = setup.evaluate(model_params(state, setup.layout))
      state = _end_epoch(state, done // per_epoch, test, sent, log, progress)
    log.flush()
    if done % ckpt_every == 0 or done == end:
      ckpt.save(done, state.checkpoint_item())
    progress.step(loss, acc, test[1], sent)
    if stop.reached is not None:
      break
  return state, end, test


def _summary(config, setup: Setup, state: TrainState, steps: int, test, stop, t0: float):
  """The run summary (summary.json, and the CLI's table)."""
  return {
    "variant": config.get("variant", "run"),
    "config": json.loads(config.to_json()),
    "steps": steps,
    "total_steps": setup.total_steps,
    "epochs_done": steps / setup.per_epoch,
    "num_workers": int(config.num_workers),
    "num_params": count_params(model_params(state, setup.layout)),
    "train_examples": len(setup.dataset.y_train),
    "test_examples": len(setup.dataset.y_test),
    "test_loss": test[0],
    "test_accuracy": test[1],
    **setup.comm,
    "seconds": time.time() - t0,
    "finished": steps == setup.total_steps or stop.reached is not None,
    "target_train_loss": stop.target or None,
    "steps_to_target": stop.reached,
  }


def _final_state_arrays(state: TrainState) -> dict[str, np.ndarray]:
  """Every parameter and optimizer-state leaf as a host array (global view), keyed by its path."""
  flat = {
    f"params{jax.tree_util.keystr(k)}": to_host(v)
    for k, v in jax.tree_util.tree_leaves_with_path(state.params)
  }
  flat.update(
    {
      f"opt_state{jax.tree_util.keystr(k)}": to_host(v)
      for k, v in jax.tree_util.tree_leaves_with_path(state.opt_state)
    }
  )
  return flat


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
    resume: continue from the latest checkpoint in `workdir` (its config must match); a
      `workdir` without a checkpoint is an error (`checkpoints.CheckpointError`).
    stop_after: stop (with a checkpoint) after this many total steps, as an interruption would.
    progress: show a progress bar.
    elastic: allow resuming a checkpoint made with a different `num_workers`: the error
      residuals are redistributed with their sum preserved (`cj.sharding.resize_workers`;
      state without such an invariant is refused, and so is a local-SGD run: its per-worker
      parameters and inner optimizer states). The step count carries on; the data order
      from then on is that of the new worker count.

  Returns:
    A `RunResult`: the summary (also written to `summary.json`), final params and optimizer
    state (global view: per-worker leaves stacked along their leading axis; for local SGD the
    params are every worker's own, and `cj.synchronized_params(opt_state)` is the model
    evaluated).
  """
  config_lib.validate(config)  # Impossible values are refused before any setup.
  workdir = pathlib.Path(workdir)
  if resume and not checkpoints.has_checkpoint(workdir / "checkpoints"):
    raise checkpoints.CheckpointError(
      f"cannot resume {workdir}: it holds no checkpoint (missing or empty run directory); "
      "start it without --resume."
    )
  saved_meta = checkpoints.read_meta(workdir)
  must_match = ("model", "dataset", "optimizer") + (() if elastic else ("num_workers",))
  if resume and saved_meta is not None:  # Refuse a mismatched run before any expensive setup.
    checkpoints.check_meta(saved_meta, _meta(config), workdir, keys=must_match)
  setup = make_setup(config)
  lead = jax.process_index() == 0  # Across processes, process 0 writes the run's files.
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
  try:
    state = _resume_or_start(ckpt, setup, config, workdir, resume, saved_meta, must_match, lead)
    total = setup.total_steps
    end = total if stop_after is None else min(total, int(stop_after))
    shown = _Progress(config, show=progress and lead, total_steps=total, start=state.step)
    t0 = time.time()
    stop = _LossTarget(config, total)
    with open(workdir / "metrics.jsonl" if lead else os.devnull, "a") as log:
      state, end, test = _fit(setup, state, end, config, ckpt, log, shown, stop)
    shown.close()
    if math.isnan(test[1]) or (stop.reached is not None and end % setup.per_epoch):
      test = setup.evaluate(model_params(state, setup.layout))
  finally:
    ckpt.close()
  summary = _summary(config, setup, state, end, test, stop, t0)
  flat = _final_state_arrays(state)  # On every process: gathering a global array is collective.
  if lead:
    np.savez(workdir / "final_state.npz", **flat)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  return RunResult(summary=summary, params=state.params, opt_state=state.opt_state)
