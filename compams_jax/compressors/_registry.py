"""Compressors by name: for configs and command lines, and the list tests and benchmarks use.

Each name maps to an `Entry`: the factory, a few example arguments (the settings the tests
parametrize over and the benchmarks run; the first is the benchmark default) and arguments the
factory must reject. Registering a compressor here is what puts it under the registry-driven
tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from compams_jax._src.base import Compressor
from compams_jax.compressors._chunked_top_k import chunked_top_k
from compams_jax.compressors._dct import dct_top_k
from compams_jax.compressors._dense import cast, identity
from compams_jax.compressors._qsgd import qsgd
from compams_jax.compressors._sign import block_sign, scaled_sign
from compams_jax.compressors._terngrad import terngrad
from compams_jax.compressors._top_k import random_k, top_k


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered compressor.

  Attributes:
    factory: builds the compressor from keyword arguments.
    examples: keyword arguments of representative settings (at least one; the first is what a
      benchmark runs by default).
    bad: (keyword arguments, exception type) pairs the factory must reject.
  """

  factory: Callable[..., Compressor]
  examples: tuple[Mapping[str, Any], ...] = ({},)
  bad: tuple[tuple[Mapping[str, Any], type[Exception]], ...] = ()

  def __post_init__(self):
    if not self.examples:
      raise ValueError("a registry entry needs at least one example.")

  @property
  def parameters(self) -> frozenset[str]:
    """Names of the factory's keyword arguments."""
    return frozenset(inspect.signature(self.factory).parameters)


_BAD_RATIO = (
  ({"ratio": 0}, ValueError),
  ({"ratio": 1.5}, ValueError),
  ({"ratio": "0.1"}, TypeError),
)

REGISTRY: dict[str, Entry] = {
  "identity": Entry(identity),
  "cast": Entry(
    cast,
    ({"dtype": jnp.bfloat16}, {"dtype": jnp.float16}),
    (({"dtype": jnp.int32}, TypeError), ({"dtype": "not-a-dtype"}, TypeError)),
  ),
  "top_k": Entry(
    top_k,
    ({"ratio": 0.01}, {"ratio": 0.3}),
    (*_BAD_RATIO, ({"value_dtype": jnp.int32}, ValueError)),
  ),
  "random_k": Entry(random_k, ({"ratio": 0.01}, {"ratio": 0.3}), _BAD_RATIO),
  "block_sign": Entry(
    block_sign,
    ({}, {"exact_zeros": True}, {"block_size": 256}, {"norm": "l2"}),
    (({"block_size": 0}, ValueError), ({"norm": "l3"}, ValueError)),
  ),
  "scaled_sign": Entry(scaled_sign),
  "qsgd": Entry(
    qsgd,
    ({"levels": 4}, {"levels": 300}, {"levels": 127, "bucket_size": 512}),
    (({"levels": 0}, ValueError), ({"levels": 4, "bucket_size": 0}, ValueError)),
  ),
  "terngrad": Entry(terngrad),
  "chunked_top_k": Entry(
    chunked_top_k,
    (
      {"k": 64, "chunk": 64, "value_bits": 2},  # SparseLoCo
      {"k": 41, "value_bits": None, "value_dtype": jnp.bfloat16},  # 1% per chunk, bf16 values
      {"k": 64, "value_bits": 4},
    ),
    (
      ({"k": 0}, ValueError),
      ({"chunk": 0}, ValueError),
      ({"chunk": 65}, ValueError),  # 12-bit chunk-local indices: at most 64² entries a chunk
      ({"value_bits": 3}, ValueError),
      ({"value_bits": 16}, ValueError),
      ({"k": 2.5}, TypeError),
      ({"value_dtype": jnp.int32}, ValueError),
    ),
  ),
  "dct_top_k": Entry(
    dct_top_k,
    ({"k": 32, "chunk": 64}, {"k": 4, "chunk": 64}),
    (
      ({"k": 0}, ValueError),
      ({"chunk": 0}, ValueError),
      ({"chunk": 65}, ValueError),
      ({"k": "32"}, TypeError),
      ({"value_dtype": jnp.int32}, ValueError),
    ),
  ),
}

FACTORIES: dict[str, Callable[..., Compressor]] = {n: e.factory for n, e in REGISTRY.items()}


def get(name: str, **kwargs: Any) -> Compressor:
  """Builds a compressor from its registry name and keyword arguments.

  Args:
    name: a key of `REGISTRY` (the error for an unknown name lists them).
    **kwargs: the factory's arguments (e.g. ratio=0.01); unused ones are an error.

  Returns:
    The compressor.

  Examples:
    >>> import compams_jax as cj
    >>> c = cj.compressors.get("top_k", ratio=0.05)
    >>> c == cj.compressors.top_k(0.05), c.ratio
    (True, 0.05)
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(sorted(REGISTRY))}.")
  entry = REGISTRY[name]
  unknown = sorted(set(kwargs) - entry.parameters)
  if unknown:
    raise ValueError(
      f"compressor {name!r} takes {sorted(entry.parameters) or 'no arguments'}; "
      f"got unexpected {unknown}."
    )
  return entry.factory(**kwargs)
