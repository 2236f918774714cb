"""Optimizers of the experiments, built from a config section."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optax

import compams_jax as cj

OPTIMIZERS = ("amsgrad", "comp_ams", "momentum_sgd", "onebit_adam", "qadam")
PREDICTORS = ("none", "fixed", "least_squares")

# Named optimizer presets: overrides of the `optimizer` config section. A config lists the ones
# it runs side by side in `variants`.
PRESETS: dict[str, dict[str, Any]] = {
  "amsgrad": dict(name="amsgrad", compressor="identity", compressor_kwargs={}),
  "comp_ams_top_k": dict(name="comp_ams", compressor="top_k", compressor_kwargs={"ratio": 0.01}),
  "comp_ams_block_sign": dict(name="comp_ams", compressor="block_sign", compressor_kwargs={}),
  "comp_ams_block_sign_256": dict(
    name="comp_ams", compressor="block_sign", compressor_kwargs={"block_size": 256}
  ),
  "comp_ams_top_k_bf16": dict(
    name="comp_ams",
    compressor="top_k",
    compressor_kwargs={"ratio": 0.01, "value_dtype": "bfloat16"},
  ),
  # The top-k ratio annealed from 10% to 1% (set optimizer.anneal_steps, e.g. one epoch).
  "comp_ams_top_k_annealed": dict(
    name="comp_ams", compressor="top_k", compressor_kwargs={"ratio": 0.01}, anneal_from=0.1
  ),
  "comp_ams_random_k": dict(
    name="comp_ams", compressor="random_k", compressor_kwargs={"ratio": 0.01}
  ),
  "comp_ams_qsgd": dict(name="comp_ams", compressor="qsgd", compressor_kwargs={"levels": 4}),
  "onebit_adam": dict(name="onebit_adam", compressor="scaled_sign", compressor_kwargs={}),
  # DeepSpeed's 1-bit Adam compressor: one scale per tensor, ‖x‖₂/√d.
  "onebit_adam_l2": dict(
    name="onebit_adam", compressor="block_sign", compressor_kwargs={"norm": "l2"}
  ),
  "qadam": dict(name="qadam", compressor="qsgd", compressor_kwargs={"levels": 127}),
  # QSGD as Alistarh et al. run it: one norm per bucket of 512 entries.
  "qadam_bucketed": dict(
    name="qadam", compressor="qsgd", compressor_kwargs={"levels": 127, "bucket_size": 512}
  ),
  "momentum_sgd": dict(
    name="momentum_sgd", compressor="identity", compressor_kwargs={}, predictor="none"
  ),
  "momentum_sgd_top_k": dict(
    name="momentum_sgd", compressor="top_k", compressor_kwargs={"ratio": 0.01}, predictor="none"
  ),
  # Least-squares ρ: with error feedback, a fixed ρ = β re-injects the residual with weight
  # (1 + β) and trains worse (see cj.predictive_compression); the fitted ρ does not.
  "momentum_sgd_top_k_predictive": dict(
    name="momentum_sgd",
    compressor="top_k",
    compressor_kwargs={"ratio": 0.01},
    predictor="least_squares",
  ),
  "momentum_sgd_top_k_predictive_fixed": dict(
    name="momentum_sgd", compressor="top_k", compressor_kwargs={"ratio": 0.01}, predictor="fixed"
  ),
}


def _predictor(opt: Mapping[str, Any]):
  kind = opt.get("predictor", "none")
  if kind not in PREDICTORS:
    raise ValueError(f"unknown predictor {kind!r}; valid: {', '.join(PREDICTORS)}.")
  if kind == "fixed":
    return cj.predictors.fixed(float(opt.get("rho", opt.get("momentum", 0.9))))
  if kind == "least_squares":
    return cj.predictors.least_squares()
  return None


def build_optimizer(
  opt: Mapping[str, Any], *, axis_name: str | None, dense_axis_name: str | None = None
) -> optax.GradientTransformation:
  """Builds the optimizer that an `optimizer` config section describes.

  Args:
    opt: a mapping with `name` ("amsgrad", "comp_ams", "momentum_sgd", "onebit_adam" or
      "qadam"), `learning_rate`,
      `compressor` and `compressor_kwargs` (see `cj.compressors.get`), and the optimizer's own
      fields (`b1`, `b2`, `eps`, `momentum`, `error_feedback`, `predictor`, `seed`,
      `warmup_steps`).
    axis_name: the data-parallel axis.
    dense_axis_name: a fast axis averaged densely before compression (hierarchical meshes).

  Returns:
    The `optax.GradientTransformation`.

  Examples:
    >>> from compams_jax.experiments.optim import build_optimizer
    >>> tx = build_optimizer(dict(name="comp_ams", learning_rate=1e-3, compressor="top_k",
    ...                           compressor_kwargs={"ratio": 0.01}), axis_name=None)
  """
  name = opt.get("name")
  wire_name = opt.get("wire", "gather")
  wires = {"gather": cj.wire.gather, "two_phase": cj.wire.two_phase}
  if wire_name not in wires:
    raise ValueError(f"unknown wire {wire_name!r}; valid: {', '.join(wires)}.")
  where = dict(axis_name=axis_name, dense_axis_name=dense_axis_name, wire=wires[wire_name]())
  if dense_axis_name is not None and name in ("onebit_adam", "qadam"):
    raise ValueError(f"{name} does not support a hierarchical mesh (mesh.dense_axis).")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.")
  lr = float(opt["learning_rate"])
  seed = int(opt.get("seed", 0))
  if name == "amsgrad":
    # Full precision: the identity compressor's payload is the dense gradient (one psum).
    return cj.comp_ams(
      lr,
      cj.compressors.identity(),
      axis_name=axis_name,
      dense_axis_name=dense_axis_name,
      b1=opt.get("b1", 0.9),
      b2=opt.get("b2", 0.999),
      eps_root=opt.get("eps", 1e-8),
    )
  compressor = cj.compressors.get(
    opt.get("compressor", "identity"), **dict(opt.get("compressor_kwargs", {}) or {})
  )
  if name == "onebit_adam":
    return cj.onebit_adam(
      lr,
      compressor,
      warmup_steps=int(opt.get("warmup_steps", 100)),
      b1=opt.get("b1", 0.9),
      b2=opt.get("b2", 0.999),
      eps=opt.get("eps", 1e-8),
      axis_name=axis_name,
      seed=seed,
    )
  if name == "qadam":
    return cj.qadam(
      lr,
      compressor,
      b1=opt.get("b1", 0.9),
      b2=opt.get("b2", 0.999),
      eps=opt.get("eps", 1e-8),
      axis_name=axis_name,
      seed=seed,
    )
  if name == "comp_ams":
    return cj.comp_ams(
      lr,
      compressor,
      **where,
      b1=opt.get("b1", 0.9),
      b2=opt.get("b2", 0.999),
      eps_root=opt.get("eps", 1e-8),
      seed=seed,
      predictor=_predictor(opt),
      feedback=str(opt.get("feedback", "ef")),
      dense_warmup_steps=int(opt.get("dense_warmup_steps", 0)),
      compressor_stages=_annealed_stages(opt),
    )
  predictor = _predictor(opt)
  return cj.compressed_momentum_sgd(
    lr,
    compressor,
    momentum=float(opt.get("momentum", 0.9)),
    predictive=predictor if predictor is not None else False,
    feedback="ef" if bool(opt.get("error_feedback", True)) else "none",
    **where,
    seed=seed,
  )


def _annealed_stages(opt: Mapping[str, Any]) -> list[tuple[int, Any]]:
  """`anneal_from` r0 and `anneal_steps` N: the ratio falls geometrically from r0 to the
  compressor's ratio in `anneal_stages` (default 4) equal stages over the first N steps."""
  r0, steps = opt.get("anneal_from"), int(opt.get("anneal_steps", 0) or 0)
  if not r0 or steps <= 0:
    return []
  kwargs = dict(opt.get("compressor_kwargs", {}) or {})
  if "ratio" not in kwargs:
    raise ValueError("optimizer.anneal_from needs a compressor with a ratio (top_k, random_k).")
  stages = max(1, min(int(opt.get("anneal_stages", 4)), steps))
  r1, name = float(kwargs["ratio"]), opt.get("compressor", "identity")
  bounds = [round(steps * (i + 1) / stages) for i in range(stages)]
  lengths = [b - a for a, b in zip([0, *bounds], bounds)]
  return [
    (
      n,
      cj.compressors.get(name, **{**kwargs, "ratio": float(r0) * (r1 / float(r0)) ** (i / stages)}),
    )
    for i, n in enumerate(lengths)
  ]


def bytes_sent_by_step(
  opt: Mapping[str, Any],
  params: Any,
  hlo_bytes: int,
  *,
  measure: Callable[[Mapping[str, Any]], int] | None = None,
):
  """Bytes one worker has sent after `step` steps, as a function of the step.

  Constant-per-step optimizers send `hlo_bytes` (measured from the compiled step) every step.
  1-bit Adam's, a dense-warm-up COMP-AMS's and an annealed COMP-AMS's compiled steps hold
  every phase (a `lax.cond` / `lax.switch`), so their HLO counts all; they really send the
  dense gradient during a warm-up, each stage's payload during its steps and the compressed
  payload afterwards. Each phase is measured on its own: `measure(section)` gives the bytes
  per step of the optimizer an `optimizer` section describes, on the run's layout (wire,
  hierarchical mesh); by default the compressor's payload over `params` (the gather wire).

  Returns:
    (sent_after(step), bytes per step of the steady phase).
  """
  if measure is None:

    def measure(section):
      name = "identity" if section.get("name") == "amsgrad" else section.get("compressor")
      kwargs = {} if name == "identity" else dict(section.get("compressor_kwargs", {}) or {})
      return cj.wire_bytes(cj.compressors.get(name or "identity", **kwargs), params)

  phases: list[tuple[int, int]] = []  # (steps, bytes per step) before the steady phase
  plain = {**opt, "dense_warmup_steps": 0, "anneal_from": 0.0, "anneal_steps": 0}
  if opt.get("name") == "onebit_adam":
    # Its compressed phase sends the compressor's payload over the whole model (gather).
    dense = cj.wire_bytes(cj.compressors.identity(), params)
    phases.append((int(opt.get("warmup_steps", 100)), dense))
    steady = cj.wire_bytes(
      cj.compressors.get(
        opt.get("compressor", "scaled_sign"), **dict(opt.get("compressor_kwargs", {}) or {})
      ),
      params,
    )
  elif opt.get("name") == "comp_ams" and (
    int(opt.get("dense_warmup_steps", 0) or 0) > 0 or _annealed_stages(opt)
  ):
    if int(opt.get("dense_warmup_steps", 0) or 0) > 0:
      phases.append((int(opt["dense_warmup_steps"]), measure({**plain, "name": "amsgrad"})))
    for n, c in _annealed_stages(opt):
      kwargs = {**dict(opt.get("compressor_kwargs", {}) or {}), "ratio": c.ratio}
      phases.append((n, measure({**plain, "compressor_kwargs": kwargs})))
    steady = measure(plain)
  else:
    return lambda step: step * hlo_bytes, hlo_bytes

  def sent(step: int) -> int:
    total, left = 0, step
    for n, per_step in phases:
      total += min(left, n) * per_step
      left -= min(left, n)
    return total + left * steady

  return sent, steady
