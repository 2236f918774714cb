"""How a communicating transform averages what its workers compressed, per wire strategy.

A transform compresses in the layout its strategy needs (`codec`), runs its own algorithm on
the payload (error feedback, predictive coding), then averages (`mean`): through the wire's
`average` for strategies that average whole payloads (`averages_payloads`: the gather
strategy, with any of its averaging options), or by two-phase averaging (`_two_phase`).
"""

from __future__ import annotations

from typing import Any

import jax

from compams_jax._src.axis import AxisName
from compams_jax._src.base import Compressor
from compams_jax._src.feedback import Compressed, TreeCodec, compress_with_feedback
from compams_jax._src.shards import leaf_specs, map_shards, on_shards, sharded_axes, spec_groups
from compams_jax._src.tree import flat_spec
from compams_jax._src.workers import PerWorker
from compams_jax.transforms import _two_phase
from compams_jax.wire import Wire


def codec(
  wire: Wire, compressor: Compressor, axis_name: AxisName | None, stacked: Any = None
) -> Any:
  """The layout the workers compress in: per leaf (`TreeCodec`, stacked layers each a block),
  or two-phase's n chunks."""
  if wire.averages_payloads:
    return TreeCodec(compressor, stacked)
  if stacked is not None and any(stacked):
    raise ValueError(
      "stacked layers are compressed per layer, but cj.wire.two_phase() flattens the model "
      "into chunks; use cj.wire.gather() with stacked=."
    )
  # Chunks are decoded under vmap: the compressor's vmap-safe path.
  return _two_phase.ChunkCodec(compressor.batched(), wire.workers(axis_name))


def follows_sharding(
  wire: Wire,
  compressor: Compressor,
  value: Any,
  what: str,
  dense_axis_name: AxisName | None = None,
  specs: Any = None,
) -> bool:
  """Whether `value`'s leaves are sharded over mesh axes besides the worker axis (explicit
  mode), so compression runs on each device's own shard; refuses layouts it cannot follow."""
  axes = sharded_axes(value, specs)
  if not axes:
    return False
  if dense_axis_name is not None:
    raise ValueError(
      f"{what}: dense_axis_name={dense_axis_name!r} with gradients sharded over {axes} is "
      "averaged on each device's shards by the error-feedback transforms "
      "(cj.error_feedback, cj.compressed_mean, cj.comp_ams); this one takes axis_name alone "
      "on sharded parameters (compression follows the parameter sharding)."
    )
  if compressor.granularity == "model":
    raise ValueError(
      f"{what}: {type(compressor).__name__} with granularity='model' compresses the model as "
      f"one block, but the gradients are sharded over {axes} and no device holds the model; "
      "use a per-leaf code such as cj.compressors.block_sign() (each device's shard of each "
      "leaf is then a block)."
    )
  return True


def init(
  wire: Wire, like: Any, axis_name: AxisName | None, compressor: Compressor | None = None
) -> PerWorker | None:
  """State the averaging keeps of its own (two-phase's server residuals), or None.

  With two-phase, warns when `compressor` codes its 1-D chunk rows at more than half the dense
  bytes (a code built for matrices, e.g. a DCT over short vector chunks, can lose its rate).
  """
  if wire.averages_payloads:
    return None
  n = wire.workers(axis_name, at_init=True)
  if compressor is not None:
    _two_phase.warn_if_rows_stay_dense(compressor, like, n)
  return _two_phase.init(like, n)


def mean(
  wire: Wire,
  codec: Any,
  out: Compressed,
  like: Any,
  state: PerWorker | None,
  *,
  key: jax.Array | None,
  axis_name: AxisName | None,
  corrected: Any = None,
) -> tuple[Any, PerWorker | None]:
  """(average over the workers of what `out` sent, new averaging state), a pytree like `like`.

  `corrected` gives the dtypes the payload was encoded from (the residual's), if not `like`'s.
  """
  if wire.averages_payloads:
    own = jax.tree.map(lambda s, v: s.astype(v.dtype), out.sent, like)
    average = wire.average(
      codec.compressor,
      out.payload,
      like,
      axis_name=axis_name,
      key=key,
      own=own,
      stacked=codec.stacked,
    )
    return average, state
  flat_dtype = flat_spec(like if corrected is None else corrected).dtype
  return _two_phase.average(
    wire, codec, out.payload, like, flat_dtype, state, key=key, axis_name=axis_name
  )


def compress_and_average(
  wire: Wire,
  codec: Any,
  value: Any,
  residual: Any,
  state: PerWorker | None,
  *,
  key: jax.Array | None,
  axis_name: AxisName | None,
  what: str,
  dense_axis_name: AxisName | None = None,
  shard_specs: Any = None,
  decay: float = 1.0,
) -> tuple[Any, Any, PerWorker | None]:
  """Send C(value + decay·residual), keep what it dropped, average what the workers sent.

  The error-feedback kernel (`compress_with_feedback`; residual None: no feedback) and `mean`,
  on each device's own shard of every leaf when the leaves are sharded over mesh axes besides
  the worker axis (`shard_specs`: the parameters' specs where the types carry none).

  Returns:
    (the average, the new residual, the averaging's new state).
  """

  def exchange(value, residual, key, averaging_state=None):
    out = compress_with_feedback(codec, value, residual, key, decay=decay)
    average, averaging_state = mean(
      wire,
      codec,
      out,
      value,
      averaging_state,
      key=key,
      axis_name=axis_name,
      corrected=residual,
    )
    return average, (None if residual is None else out.residual), averaging_state

  follows = follows_sharding(wire, codec.compressor, value, what, dense_axis_name, shard_specs)
  if (
    state is not None
    and state.per_device == "groups"
    and (follows or isinstance(state.value, tuple))
  ):
    # Two-phase on sharded parameters: each device's server residuals, of its own shards (in a
    # fully manual step the leaves are the shards already: no nested map).
    return _two_phase_on_shards(
      exchange,
      value,
      residual,
      state,
      key,
      axis_name=axis_name,
      what=what,
      specs=shard_specs,
      nested=follows,
    )
  if not follows:
    return exchange(value, residual, key, state)
  average, new_residual = on_shards(
    lambda v, r, k: exchange(v, r, k)[:2],
    value,
    residual,
    key,
    worker_axes=(axis_name,),
    what=what,
    specs=shard_specs,
  )
  return average, new_residual, state


def _two_phase_on_shards(exchange, value, residual, state, key, *, axis_name, what, specs, nested):
  """Two-phase averaging of sharded leaves: on each device's own shards, one flattened vector
  per group of leaves sharded alike (`spec_groups`: a replicated leaf never mixes with a
  sharded one, so it stays identical on its devices), each group with its own server residual
  (`PerWorker.per_device`) and its own exchange. The groups are those `cj.sharding.init`
  recorded (`state.shard_specs`), else the leaves' own shardings; `nested`: run on the shards
  through a nested `shard_map` (False: the step is manual over the sharding axes already)."""
  if state.shard_specs is not None:
    groups = spec_groups(state.shard_specs)
  else:
    groups = spec_groups(leaf_specs(value, specs))
  arrays = state.value if isinstance(state.value, tuple) else (state.value,)
  if len(arrays) != len(groups):
    raise ValueError(
      f"{what}: the two-phase server residuals were initialised for {len(arrays)} group(s) of "
      f"leaves, but the gradients are sharded in {len(groups)} ways "
      f"({', '.join(str(a or 'replicated') for a, _ in groups)}); initialise the state with "
      "cj.sharding.init(tx, params, mesh=mesh, axis_name=...) on the sharded parameters."
    )
  trees = (value,) if residual is None else (value, residual)

  def own(trees, k, flat):
    v, treedef = jax.tree.flatten(trees[0])
    r = None if residual is None else jax.tree.leaves(trees[1])
    average, new_residual, new_flat = [None] * len(v), [None] * len(v), []
    for g, ((_, idx), s) in enumerate(zip(groups, flat)):
      gk = k if k is None or len(groups) == 1 else jax.random.fold_in(k, g)
      a, e, st = exchange(
        [v[i] for i in idx], None if r is None else [r[i] for i in idx], gk, state.replace(s)
      )
      for j, i in enumerate(idx):
        average[i] = a[j]
        if e is not None:
          new_residual[i] = e[j]
      new_flat.append(st.value)
    outs = (jax.tree.unflatten(treedef, average),)
    if residual is not None:
      outs += (jax.tree.unflatten(treedef, new_residual),)
    return (*outs, *new_flat)

  if nested:
    outs = map_shards(
      own,
      trees,
      key,
      outputs=len(trees),
      worker_axes=(axis_name,),
      what=what,
      specs=specs,
      flat=tuple((s, a) for s, (a, _) in zip(arrays, groups)),
    )
  else:
    outs = own(trees, key, arrays)
  new_state = outs[len(trees) :]
  new_state = new_state if isinstance(state.value, tuple) else new_state[0]
  return outs[0], (None if residual is None else outs[1]), state.replace(new_state)
