"""Named-axis queries that fail with a clear message, and collectives that work in every context.

The same transform runs inside `jax.shard_map` (with or without device-variance checks),
`jax.pmap` and `jax.vmap(..., axis_name=...)`. Only shard_map tracks whether a value varies along
an axis (`jax.typeof(x).vma`); the helpers here read that instead of guessing the context.
"""

from __future__ import annotations

from typing import Any

import jax

AxisName = str | tuple[str, ...]


class UnboundAxisError(ValueError):
  """An optimizer's collective names an axis that the calling code has not bound.

  Attributes:
    axis_name: the unbound axis.
    role: "workers" (the axis whose workers the wire averages over) or "dense" (a fast axis
      reduced densely first).
  """

  def __init__(self, axis_name: str, role: str, detail: str = ""):
    self.axis_name = axis_name
    self.role = role
    flag = "axis_name" if role == "workers" else "dense_axis_name"
    super().__init__(
      f"{flag}={axis_name!r} is not bound here. Call the optimizer's update inside "
      f"jax.shard_map over a mesh with an axis named {axis_name!r}, inside "
      f"jax.pmap(..., axis_name={axis_name!r}) or jax.vmap(..., axis_name={axis_name!r}); "
      f"initialise per-worker state with cj.sharding.init; use {flag}=None for a single worker."
      + (f" {detail}" if detail else "")
    )


def _names(axis_name: AxisName) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def axis_size(axis_name: AxisName | None, role: str = "workers") -> int:
  """Size of the named axis (or product over a tuple of axes; 1 for None), or `UnboundAxisError`."""
  if axis_name is None:
    return 1
  size = 1
  for name in _names(axis_name):
    try:
      size *= jax.lax.axis_size(name)
    except NameError as e:
      raise UnboundAxisError(name, role) from e
  return size


def num_workers(axis_name: AxisName | None) -> int:
  """The number of workers on `axis_name` (1 for None), with a clear error when unbound."""
  return axis_size(axis_name, "workers")


def worker_index(axis_name: AxisName | None) -> jax.Array | int:
  """This worker's index along the axis (0 for None; row-major over a tuple of axes)."""
  if axis_name is None:
    return 0
  num_workers(axis_name)  # Raises the clear error for an unbound axis.
  return jax.lax.axis_index(axis_name)


def varying_axes(x: Any) -> frozenset:
  """The mesh axes along which shard_map's types say `x` varies (empty outside shard_map)."""
  t = jax.typeof(x)
  vma = getattr(t, "vma", None)
  if vma is None:  # jax versions that expose it as manual_axis_type.varying
    vma = getattr(getattr(t, "manual_axis_type", None), "varying", frozenset())
  return frozenset(vma)


def _manual(axis_name: AxisName) -> bool:
  """Whether the axes are manual axes of an enclosing shard_map (or pmap), not vmap's."""
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  return all(name in manual for name in _names(axis_name))


def manual_axes_tracked(axis_name: AxisName) -> bool:
  """Whether we are inside shard_map over these axes with its varying-axis types switched on
  (`check_vma=True`): only then does `varying_axes` say anything."""
  if not _manual(axis_name):
    return False
  names = _names(axis_name)
  return set(names) <= varying_axes(jax.lax.axis_index(names))


def all_gather_invariant(x: Any, axis_name: AxisName) -> Any:
  """all_gather whose result may feed replicated state in any context (stacked on axis 0).

  Inside shard_map (and pmap) a gathered value is typed device-varying unless gathered with
  `to="invarying"`; that option exists only there, so under `jax.vmap(..., axis_name=...)` the
  plain all_gather is used.
  """
  if _manual(axis_name):
    return jax.tree.map(lambda a: jax.lax.all_gather(a, axis_name, to="invarying"), x)
  return jax.tree.map(lambda a: jax.lax.all_gather(a, axis_name), x)
