"""Compressors by name, for configs and command lines."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from compams_jax._src.base import Compressor
from compams_jax.compressors._dense import cast, identity
from compams_jax.compressors._qsgd import qsgd
from compams_jax.compressors._sign import block_sign, scaled_sign
from compams_jax.compressors._top_k import random_k, top_k

FACTORIES: dict[str, Callable[..., Compressor]] = {
  "identity": identity,
  "cast": cast,
  "top_k": top_k,
  "random_k": random_k,
  "block_sign": block_sign,
  "scaled_sign": scaled_sign,
  "qsgd": qsgd,
}


def get(name: str, **kwargs: Any) -> Compressor:
  """Builds a compressor from its name and keyword arguments.

  Args:
    name: one of "identity", "cast", "top_k", "random_k", "block_sign", "scaled_sign", "qsgd".
    **kwargs: the factory's arguments (e.g. ratio=0.01); unused ones are an error.

  Returns:
    The compressor.

  Examples:
    >>> import compams_jax as cj
    >>> cj.compressors.get("top_k", ratio=0.05)
    TopK(granularity='leaf', ratio=0.05, method='auto')
  """
  if name not in FACTORIES:
    raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(sorted(FACTORIES))}.")
  factory = FACTORIES[name]
  accepted = set(inspect.signature(factory).parameters)
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(
      f"compressor {name!r} takes {sorted(accepted) or 'no arguments'}; got unexpected {unknown}."
    )
  return factory(**kwargs)
