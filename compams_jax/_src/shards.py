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

from collections.abc import Callable
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


def sharded_axes(tree: Any, specs: Any = None) -> tuple[str, ...]:
  """The mesh axes that shard any leaf of `tree` (in the order they appear; see `leaf_specs`)."""
  out: list[str] = []
  for spec in leaf_specs(tree, specs):
    for entry in spec:
      for name in _names(entry):
        if name not in out:
          out.append(name)
  return tuple(out)


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
) -> tuple[Any, ...]:
  """fn(trees, key) -> `outputs` trees, run on each device's shard of every leaf.

  `trees[0]` gives the structure and the sharding (from the leaves' types, or `specs` where the
  types carry none); every tree of `trees` and of fn's outputs is structured and sharded like
  it. Without sharded leaves, fn runs as is.
  """
  value = trees[0]
  axes = sharded_axes(value, specs)
  if not axes:
    return tuple(fn(trees, key))
  workers = {n for a in worker_axes for n in _names(a)}
  if workers & set(axes):
    raise ValueError(
      f"{what}: a gradient leaf is sharded over the worker axis {sorted(workers & set(axes))} "
      "itself; shard parameters only over the other mesh axes (e.g. P('fsdp', None) on a "
      "('dcn', 'fsdp') mesh) and keep them replicated over the worker axis."
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
  # Only arrays travel through the nested map (a None key stays outside).
  if key is None:
    mapped = jax.shard_map(
      lambda *t: tuple(fn(t, None)),
      in_specs=(specs,) * len(trees),
      out_specs=(specs,) * outputs,
      axis_names=set(axes),
    )
    return mapped(*trees)
  mapped = jax.shard_map(
    lambda k, *t: tuple(fn(t, k)),
    in_specs=(P(), *((specs,) * len(trees))),
    out_specs=(specs,) * outputs,
    axis_names=set(axes),
  )
  return mapped(key, *trees)
