"""DeMo's momentum exchange: each worker keeps a decaying momentum and sends its compressed part."""

from __future__ import annotations

from typing import Any

import optax

from compams_jax._src.base import Compressor
from compams_jax.transforms._error_feedback import error_feedback
from compams_jax.wire import Wire


def decoupled_momentum(
  compressor: Compressor,
  *,
  decay: float = 0.999,
  axis_name: str | None = None,
  dense_axis_name: str | None = None,
  wire: Wire | None = None,
  seed: int = 0,
  momentum_dtype: Any = None,
  stacked: Any = None,
) -> optax.GradientTransformation:
  """DeMo's decoupled momentum: each worker sends the compressed part of a decaying momentum.

  Per worker i at step t (δ₀ = 0), on its input u (DeMo feeds it lr·g)::

      δ ← β·δ + u;   send C(δ);   δ ← δ − decode(C(δ))     # the sent part leaves δ
      output the wire's average of what the workers sent    # identical on every worker

  It is `cj.error_feedback(compressor, decay=β)`: δ is error feedback's decaying residual (with
  β = 1 the paper's error feedback), under DeMo's name. DeMo averages with `cj.wire.gather(average="senders")`: per entry (per
  coefficient for a transform-domain code such as `cj.compressors.dct_top_k`), the mean over
  the workers that sent it. `cj.demo` chains it with the learning rate, the sign and decoupled
  weight decay.

  Args:
    compressor: a `compams_jax.compressors` compressor (DeMo's: a DCT-domain top-k).
    decay: β, the momentum's decay, in [0, 1] (DeMo's `compression_decay`).
    axis_name: the mapped axis (of `jax.shard_map`, `jax.pmap` or `jax.vmap`) that indexes
      workers, or None for a single worker.
    dense_axis_name: a fast axis reduced densely before compression (see `cj.error_feedback`).
    wire: the wire strategy (default `cj.wire.gather()`, the plain mean; DeMo's is
      `cj.wire.gather(average="senders")`).
    seed: seeds the PRNG keys of randomized compressors.
    momentum_dtype: dtype of the momenta (default: the parameters' dtype).
    stacked: which leaves stack layers along axis 0, each layer its own block (see
      `cj.error_feedback`).

  Returns:
    An `optax.GradientTransformation` whose state is an `ErrorFeedbackState` (δ: `residual`).

  Examples:
    >>> import jax.numpy as jnp, compams_jax as cj
    >>> tx = cj.transforms.decoupled_momentum(cj.compressors.top_k(0.5), decay=0.5)
    >>> u = {"w": jnp.array([1.0, -4.0, 2.0, 0.5])}
    >>> state = tx.init(u)
    >>> out, state = tx.update(u, state)          # δ = u: sends its two largest entries
    >>> out["w"]
    Array([ 0., -4.,  2.,  0.], dtype=float32)
    >>> out, state = tx.update(u, state)          # δ = 0.5·[1, 0, 0, 0.5] + u
    >>> out["w"]
    Array([ 0., -4.,  2.,  0.], dtype=float32)
    >>> cj.sharding.worker_state(state, 0).residual.value["w"]   # δ
    Array([1.5 , 0.  , 0.  , 0.75], dtype=float32)

  References:
    Peng et al., "DeMo: Decoupled Momentum Optimization", arXiv:2411.19870, 2024.
  """
  return error_feedback(
    compressor,
    decay=decay,
    axis_name=axis_name,
    dense_axis_name=dense_axis_name,
    wire=wire,
    seed=seed,
    residual_dtype=momentum_dtype,
    stacked=stacked,
  )
