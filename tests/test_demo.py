"""The gather strategy's averaging options and DeMo, against NumPy references on simulated workers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import compams_jax as cj
from tests import harness, reference

# ---------------------------------------------------------------------------------------------
# cj.wire.gather(average="senders", clip="median") on 8 workers under shard_map.
# ---------------------------------------------------------------------------------------------

SHAPES = {"a": (5, 8), "b": (5, 8), "c": (7,)}
RATIO = 0.1  # k = 4 of 40 entries, 1 of 7
# The entries each worker's top-4 picks in leaf "a": workers 0-3 overlap, 4-7 are disjoint.
PICKS = [(0, 1, 2, 3), (0, 1, 2, 3), (2, 3, 4, 5), (3, 4, 5, 6), (10, 11, 12, 13)]
PICKS += [(14, 15, 16, 17), (18, 19, 20, 21), (22, 23, 24, 25)]


def _messages(n, seed=0):
  """Per-worker arrays (n, *shape): small noise, and in leaf "a" large entries where PICKS say,
  of magnitudes that differ by worker (worker 7's are 100x: an outlier for the clip)."""
  rng = np.random.default_rng(seed)
  x = {k: rng.uniform(-1, 1, size=(n,) + s).astype(np.float32) for k, s in SHAPES.items()}
  for i, picks in enumerate(PICKS[:n]):
    signs = rng.choice([-1.0, 1.0], size=len(picks))
    magnitude = (2.0 + i) * (100.0 if i == 7 else 1.0)
    x["a"][i].reshape(-1)[list(picks)] = signs * magnitude * rng.uniform(1, 2, size=len(picks))
  return x


def _on_workers(mesh, fn, x):
  """fn(this worker's arrays) under shard_map over the 8 workers of "data", one jit."""
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  run = jax.jit(
    jax.shard_map(
      lambda x: fn(jax.tree.map(lambda a: a[0], x)), mesh=mesh, in_specs=P("data"), out_specs=P()
    )
  )
  return jax.tree.map(np.asarray, run(jax.tree.map(put, x)))


WIRES = {
  "mean": cj.wire.gather(),
  "senders": cj.wire.gather(average="senders"),
  "clip": cj.wire.gather(clip="median"),
  "senders_clip": cj.wire.gather(average="senders", clip="median"),
}


def _expected(sent, name, **clip_kw):
  if "clip" in name:
    sent = reference.np_clip_to_median(sent, **clip_kw)
  if "senders" in name:
    return reference.np_senders_mean(sent)
  return np.asarray(sent, np.float64).mean(axis=0)


def test_gather_averaging_options_top_k(mesh, n_devices):
  """Every option at once on top-k payloads (leaves "a" and "b" share a shape: one lax.map)."""
  compressor = cj.compressors.top_k(RATIO)
  x = _messages(n_devices)

  def averages(x):
    payload = cj.compressors.encode_tree(compressor, x)
    return {
      name: wire.average(compressor, payload, x, axis_name="data") for name, wire in WIRES.items()
    }

  got = _on_workers(mesh, averages, x)
  sent = {
    k: np.stack([reference.np_top_k(v[i], RATIO) for i in range(n_devices)]) for k, v in x.items()
  }
  # The picks really overlap, are disjoint, and the outlier is clipped.
  count = (sent["a"] != 0).sum(axis=0).reshape(-1)
  assert count[3] == 4 and count[0] == 2 and count[10] == 1 and count.max() == 4
  for name in WIRES:
    for k in SHAPES:
      want = _expected(sent[k], name)
      np.testing.assert_allclose(got[name][k], want, rtol=2e-6, atol=1e-6, err_msg=f"{name} {k}")
  # The default is the plain mean, and the options change it.
  assert np.abs(got["senders"]["a"] - got["mean"]["a"]).max() > 1.0
  assert np.abs(got["clip"]["a"] - got["mean"]["a"]).max() > 1.0
  assert cj.wire.gather().exact_mean and not WIRES["senders"].exact_mean
  assert not WIRES["clip"].exact_mean and cj.wire.gather() == cj.wire.gather(average="mean")


def test_gather_averaging_options_other_codes(mesh, n_devices):
  """A summable code (identity: gathered, not summed, under the options), a per-leaf sign code,
  a model-granularity code (one norm for the model) and stacked layers (one norm per layer)."""
  x = _messages(n_devices, seed=1)
  x["a"][:, 1] = 0.0  # a row nobody sends under identity
  x["a"][2:5, 2] = 0.0  # and entries only some workers send
  cases = {
    "identity": (cj.compressors.identity(), None),
    "sign": (cj.compressors.block_sign(), None),
    "model_sign": (cj.compressors.block_sign(granularity="model"), None),
    "stacked": (cj.compressors.top_k(0.25), (True, False, False)),
  }
  wires = {k: WIRES[k] for k in ("senders", "clip", "senders_clip")}

  def averages(x):
    out = {}
    for case, (compressor, stacked) in cases.items():
      payload = cj.compressors.encode_tree(compressor, x, None, stacked)
      for name, wire in wires.items():
        out[case, name] = wire.average(compressor, payload, x, axis_name="data", stacked=stacked)
    return out

  got = _on_workers(mesh, averages, x)
  n = n_devices
  like = {k: np.zeros(s) for k, s in SHAPES.items()}
  model_sent = [
    reference.np_unflatten(
      reference.np_block_sign(reference.np_flatten({k: x[k][i] for k in SHAPES})), like
    )
    for i in range(n)
  ]
  sent = {
    "identity": {k: v for k, v in x.items()},
    "sign": {k: np.stack([reference.np_block_sign(v[i]) for i in range(n)]) for k, v in x.items()},
    "model_sign": {k: np.stack([m[k] for m in model_sent]) for k in SHAPES},
    "stacked": {
      "a": np.stack([[reference.np_top_k(layer, 0.25) for layer in x["a"][i]] for i in range(n)]),
      **{k: np.stack([reference.np_top_k(x[k][i], 0.25) for i in range(n)]) for k in "bc"},
    },
  }
  for case in cases:
    for name in wires:
      if case == "model_sign" and "clip" in name:
        # One norm per worker over the whole model.
        flat = np.stack(
          [reference.np_flatten({k: sent[case][k][i] for k in SHAPES}) for i in range(n)]
        )
        clipped = reference.np_clip_to_median(flat)
        clipped = {
          k: np.stack([reference.np_unflatten(c, like)[k] for c in clipped]) for k in SHAPES
        }
        want = {
          k: reference.np_senders_mean(clipped[k]) if "senders" in name else clipped[k].mean(0)
          for k in SHAPES
        }
      else:
        block = lambda k: 1 if case == "stacked" and k == "a" else None
        want = {k: _expected(sent[case][k], name, block_ndim=block(k)) for k in SHAPES}
      for k in SHAPES:
        np.testing.assert_allclose(
          got[case, name][k], want[k], rtol=2e-6, atol=1e-6, err_msg=f"{case} {name} {k}"
        )


def test_gather_senders_counts_what_a_sparse_code_names(mesh, n_devices):
  """chunked_top_k's own decode_count (ones at its indices) drives the default senders-mean,
  with and without the clip, on a plain and a stacked leaf: a worker whose chunk is all zeros
  still sends (zeros) at 2 indices, and they count."""
  compressor = cj.compressors.chunked_top_k(2, chunk=4, value_bits=None)
  rng = np.random.default_rng(7)
  x = {"s": rng.normal(size=(n_devices, 2, 8, 8)), "w": rng.normal(size=(n_devices, 8, 8))}
  x = {k: v.astype(np.float32) for k, v in x.items()}
  x["w"][0] = 0.0
  x["w"][1, :4, :4] = 0.0
  x["s"][2, 1] = 0.0
  stacked = (True, False)

  def senders(x):
    payload = cj.compressors.encode_tree(compressor, x, None, stacked)
    return {
      name: WIRES[name].average(compressor, payload, x, axis_name="data", stacked=stacked)
      for name in ("senders", "senders_clip")
    }

  got = _on_workers(mesh, senders, x)
  blocks = {"w": x["w"][:, None], "s": x["s"]}  # (n, layers, 8, 8)
  zeros_counted = False
  for name, b in blocks.items():
    want = {"senders": [], "senders_clip": []}
    for layer in range(b.shape[1]):
      sent, count, nonzero = np.zeros((n_devices, 64)), np.zeros(64), np.zeros(64)
      for i in range(n_devices):
        flat = b[i, layer].reshape(-1).astype(np.float64)
        for entries in reference.np_chunks((8, 8), 4, 16):
          for p in reference.np_top_k_positions(flat[entries], 2):
            sent[i, entries[p]] = flat[entries[p]]
            count[entries[p]] += 1
            nonzero[entries[p]] += flat[entries[p]] != 0
      zeros_counted |= bool((count > nonzero).any())
      want["senders"].append(reference.np_senders_mean(sent, count).reshape(8, 8))
      clipped = reference.np_clip_to_median(sent)
      want["senders_clip"].append(reference.np_senders_mean(clipped, count).reshape(8, 8))
    for wire, layers in want.items():
      expect = np.stack(layers) if name == "s" else layers[0]
      np.testing.assert_allclose(got[wire][name], expect, rtol=2e-6, atol=1e-7, err_msg=wire)
  assert zeros_counted


def test_gather_option_errors():
  with pytest.raises(ValueError, match="average"):
    cj.wire.gather(average="sum")
  with pytest.raises(ValueError, match="clip"):
    cj.wire.gather(clip="max")
  # Predictive coding's receivers rebuild the senders' reconstructions from the exact mean.
  for wire in (cj.wire.gather(average="senders"), cj.wire.gather(clip="median")):
    with pytest.raises(ValueError, match="exact_mean"):
      cj.predictive_compression(cj.compressors.top_k(0.5), axis_name="data", wire=wire)
    with pytest.raises(ValueError, match="exact_mean"):
      cj.comp_ams(0.1, cj.compressors.top_k(0.5), predictor=cj.predictors.fixed(0.5), wire=wire)
  with pytest.raises(ValueError, match="decay"):
    cj.transforms.decoupled_momentum(cj.compressors.top_k(0.5), decay=1.5)


# ---------------------------------------------------------------------------------------------
# cj.demo against a NumPy loop of demo.py's algorithm.
# ---------------------------------------------------------------------------------------------

DEMO_SHAPES = {"w": (6, 8), "b": (8,)}
DEMO_STEPS = 5
LR, DECAY, WD = 0.05, 0.999, 0.1
TOP_K = 0.1  # 5 of 48 entries, 1 of 8


def _select_top_k(ratio):
  return lambda c: reference.np_top_k_mask(c, reference.math.ceil(ratio * c.size - 1e-9))


def _linear_loss(p, g):
  """Σ_k ⟨p_k, g_k⟩: its gradient is this worker's given gradient."""
  return sum(jnp.vdot(p[k], g[k][0]) for k in p)


def test_demo_matches_demo_py_top_k_shard_map(mesh, n_devices):
  params, grads = harness.problem(DEMO_SHAPES, n_devices, DEMO_STEPS, seed=3)
  compressor = cj.compressors.top_k(TOP_K)
  tx = cj.demo(
    LR, compression_decay=DECAY, weight_decay=WD, axis_name="data", compressor=compressor
  )
  got, states = harness.run(tx, params, grads, mesh, DEMO_STEPS)
  want, delta = reference.np_demo(
    params, grads, lr=LR, decay=DECAY, weight_decay=WD, select=_select_top_k(TOP_K)
  )
  momentum = states[-1][1].residual.value  # global view: (n, *shape)
  for k in DEMO_SHAPES:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(momentum[k], delta[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # It moved by sign steps, and the weight decay shows.
  assert np.abs(want["w"] - params["w"]).max() > 4 * LR
  # Bytes: one top-k payload per worker, the compressor's bits.
  bits = cj.compressors.tree_wire_bits(compressor, params)
  assert cj.wire_bytes(tx, params) == -(-bits // 8)


def test_demo_schedule_and_clip_under_vmap():
  """All workers on one device (vmap with an axis name), a learning-rate schedule (it scales
  both the momentum's input and the sign step) and the median clip."""
  n = 4
  params, grads = harness.problem(DEMO_SHAPES, n, DEMO_STEPS, seed=4)
  for g in grads.values():
    g[:, 3] *= 30.0  # worker 3's messages outweigh the others' unless clipped
  ratio = 0.25
  schedule = lambda count: 0.05 * 0.5 ** (count // 2)  # exact in float32
  compressor = cj.compressors.top_k(ratio)
  wire = cj.wire.gather(average="senders", clip="median")
  tx = cj.demo(
    schedule,
    compression_decay=DECAY,
    weight_decay=WD,
    axis_name="data",
    compressor=compressor,
    wire=wire,
  )
  step = cj.data_parallel_step(_linear_loss, tx, mode="vmap", num_workers=n, donate=False)
  p, state = step.init(params)
  for t in range(DEMO_STEPS):
    p, state, _ = step(p, state, {k: v[t] for k, v in grads.items()})
  want, delta = reference.np_demo(
    params,
    grads,
    lr=schedule,
    decay=DECAY,
    weight_decay=WD,
    select=_select_top_k(ratio),
    clip=True,
  )
  for k in DEMO_SHAPES:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    momentum = state[1].residual.value[k][:, 0]  # (n, 1, *shape): vmap's worker axis first
    np.testing.assert_allclose(momentum, delta[k], rtol=1e-6, atol=1e-7, err_msg=k)
  unclipped, _ = reference.np_demo(
    params, grads, lr=schedule, decay=DECAY, weight_decay=WD, select=_select_top_k(ratio)
  )
  assert np.abs(unclipped["w"] - want["w"]).max() > 0.01  # the clip mattered
  assert cj.wire_bytes(tx, params) == -(-cj.compressors.tree_wire_bits(compressor, params) // 8)


def test_summable_code_over_senders_has_the_same_bytes():
  # A summable code averaged over senders is gathered, not summed: the same bytes per worker.
  params = {"w": jnp.zeros((6, 8)), "b": jnp.zeros(8)}
  tx = cj.demo(0.1, axis_name="data", compressor=cj.compressors.identity())
  assert cj.wire_bytes(tx, params) == 4 * (48 + 8)


# ---------------------------------------------------------------------------------------------
# DeMo's own compressor, cj.compressors.dct_top_k: the mean over senders is per DCT coefficient.
# ---------------------------------------------------------------------------------------------


def _dct_ii(m):
  """The orthonormal DCT-II matrix (rows: frequencies), as demo.py's _dct(eye(m), "ortho")."""
  freq, j = np.arange(m)[:, None], np.arange(m)[None, :]
  d = np.cos(np.pi * freq * (2 * j + 1) / (2 * m)) * np.sqrt(2.0 / m)
  d[0] /= np.sqrt(2.0)
  return d


def _largest_divisor(n, at_most):
  """demo.py's _get_smaller_split: the largest divisor of n that is ≤ at_most."""
  return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _demo_dct(chunk):
  """transform(shape) -> (forward, inverse): demo.py's TransformDCT of a vector or a matrix;
  coefficients shaped (chunks, m), row-major inside a chunk."""

  def transform(shape):
    if len(shape) == 1:
      c = _largest_divisor(shape[0], chunk)
      d = _dct_ii(c)
      return (
        lambda x: np.asarray(x, np.float64).reshape(-1, c) @ d.T,
        lambda y: (np.reshape(y, (-1, c)) @ d).reshape(shape),
      )
    rows, cols = shape
    r, c = _largest_divisor(rows, chunk), _largest_divisor(cols, chunk)
    dr, dc = _dct_ii(r), _dct_ii(c)
    blocks = lambda x: np.asarray(x, np.float64).reshape(rows // r, r, cols // c, c)
    return (
      lambda x: np.einsum("pi,aibj,qj->abpq", dr, blocks(x), dc).reshape(-1, r * c),
      lambda y: np.einsum(
        "pi,abpq,qj->aibj", dr, np.reshape(y, (rows // r, cols // c, r, c)), dc
      ).reshape(shape),
    )

  return transform


def _select_per_chunk(k):
  """The k largest |coefficients| of every chunk (row) as a mask (ties: lower index)."""

  def select(coefficients):
    mask = np.zeros(coefficients.shape, bool)
    for row, keep in zip(coefficients, mask):
      keep[np.argsort(-np.abs(row), kind="stable")[:k]] = True
    return mask

  return select


def test_gather_options_dct_top_k(mesh, n_devices):
  """Senders-mean per coefficient (the compressor's own decode_mean_over_senders, also on
  stacked layers), the clip of decoded messages, and the refusal of the two together."""
  k, chunk = 2, 4
  compressor = cj.compressors.dct_top_k(k, chunk=chunk)
  shapes = {"m": (6, 8), "s": (3, 6, 8), "v": (8,)}
  stacked = (False, True, False)  # leaves in order m, s, v; "s" stacks 3 layers of (6, 8)
  rng = np.random.default_rng(6)
  x = {name: rng.normal(size=(n_devices,) + s).astype(np.float32) for name, s in shapes.items()}

  def averages(x):
    payload = cj.compressors.encode_tree(compressor, x, None, stacked)
    return {
      name: WIRES[name].average(compressor, payload, x, axis_name="data", stacked=stacked)
      for name in ("senders", "clip")
    }

  got = _on_workers(mesh, averages, x)
  transform, select = _demo_dct(chunk), _select_per_chunk(k)

  def blocks(name, i):  # worker i's blocks of a leaf: the layers of "s", else the leaf
    return list(x[name][i]) if name == "s" else [x[name][i]]

  counts = []
  for name in shapes:
    forward, inverse = transform(shapes[name][-2:] if name == "s" else shapes[name])
    senders, clipped = [], []
    for b in range(3 if name == "s" else 1):
      coefficients = [forward(blocks(name, i)[b]) for i in range(n_devices)]
      masks = [select(c) for c in coefficients]
      sent = [np.where(m, c, 0.0) for m, c in zip(masks, coefficients)]
      count = np.sum(masks, axis=0)
      counts.append(count.reshape(-1))
      senders.append(inverse(reference.np_senders_mean(sent, count)))
      clipped.append(reference.np_clip_to_median([inverse(c) for c in sent]).mean(axis=0))
    want = {"senders": np.stack(senders), "clip": np.stack(clipped)}
    for wire in want:
      expect = want[wire] if name == "s" else want[wire][0]
      np.testing.assert_allclose(got[wire][name], expect, rtol=1e-5, atol=1e-6, err_msg=name)
  counts = np.concatenate(counts)
  assert (counts > 1).any() and (counts == 1).any()  # shared and lone coefficients

  with pytest.raises(ValueError, match="per coefficient"):
    _on_workers(
      mesh,
      lambda x: WIRES["senders_clip"].average(
        compressor, cj.compressors.encode_tree(compressor, x), x, axis_name="data"
      ),
      {"v": x["v"]},
    )


def test_demo_default_dct_compressor_matches_demo_py(mesh, n_devices):
  """cj.demo's default compressor and wire: DeMo's DCT top-k, averaged per coefficient."""
  params, grads = harness.problem(DEMO_SHAPES, n_devices, DEMO_STEPS, seed=5)
  k, chunk = 2, 4  # chunks of 3x4 and 4 entries
  tx = cj.demo(
    LR,
    compression_decay=DECAY,
    compression_topk=k,
    compression_chunk=chunk,
    weight_decay=WD,
    axis_name="data",
  )
  got, states = harness.run(tx, params, grads, mesh, DEMO_STEPS)
  want, delta = reference.np_demo(
    params,
    grads,
    lr=LR,
    decay=DECAY,
    weight_decay=WD,
    select=_select_per_chunk(k),
    transform=_demo_dct(chunk),
  )
  momentum = states[-1][1].residual.value
  for name in DEMO_SHAPES:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(momentum[name], delta[name], rtol=1e-5, atol=1e-7, err_msg=name)
  assert np.abs(want["w"] - params["w"]).max() > 4 * LR
  bits = cj.compressors.tree_wire_bits(cj.compressors.dct_top_k(k, chunk=chunk), params)
  assert cj.wire_bytes(tx, params) == -(-bits // 8)
