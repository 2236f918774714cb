"""A GPT-style decoder-only transformer in flax nnx, with scanned (stacked) layers.

Token + learned position embeddings, ``num_layers`` pre-LN blocks (causal
multi-head self-attention, then a GELU MLP of width ``4 d``, each a residual
branch), a final LayerNorm and an output head tied to the token embedding
(``logits = h @ wte.T``, as GPT-2; no separate head parameters).

The blocks are created with ``nnx.split_rngs`` + ``nnx.vmap`` and run with
``nnx.scan``: the parameter tree has one leaf per parameter kind of a block,
of shape ``(num_layers, ...)``.  :func:`stacked_mask` marks those leaves for
``cj.comp_ams(..., stacked=)`` so that each layer is compressed as its own
block.

Presets: :func:`gpt2_small` (GPT-2 124M: vocab 50257, context 1024, d 768,
12 heads, 12 layers; 124,439,808 parameters) for abstract-shape benchmarks
(``nnx.eval_shape``), :func:`lm_small` (bytes, d 128, 4 layers, 4 heads,
context 128) for CPU training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
  "GPTConfig",
  "GPT",
  "Block",
  "gpt2_small",
  "lm_small",
  "stacked_mask",
  "fsdp_specs",
  "param_count",
  "next_token_loss",
]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyper-parameters of :class:`GPT`.

  Attributes:
    vocab_size: number of token ids.
    context_length: maximum sequence length (size of the position table).
    d_model: residual-stream width.
    num_heads: attention heads (``d_model`` must be divisible by it).
    num_layers: transformer blocks.
    mlp_ratio: MLP hidden width / ``d_model``.
    dtype: computation dtype (parameters stay float32).
  """

  vocab_size: int = 256
  context_length: int = 128
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 4
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")


def gpt2_small() -> GPTConfig:
  """GPT-2 small (124M): vocab 50257, context 1024, d 768, 12 heads, 12 layers."""
  return GPTConfig(vocab_size=50257, context_length=1024, d_model=768, num_heads=12, num_layers=12)


def lm_small(context_length: int = 128) -> GPTConfig:
  """The CPU preset: bytes (vocab 256), d 128, 4 heads, 4 layers."""
  return GPTConfig(
    vocab_size=256, context_length=context_length, d_model=128, num_heads=4, num_layers=4
  )


def _init(std: float) -> Any:
  return nnx.initializers.normal(std)


class Block(nnx.Module):
  """One pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    d, std = cfg.d_model, 0.02
    proj_std = std / (2 * cfg.num_layers) ** 0.5  # GPT-2's scaled residual projections
    self.num_heads = cfg.num_heads
    self.dtype = cfg.dtype
    self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, kernel_init=_init(std), dtype=cfg.dtype, rngs=rngs)
    self.proj = nnx.Linear(d, d, kernel_init=_init(proj_std), dtype=cfg.dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
    hidden = cfg.mlp_ratio * d
    self.fc = nnx.Linear(d, hidden, kernel_init=_init(std), dtype=cfg.dtype, rngs=rngs)
    self.out = nnx.Linear(hidden, d, kernel_init=_init(proj_std), dtype=cfg.dtype, rngs=rngs)

  def attention(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h).astype(x.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    return self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.ln1(x))
    return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  """Decoder-only transformer; ``__call__(tokens [B, T]) -> logits [B, T, vocab]``."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_init(0.02), rngs=rngs)
    self.wpe = nnx.Embed(cfg.context_length, cfg.d_model, embedding_init=_init(0.01), rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs)

    self.blocks = create_blocks(rngs)
    self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    if t > self.cfg.context_length:
      raise ValueError(f"sequence length {t} exceeds context_length={self.cfg.context_length}")
    x = _lookup(self.wte.embedding[...], tokens) + self.wpe.embedding[:t]
    x = x.astype(self.cfg.dtype)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x: jax.Array, block: Block) -> jax.Array:
      return block(x)

    x = self.ln_f(forward(x, self.blocks))
    return self.wte.attend(x).astype(jnp.float32)  # tied head


def _lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """``table[ids]``; under a mesh (explicit sharding) the rows come out sharded like ``ids``."""
  if jax.sharding.get_abstract_mesh().empty:
    return jnp.take(table, ids, axis=0)
  spec = jax.typeof(ids).sharding.spec
  return table.at[ids].get(out_sharding=jax.sharding.PartitionSpec(*spec, None))


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def stacked_mask(params: Any) -> Any:
  """A tree of bools like ``params``: ``True`` for the blocks' leaves (layer axis 0).

  ``params`` is ``nnx.state(model, nnx.Param)`` or any tree with the same
  paths; the result has no ``nnx.Variable`` wrappers (``nnx.as_pure``), the form in
  which ``nnx.Optimizer`` hands parameters and gradients to the optimizer, so
  it is a valid ``stacked=`` for ``cj.comp_ams``.
  """
  return jax.tree_util.tree_map_with_path(
    lambda p, _: "blocks" in _path_names(p), nnx.as_pure(params)
  )


def fsdp_specs(params: Any, axis: str = "fsdp", axis_size: int = 1) -> Any:
  """``PartitionSpec``s sharding each weight matrix's first non-layer axis over ``axis``.

  Matrices (embeddings, kernels: ``ndim >= 2`` after the layer axis of a
  stacked leaf) whose leading dimension is divisible by ``axis_size`` (the
  mesh axis size) are split over ``axis``; biases and LayerNorm scales are
  replicated (``P()``).  Stacked leaves keep their layer axis whole:
  ``P(None, axis, None)``.  Like :func:`stacked_mask`, the result is ``nnx.as_pure``.
  """
  P = jax.sharding.PartitionSpec

  def spec(path, leaf):
    stacked = "blocks" in _path_names(path)
    core = leaf.shape[1:] if stacked else leaf.shape
    if len(core) < 2 or core[0] % axis_size:
      return P()
    return P(*(((None,) if stacked else ()) + (axis,) + (None,) * (len(core) - 1)))

  return jax.tree_util.tree_map_with_path(spec, nnx.as_pure(params))


def param_count(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ``ShapeDtypeStruct``s)."""
  return int(sum(int(x.size) for x in jax.tree.leaves(params)))


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross entropy (nats per token) of ``logits [B, T, V]`` against ``targets [B, T]``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
