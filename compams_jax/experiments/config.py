"""Experiment configs: loading `get_config()` files, presets and `key=value` overrides."""

from __future__ import annotations

import ast
import copy
import importlib.util
import pathlib
from typing import Any, Sequence

import ml_collections

from compams_jax.experiments.optim import PRESETS


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
      raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r} (in override "
                        f"{key!r}); valid keys here: {sorted(node.keys())}.")
    node = node[part]
  leaf = parts[-1]
  # Free-form sections (compressor/dataset/model kwargs) take new keys; all others must exist.
  allow_new = len(parts) >= 2 and parts[-2].endswith("kwargs")
  if leaf not in node and not allow_new:
    raise ConfigError(f"unknown config key {key!r}; valid keys: {sorted(node.keys())}.")
  try:
    if leaf in node and isinstance(node[leaf], ml_collections.ConfigDict) and isinstance(
        value, dict):
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


def resolve(spec: str, overrides: Sequence[str] = (), variants: Sequence[str] | None = None
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
