"""Byte-level language modelling on the Python docs: simulated slices x FSDP, COMP-AMS or local
SGD (DiLoCo) across slices.

``python -m compams_jax.experiments.lm_train --config configs/lm_small.py [key=value ...]``

A plain training loop, separate from ``compams-train`` (whose trainer is built
around classifiers and accuracy).  The mesh is ``("dcn", "fsdp")`` over
simulated CPU devices (``mesh_shape``, default 2 x 4): each ``dcn`` index is a
slice (a data-parallel worker of the optimizer), the weight matrices are
sharded over ``fsdp`` inside it (:func:`compams_jax.experiments.lm.fsdp_specs`)
and gathered for use (``jax.sharding.reshard(w, P())``), and the optimizer
communicates across slices only (``axis_name="dcn"``), compressing each layer
of the scanned blocks on its own (``stacked=``).  The step is the library's
partial-manual ``jax.shard_map`` over ``"dcn"`` (docs/guide.md, "Sharded
models").  A local-SGD method (``diloco``, ``sparseloco``: the experiments' presets, built by
``optim.build_optimizer`` with the config's ``learning_rate`` and ``sync_every``)
gives each slice its own parameters: a leading slice axis split over ``"dcn"``
(FSDP inside, as before), synchronized every ``sync_every`` steps; it is
validated on θ, the synchronized parameters (``cj.synchronized_params``); DeMo
(``demo``, the preset too) sends its compressed momentum every step.  For
every method it prints validation loss (nats/byte), perplexity and bits per
byte, and the bytes each device sends across slices per step (``cj.wire_bytes``
of its own parameter shards: compression follows the sharding; for local SGD
the bytes per sync and their per-step equivalent, bytes per sync /
``sync_every``); "wall s" is the training loop's wall time, compilation included, the
validations of `eval_every` left out.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import compams_jax as cj

__all__ = [
  "METHODS",
  "COMP_AMS",
  "PRESET_METHODS",
  "make_tx",
  "shard_params",
  "per_slice",
  "make_step",
  "build",
  "make_eval",
  "train_method",
  "main",
]

# COMP-AMS methods: name -> the compressor from the config.
COMP_AMS: dict[str, Callable[[Any], Any]] = {
  "amsgrad": lambda c: cj.compressors.identity(),
  "comp_ams_top_k": lambda c: cj.compressors.top_k(c.top_k_ratio),
  "comp_ams_block_sign": lambda c: cj.compressors.block_sign(),
}
# Methods built from the experiments' optimizer presets (`config.PRESETS`) with the config's
# `learning_rate` and `sync_every`: local SGD (diloco, sparseloco: every slice its own params)
# and DeMo (its DCT chunks read a stacked leaf as a (layers · rows, cols) matrix: a chunk spans
# layers only where rows is not a multiple of its side).
PRESET_METHODS = ("adamw", "diloco", "sparseloco", "sparseloco_predictive", "demo")
METHODS = (*COMP_AMS, *PRESET_METHODS)


def optimizer_section(method: str, config: Any) -> dict[str, Any] | None:
  """The `optimizer` section a preset method is built from (None for a COMP-AMS method)."""
  from compams_jax.experiments import config as config_lib

  if method not in PRESET_METHODS:
    return None
  section = {**config_lib.PRESETS[method], "learning_rate": float(config.learning_rate)}
  if config.get("sync_every") is not None:
    section["sync_every"] = int(config.sync_every)
  return section


def make_tx(method: str, config: Any, params: Any):
  """The method's optimizer across ``"dcn"``, blocks compressed per layer: ``cj.comp_ams`` with
  the method's compressor, or the preset's (``optim.build_optimizer``)."""
  from compams_jax.experiments import lm, optim

  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
  if method in PRESET_METHODS:
    section = optimizer_section(method, config)
    factory = optim.REGISTRY[section["name"]].factory
    per_layer = "stacked" in inspect.signature(factory).parameters
    return optim.build_optimizer(
      section, axis_name="dcn", stacked=lm.stacked_mask(params) if per_layer else None
    )
  return cj.comp_ams(
    config.learning_rate,
    COMP_AMS[method](config),
    axis_name="dcn",
    stacked=lm.stacked_mask(params),
  )


def shard_params(params: Any, mesh: Any) -> Any:
  """``params`` placed on ``mesh``: matrices split over ``"fsdp"``, the rest replicated."""
  import jax
  from jax.sharding import NamedSharding

  from compams_jax.experiments import lm

  specs = lm.fsdp_specs(params, axis="fsdp", axis_size=mesh.shape["fsdp"])
  return jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def per_slice(params: Any, mesh: Any) -> Any:
  """Every slice's own copy of ``params`` (local SGD): a leading axis of the slices split over
  ``"dcn"``, each copy sharded over ``"fsdp"`` as ``params`` are."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  slices = mesh.shape["dcn"]

  def one(x):
    copies = jnp.broadcast_to(x[None], (slices, *x.shape))
    return jax.sharding.reshard(copies, P("dcn", *jax.typeof(x).sharding.spec))

  with jax.set_mesh(mesh):
    return jax.jit(lambda tree: jax.tree.map(one, tree))(params)


def _loss_fn(graphdef: Any) -> Callable[[Any, Any], Any]:
  import jax
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from compams_jax.experiments import lm

  def loss(params, batch):
    full = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params)  # FSDP: gather to use
    model = nnx.merge(graphdef, full)
    return lm.next_token_loss(model(batch[:, :-1]), batch[:, 1:])

  return loss


def make_step(graphdef: Any, tx: Any, mesh: Any, opt_state: Any) -> Callable[..., Any]:
  """The jitted step ``(params, opt_state, batch) -> (params, opt_state, losses)``.

  ``batch`` is int32 ``[slices * per-slice batch, T + 1]`` sharded ``P(("dcn", "fsdp"))``;
  ``losses`` holds each slice's mean loss (shape ``[slices]``: average them on the host; the
  step has no collective across slices but the optimizer's). ``params`` are replicated over
  ``"dcn"``, or, for a local-SGD optimizer (its state holds θ, ``cj.synchronized_params``),
  every slice's own (``per_slice``): each slice then trains its copy and the optimizer
  synchronizes them (``cj.apply_updates`` sets every copy to θ exactly after a sync).
  """
  import jax
  from jax.sharding import PartitionSpec as P

  loss_fn = _loss_fn(graphdef)
  specs = cj.sharding.state_specs(opt_state, "dcn")
  own = cj.synchronized_params(opt_state) is not None
  pspec = P("dcn") if own else P()

  def replica(params, opt_state, batch):
    if own:  # this slice's copy: already device-varying over "dcn"
      params = jax.tree.map(lambda x: x[0], params)
      grad_at = params
    else:  # the gradient of a replicated parameter would be summed over the slices
      grad_at = jax.lax.pcast(params, "dcn", to="varying")
    loss, grads = jax.value_and_grad(loss_fn)(grad_at, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = cj.apply_updates(params, updates, opt_state)
    if own:
      params = jax.tree.map(lambda x: x[None], params)
    return params, opt_state, loss[None]

  @jax.jit
  def step(params, opt_state, batch):
    return jax.shard_map(
      replica,
      mesh=mesh,
      in_specs=(pspec, specs, P("dcn")),
      out_specs=(pspec, specs, P("dcn")),
      axis_names={"dcn"},
    )(params, opt_state, batch)

  return step


def make_eval(graphdef: Any) -> Callable[[Any, Any], Any]:
  """Jitted mean next-byte loss of ``params`` on a batch (no shard_map: plain explicit sharding)."""
  import jax

  return jax.jit(_loss_fn(graphdef))


def _put_batch(batch: np.ndarray, mesh: Any) -> Any:
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  return jax.device_put(batch, NamedSharding(mesh, P(("dcn", "fsdp"))))


def evaluate(
  eval_fn: Callable[..., Any], params: Any, rows: np.ndarray, batch: int, mesh: Any
) -> float:
  """Mean loss over ``rows`` (whole batches only; the ragged tail is dropped)."""
  import jax

  n = (len(rows) // batch) * batch
  with jax.set_mesh(mesh):  # the loss reshards with bare PartitionSpecs
    losses = [
      float(eval_fn(params, _put_batch(rows[i : i + batch], mesh))) for i in range(0, n, batch)
    ]
  return float(np.mean(losses))


def build(method: str, config: Any, corpus: Any, mesh: Any) -> tuple[Any, ...]:
  """(graphdef, params sharded over ``"fsdp"``, the method's optimizer, its state, the jitted
  step) for a model of ``config`` initialised from ``config.seed``."""
  from flax import nnx

  from compams_jax.experiments import lm

  cfg = lm.GPTConfig(
    vocab_size=corpus.vocab_size,
    context_length=config.context_length,
    d_model=config.d_model,
    num_heads=config.num_heads,
    num_layers=config.num_layers,
  )
  graphdef, params = nnx.split(lm.GPT(cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
  params = shard_params(params, mesh)
  tx = make_tx(method, config, params)
  opt_state = cj.sharding.init(tx, params, mesh=mesh, axis_name="dcn")
  return graphdef, params, tx, opt_state, make_step(graphdef, tx, mesh, opt_state)


def train_method(
  method: str, config: Any, corpus: Any, mesh: Any, progress: bool = True
) -> dict[str, Any]:
  """Train one model from ``config.seed`` with ``method``; returns its measurements."""
  import jax
  from tqdm import tqdm

  from compams_jax.experiments import data as D
  from compams_jax.experiments import optim

  graphdef, params, tx, opt_state, step = build(method, config, corpus, mesh)
  eval_fn = make_eval(graphdef)
  # What one device compresses and sends: its shard of every leaf (per sync, for local SGD).
  like = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.sharding.shard_shape(x.shape), x.dtype), params
  )
  sent = cj.wire_bytes(tx, like)
  sync_every = None
  if cj.synchronized_params(opt_state) is not None:  # local SGD: every slice its own params
    sync_every = optim.sync_every(optimizer_section(method, config))
    params = per_slice(params, mesh)

  global_batch = mesh.shape["dcn"] * config.batch_per_slice
  val_rows = D.windows(corpus.validation, config.context_length)[: config.eval_sequences]
  rng = np.random.default_rng(config.seed)

  def validate(params, opt_state):  # local SGD: validate θ, the synchronized model
    theta = cj.synchronized_params(opt_state)
    return evaluate(eval_fn, params if theta is None else theta, val_rows, global_batch, mesh)

  eval_every = int(config.get("eval_every", 0) or 0)
  losses, curve, eval_s, start = [], [], 0.0, time.perf_counter()
  bar = tqdm(range(config.steps), desc=method, disable=not progress, file=sys.stderr)
  for i in bar:
    batch = D.sample_windows(corpus.train, global_batch, config.context_length, rng)
    params, opt_state, loss = step(params, opt_state, _put_batch(batch, mesh))
    if i % config.log_every == 0 or i == config.steps - 1:
      losses.append((i, float(np.mean(loss))))
      bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
    if eval_every and (i + 1) % eval_every == 0 and i + 1 < config.steps:
      t = time.perf_counter()
      curve.append((i + 1, validate(params, opt_state)))
      eval_s += time.perf_counter() - t
  train_s = time.perf_counter() - start - eval_s
  val = validate(params, opt_state)
  curve.append((config.steps, val))
  return {
    "method": method,
    "train_losses": losses,
    "val_curve": curve,
    "tokens_per_step": global_batch * config.context_length,
    "val_loss": val,
    "perplexity": math.exp(val),
    "bits_per_byte": val / math.log(2),
    "bytes_per_step": int(sent) if sync_every is None else sent / sync_every,
    "bytes_per_sync": None if sync_every is None else int(sent),
    "sync_every": sync_every,
    "train_seconds": train_s,
    "params": params,
    "opt_state": opt_state,
  }


def _bytes(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float) and not value.is_integer():
    return f"{value:,.1f}"
  return f"{int(value):,d}"


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """The final table: one row per method (bytes/sync and its H for local-SGD methods)."""
  head = (
    f"{'method':<22} {'val loss':>9} {'perplexity':>10} {'bits/byte':>9} {'bytes/step':>11} "
    f"{'bytes/sync':>11} {'wall s':>8}"
  )
  rows = [head, "-" * len(head)]
  for r in results:
    rows.append(
      f"{r['method']:<22} {r['val_loss']:>9.4f} {r['perplexity']:>10.3f} "
      f"{r['bits_per_byte']:>9.3f} "
      f"{_bytes(r['bytes_per_step']):>11} {_bytes(r.get('bytes_per_sync')):>11} "
      f"{r['train_seconds']:>8.1f}"
    )
  local = [r for r in results if r.get("bytes_per_sync") is not None]
  if local:
    every = ", ".join(f"{r['method']} H={r['sync_every']}" for r in local)
    rows.append(
      "bytes/sync: what one device sends across slices at each synchronization of a local-SGD "
      f"method, every H steps ({every}); its bytes/step is bytes/sync / H."
    )
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m compams_jax.experiments.lm_train", description=__doc__
  )
  parser.add_argument("--config", required=True, help="configs/lm_small.py (or :smoke)")
  parser.add_argument(
    "overrides", nargs="*", help="key=value, e.g. steps=50 methods=\"('amsgrad',)\""
  )
  parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
  args = parser.parse_args(argv)

  from compams_jax.experiments import config as config_lib

  config = config_lib.apply_overrides(config_lib.load_config_file(args.config), args.overrides)
  shape = tuple(config.mesh_shape)
  cj.simulate_cpu_devices(math.prod(shape))  # before any jax computation

  import jax

  from compams_jax.experiments import data as D

  corpus = D.load_python_docs(config.corpus_path or None, max_files=config.max_files or None)
  print(corpus.summary())
  mesh = jax.make_mesh(shape, ("dcn", "fsdp"))
  results = [
    train_method(m, config, corpus, mesh, progress=not args.no_progress) for m in config.methods
  ]
  print(format_table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
