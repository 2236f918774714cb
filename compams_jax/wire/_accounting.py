"""Bytes one worker sends per step, read from the traced program (no devices, no special mode)."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.extend import core as jex_core
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from compams_jax._src.axis import UnboundAxisError
from compams_jax._src.base import Compressor
from compams_jax._src.tree import tree_wire_bits

# Collective primitives and the parameter naming their axes.
_COLLECTIVES = {
  "all_gather": "axis_name",
  "all_gather_invariant": "axis_name",
  "all_to_all": "axis_name",
  "reduce_scatter": "axis_name",
  "psum": "axes",
  "pmin": "axes",
  "pmax": "axes",
  "ppermute": "axis_name",
}


def _axes(value: Any) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _subjaxprs(value: Any):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def _count(jaxpr: Any, axes: set[str]) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in _COLLECTIVES and axes & set(_axes(eqn.params.get(_COLLECTIVES[name]))):
      total += sum(math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize for v in eqn.invars)
    inner = sum(_count(j, axes) for v in eqn.params.values() for j in _subjaxprs(v))
    if inner and name == "while":
      raise ValueError("wire_bytes: a collective inside a while loop has no static byte count.")
    total += inner * (eqn.params.get("length", 1) if name == "scan" else 1)
  return total


def _trace(tx: optax.GradientTransformation, params: Any, axes: dict[str, tuple[int, str]]):
  """The jaxpr of `update` inside shard_map over an abstract mesh binding `axes`.

  The state is traced from `init` first and enters `update` as an argument, so that state-driven
  branches (a warm-up phase's `lax.cond`) stay branches rather than being decided at trace time.
  """
  mesh = AbstractMesh(tuple(s for s, _ in axes.values()) or (1,), tuple(axes) or ("_unused",))

  def mapped(fn):
    return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)

  state = jax.eval_shape(mapped(tx.init), params)
  update = mapped(lambda p, s: tx.update(p, s, p)[0])
  return jax.make_jaxpr(update)(params, state).jaxpr


def _measure(tx, params, num_workers: int, dense_workers: int) -> int:
  axes: dict[str, tuple[int, str]] = {}
  while True:
    try:
      jaxpr = _trace(tx, params, axes)
      break
    except UnboundAxisError as e:
      if e.axis_name in axes:
        raise
      axes[e.axis_name] = (num_workers if e.role == "workers" else dense_workers, e.role)
  return _count(jaxpr, {name for name, (_, role) in axes.items() if role == "workers"})


def wire_bytes(
  tx_or_compressor: optax.GradientTransformation | Compressor,
  params: Any,
  *,
  num_workers: int | None = None,
  dense_workers: int = 1,
) -> int:
  """Bytes one worker hands to the worker-axis collectives per step, for gradients like `params`.

  For a compressor this is its exact static `wire_bits` summed over the pytree. For a
  transformation (e.g. `cj.comp_ams(..., axis_name="data")`) its `init` and `update` are traced
  on an abstract mesh binding the axes it names (nothing is computed, no device is needed) and
  the operands of every collective over its worker axis are added up: compressed payloads,
  side information such as the least-squares predictor's scalars, agreement flags. Collectives
  over a `dense_axis_name` (the fast links of a hierarchical mesh) are not counted. A
  transformation built with `axis_name=None` communicates nothing: 0.

  Args:
    tx_or_compressor: a `Compressor`, or an optax GradientTransformation.
    params: a pytree of arrays or ShapeDtypeStructs.
    num_workers: the number of workers on the worker axis. Needed only when the bytes depend on
      it (the two-phase strategy); omitted there, it is an error. (With 1 worker JAX elides
      an all_gather entirely.)
    dense_workers: the size of the dense (fast) axis of a hierarchical mesh.

  Returns:
    Bytes per worker per step (an int).

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> params = {"w": jnp.zeros((1000,))}
    >>> cj.wire_bytes(cj.compressors.top_k(0.01), params)   # 10 f32 values + 10 uint16 indices
    60
    >>> cj.wire_bytes(cj.comp_ams(1e-3, cj.compressors.top_k(0.01), axis_name="data"), params)
    60
  """
  if isinstance(tx_or_compressor, Compressor):
    return -(-tree_wire_bits(tx_or_compressor, params) // 8)
  if not isinstance(tx_or_compressor, optax.GradientTransformation):
    raise TypeError(
      "wire_bytes expects a Compressor or an optax.GradientTransformation, got "
      f"{type(tx_or_compressor).__name__}."
    )
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = tx_or_compressor
  if num_workers is not None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
      raise ValueError(f"num_workers must be a positive int, got {num_workers!r}.")
    return _measure(tx, abstract, num_workers, dense_workers)
  # Traced at two worker counts (JAX drops an all_gather over an axis of size 1).
  two = _measure(tx, abstract, 2, dense_workers)
  if _measure(tx, abstract, 3, dense_workers) != two:
    raise ValueError(
      "wire_bytes: this optimizer's bytes per worker depend on the number of workers (e.g. the "
      "two-phase wire strategy); pass num_workers=<size of its worker axis>."
    )
  return two
