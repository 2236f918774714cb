"""Experiment configs: loading `get_config()` files, presets and `key=value` overrides."""

from __future__ import annotations

import ast
import copy
import importlib.util
import math
import numbers
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from compams_jax.experiments.optim import PRESETS


def base_config(*, name: str, dataset: str, model: str, **fields: Any) -> ml_collections.ConfigDict:
  """A config with every field the trainer reads, defaults filled in; `fields` override them.

  Fields: name, dataset.{name, kwargs}, model.{name, kwargs}, num_workers, local_batch, epochs,
  seed, max_train_examples / max_test_examples (0 = all), log_every, checkpoint_every,
  target_train_loss / target_loss_window (stop once the mean training loss of the last
  `target_loss_window` steps is at most `target_train_loss`; 0 = train all epochs),
  optimizer.{name, learning_rate, compressor, compressor_kwargs, b1, b2, eps, momentum,
  predictor, error_feedback, seed, wire ("gather" or "two_phase"), feedback ("ef", "ef21" or
  "none": COMP-AMS's feedback), dense_warmup_steps (COMP-AMS: dense steps first),
  anneal_from / anneal_steps / anneal_stages (COMP-AMS: the compressor's ratio falls
  geometrically from anneal_from to its own in anneal_stages stages over the first anneal_steps
  steps; 0 = off)}, mesh.{shape (() = 1-D
  "data" of num_workers; (slices, chips) = hierarchical ("dcn", "ici")), dense_axis (the fast
  axis averaged densely first, "ici"), simulate ("vmap": every worker on one device)}, variants (optimizer presets run side by side), lr_grid
  (the learning rates a sweep tries).
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
  c.optimizer = ml_collections.ConfigDict(
    {
      "name": "comp_ams",
      "learning_rate": 1e-3,
      "compressor": "top_k",
      "compressor_kwargs": {"ratio": 0.01},
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "momentum": 0.9,
      "predictor": "none",
      "error_feedback": True,
      "seed": 0,
      "warmup_steps": 100,
      "wire": "gather",
      "feedback": "ef",
      "dense_warmup_steps": 0,
      "anneal_from": 0.0,
      "anneal_steps": 0,
      "anneal_stages": 4,
    }
  )
  c.variants = ("amsgrad", "comp_ams_top_k", "comp_ams_block_sign", "onebit_adam", "qadam")
  c.lr_grid = (1e-4, 3e-4, 1e-3)
  for key, value in fields.items():
    apply_override(c, key.replace("__", "."), value)
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
  for key, value in {**defaults, **fields}.items():
    apply_override(c, key.replace("__", "."), value)
  with c.unlocked():
    c.name = c.name + "_smoke"
  return c


class ConfigError(ValueError):
  """A config file, override or variant that cannot be used (the message says why)."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg`: the file's `get_config()` (or `get_config(arg)`)."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} not found.")
  module_spec = importlib.util.spec_from_file_location(f"_compams_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config().")
  config = module.get_config(arg) if arg else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict.")
  return config


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A bare string such as top_k.


def apply_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted key (which must exist) to a value of a compatible type."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts[:-1]):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(
        f"unknown config key {'.'.join(parts[: i + 1])!r} (in override "
        f"{key!r}); valid keys here: {sorted(node.keys())}."
      )
    node = node[part]
  leaf = parts[-1]
  # Free-form sections (compressor/dataset/model kwargs) take new keys; all others must exist.
  allow_new = len(parts) >= 2 and parts[-2].endswith("kwargs")
  if leaf not in node and not allow_new:
    raise ConfigError(f"unknown config key {key!r}; valid keys: {sorted(node.keys())}.")
  if (
    isinstance(value, str)
    and leaf in node
    and isinstance(node[leaf], float)
    and re.fullmatch(r"[+-]?(nan|inf|infinity)", value.strip(), re.IGNORECASE)
  ):
    value = float(value)  # Not Python literals, but floats (then refused by `validate`).
  try:
    if (
      leaf in node and isinstance(node[leaf], ml_collections.ConfigDict) and isinstance(value, dict)
    ):
      node[leaf] = ml_collections.ConfigDict(value)
    else:
      node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"override {key}={value!r}: {e}") from e


def parse_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `key=value` strings (values parsed as Python literals, else strings)."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"override {item!r} is not of the form key=value.")
    apply_override(config, key.strip(), _parse_value(text.strip()))


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


# (key, test, what the value must be); keys a config lacks are not checked.
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
  ("optimizer.feedback", lambda v: v in ("ef", "ef21", "none"), "'ef', 'ef21' or 'none'"),
  ("optimizer.wire", lambda v: v in ("gather", "two_phase"), "'gather' or 'two_phase'"),
)


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses impossible values before anything is built (`train` and `compams-train` call it).

  Checks counts (num_workers, local_batch, epochs, log_every, checkpoint_every >= 1;
  max_train_examples / max_test_examples, optimizer.warmup_steps >= 0), the learning rate
  (finite, > 0), optimizer.b1 / b2 / momentum in [0, 1), optimizer.eps >= 0, the loss target,
  and the mesh section (shape of positive sizes whose product is num_workers; simulate "" or
  "vmap").

  Raises:
    ConfigError: one message naming every impossible value.
  """
  problems = []
  for key, ok, requirement in _CHECKS:
    value = _lookup(config, key)
    if value is not _MISSING and not ok(value):
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
  """The configs to run: one per variant (config's `variants` unless given), overrides last."""
  base = load_config_file(spec)
  names = list(variants) if variants else list(base.get("variants", ()) or ())
  configs = [with_variant(base, v) for v in names] if names else [copy.deepcopy(base)]
  for c in configs:
    parse_overrides(c, overrides)
    if "variant" not in c:
      with c.unlocked():
        c.variant = "run"
  return configs
