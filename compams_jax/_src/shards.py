"""Compression follows the parameter sharding: run a per-leaf step on each device's own shard.

On a mesh whose worker axis is manual (a partial-manual `jax.shard_map(..., axis_names={"dcn"})`)
and whose other axes shard the parameters (FSDP, tensor parallelism) in jax's explicit mode,
every gradient leaf's type carries its sharding (`jax.typeof(g).sharding.spec`). `on_shards`
then nests a `jax.shard_map` manual over those other axes, so the step sees each device's
addressable shard of every leaf: the shard is the compressor's block, and no device holds a
full gradient leaf. Leaves replicated over those axes are processed whole, identically on each
of their devices.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from compams_jax._src.axis import AxisName


def _names(axis: Any) -> tuple[str, ...]:
  if axis is None:
    return ()
  return (axis,) if isinstance(axis, str) else tuple(axis)


def leaf_spec(x: Any) -> P:
  """The leaf's partition spec over non-manual mesh axes (explicit mode), P() if it has none."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None:
    return P()
  entries = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
  return P(*entries)


def _sharded(specs: Any) -> bool:
  return any(entry is not None for spec in specs for entry in spec)


def _unmanual(spec: P) -> P:
  """`spec` without the axes that are manual here (their shards are already local)."""
  manual = set(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
  entries = []
  for entry in spec:
    kept = tuple(n for n in _names(entry) if n not in manual)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*entries)


def leaf_specs(tree: Any, specs: Any = None) -> list[P]:
  """Each leaf's spec over the mesh axes that are not manual here: from the leaves' types, or
  from `specs` (one PartitionSpec per leaf, `PerWorker.shard_specs`) where the types carry none
  (auto mesh axes)."""
  leaves = jax.tree.leaves(tree)
  typed = [leaf_spec(leaf) for leaf in leaves]
  if specs is not None and not _sharded(typed) and len(specs) == len(leaves):
    return [_unmanual(spec) for spec in specs]
  return typed


def spec_axes(specs: Any) -> tuple[str, ...]:
  """The mesh axes named by a sequence of PartitionSpecs, in the order they first appear."""
  out: list[str] = []
  for spec in specs:
    for entry in spec:
      for name in _names(entry):
        if name not in out:
          out.append(name)
  return tuple(out)


def spec_groups(specs: Any) -> list[tuple[tuple[str, ...], list[int]]]:
  """Leaves grouped by the mesh axes they are sharded over: [(axes, leaf indices)], in the
  order each group first appears (axes in `spec_axes(specs)` order; () for replicated leaves).

  State computed from several leaves together (the two-phase server residual of a flattened
  group) is kept per group, so that a leaf replicated over an axis never mixes with one
  sharded over it."""
  groups: dict[tuple[str, ...], list[int]] = {}
  for i, axes in enumerate(leaf_axes(specs)):
    groups.setdefault(axes, []).append(i)
  return list(groups.items())


def leaf_axes(specs: Any) -> list[tuple[str, ...]]:
  """Each leaf's sharding axes, in `spec_axes(specs)` order (the order per-device state is
  split in)."""
  specs = list(specs)
  order = spec_axes(specs)
  return [tuple(a for a in order if a in set(spec_axes([spec]))) for spec in specs]


_INIT_SPECS: contextvars.ContextVar[tuple[P, ...] | None] = contextvars.ContextVar(
  "compams_jax_init_specs", default=None
)


@contextlib.contextmanager
def initialising_with(param_specs: Any) -> Iterator[None]:
  """While `cj.sharding.init` runs `tx.init` on each device's shards: the parameters' specs,
  which the state that groups leaves by their sharding (`spec_groups`) reads there."""
  leaves = tuple(jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P)))
  token = _INIT_SPECS.set(leaves)
  try:
    yield
  finally:
    _INIT_SPECS.reset(token)


def init_groups(like: Any) -> list[tuple[tuple[str, ...], list[int]]]:
  """`spec_groups` of `like`'s leaves while `cj.sharding.init` initialises them (one group of
  every leaf otherwise)."""
  n = len(jax.tree.leaves(like))
  specs = _INIT_SPECS.get()
  if specs is None or len(specs) != n:
    return [((), list(range(n)))]
  return spec_groups(specs)


def sharded_axes(tree: Any, specs: Any = None) -> tuple[str, ...]:
  """The mesh axes that shard any leaf of `tree` (in the order they appear; see `leaf_specs`).
  Per-device state (`PerWorker.per_device`) is split over them in this order."""
  return spec_axes(leaf_specs(tree, specs))


def on_shards(
  fn: Callable[..., tuple[Any, Any]],
  value: Any,
  residual: Any,
  key: jax.Array | None,
  *,
  worker_axes: tuple[AxisName | None, ...],
  what: str,
  specs: Any = None,
) -> tuple[Any, Any]:
  """fn(value, residual, key) -> (mean, new_residual), run on each device's shard of the leaves.

  `mean` and `new_residual` are structured like `value` and sharded as it is; `residual` is
  structured like `value` (or None). Without sharded leaves, fn runs as is. `specs` (one
  PartitionSpec per leaf, `PerWorker.shard_specs`) stands in for the types' shardings under
  auto mesh axes.
  """
  outputs = 1 if residual is None else 2

  def body(trees, k):
    mean, new_residual = fn(trees[0], trees[1] if residual is not None else None, k)
    return (mean,) if residual is None else (mean, new_residual)

  trees = (value,) if residual is None else (value, residual)
  if not sharded_axes(value, specs):
    return fn(value, residual, key)
  outs = map_shards(
    body, trees, key, outputs=outputs, worker_axes=worker_axes, what=what, specs=specs
  )
  return (outs[0], None) if residual is None else (outs[0], outs[1])


def map_shards(
  fn: Any,
  trees: tuple[Any, ...],
  key: jax.Array | None,
  *,
  outputs: int,
  worker_axes: tuple[AxisName | None, ...],
  what: str,
  specs: Any = None,
  flat: tuple[tuple[jax.Array, tuple[str, ...]], ...] = (),
) -> tuple[Any, ...]:
  """fn(trees, key) -> `outputs` trees, run on each device's shard of every leaf.

  `trees[0]` gives the structure and the sharding (from the leaves' types, or `specs` where the
  types carry none); every tree of `trees` and of fn's outputs is structured and sharded like
  it. Without sharded leaves, fn runs as is.

  With `flat` (per-device state, `PerWorker.per_device`: (array, axes) pairs, the array's last
  axis split over those of the sharding axes), fn(trees, key, arrays) returns the `outputs`
  trees followed by the new arrays, each device seeing and returning its own part.
  """
  value = trees[0]
  axes = sharded_axes(value, specs)
  arrays = tuple(x for x, _ in flat)
  if not axes:
    return tuple(fn(trees, key, arrays) if flat else fn(trees, key))
  workers = {n for a in worker_axes for n in _names(a)}
  if workers & set(axes):
    raise ValueError(
      f"{what}: a gradient leaf is sharded over {sorted(workers & set(axes))}, an axis the "
      "optimizer communicates over itself (its axis_name or dense_axis_name); shard "
      "parameters only over the other mesh axes (e.g. P('fsdp', None) on a ('dcn', 'fsdp') "
      "mesh) and keep them replicated over the worker axes."
    )
  specs = jax.tree.unflatten(jax.tree.structure(value), leaf_specs(value, specs))
  for tree in trees[1:]:
    for leaf, r in zip(jax.tree.leaves(value), jax.tree.leaves(tree)):
      if tuple(r.shape) != tuple(leaf.shape):
        raise ValueError(
          f"{what}: per-worker state of shape {tuple(r.shape)} does not follow the "
          f"parameter sharding of a leaf of shape {tuple(leaf.shape)}; initialise it with "
          "cj.sharding.init(tx, params, mesh=mesh, axis_name=...) on the sharded params."
        )
  flat_specs = tuple(P(*(None,) * (x.ndim - 1), a or None) for x, a in flat)
  n = len(trees)

  def body(k, t, f):
    return tuple(fn(t, k, f) if flat else fn(t, k))

  # Only arrays travel through the nested map (a None key stays outside).
  if key is None:
    mapped = jax.shard_map(
      lambda *a: body(None, a[:n], a[n:]),
      in_specs=(*((specs,) * n), *flat_specs),
      out_specs=(*((specs,) * outputs), *flat_specs),
      axis_names=set(axes),
    )
    return mapped(*trees, *arrays)
  mapped = jax.shard_map(
    lambda k, *a: body(k, a[:n], a[n:]),
    in_specs=(P(), *((specs,) * n), *flat_specs),
    out_specs=(*((specs,) * outputs), *flat_specs),
    axis_names=set(axes),
  )
  return mapped(key, *trees, *arrays)
