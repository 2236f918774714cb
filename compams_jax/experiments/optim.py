"""The experiments' optimizers: one registry from an `optimizer` config section to the library's
factories, and the phases whose bytes a multi-phase optimizer sends.

Every optimizer hyperparameter defaults to its library factory's own default: a config field
left None (see `config.optimizer_section`) is not passed, and where the experiments need a
default value they read it from the factory's signature.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax

import compams_jax as cj
from compams_jax.experiments import config as config_lib

PRESETS = config_lib.PRESETS  # The named optimizer sections (defined with the configs).
PREDICTORS = ("none", "fixed", "least_squares")
WIRES = {"gather": cj.wire.gather, "two_phase": cj.wire.two_phase}


def _predictor(kind: str, section: Mapping[str, Any]):
  if kind not in PREDICTORS:
    raise ValueError(f"unknown predictor {kind!r}; valid: {', '.join(PREDICTORS)}.")
  if kind == "fixed":  # ρ: the section's rho, else its momentum β, else momentum SGD's default β
    rho = section.get("rho")
    rho = section.get("momentum") if rho is None else rho
    rho = _factory_default(cj.compressed_momentum_sgd, "momentum") if rho is None else rho
    return cj.predictors.fixed(float(rho))
  if kind == "least_squares":
    return cj.predictors.least_squares()
  return None


def _wire(name: str, section: Mapping[str, Any]):
  if name not in WIRES:
    raise ValueError(f"unknown wire {name!r}; valid: {', '.join(WIRES)}.")
  return WIRES[name]()


# How a field's config value becomes its argument's value; other fields pass unchanged.
_CONVERT: dict[str, Callable[[Any, Mapping[str, Any]], Any]] = {
  "predictor": _predictor,
  "wire": _wire,
  "error_feedback": lambda on, section: "ef" if on else "none",  # to the factories' feedback=
}


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """How an `optimizer` section builds one library optimizer.

  Attributes:
    factory: called as `factory(learning_rate, compressor, axis_name=..., **arguments)`, with
      `dense_axis_name=` where it takes one.
    arguments: config field -> the factory's keyword. A field that is None is not passed (the
      factory's default applies); `_CONVERT` turns names into objects (wire, predictor).
    compressor: the compressor's registry name when the optimizer fixes it (full-precision
      AMSGrad: "identity"); None: the section's `compressor` and `compressor_kwargs`.
    derived: arguments computed from several fields (COMP-AMS's annealed `compressor_stages`).
    phases: for an optimizer whose steps send different bytes (a warm-up, stages), the phases
      before its steady one: `phases(optimizer, section, place)` -> ([(steps, transform of that
      phase)], transform of the steady phase), each transform sending exactly what its phase
      sends per step (see `phases`).
  """

  factory: Callable[..., optax.GradientTransformation]
  arguments: Mapping[str, str]
  compressor: str | None = None
  derived: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
  phases: Callable[..., tuple[list[tuple[int, Any]], Any]] | None = None


def _factory_default(factory: Callable[..., Any], argument: str) -> Any:
  return inspect.signature(factory).parameters[argument].default


def _value(optimizer: Optimizer, section: Mapping[str, Any], field: str) -> Any:
  """The field's value for this optimizer: the section's, else the factory's default."""
  value = section.get(field)
  if value is None:
    value = _factory_default(optimizer.factory, optimizer.arguments[field])
  return value


def _annealed_stages(section: Mapping[str, Any]) -> list[tuple[int, Any]]:
  """`anneal_from` r0 and `anneal_steps` N: the ratio falls geometrically from r0 to the
  compressor's ratio in `anneal_stages` equal stages over the first N steps."""
  section = _section(section)
  r0, steps = section["anneal_from"], int(section["anneal_steps"] or 0)
  if not r0 or steps <= 0:
    return []
  kwargs = dict(section["compressor_kwargs"] or {})
  if "ratio" not in kwargs:
    raise ValueError("optimizer.anneal_from needs a compressor with a ratio (top_k, random_k).")
  stages = max(1, min(int(section["anneal_stages"]), steps))
  r1, name = float(kwargs["ratio"]), section["compressor"] or "identity"
  bounds = [round(steps * (i + 1) / stages) for i in range(stages)]
  lengths = [b - a for a, b in zip([0, *bounds], bounds)]
  return [
    (
      n,
      cj.compressors.get(name, **{**kwargs, "ratio": float(r0) * (r1 / float(r0)) ** (i / stages)}),
    )
    for i, n in enumerate(lengths)
  ]


def _dense_mean(place: Mapping[str, Any]) -> optax.GradientTransformation:
  """What a dense warm-up step sends: the full-precision average of the gradients."""
  return cj.compressed_mean(cj.compressors.identity(), **place)


def _comp_ams_phases(optimizer: Optimizer, section, place):
  """The dense warm-up (`dense_warmup_steps`), then the annealed stages, then the rest."""
  warmup, stages = int(_value(optimizer, section, "dense_warmup_steps")), _annealed_stages(section)
  plain = {**section, "dense_warmup_steps": 0, "anneal_from": 0.0, "anneal_steps": 0}
  steady = _build(optimizer, plain, place)
  if not warmup and not stages:
    return [], steady
  before = [(warmup, _dense_mean(place))] if warmup else []
  before += [(n, _build(optimizer, plain, place, compressor=c)) for n, c in stages]
  return before, steady


def _onebit_adam_phases(optimizer: Optimizer, section, place):
  """Adam on the dense average of the gradients for `warmup_steps`, then the momentum averaged
  compressed with error feedback (`cj.scale_by_onebit_adam`)."""
  options = {k: v for k, v in _arguments(optimizer, section).items() if k in ("wire", "seed")}
  compressed = cj.error_feedback(_compressor(optimizer, section), **place, **options)
  return [(int(_value(optimizer, section, "warmup_steps")), _dense_mean(place))], compressed


_ADAMW = inspect.signature(optax.adamw).parameters
_DILOCO = inspect.signature(cj.diloco).parameters


def diloco_adamw(
  learning_rate: float,
  compressor: Any = None,
  *,
  axis_name: str | None,
  dense_axis_name: str | None = None,
  sync_every: int = 30,
  outer_lr: float = 0.7,
  outer_momentum: float = 0.9,
  b1: float = _ADAMW["b1"].default,
  b2: float = _ADAMW["b2"].default,
  eps: float = _ADAMW["eps"].default,
  weight_decay: float = _ADAMW["weight_decay"].default,
  feedback: str = _DILOCO["feedback"].default,
  feedback_decay: float = _DILOCO["feedback_decay"].default,
  wire: Any = _DILOCO["wire"].default,
  seed: int = _DILOCO["seed"].default,
  predictor: Any = _DILOCO["predictor"].default,
  stacked: Any = None,
) -> optax.GradientTransformation:
  """`cj.diloco` with an AdamW inner optimizer and a Nesterov SGD outer one, from flat
  hyperparameters (an `optimizer` config section's fields).

  Args:
    learning_rate: the inner AdamW's learning rate.
    compressor: compresses the pseudo-gradient at a sync; None or `identity()` sends it dense
      (DiLoCo); a lossy one with error feedback is SparseLoCo.
    axis_name: the worker axis.
    dense_axis_name: a fast axis averaged densely every inner step (hierarchical meshes).
    sync_every: H, inner steps between synchronizations.
    outer_lr: the outer SGD's learning rate.
    outer_momentum: its Nesterov momentum; 0 is plain SGD. With `outer_lr` at its default,
      0.7 and 0.9 are `cj.diloco`'s default outer optimizer (DiLoCo's).
    b1, b2, eps, weight_decay: the inner `optax.adamw`'s (defaults: optax's).
    feedback, feedback_decay, wire, seed, predictor, stacked: `cj.diloco`'s (defaults: its
      own); `predictor` codes each pseudo-gradient against its prediction across syncs.

  Returns:
    The `optax.GradientTransformation` (a `cj.diloco`; its state holds θ).
  """
  inner = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  momentum = float(outer_momentum)
  outer = optax.sgd(outer_lr, momentum=momentum or None, nesterov=bool(momentum))
  dense = compressor is None or compressor == cj.compressors.identity()
  return cj.diloco(
    inner,
    sync_every=sync_every,
    outer=outer,
    compressor=None if dense else compressor,
    feedback=feedback,
    feedback_decay=feedback_decay,
    axis_name=axis_name,
    dense_axis_name=dense_axis_name,
    wire=wire,
    seed=seed,
    predictor=predictor,
    stacked=stacked,
  )


def dense_adamw(
  learning_rate: float,
  compressor: Any = None,
  *,
  axis_name: str | None,
  b1: float = _ADAMW["b1"].default,
  b2: float = _ADAMW["b2"].default,
  eps: float = _ADAMW["eps"].default,
  weight_decay: float = _ADAMW["weight_decay"].default,
) -> optax.GradientTransformation:
  """Data-parallel AdamW: the dense f32 mean of the workers' gradients (one all-reduce), then
  `optax.adamw` on it, the same on every worker.

  Args:
    learning_rate: AdamW's learning rate.
    compressor: must be None or `identity()` (the gradient is sent dense).
    axis_name: the worker axis.
    b1, b2, eps, weight_decay: `optax.adamw`'s (defaults: optax's).

  Returns:
    The `optax.GradientTransformation`.
  """
  if compressor is not None and compressor != cj.compressors.identity():
    raise ValueError(f"adamw sends the dense gradient; got compressor {compressor!r}.")
  return optax.chain(
    cj.compressed_mean(cj.compressors.identity(), axis_name=axis_name),
    optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
  )


_DEMO = inspect.signature(cj.demo).parameters


def demo(
  learning_rate: float,
  compressor: Any,
  *,
  axis_name: str | None,
  compression_decay: float = _DEMO["compression_decay"].default,
  weight_decay: float = _DEMO["weight_decay"].default,
) -> optax.GradientTransformation:
  """`cj.demo` with its momentum's compressor given (the section's `compressor`): DeMo's
  `dct_top_k(k=compression_topk, chunk=compression_chunk)` for the `demo` preset.

  Args:
    learning_rate: η.
    compressor: the compressor of each worker's decoupled momentum.
    axis_name: the worker axis.
    compression_decay: β, the momentum's decay (default: `cj.demo`'s).
    weight_decay: λ, decoupled weight decay (default: `cj.demo`'s).

  Returns:
    The `optax.GradientTransformation` (DeMo's default wire: the mean over the senders).
  """
  return cj.demo(
    learning_rate,
    compression_decay=compression_decay,
    weight_decay=weight_decay,
    axis_name=axis_name,
    compressor=compressor,
  )


_ADAM = {"b1": "b1", "b2": "b2"}
REGISTRY: dict[str, Optimizer] = {
  # Full precision: the identity compressor's payload is the dense gradient (one psum).
  "amsgrad": Optimizer(cj.comp_ams, {**_ADAM, "eps": "eps_root"}, compressor="identity"),
  "comp_ams": Optimizer(
    cj.comp_ams,
    {
      **_ADAM,
      "eps": "eps_root",
      "seed": "seed",
      "predictor": "predictor",
      "feedback": "feedback",
      "dense_warmup_steps": "dense_warmup_steps",
      "wire": "wire",
    },
    derived=lambda section: {"compressor_stages": _annealed_stages(section)},
    phases=_comp_ams_phases,
  ),
  "onebit_adam": Optimizer(
    cj.onebit_adam,
    {**_ADAM, "eps": "eps", "seed": "seed", "warmup_steps": "warmup_steps", "wire": "wire"},
    phases=_onebit_adam_phases,
  ),
  "qadam": Optimizer(
    cj.qadam, {**_ADAM, "eps": "eps", "seed": "seed", "feedback": "feedback", "wire": "wire"}
  ),
  "momentum_sgd": Optimizer(
    cj.compressed_momentum_sgd,
    {
      "momentum": "momentum",
      "seed": "seed",
      "predictor": "predictive",
      "error_feedback": "feedback",
      "wire": "wire",
    },
  ),
  # Local SGD: H AdamW steps per worker on its own parameters, then an outer step on the
  # averaged pseudo-gradient (dense: DiLoCo; compressed with error feedback: SparseLoCo).
  "diloco": Optimizer(
    diloco_adamw,
    {
      **_ADAM,
      "eps": "eps",
      "weight_decay": "weight_decay",
      "sync_every": "sync_every",
      "outer_lr": "outer_lr",
      "outer_momentum": "outer_momentum",
      "feedback": "feedback",
      "feedback_decay": "feedback_decay",
      "seed": "seed",
      "wire": "wire",
      "predictor": "predictor",
    },
  ),
  # Data-parallel AdamW: the dense mean of the gradients, then optax.adamw.
  "adamw": Optimizer(
    dense_adamw,
    {**_ADAM, "eps": "eps", "weight_decay": "weight_decay"},
    compressor="identity",
  ),
  # DeMo: every step, each worker's decoupled momentum compressed (DCT top-k), averaged over
  # the senders, sign descent.
  "demo": Optimizer(
    demo, {"compression_decay": "compression_decay", "weight_decay": "weight_decay"}
  ),
}
OPTIMIZERS = tuple(REGISTRY)


def _section(opt: Mapping[str, Any]) -> dict[str, Any]:
  """`opt` over the defaults of `config.optimizer_section` (a bare dict may name few fields)."""
  return {**config_lib.optimizer_section().to_dict(), **dict(opt)}


def _compressor(optimizer: Optimizer, section: Mapping[str, Any]):
  if optimizer.compressor is not None:
    return cj.compressors.get(optimizer.compressor)
  return cj.compressors.get(
    section["compressor"] or "identity", **dict(section["compressor_kwargs"] or {})
  )


def _arguments(optimizer: Optimizer, section: Mapping[str, Any]) -> dict[str, Any]:
  """The factory's keyword arguments from the section's fields (None fields left out)."""
  out = {
    argument: _CONVERT.get(field, lambda value, _: value)(section[field], section)
    for field, argument in optimizer.arguments.items()
    if section.get(field) is not None
  }
  if optimizer.derived is not None:
    out.update({k: v for k, v in optimizer.derived(section).items() if v})
  return out


def _place(name: str, optimizer: Optimizer, axis_name, dense_axis_name) -> dict[str, Any]:
  """The mesh axes the factory is built on."""
  place = {"axis_name": axis_name}
  if "dense_axis_name" in inspect.signature(optimizer.factory).parameters:
    place["dense_axis_name"] = dense_axis_name
  elif dense_axis_name is not None:
    raise ValueError(f"{name} does not support a hierarchical mesh (mesh.dense_axis).")
  return place


def _build(
  optimizer: Optimizer, section, place, *, compressor=None
) -> optax.GradientTransformation:
  compressor = _compressor(optimizer, section) if compressor is None else compressor
  return optimizer.factory(
    float(section["learning_rate"]),
    compressor,
    **place,
    **_arguments(optimizer, section),
  )


def _lookup(opt: Mapping[str, Any], axis_name, dense_axis_name, stacked=None):
  section = _section(opt)
  name = section["name"]
  if name not in REGISTRY:
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.")
  optimizer = REGISTRY[name]
  place = _place(name, optimizer, axis_name, dense_axis_name)
  if stacked is not None:
    if "stacked" not in inspect.signature(optimizer.factory).parameters:
      raise ValueError(f"{name} does not compress stacked layers per layer (stacked=).")
    place["stacked"] = stacked
  return optimizer, section, place


def sync_every(opt: Mapping[str, Any]) -> int | None:
  """H, the steps between a local-SGD optimizer's synchronizations (the section's
  `sync_every`, else its factory's default); None for an optimizer without one."""
  section = _section(opt)
  optimizer = REGISTRY.get(section["name"])
  if optimizer is None or "sync_every" not in optimizer.arguments:
    return None
  return int(_value(optimizer, section, "sync_every"))


def build_optimizer(
  opt: Mapping[str, Any],
  *,
  axis_name: str | None,
  dense_axis_name: str | None = None,
  stacked: Any = None,
) -> optax.GradientTransformation:
  """Builds the optimizer that an `optimizer` config section describes (see `REGISTRY`).

  Args:
    opt: a mapping with `name` ("amsgrad", "comp_ams", "momentum_sgd", "onebit_adam", "qadam",
      "diloco" or "demo"), `learning_rate`, `compressor` and `compressor_kwargs` (see
      `cj.compressors.get`), and the optimizer's own fields (`b1`, `b2`, `eps`, `momentum`,
      `feedback`, `error_feedback`, `predictor`, `seed`, `warmup_steps`, `wire`,
      `sync_every`, `outer_lr`, ...); fields missing or None take the library factory's
      default.
    axis_name: the data-parallel axis.
    dense_axis_name: a fast axis averaged densely before compression (hierarchical meshes).
    stacked: which parameter leaves stack layers along axis 0, compressed per layer (see
      `cj.error_feedback`); None: none.

  Returns:
    The `optax.GradientTransformation`.

  Examples:
    >>> from compams_jax.experiments.optim import build_optimizer
    >>> tx = build_optimizer(dict(name="comp_ams", learning_rate=1e-3, compressor="top_k",
    ...                           compressor_kwargs={"ratio": 0.01}), axis_name=None)
  """
  optimizer, section, place = _lookup(opt, axis_name, dense_axis_name, stacked)
  return _build(optimizer, section, place)


def phases(
  opt: Mapping[str, Any], *, axis_name: str | None, dense_axis_name: str | None = None
) -> tuple[list[tuple[int, optax.GradientTransformation]], optax.GradientTransformation]:
  """What the optimizer sends, phase by phase, as transforms to measure with `cj.wire_bytes`.

  The compiled step of a 1-bit Adam, a dense-warm-up or an annealed COMP-AMS holds every phase
  (a `lax.cond` / `lax.switch`), so `cj.wire_bytes` of the optimizer counts them all; a worker
  really sends the dense gradient during a warm-up, each stage's payload during its steps and
  the steady payload afterwards. Here each phase is a transform of its own that sends exactly
  that phase's payload.

  Returns:
    ([(steps, transform)] of the phases before the steady one (empty for an optimizer that
    sends the same every step), the steady phase's transform).
  """
  optimizer, section, place = _lookup(opt, axis_name, dense_axis_name)
  if optimizer.phases is None:
    return [], _build(optimizer, section, place)
  return optimizer.phases(optimizer, section, place)


def bytes_sent_by_step(before: Sequence[tuple[int, int]], steady: int) -> Callable[[int], int]:
  """`sent(step)`: the bytes one worker has sent after `step` steps, for phases of (steps, bytes
  per step) followed by a steady phase of `steady` bytes per step."""

  def sent(step: int) -> int:
    total, left = 0, step
    for n, per_step in before:
      total += min(left, n) * per_step
      left -= min(left, n)
    return total + left * steady

  return sent
