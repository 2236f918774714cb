"""Test cases built from `cj.compressors.REGISTRY`: every registered compressor, every example.

Tests parametrize over `cases(...)` instead of listing compressors, so a newly registered
compressor is tested without editing them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from compams_jax.compressors import REGISTRY, Compressor

GRANULARITIES = ("leaf", "model")


def _short(value: Any) -> str:
  if value is None or isinstance(value, (bool, int, float, str)):
    return str(value)
  try:
    return np.dtype(value).name
  except TypeError:
    return repr(value)


def case_id(name: str, kwargs: Mapping[str, Any]) -> str:
  """E.g. "top_k(ratio=0.01)", "block_sign"."""
  if not kwargs:
    return name
  return f"{name}(" + ",".join(f"{k}={_short(v)}" for k, v in sorted(kwargs.items())) + ")"


def build(name: str, kwargs: Mapping[str, Any] | None = None, granularity: str | None = None):
  """The registered factory called with `kwargs` (and `granularity`, where it takes one)."""
  entry = REGISTRY[name]
  kwargs = dict(kwargs or {})
  if granularity is not None and "granularity" in entry.parameters:
    kwargs["granularity"] = granularity
  return entry.factory(**kwargs)


def examples(*, first: bool = False) -> list[tuple[str, dict[str, Any]]]:
  """(registry name, kwargs) of every example (or the first) of every registered compressor."""
  return [
    (name, dict(kw))
    for name, entry in REGISTRY.items()
    for kw in (entry.examples[:1] if first else entry.examples)
  ]


def cases(
  *,
  where: Callable[[Compressor], bool] | None = None,
  granularities: tuple[str, ...] = (),
  first: bool = False,
  slow_beyond_first: bool = False,
) -> list:
  """pytest params (name, kwargs[, granularity]) of every example (`first`: of the first example
  of every compressor, for expensive tests), optionally filtered by the built compressor's
  declarations; with `granularities`, each granularity the factory can build (a factory without
  a `granularity` argument only its own).

  `slow_beyond_first`: every example, but only the first of each compressor in the default run;
  the others are marked `slow` (`pytest -m slow`). For expensive tests (training runs, compiled
  steps) whose other examples' code paths the cheap per-example tests already cover."""
  out = []
  for name, kw in examples(first=first):
    if where is not None and not where(build(name, kw)):
      continue
    later = slow_beyond_first and kw != dict(REGISTRY[name].examples[0])
    marks = [pytest.mark.slow] if later else []
    if not granularities:
      out.append(pytest.param(name, kw, id=case_id(name, kw), marks=marks))
      continue
    for g in granularities:
      if "granularity" in REGISTRY[name].parameters or build(name, kw).granularity == g:
        out.append(pytest.param(name, kw, g, id=f"{case_id(name, kw)}-{g}", marks=marks))
  return out
