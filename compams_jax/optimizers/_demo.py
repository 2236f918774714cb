"""DeMo (Peng et al., 2024): decoupled momentum, sign descent, decoupled weight decay."""

from __future__ import annotations

import optax

from compams_jax import compressors
from compams_jax.compressors import Compressor
from compams_jax.transforms import decoupled_momentum
from compams_jax.wire import Wire, check_wire, gather


def _dct_top_k(k: int, chunk: int) -> Compressor:
  """DeMo's compressor, `cj.compressors.dct_top_k(k, chunk=chunk)`, where this build has it."""
  factory = getattr(compressors, "dct_top_k", None)
  if factory is None:
    raise NotImplementedError(
      "cj.demo's default compressor, cj.compressors.dct_top_k (DeMo's DCT-domain top-k), is "
      "not in this build of compams_jax; pass compressor= (e.g. cj.compressors.top_k(0.01))."
    )
  return factory(k=k, chunk=chunk)


def demo(
  learning_rate: optax.ScalarOrSchedule,
  *,
  compression_decay: float = 0.999,
  compression_topk: int = 32,
  compression_chunk: int = 64,
  weight_decay: float = 0.0,
  axis_name: str | None = None,
  compressor: Compressor | None = None,
  wire: Wire | None = None,
) -> optax.GradientTransformation:
  """DeMo, decoupled momentum optimization, as the authors' demo.py runs it.

  Per worker i and step t, with η = learning_rate(t) and λ = weight_decay (δ₀ = 0)::

      θ ← θ·(1 − η·λ)                                  # decoupled weight decay
      δ ← β·δ + η·g;   send C(δ);   δ ← δ − decode(C(δ))   # per-worker momentum, sent part out
      q = per entry (per DCT coefficient), the mean over the workers that sent it
      θ ← θ − η·sign(q)                                # identical on every worker

  It is `optax.chain(optax.scale_by_learning_rate(learning_rate, flip_sign=False),
  cj.transforms.decoupled_momentum(compressor, decay=compression_decay, wire=wire),
  optax.scale_by_sign(), optax.add_decayed_weights(weight_decay),
  optax.scale_by_learning_rate(learning_rate))`: the update −η·(sign(q) + λ·θ) is the
  weight decay θ·(1 − η·λ) and the sign step −η·sign(q) of demo.py. The learning rate enters
  twice, as in demo.py: δ accumulates η·g, and the sign step is scaled by η. A schedule is
  evaluated at the step count in both places (both elements count the same steps), so the
  momentum holds Σ_s β^(t−s)·η(s)·g_s, the gradients scaled by the rate of their own step.
  Wrapped in `optax.inject_hyperparams`, the compression settings must be `static_args`
  (they build the compressor).

  Args:
    learning_rate: η, a float or an optax schedule.
    compression_decay: β, the decay of each worker's momentum, in [0, 1] (demo.py refuses 1).
    compression_topk: k, the DCT coefficients sent per chunk (default compressor only).
    compression_chunk: the target chunk side: along each dimension, the chunk is that
      dimension's largest divisor ≤ compression_chunk (default compressor only).
    weight_decay: λ, decoupled weight decay (applied as θ·(1 − η·λ)).
    axis_name: the mapped axis indexing workers, or None for one worker.
    compressor: the momentum's compressor. None (default): DeMo's DCT-domain top-k,
      `cj.compressors.dct_top_k(k=compression_topk, chunk=compression_chunk)` (an orthonormal
      DCT-II over chunks, the top k coefficients per chunk). Given, the two compression
      settings above are not used.
    wire: the wire strategy. None (default): DeMo's `cj.wire.gather(average="senders")`, the
      per-entry (per-coefficient) mean over the workers that sent it. `cj.wire.gather(
      average="senders", clip="median")` also clips every worker's message to the median norm.

  Returns:
    An `optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax, compams_jax as cj
    >>> tx = cj.demo(0.1, weight_decay=0.5, compressor=cj.compressors.top_k(0.5))
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.1, -0.4, 0.3, 0.2])}, state, params)
    >>> optax.apply_updates(params, updates)["w"]   # w·(1 − 0.05) − 0.1·sign(q)
    Array([0.95, 2.  , 2.75, 3.8 ], dtype=float32)

  References:
    Peng et al., "DeMo: Decoupled Momentum Optimization", arXiv:2411.19870, 2024;
    github.com/bloc97/DeMo (demo.py).
  """
  if compressor is None:
    compressor = _dct_top_k(compression_topk, compression_chunk)
  wire = gather(average="senders") if wire is None else check_wire(wire)
  return optax.chain(
    # δ accumulates η·g (demo.py: delta.add_(grad, alpha=lr)).
    optax.scale_by_learning_rate(learning_rate, flip_sign=False),
    decoupled_momentum(compressor, decay=compression_decay, axis_name=axis_name, wire=wire),
    optax.scale_by_sign(),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
