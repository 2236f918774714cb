"""The experiments' optimizer sections: annealed top-k stages and the bytes each phase sends."""

import jax.numpy as jnp
import numpy as np
import pytest

from compams_jax.experiments import config as config_lib
from compams_jax.experiments.optim import _annealed_stages, bytes_sent_by_step

PARAMS = {"w": jnp.zeros((1000,)), "b": jnp.zeros((10,))}


def _top_k_bytes(ratio):
  # Brute force: k = ceil(ratio·d) kept entries per leaf, f32 value + the narrowest index.
  total = 0
  for d in (1000, 10):
    k = max(1, int(np.ceil(ratio * d - 1e-9)))
    total += k * (4 + (1 if d <= 256 else 2))
  return total


def test_annealed_stages_are_geometric_and_cover_the_steps():
  opt = dict(name="comp_ams", compressor="top_k", compressor_kwargs={"ratio": 0.01})
  stages = _annealed_stages({**opt, "anneal_from": 0.1, "anneal_steps": 10, "anneal_stages": 4})
  # Stage i ends at round(10·(i + 1)/4): 2.5 → 2, 5, 7.5 → 8, 10 (halves to even).
  assert [n for n, _ in stages] == [2, 3, 3, 2]
  np.testing.assert_allclose(
    [c.ratio for _, c in stages], [0.1 * 0.1 ** (i / 4) for i in range(4)], rtol=1e-12
  )
  assert _annealed_stages({**opt, "anneal_from": 0.1, "anneal_steps": 0}) == []


def test_bytes_per_phase_dense_warmup_then_stages_then_steady():
  opt = dict(
    name="comp_ams",
    compressor="top_k",
    compressor_kwargs={"ratio": 0.01},
    dense_warmup_steps=3,
    anneal_from=0.1,
    anneal_steps=4,
    anneal_stages=2,
  )
  sent, steady = bytes_sent_by_step(opt, PARAMS, hlo_bytes=10**9)
  dense = 4 * 1010
  stage = [_top_k_bytes(0.1), _top_k_bytes(0.1 * 0.1**0.5)]
  assert steady == _top_k_bytes(0.01)
  want = [0]
  for t in range(1, 12):
    per = dense if t <= 3 else stage[0] if t <= 5 else stage[1] if t <= 7 else steady
    want.append(want[-1] + per)
  assert [sent(t) for t in range(12)] == want


def test_constant_optimizers_send_the_hlo_bytes():
  sent, steady = bytes_sent_by_step(dict(name="comp_ams", compressor="top_k"), PARAMS, 77)
  assert steady == 77 and sent(5) == 385


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"optimizer.anneal_from": 0.1}, "anneal_steps"),
    ({"optimizer.anneal_from": 0.005, "optimizer.anneal_steps": 8}, "must exceed"),
    (
      {"optimizer.anneal_from": 0.1, "optimizer.anneal_steps": 8, "optimizer.name": "qadam"},
      "comp_ams only",
    ),
  ],
)
def test_anneal_config_refuses_what_would_be_silently_off(overrides, message):
  c = config_lib.base_config(name="t", dataset="digits", model="mlp")
  for k, v in overrides.items():
    config_lib.apply_override(c, k, v)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)
