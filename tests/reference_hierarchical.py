"""Plain-NumPy references of hierarchical COMP-AMS on a ("dcn", "ici") mesh (no compams_jax code).

Semantics (docs/design.md, "Hierarchical semantics (exact)"), with S = |dcn| slices of K = |ici|
devices each; device (s, j) is worker row s·K + j:

  * each leaf is flattened row-major, zero-padded to K·c (c = ⌈d / K⌉) and cut into K contiguous
    chunks of c entries; the device at ici position j owns chunk j;
  * reduce-scatter MEAN over ici: x[s, j] = (1/K) Σ_j' chunk_j(g[s, j']);
  * error feedback with the chunk as the compressor's block (the padded entries included):
    v = x + e[s, j];  sent = C(v);  e[s, j] = v − sent;
  * average over dcn (gather: (1/S) Σ_s sent[s, j]; two-phase: see `np_hier_two_phase_average`);
  * dense all-gather over ici: the K averaged chunks concatenated, cut back to d, reshaped;
  * AMSGrad (ε inside the root, no bias correction), θ ← θ − η m / sqrt(v̂ + ε).

The compressors here are written from their definitions, not imported from tests/reference.py.
"""

import math

import numpy as np


def np_top_k(x, ratio):
  """Keeps the max(1, ⌈ratio·d⌉) largest magnitudes of a vector (ties to the lower index)."""
  x = np.asarray(x)
  k = max(1, math.ceil(ratio * x.size - 1e-9))
  keep = np.argsort(-np.abs(x), kind="stable")[:k]
  out = np.zeros_like(x)
  out[keep] = x[keep]
  return out


def np_block_sign(x):
  """sign(x)·mean|x| over the whole vector (one block); a zero is sent as +scale."""
  x = np.asarray(x)
  scale = np.float32(np.mean(np.abs(x.astype(np.float64))))
  return np.where(x < 0, -scale, scale).astype(x.dtype)


def chunk_len(shape, k):
  return -(-math.prod(shape) // k)


def to_chunks(x, k):
  """(k, c): the leaf flattened row-major, zero-padded to k·c, cut into k contiguous chunks."""
  flat = np.asarray(x, np.float32).reshape(-1)
  c = chunk_len(np.shape(x), k)
  return np.concatenate([flat, np.zeros(k * c - flat.size, np.float32)]).reshape(k, c)


def from_chunks(chunks, shape):
  """The inverse of `to_chunks`: concatenate the k chunks, cut to the leaf size, reshape."""
  return np.asarray(chunks).reshape(-1)[: math.prod(shape)].reshape(shape)


def np_scatter_mean(grads_sj, k):
  """grads_sj: (S, K, *leaf) → (S, K, c), device (s, j)'s chunk of its slice's mean gradient."""
  s_count = grads_sj.shape[0]
  out = []
  for s in range(s_count):
    chunks = np.stack([to_chunks(grads_sj[s, jj], k) for jj in range(k)])  # (K_src, K, c)
    out.append(chunks.mean(axis=0, dtype=np.float64).astype(np.float32))
  return np.stack(out)


def np_amsgrad_step(theta, gbar, m, v, vhat, *, lr, b1, b2, eps):
  m = (b1 * m + (1 - b1) * gbar).astype(np.float32)
  v = (b2 * v + (1 - b2) * gbar * gbar).astype(np.float32)
  vhat = np.maximum(vhat, v)
  theta = (theta - lr * m / np.sqrt(vhat + eps)).astype(np.float32)
  return theta, m, v, vhat


def np_hier_comp_ams(
  params, grads, compress, *, slices, k, lr, b1=0.9, b2=0.999, eps=1e-8, wire="gather"
):
  """Hierarchical COMP-AMS on an (S, K) = (slices, k) mesh.

  Args:
    params: dict of float32 arrays θ₀.
    grads: dict of arrays shaped (T, S·K, *leaf): device (s, j)'s gradient at step t is row
      s·K + j.
    compress: C, applied to one chunk vector (for "two_phase": to one sub-chunk).
    wire: "gather" or "two_phase".

  Returns:
    (trace: list over steps of the params dict after that step,
     residuals: dict of (S·K, c) per leaf (device (s, j) in row s·K + j),
     server: (S·K, cc) two-phase server residuals, or None for gather).
  """
  names = sorted(params)  # jax's leaf order for a dict.
  theta = {n: np.array(params[n], np.float32) for n in names}
  steps = next(iter(grads.values())).shape[0]
  c = {n: chunk_len(theta[n].shape, k) for n in names}
  err = {n: np.zeros((slices, k, c[n]), np.float32) for n in names}
  m = {n: np.zeros_like(theta[n]) for n in names}
  v = {n: np.zeros_like(theta[n]) for n in names}
  vhat = {n: np.zeros_like(theta[n]) for n in names}
  total = sum(c.values())
  cc = max(1, -(-total // slices))
  server = np.zeros((slices, k, cc), np.float32)
  trace = []
  for t in range(steps):
    x = {n: np_scatter_mean(grads[n][t].reshape((slices, k) + theta[n].shape), k) for n in names}
    if wire == "gather":
      avg = {}
      for n in names:
        sent = np.zeros((slices, k, c[n]), np.float32)
        for s in range(slices):
          for j in range(k):
            corrected = (x[n][s, j] + err[n][s, j]).astype(np.float32)
            sent[s, j] = compress(corrected)
            err[n][s, j] = corrected - sent[s, j]
        avg[n] = sent.mean(axis=0, dtype=np.float64).astype(np.float32)  # (K, c)
    elif wire == "two_phase":
      avg = np_hier_two_phase_average(x, err, server, compress, names, c, slices, k, cc)
    else:
      raise ValueError(wire)
    for n in names:
      gbar = from_chunks(avg[n], theta[n].shape)
      theta[n], m[n], v[n], vhat[n] = np_amsgrad_step(
        theta[n], gbar, m[n], v[n], vhat[n], lr=lr, b1=b1, b2=b2, eps=eps
      )
    trace.append({n: theta[n].copy() for n in names})
  residuals = {n: err[n].reshape(slices * k, c[n]) for n in names}
  srv = server.reshape(slices * k, cc) if wire == "two_phase" else None
  return trace, residuals, srv


def np_hier_two_phase_average(x, err, server, compress, names, c, slices, k, cc):
  """The two-phase average over dcn of each ici position's chunk vector (updates err, server).

  Device (s, j): its chunk vector V (all leaves' corrected chunks, in leaf order, concatenated;
  `total` entries) is zero-padded to S·cc and cut into S sub-chunks; each is compressed; the
  worker residual is V − sent on the first `total` entries. Device (s, j) receives sub-chunk s
  of every slice (same j), averages the decoded sub-chunks, adds its server residual, sends
  C(a) and keeps a − C(a). Every device gathers the S recompressed sub-chunks of its j; the
  vector cut back to `total` entries is the averaged chunk vector.
  """
  total = sum(c[n] for n in names)
  avg = {n: np.zeros((k, c[n]), np.float32) for n in names}
  for j in range(k):
    sent = np.zeros((slices, slices, cc), np.float32)  # [worker s, sub-chunk]
    for s in range(slices):
      vec = np.concatenate([x[n][s, j] + err[n][s, j] for n in names]).astype(np.float32)
      subs = np.concatenate([vec, np.zeros(slices * cc - total, np.float32)]).reshape(slices, cc)
      sent[s] = np.stack([compress(sub) for sub in subs])
      res = vec - sent[s].reshape(-1)[:total]
      start = 0
      for n in names:
        err[n][s, j] = res[start : start + c[n]]
        start += c[n]
    out = np.zeros((slices, cc), np.float32)
    for s in range(slices):
      a = (sent[:, s].mean(axis=0, dtype=np.float64).astype(np.float32) + server[s, j]).astype(
        np.float32
      )
      out[s] = compress(a)
      server[s, j] = a - out[s]
    flat = out.reshape(-1)[:total]
    start = 0
    for n in names:
      avg[n][j] = flat[start : start + c[n]]
      start += c[n]
  return avg
