"""Experiment configs: `get_config()` files, optimizer presets and overrides, all through
ml_collections' `config_flags`, and the validation of values.

A config file (configs/*.py) loads with `--config path.py` or `path.py:arg` (`get_config(arg)`);
overrides are `key=value` or config_flags' own `--config.key=value`, both applied by config_flags
(values parsed by the field's type: int, float, bool, str, tuple, a dict for a section). This
module and the config files import no jax: they describe a run, `optim` and `train` build it.
"""

from __future__ import annotations

import copy
import math
import numbers
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

# Named optimizer presets: overrides of the `optimizer` config section. A config lists the ones
# it runs side by side in `variants`.
PRESETS: dict[str, dict[str, Any]] = {
  "amsgrad": dict(name="amsgrad", compressor="identity", compressor_kwargs={}),
  "comp_ams_top_k": dict(name="comp_ams", compressor="top_k", compressor_kwargs={"ratio": 0.01}),
  "comp_ams_block_sign": dict(name="comp_ams", compressor="block_sign", compressor_kwargs={}),
  "comp_ams_block_sign_256": dict(
    name="comp_ams", compressor="block_sign", compressor_kwargs={"block_size": 256}
  ),
  "comp_ams_top_k_bf16": dict(
    name="comp_ams",
    compressor="top_k",
    compressor_kwargs={"ratio": 0.01, "value_dtype": "bfloat16"},
  ),
  # The top-k ratio annealed from 10% to 1% (set optimizer.anneal_steps, e.g. one epoch).
  "comp_ams_top_k_annealed": dict(
    name="comp_ams", compressor="top_k", compressor_kwargs={"ratio": 0.01}, anneal_from=0.1
  ),
  "comp_ams_random_k": dict(
    name="comp_ams", compressor="random_k", compressor_kwargs={"ratio": 0.01}
  ),
  "comp_ams_qsgd": dict(name="comp_ams", compressor="qsgd", compressor_kwargs={"levels": 4}),
  "onebit_adam": dict(name="onebit_adam", compressor="scaled_sign", compressor_kwargs={}),
  # DeepSpeed's 1-bit Adam compressor: one scale per tensor, ‖x‖₂/√d.
  "onebit_adam_l2": dict(
    name="onebit_adam", compressor="block_sign", compressor_kwargs={"norm": "l2"}
  ),
  "qadam": dict(name="qadam", compressor="qsgd", compressor_kwargs={"levels": 127}),
  # QSGD as Alistarh et al. run it: one norm per bucket of 512 entries.
  "qadam_bucketed": dict(
    name="qadam", compressor="qsgd", compressor_kwargs={"levels": 127, "bucket_size": 512}
  ),
  "momentum_sgd": dict(
    name="momentum_sgd", compressor="identity", compressor_kwargs={}, predictor="none"
  ),
  "momentum_sgd_top_k": dict(
    name="momentum_sgd", compressor="top_k", compressor_kwargs={"ratio": 0.01}, predictor="none"
  ),
  # Least-squares ρ: with error feedback, a fixed ρ = β re-injects the residual with weight
  # (1 + β) and trains worse (see cj.predictive_compression); the fitted ρ does not.
  "momentum_sgd_top_k_predictive": dict(
    name="momentum_sgd",
    compressor="top_k",
    compressor_kwargs={"ratio": 0.01},
    predictor="least_squares",
  ),
  "momentum_sgd_top_k_predictive_fixed": dict(
    name="momentum_sgd", compressor="top_k", compressor_kwargs={"ratio": 0.01}, predictor="fixed"
  ),
  # Local SGD (DiLoCo): optimizer.sync_every (H) AdamW steps per worker on its own parameters
  # (inner learning rate: optimizer.learning_rate), then the dense average of the
  # pseudo-gradients, one outer Nesterov SGD step (optimizer.outer_lr 0.7, outer_momentum 0.9).
  "diloco": dict(name="diloco", compressor="identity", compressor_kwargs={}),
  # Dense data-parallel AdamW (optax.adamw on the dense mean of the gradients).
  "adamw": dict(name="adamw", compressor="identity", compressor_kwargs={}),
  # SparseLoCo: local SGD as diloco, the pseudo-gradient compressed (64 of each 64×64 chunk,
  # 12-bit indices, 2-bit values) with error feedback decaying by 0.95, plain outer SGD at 0.6.
  "sparseloco": dict(
    name="diloco",
    compressor="chunked_top_k",
    compressor_kwargs={"k": 64, "chunk": 64, "value_bits": 2},
    feedback="ef",
    feedback_decay=0.95,
    outer_lr=0.6,
    outer_momentum=0.0,
  ),
  # SparseLoCo's code with prediction across syncs: each worker's pseudo-gradient coded as the
  # innovation against its least-squares prediction from the previous decoded ones (error
  # feedback without decay: a decaying residual and a predictor do not combine).
  "sparseloco_predictive": dict(
    name="diloco",
    compressor="chunked_top_k",
    compressor_kwargs={"k": 64, "chunk": 64, "value_bits": 2},
    feedback="ef",
    predictor="least_squares",
    outer_lr=0.6,
    outer_momentum=0.0,
  ),
  # DeMo: every step (no local steps), each worker's decoupled momentum (decay 0.999) sent as
  # the top 32 DCT coefficients of each 64×64 chunk, averaged over the senders, sign descent;
  # cj.demo(learning_rate, compression_decay=0.999, compression_topk=32, compression_chunk=64).
  "demo": dict(
    name="demo",
    compressor="dct_top_k",
    compressor_kwargs={"k": 32, "chunk": 64},
    compression_decay=0.999,
  ),
}


def optimizer_section() -> ml_collections.ConfigDict:
  """The `optimizer` section with its defaults.

  The experiments' own fields have their defaults here: name, learning_rate, compressor,
  compressor_kwargs, predictor ("none", "fixed" or "least_squares") and the top-k annealing
  (anneal_from / anneal_steps / anneal_stages: the ratio falls geometrically from anneal_from
  to the compressor's own in anneal_stages stages over the first anneal_steps steps; 0 = off).
  The fields that are arguments of the library's optimizer factories are typed placeholders,
  None until set: None means the factory's own default (`cj.comp_ams`, `cj.onebit_adam`, ...;
  `optim.REGISTRY` says which field goes to which argument). They are b1, b2, eps (COMP-AMS:
  inside the root; 1-bit Adam, QAdam: outside), momentum, seed, warmup_steps (1-bit Adam),
  dense_warmup_steps (COMP-AMS: dense steps first), feedback ("ef", "ef21" or "none"),
  error_feedback (momentum SGD: keep residuals) and wire ("gather" or "two_phase"); for local
  SGD (`diloco`, see `optim.diloco_adamw`): sync_every (H, inner steps between syncs),
  outer_lr and outer_momentum (the outer Nesterov SGD; momentum 0 = plain SGD),
  weight_decay (the inner AdamW's; DeMo's decoupled one) and feedback_decay (the error
  residual's decay); for DeMo (`demo`): compression_decay (its momentum's decay).
  """
  library = config_dict.placeholder  # None: the library factory's default
  return ml_collections.ConfigDict(
    {
      "name": "comp_ams",
      "learning_rate": 1e-3,
      "compressor": "top_k",
      "compressor_kwargs": {"ratio": 0.01},
      "predictor": "none",
      "anneal_from": 0.0,
      "anneal_steps": 0,
      "anneal_stages": 4,
      "b1": library(float),
      "b2": library(float),
      "eps": library(float),
      "momentum": library(float),
      "seed": library(int),
      "warmup_steps": library(int),
      "dense_warmup_steps": library(int),
      "feedback": library(str),
      "error_feedback": library(bool),
      "wire": library(str),
      "sync_every": library(int),
      "outer_lr": library(float),
      "outer_momentum": library(float),
      "weight_decay": library(float),
      "feedback_decay": library(float),
      "compression_decay": library(float),
    }
  )


def base_config(*, name: str, dataset: str, model: str, **fields: Any) -> ml_collections.ConfigDict:
  """A config with every field the trainer reads, defaults filled in; `fields` override them
  (`optimizer__learning_rate=...` for a nested key).

  Fields: name, dataset.{name, kwargs}, model.{name, kwargs}, num_workers, local_batch, epochs,
  seed, max_train_examples / max_test_examples (0 = all), log_every, checkpoint_every,
  target_train_loss / target_loss_window (stop once the mean training loss of the last
  `target_loss_window` steps is at most `target_train_loss`; 0 = train all epochs), optimizer
  (see `optimizer_section`), mesh.{shape (() = 1-D "data" of num_workers; (slices, chips) =
  hierarchical ("dcn", "ici")), dense_axis (the fast axis averaged densely first, "ici"),
  simulate ("vmap": every worker on one device)}, variants (optimizer presets run side by side),
  lr_grid (the learning rates a sweep tries).
  """
  c = ml_collections.ConfigDict()
  c.name = name
  c.dataset = ml_collections.ConfigDict({"name": dataset, "kwargs": {}})
  c.model = ml_collections.ConfigDict({"name": model, "kwargs": {}})
  c.num_workers = 16
  c.local_batch = 32
  c.epochs = 10
  c.seed = 0
  c.max_train_examples = 0
  c.max_test_examples = 0
  c.log_every = 10
  c.checkpoint_every = 500
  c.target_train_loss = 0.0
  c.target_loss_window = 10
  c.mesh = ml_collections.ConfigDict({"shape": (), "dense_axis": "ici", "simulate": ""})
  c.optimizer = optimizer_section()
  c.variants = ("amsgrad", "comp_ams_top_k", "comp_ams_block_sign", "onebit_adam", "qadam")
  c.lr_grid = (1e-4, 3e-4, 1e-3)
  _set_fields(c, fields)
  return c


def smoke(c: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  """Shrinks a config for tests: 4 workers, 1 epoch on a small subset, unless `fields` say."""
  defaults = dict(
    num_workers=4,
    epochs=1,
    max_train_examples=1024,
    max_test_examples=512,
    log_every=2,
    checkpoint_every=1000,
  )
  _set_fields(c, {**defaults, **fields})
  with c.unlocked():
    c.name = c.name + "_smoke"
  return c


class ConfigError(ValueError):
  """A config file, override or variant that cannot be used (the message says why)."""


def _check_key(config: ml_collections.ConfigDict, key: str) -> None:
  """Refuses a dotted key the config lacks; the free-form `*kwargs` sections (compressor,
  dataset and model arguments) take new keys."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts[:-1]):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(
        f"unknown config key {'.'.join(parts[: i + 1])!r} (in override {key!r}); valid keys "
        f"here: {sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []}."
      )
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict):
    raise ConfigError(f"config key {'.'.join(parts[:-1])!r} has no fields (in override {key!r}).")
  new_allowed = len(parts) >= 2 and parts[-2].endswith("kwargs")
  if parts[-1] not in node and not new_allowed:
    raise ConfigError(f"unknown config key {key!r}; valid keys: {sorted(node.keys())}.")


def _set_fields(config: ml_collections.ConfigDict, fields: Mapping[str, Any]) -> None:
  """Python values for keys (`a__b` = `a.b`), by ml_collections' `update_from_flattened_dict`."""
  flat = {key.replace("__", "."): value for key, value in fields.items()}
  for key in flat:
    _check_key(config, key)
  try:
    config.update_from_flattened_dict(flat)
  except (TypeError, ValueError, KeyError) as e:
    raise ConfigError(f"config fields {flat}: {e}") from e


def _flag_error(e: Exception) -> str:
  """An absl/config_flags error as one line about the override: "override KEY=VALUE: why"."""
  return re.sub(r"^flag --config\.", "override ", str(e).strip().splitlines()[-1])


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg` with config_flags: the file's `get_config()` (or
  `get_config(arg)`)."""
  path = spec.partition(":")[0]
  if not pathlib.Path(path).is_file():
    raise ConfigError(f"config file {path!r} not found.")
  holder = flags.FlagValues()
  argv = ["compams-train", f"--config={spec}"]
  config_flags.DEFINE_config_file("config", flag_values=holder, lock_config=False, sys_argv=argv)
  try:
    with warnings.catch_warnings():  # config_flags loads the file with importlib's load_module
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
      holder(argv)
  except AttributeError as e:  # config_flags calls the file's get_config
    raise ConfigError(f"config file {path!r}: {e} (it must define get_config()).") from e
  except flags.Error as e:  # get_config raised; config_flags carries its traceback
    raise ConfigError(f"config file {spec!r}: {str(e).strip().splitlines()[-1]}") from e
  config = holder.config
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict.")
  return config


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
  """Applies `key=value` (or `--config.key=value`) overrides with config_flags.

  The value is parsed by the field's type (int, float (also nan, inf), bool, str, a tuple such as
  `(2, 4)`, a dict for a whole section); new keys go only into the `*kwargs` sections, whose
  values are Python literals or else strings. A key given twice takes its last value.

  Returns:
    `config`, updated in place.

  Raises:
    ConfigError: an unknown key, a malformed override or a value of the wrong type.
  """
  items = []
  for item in overrides:
    key, sep, value = item.removeprefix("--config.").partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"override {item!r} is not of the form key=value.")
    _check_key(config, key.strip())
    items.append(f"--config.{key.strip()}={value.strip()}")
  if not items:
    return config
  holder = flags.FlagValues()
  argv = ["compams-train", *items]
  try:
    # accept_new_attributes: for the kwargs sections (`_check_key` refused every other new key).
    config_flags.DEFINE_config_dict(
      "config",
      config,
      flag_values=holder,
      lock_config=False,
      accept_new_attributes=True,
      sys_argv=argv,
    )
    holder(argv)
  except (flags.Error, TypeError, ValueError, KeyError) as e:
    raise ConfigError(_flag_error(e)) from e
  return holder.config


_MISSING = object()


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for part in key.split("."):
    if not hasattr(node, "get"):
      return _MISSING
    node = node.get(part, _MISSING)
    if node is _MISSING:
      return _MISSING
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# (key, test, what the value must be); keys a config lacks, and library fields left None (the
# factory's default), are not checked.
_CHECKS = (
  ("num_workers", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  ("local_batch", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  ("epochs", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  ("max_train_examples", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = all)"),
  ("max_test_examples", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = all)"),
  ("log_every", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  ("checkpoint_every", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  ("target_train_loss", lambda v: _is_real(v) and v >= 0, "a finite number >= 0 (0 = off)"),
  ("target_loss_window", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  ("optimizer.learning_rate", lambda v: _is_real(v) and v > 0, "a finite number > 0"),
  ("optimizer.b1", lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
  ("optimizer.b2", lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
  ("optimizer.eps", lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
  ("optimizer.momentum", lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
  ("optimizer.warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
  ("optimizer.dense_warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
  ("optimizer.anneal_from", lambda v: _is_real(v) and 0 <= v <= 1, "in [0, 1] (0 = off)"),
  ("optimizer.anneal_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
  ("optimizer.anneal_stages", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  ("optimizer.sync_every", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  ("optimizer.outer_lr", lambda v: _is_real(v) and v > 0, "a finite number > 0"),
  ("optimizer.outer_momentum", lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
  ("optimizer.weight_decay", lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
  ("optimizer.feedback_decay", lambda v: _is_real(v) and 0 < v <= 1, "in (0, 1]"),
  ("optimizer.compression_decay", lambda v: _is_real(v) and 0 <= v <= 1, "in [0, 1]"),
  ("optimizer.feedback", lambda v: v in ("ef", "ef21", "none"), "'ef', 'ef21' or 'none'"),
  ("optimizer.wire", lambda v: v in ("gather", "two_phase"), "'gather' or 'two_phase'"),
  (
    "optimizer.predictor",
    lambda v: v in ("none", "fixed", "least_squares"),
    "'none', 'fixed' or 'least_squares'",
  ),
)


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses impossible values before anything is built (`train` and `compams-train` call it).

  Checks counts (num_workers, local_batch, epochs, log_every, checkpoint_every >= 1;
  max_train_examples / max_test_examples, optimizer.warmup_steps >= 0), the learning rate
  (finite, > 0), optimizer.b1 / b2 / momentum in [0, 1), optimizer.eps >= 0, the local-SGD
  fields (sync_every >= 1, outer_lr > 0, outer_momentum in [0, 1), weight_decay >= 0,
  feedback_decay in (0, 1]), DeMo's compression_decay in [0, 1], the loss target,
  the names of optimizer.feedback / wire / predictor, the annealing fields, and the mesh
  section (shape of positive sizes whose product is num_workers; simulate "" or "vmap").

  Raises:
    ConfigError: one message naming every impossible value.
  """
  problems = []
  for key, ok, requirement in _CHECKS:
    value = _lookup(config, key)
    if value is not _MISSING and value is not None and not ok(value):
      problems.append(f"{key}={value!r} must be {requirement}")
  shape = _lookup(config, "mesh.shape")
  if shape is not _MISSING and shape:
    workers = _lookup(config, "num_workers")
    if (
      not isinstance(shape, (tuple, list))
      or len(shape) > 2
      or not all(_is_int(k) and k >= 1 for k in shape)
    ):
      problems.append(f"mesh.shape={shape!r} must be () or 1 or 2 positive sizes")
    elif _is_int(workers) and math.prod(shape) != workers:
      problems.append(
        f"mesh.shape={tuple(shape)!r} has {math.prod(shape)} workers but num_workers={workers}"
      )
  anneal_from = _lookup(config, "optimizer.anneal_from")
  if anneal_from is not _MISSING and _is_real(anneal_from) and anneal_from > 0:
    kwargs = _lookup(config, "optimizer.compressor_kwargs")
    ratio = dict(kwargs or {}).get("ratio") if kwargs is not _MISSING else None
    if _lookup(config, "optimizer.name") != "comp_ams":
      problems.append("optimizer.anneal_from applies to comp_ams only")
    if _lookup(config, "optimizer.anneal_steps") in (_MISSING, 0):
      problems.append("optimizer.anneal_from needs optimizer.anneal_steps > 0 (e.g. one epoch)")
    if ratio is None:
      problems.append("optimizer.anneal_from needs a compressor with a ratio (top_k, random_k)")
    elif not anneal_from > ratio:
      problems.append(
        f"optimizer.anneal_from={anneal_from!r} must exceed the compressor's ratio {ratio!r}"
      )
  simulate = _lookup(config, "mesh.simulate")
  if simulate is not _MISSING and (simulate or "") not in ("", "vmap"):
    problems.append(f"mesh.simulate={simulate!r} must be '' or 'vmap'")
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems) + ".")


def with_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose optimizer section has the preset `variant` applied."""
  if variant not in PRESETS:
    raise ConfigError(f"unknown variant {variant!r}; valid: {', '.join(sorted(PRESETS))}.")
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in PRESETS[variant].items():
      out.optimizer[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    out.variant = variant
  return out


def resolve(
  spec: str, overrides: Sequence[str] = (), variants: Sequence[str] | None = None
) -> list[ml_collections.ConfigDict]:
  """The configs to run: one per variant (config's `variants` unless given), overrides last.

  Args:
    spec: the config file, `path.py` or `path.py:arg`.
    overrides: `key=value` or `--config.key=value` strings (see `apply_overrides`).
    variants: optimizer presets (`PRESETS`); default the config's `variants` field.
  """
  base = load_config_file(spec)
  names = list(variants) if variants else list(base.get("variants", ()) or ())
  configs = [with_variant(base, v) for v in names] if names else [copy.deepcopy(base)]
  configs = [apply_overrides(c, overrides) for c in configs]
  for c in configs:
    if "variant" not in c:
      with c.unlocked():
        c.variant = "run"
  return configs
