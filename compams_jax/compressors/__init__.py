"""Compressors: stateless per-array encode/decode to a fixed-shape payload.

Each compressor declares its properties (`deviation`, `unbiased`, `summable`, `randomness`),
its exact static `wire_bits(shape, dtype)`, and acts per pytree leaf (the paper's per-layer
compression) or, with `granularity="model"`, on the whole model flattened into one vector.
`REGISTRY` names every compressor (`get(name, **kwargs)` builds one) with the example settings
the tests and benchmarks run.
"""

from compams_jax._src.base import Compressor, num_kept, payload_bits
from compams_jax._src.tree import (
  compress_tree,
  decode_sum_tree,
  decode_tree,
  encode_tree,
  tree_wire_bits,
)
from compams_jax.compressors._chunked_top_k import ChunkedTopK, chunked_top_k
from compams_jax.compressors._dct import DctTopK, dct_top_k
from compams_jax.compressors._dense import Cast, Identity, cast, identity
from compams_jax.compressors._qsgd import QSGD, qsgd
from compams_jax.compressors._registry import FACTORIES, REGISTRY, Entry, get
from compams_jax.compressors._sign import BlockSign, block_sign, scaled_sign
from compams_jax.compressors._terngrad import TernGrad, terngrad
from compams_jax.compressors._top_k import RandomK, TopK, random_k, top_k

__all__ = [
  "BlockSign",
  "Cast",
  "ChunkedTopK",
  "Compressor",
  "DctTopK",
  "Entry",
  "FACTORIES",
  "Identity",
  "QSGD",
  "REGISTRY",
  "RandomK",
  "TernGrad",
  "TopK",
  "block_sign",
  "cast",
  "chunked_top_k",
  "compress_tree",
  "dct_top_k",
  "decode_sum_tree",
  "decode_tree",
  "encode_tree",
  "get",
  "identity",
  "num_kept",
  "payload_bits",
  "qsgd",
  "random_k",
  "scaled_sign",
  "terngrad",
  "top_k",
  "tree_wire_bits",
]
