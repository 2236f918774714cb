"""The data-parallel step: one place that builds it for shard_map meshes, pmap and vmap.

Every worker differentiates its own share of the batch, the optimizer's collectives average
the compressed gradients, and every worker applies the same update. The helper takes care of
what a hand-written step gets silently wrong: differentiating with respect to a device-varying
copy of the parameters (inside `jax.shard_map` the gradient of a replicated parameter is
otherwise summed over workers before compression), per-worker optimizer state, batch placement
and per-worker PRNG keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from compams_jax import sharding, wire
from compams_jax._src.workers import apply_updates, find_global_params, is_per_worker

Mode = Literal["shard_map", "pmap", "vmap"]


def _names(axis: Any) -> tuple[str, ...]:
  if axis is None:
    return ()
  return (axis,) if isinstance(axis, str) else tuple(axis)


@dataclasses.dataclass(frozen=True)
class DataParallelStep:
  """A jitted data-parallel training step; build it with `data_parallel_step`.

  Call `init(params)` once, then `step(params, opt_state, batch[, key])` every step. Layouts:

  * "shard_map": params are global arrays on `mesh` (replicated, or sharded by
    `param_specs`), the optimizer state is sharded as `cj.sharding.state_specs` says, and a
    batch is a pytree of global arrays whose leading axis (the global batch) is split over the
    worker axes.
  * "pmap": params and every optimizer-state leaf carry a leading axis of the workers (pmap's
    usual replicated layout). "vmap": one copy of the params; every optimizer-state leaf
    carries the leading worker axis. In both, the batch's leading axis is split into
    (workers, local batch).

  Attributes:
    loss_fn: `loss_fn(params, batch[, key]) -> loss` (or `(loss, aux)` with `has_aux`).
    tx: the optimizer; its `axis_name` (and `dense_axis_name`) must name the worker axes.
    mode: "shard_map", "pmap" or "vmap".
    mesh: the device mesh ("shard_map" only).
    axis_name: the axis (or axes) along which workers differ.
    axis_sizes: the number of workers along each of those axes.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    param_specs: partition specs of the parameters over non-worker mesh axes, or None.
    donate: whether the step donates its params and state buffers (reuses their memory).
  """

  loss_fn: Callable[..., Any]
  tx: optax.GradientTransformation
  mode: Mode
  mesh: jax.sharding.Mesh | None
  axis_name: tuple[str, ...]
  axis_sizes: tuple[int, ...]
  has_aux: bool = False
  param_specs: Any = None
  donate: bool = True

  @property
  def _donated(self) -> tuple[int, ...]:
    return (0, 1) if self.donate else ()

  @property
  def num_workers(self) -> int:
    return math.prod(self.axis_sizes)

  def _nest(self, fn: Callable[..., Any], in_axes: Any) -> Callable[..., Any]:
    """`fn` vmapped over every worker axis, outermost first, on (*axis_sizes, ...) inputs."""
    for name, size in reversed(list(zip(self.axis_name, self.axis_sizes))):
      fn = jax.vmap(fn, in_axes=in_axes, axis_name=name, axis_size=size)
    return fn

  def _split(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: x.reshape(self.axis_sizes + x.shape[1:]), tree)

  def _merge(self, tree: Any) -> Any:
    k = len(self.axis_sizes)
    return jax.tree.map(lambda x: x.reshape((self.num_workers,) + x.shape[k:]), tree)

  # ---------------------------------------------------------------------------------------------
  # Placement.
  # ---------------------------------------------------------------------------------------------

  def _param_specs(self, params: Any) -> Any:
    if self.param_specs is None:
      return jax.tree.map(lambda _: P(), params)
    return self.param_specs

  def init(self, params: Any) -> tuple[Any, Any]:
    """Places the parameters and initialises every worker's optimizer state.

    Args:
      params: the parameters (host or device arrays).

    Returns:
      (params, opt_state) in this step's layout.
    """
    n = self.num_workers
    own = self._own_params(params)
    if self.mode == "shard_map":
      specs = self._param_specs(params)
      # Fresh buffers: the step donates its inputs, which must not delete the caller's arrays.
      out = jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs)
      params = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=out)(params)
      state = sharding.init(
        self.tx,
        params,
        mesh=self.mesh,
        axis_name=self.axis_name,
        param_specs=self.param_specs,
      )
      if own:  # every worker's own copy, behind a leading worker axis split over the workers
        wspecs = self._worker_specs(specs)
        params = jax.jit(
          lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), t),
          out_shardings=jax.tree.map(lambda s: NamedSharding(self.mesh, s), wspecs),
        )(params)
      return params, state
    if self.mode == "pmap":
      stacked = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + np.shape(x)), params)
      init = jax.pmap(self.tx.init, axis_name=self._pmap_axis(), devices=jax.local_devices()[:n])
      state = init(stacked)
      place = jax.pmap(lambda x: x, devices=jax.local_devices()[:n])
      return place(stacked), state
    init = jax.jit(lambda p: self._merge(self._nest(self.tx.init, None)(p)))
    state = init(params)
    if own:
      return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + np.shape(x)), params
      ), state
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params), state

  def _own_params(self, params: Any, *, per_worker: bool = False) -> bool:
    """Whether every worker trains its own copy of the parameters (a local-SGD optimizer such
    as `cj.diloco`, whose state holds the synchronized `GlobalParams`). `per_worker`: `params`
    already carry the leading worker axis."""
    shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:] if per_worker else np.shape(x), x.dtype),
      params,
    )
    cache = self.__dict__.setdefault("_own_cache", {})
    signature = jax.tree.structure(shapes)
    if signature not in cache:
      state = jax.eval_shape(self._nest(self.tx.init, None), shapes)
      cache[signature] = find_global_params(state) is not None
    return cache[signature]

  def _worker_specs(self, specs: Any) -> Any:
    return jax.tree.map(lambda s: P(self.axis_name, *s), specs, is_leaf=lambda x: isinstance(x, P))

  def _pmap_axis(self) -> str:
    if len(self.axis_name) != 1:
      raise ValueError(f"pmap takes one worker axis, got {self.axis_name}.")
    return self.axis_name[0]

  def shard_batch(self, batch: Any) -> Any:
    """Places a global batch: its leading axis split over the workers (checked)."""
    n = self.num_workers

    def check(x):
      size = np.shape(x)[0] if np.ndim(x) else None
      if size is None or size % n:
        raise ValueError(
          f"every batch leaf needs a leading (global batch) axis divisible by the {n} workers; "
          f"got shape {np.shape(x)}."
        )

    jax.tree.map(check, batch)
    if self.mode == "shard_map":
      spec = P(self.axis_name)
      return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(self.mesh, spec)), batch)
    return jax.tree.map(lambda x: jnp.reshape(x, (n, -1) + np.shape(x)[1:]), batch)

  # ---------------------------------------------------------------------------------------------
  # The step.
  # ---------------------------------------------------------------------------------------------

  def _local(self, params, opt_state, batch, key, *, varying: bool):
    """One worker's step: its gradient, the optimizer's collectives, the update."""
    axes = self.axis_name
    if key is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axes))
    # Inside shard_map, differentiate with respect to a device-varying copy: the gradient of a
    # replicated parameter would otherwise be summed over the workers before compression.
    diff = (
      jax.tree.map(lambda p: jax.lax.pcast(p, axes, to="varying"), params) if varying else params
    )
    args = (batch,) if key is None else (batch, key)
    fn = self.loss_fn if self.has_aux else (lambda p, *a: (self.loss_fn(p, *a), None))
    (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(diff, *args)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    # optax.apply_updates, then exactly the synchronized params after a local-SGD sync.
    params = apply_updates(params, updates, opt_state)
    # Per-worker metrics, averaged outside the step: a collective here would add bytes to
    # every step that the optimizer did not send.
    metrics = {"loss": loss} if aux is None else {"loss": loss, "aux": aux}
    return params, opt_state, metrics

  def _shard_axes(self) -> tuple[str, ...]:
    """Mesh axes besides the workers' that shard the parameters (`param_specs`)."""
    used: list[str] = []
    for spec in jax.tree.leaves(self.param_specs, is_leaf=lambda x: isinstance(x, P)):
      for entry in spec:
        for name in _names(entry):
          if name not in self.axis_name and name not in used:
            used.append(name)
    return tuple(used)

  def _local_sharded(self, params, opt_state, batch, key, *, own=False):
    if own:  # this worker's own params: already device-varying, behind the worker axis
      params = jax.tree.map(lambda x: x[0], params)
    params, opt_state, metrics = self._local(params, opt_state, batch, key, varying=not own)
    if own:
      params = jax.tree.map(lambda x: x[None], params)
    shard_axes = self._shard_axes()
    if shard_axes:
      # Each device of a sharded model reports its share: the worker's metric is their mean
      # (a scalar all-reduce inside the worker, never over the worker axis).
      metrics = wire.mean_over(metrics, shard_axes)
    return params, opt_state, jax.tree.map(lambda m: jnp.asarray(m)[None], metrics)

  @functools.cached_property
  def _compiled(self) -> Callable[..., Any]:
    if self.mode == "shard_map":
      return self._shard_map_step()
    if self.mode == "pmap":
      return jax.pmap(
        functools.partial(self._local, varying=False),
        axis_name=self._pmap_axis(),
        in_axes=(0, 0, 0, None),
        donate_argnums=self._donated,
        devices=jax.local_devices()[: self.num_workers],
      )
    shared = self._nest(functools.partial(self._local, varying=False), (None, 0, 0, None))
    own = self._nest(functools.partial(self._local, varying=False), (0, 0, 0, None))

    def simulated(params, opt_state, batch, key):
      if self._has_worker_axis(params) and self._own_params(params, per_worker=True):
        params, opt_state, metrics = own(
          self._split(params), self._split(opt_state), self._split(batch), key
        )
        return self._merge(params), self._merge(opt_state), self._merge(metrics)
      params, opt_state, metrics = shared(params, self._split(opt_state), self._split(batch), key)
      # Every simulated worker holds the same params: keep one copy.
      params = jax.tree.map(lambda x: self._merge(x)[0], params)
      return params, self._merge(opt_state), self._merge(metrics)

    return jax.jit(simulated, donate_argnums=self._donated)

  def _jit_for(self, params: Any, batch: Any, key: Any) -> Callable[..., Any]:
    """The jitted shard_map step for this params/batch structure (built once, cached)."""
    signature = (jax.tree.structure(params), jax.tree.structure(batch), key is None)
    cache = self.__dict__.setdefault("_jits", {})
    if signature not in cache:
      pspecs = self._param_specs(params)
      own = False
      if self._has_worker_axis(params):
        own = self._own_params(params, per_worker=True)
      if own:  # one worker's params, placed as the parameters' specs say
        params = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(
            x.shape[1:], x.dtype, sharding=NamedSharding(self.mesh, s)
          ),
          params,
          pspecs,
          is_leaf=lambda x: isinstance(x, P),
        )
      sspecs = sharding.init_specs(
        self.tx, params, mesh=self.mesh, axis_name=self.axis_name, param_specs=self.param_specs
      )
      if own:
        pspecs = self._worker_specs(pspecs)
      bspecs = jax.tree.map(lambda _: P(self.axis_name), batch)
      mapped = jax.shard_map(
        functools.partial(self._local_sharded, own=own),
        mesh=self.mesh,
        in_specs=(pspecs, sspecs, bspecs, P()),
        out_specs=(pspecs, sspecs, P(self.axis_name)),
      )
      cache[signature] = jax.jit(mapped, donate_argnums=self._donated)
    return cache[signature]

  def _has_worker_axis(self, params: Any) -> bool:
    """Every leaf's leading axis has the workers' size (a local-SGD layout is possible)."""
    leaves = jax.tree.leaves(params)
    return bool(leaves) and all(np.ndim(x) and np.shape(x)[0] == self.num_workers for x in leaves)

  def _shard_map_step(self) -> Callable[..., Any]:
    def step(params, opt_state, batch, key):
      return self._jit_for(params, batch, key)(params, opt_state, batch, key)

    return step

  def __call__(self, params: Any, opt_state: Any, batch: Any, key: jax.Array | None = None):
    """One step on a global batch.

    Args:
      params: the parameters in this step's layout (from `init` or the last step).
      opt_state: the optimizer state in this step's layout.
      batch: a pytree of arrays whose leading axis is the global batch (placed here if it is
        not already).
      key: a PRNG key; each worker's `loss_fn` receives `fold_in(key, worker index)` (for
        dropout). Omit it for a `loss_fn(params, batch)`.

    Returns:
      (params, opt_state, metrics): metrics hold "loss" (one value per worker: shape (n,)),
      "aux" (with `has_aux`: each leaf with a leading axis of the n workers) and "skipped"
      (the count of skipped steps, when the optimizer is wrapped in `cj.skip_nonfinite`). They
      are not averaged inside the compiled step, which holds no collective but the
      optimizer's: take `metrics["loss"].mean()`.
    """
    self._check_state(opt_state)
    params, opt_state, metrics = self._compiled(params, opt_state, self.shard_batch(batch), key)
    skipped = optax.tree.get(opt_state, "skipped", None)
    if skipped is not None:
      metrics["skipped"] = jnp.asarray(skipped).reshape(-1)[0]
    return params, opt_state, metrics

  def lower(self, params: Any, opt_state: Any, batch: Any, key: jax.Array | None = None):
    """The lowered step (`.compile()`, `.as_text()`; `cj.collective_bytes` reads it)."""
    batch = self.shard_batch(batch)
    if self.mode == "shard_map":
      return self._jit_for(params, batch, key).lower(params, opt_state, batch, key)
    return self._compiled.lower(params, opt_state, batch, key)

  def _check_state(self, opt_state: Any) -> None:
    """Per-worker state from `tx.init` (one worker) would be silently wrong on n workers."""
    for node in jax.tree.leaves(opt_state, is_leaf=is_per_worker):
      if not is_per_worker(node):
        continue
      for leaf in jax.tree.leaves(node.value):
        if np.shape(leaf)[0] != self.num_workers:
          raise ValueError(
            f"the optimizer state holds {node.what} for {np.shape(leaf)[0]} worker(s), but this "
            f"step has {self.num_workers}: create it with step.init(params) (on a mesh, "
            "cj.sharding.init(tx, params, mesh=..., axis_name=...)), not tx.init(params)."
          )


def data_parallel_step(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  *,
  mesh: jax.sharding.Mesh | None = None,
  axis_name: str | tuple[str, ...] = "data",
  mode: Mode | None = None,
  num_workers: int | tuple[int, ...] | None = None,
  has_aux: bool = False,
  param_specs: Any = None,
  donate: bool = True,
) -> DataParallelStep:
  """Builds the data-parallel training step for `tx` and `loss_fn`.

  Args:
    loss_fn: `loss_fn(params, batch)` (or `loss_fn(params, batch, key)` when the step is given
      a key) returning the scalar loss of one worker's share of the batch, or `(loss, aux)`
      with `has_aux`.
    tx: the optimizer, built with the same worker axes (e.g. `cj.comp_ams(...,
      axis_name="data")`; on a hierarchical mesh `axis_name="dcn", dense_axis_name="ici"`).
    mesh: the device mesh for `jax.shard_map` (the default mode when given).
    axis_name: the mesh axis (or tuple of axes) along which workers differ: ("dcn", "ici") on a
      hierarchical mesh. Other mesh axes (e.g. "model") are left to `param_specs`.
    mode: "shard_map" (default with a mesh), "pmap" (one worker per local device) or "vmap"
      (all workers simulated on one device; `jax.vmap(..., axis_name=...)`).
    num_workers: the number of workers (pmap: default all local devices; vmap: required, one
      size per axis when `axis_name` is a tuple).
    has_aux: `loss_fn` returns `(loss, aux)` (aux: numeric arrays, reported averaged over the
      workers, e.g. accuracy).
    param_specs: PartitionSpecs of the parameters over non-worker mesh axes, or None
      (replicated).
    donate: donate the params and state passed to each step (their buffers are reused: keep
      no reference to them), the default; False keeps them valid.

  Returns:
    A `DataParallelStep`: `params, opt_state = step.init(params)`, then
    `params, opt_state, metrics = step(params, opt_state, batch)`.

  Examples:
    >>> import jax, jax.numpy as jnp, compams_jax as cj
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> tx = cj.comp_ams(1e-2, cj.compressors.top_k(0.5), axis_name="data")
    >>> loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> step = cj.data_parallel_step(loss, tx, mesh=mesh, axis_name="data")
    >>> params, opt_state = step.init({"w": jnp.zeros(3)})
    >>> batch = {"x": jnp.ones((8 * jax.device_count(), 3)), "y": jnp.ones(8 * jax.device_count())}
    >>> params, opt_state, metrics = step(params, opt_state, batch)
    >>> float(metrics["loss"].mean())
    1.0
  """
  names = _names(axis_name)
  if not names:
    raise ValueError("data_parallel_step needs the worker axis_name (e.g. 'data').")
  if mode is None:
    mode = "shard_map" if mesh is not None else "pmap"
  if mode not in ("shard_map", "pmap", "vmap"):
    raise ValueError(f"mode must be 'shard_map', 'pmap' or 'vmap', got {mode!r}.")
  if mode == "shard_map":
    if mesh is None:
      raise ValueError("mode='shard_map' needs a mesh (jax.make_mesh(...)).")
    missing = [a for a in names if a not in mesh.shape]
    if missing:
      raise ValueError(f"axis_name {missing} not in the mesh's axes {tuple(mesh.shape)}.")
    sizes = tuple(mesh.shape[a] for a in names)
    if num_workers is not None and num_workers not in (math.prod(sizes), sizes):
      raise ValueError(f"num_workers={num_workers}, but the mesh has {sizes} workers on {names}.")
  elif mode == "pmap":
    n = jax.local_device_count() if num_workers is None else num_workers
    if len(names) != 1 or not isinstance(n, int):
      raise ValueError("mode='pmap' takes one worker axis and an int num_workers.")
    if n > jax.local_device_count():
      raise ValueError(
        f"pmap over {n} workers needs {n} local devices; jax sees {jax.local_device_count()}."
      )
    sizes = (n,)
  else:
    if num_workers is None:
      raise ValueError("mode='vmap' needs num_workers (the number of simulated workers).")
    sizes = (num_workers,) if isinstance(num_workers, int) else tuple(num_workers)
    if len(sizes) != len(names):
      raise ValueError(f"num_workers={num_workers} needs one size per axis of {names}.")
  if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
    raise ValueError(f"num_workers must be positive ints, got {num_workers!r}.")
  return DataParallelStep(
    loss_fn=loss_fn,
    tx=tx,
    mode=mode,
    mesh=mesh,
    axis_name=names,
    axis_sizes=sizes,
    has_aux=has_aux,
    param_specs=param_specs,
    donate=donate,
  )
