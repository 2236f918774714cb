"""The error-feedback kernel, used by every worker-side and server-side compression step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from compams_jax._src.base import Compressor
from compams_jax._src.keys import decode_key
from compams_jax._src.tree import decode_tree, encode_tree


class Compressed(NamedTuple):
  """One error-feedback step's results.

  Attributes:
    payload: what travels on the wire.
    sent: what the receivers reconstruct: C(corrected), or offset + C(corrected − offset).
    residual: corrected − sent, what the next step owes.
  """

  payload: Any
  sent: Any
  residual: Any


def compress_with_feedback(
  compressor: Compressor,
  value: Any,
  residual: Any,
  key: jax.Array | None,
  *,
  offset: Any = None,
  per_leaf: bool = True,
) -> Compressed:
  """corrected = value + residual; send C(corrected − offset); keep corrected − sent.

  With no offset this is error feedback: sent = C(corrected). With an offset both ends can
  form (a prediction p), it is predictive coding: the innovation corrected − p is compressed
  and sent = p + C(corrected − p) is the reconstruction. Either way the residual is taken
  against what the receivers decode, so whatever the code loses (dropped entries, sign scales,
  rounding of narrow value dtypes) is owed to the next step.

  Args:
    compressor: the compressor C.
    value: the pytree (or, with `per_leaf=False`, the single array) to send.
    residual: the residual owed from the last step, structured like `value`, or None when the
      caller has already added it (or keeps none).
    key: the encoding key (see `compams_jax._src.keys`).
    offset: a prediction structured like `value` that receivers also hold, or None.
    per_leaf: True: `value` is a pytree compressed as the compressor's granularity says
      (`encode_tree`); False: `value` is one array and the compressor acts on it whole.

  Returns:
    A `Compressed` (payload, sent, residual).
  """
  if residual is None:
    corrected = value
  else:
    corrected = jax.tree.map(lambda v, e: v.astype(e.dtype) + e, value, residual)
  coded = corrected if offset is None else jax.tree.map(lambda c, p: c - p, corrected, offset)
  receiver_key = decode_key(compressor, key)
  if per_leaf:
    payload = encode_tree(compressor, coded, key)
    decoded = decode_tree(compressor, payload, coded, receiver_key)
  else:
    payload = compressor.encode(coded, key)
    decoded = compressor.decode(payload, coded, receiver_key)
  sent = decoded if offset is None else jax.tree.map(lambda p, d: p + d, offset, decoded)
  return Compressed(payload, sent, jax.tree.map(lambda c, s: c - s, corrected, sent))
