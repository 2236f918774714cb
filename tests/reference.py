"""Independent plain-NumPy references of the papers' algorithms (no compams_jax code).

`REFERENCES` maps every registry name (`cj.compressors.REGISTRY`) to a brute-force definition
`ref(x, key, **example_kwargs) -> C(x)` of that compressor applied to one array; a randomized
one draws its randomness from `key` with `uniforms` (the one `jax.random` call it shares with the
library: the same key gives the same draws). tests/test_compressors.py checks every registered
compressor, every example, against it, and fails for a registered name without one.
"""

import math

import numpy as np

from compams_jax._src.keys import uniforms as uniforms_of


def np_top_k(x, ratio):
  flat = np.asarray(x).reshape(-1)
  k = max(1, math.ceil(ratio * flat.size - 1e-9))
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(np.shape(x))


def np_block_sign(x):
  x = np.asarray(x)
  scale = np.mean(np.abs(x), dtype=np.float64).astype(x.dtype)
  return np.where(x < 0, -scale, scale).astype(x.dtype)


def np_identity(x):
  return np.asarray(x)


# ----------------------------------------------------------------- compressors by registry name


def uniforms(key, d):
  """The d float32 uniforms in [0, 1) a randomized compressor draws from `key` (an input of
  the algorithms, taken from the library's one source of them)."""
  return np.asarray(uniforms_of(key, (d,)))


def _flat64(x):
  return np.asarray(x, np.float64).reshape(-1)


def np_cast(x, dtype):
  """Round to nearest even in `dtype` (ml_dtypes / NumPy casts), back to x's dtype."""
  x = np.asarray(x)
  return x.astype(dtype).astype(x.dtype)


def np_random_k(x, key, ratio):
  """x at the k positions of the k largest of d uniforms (ties to the lower index), else 0."""
  flat = _flat64(x)
  k = max(1, math.ceil(ratio * flat.size - 1e-9))
  keep = np.argsort(-uniforms(key, flat.size), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(np.shape(x))


def np_block_sign_exact(x, exact_zeros=False, block_size=None, norm="l1"):
  """sign(x_B)·s_B per block B of `block_size` consecutive entries (the whole array if None),
  s_B = ‖x_B‖₁/|B| ("l1") or ‖x_B‖₂/√|B| ("l2"), in float64; zeros are sent as +1 unless
  exact_zeros (then sign(0) = 0)."""
  flat = _flat64(x)
  sign = np.sign(flat) if exact_zeros else np.where(flat < 0, -1.0, 1.0)
  out = np.zeros_like(flat)
  b = block_size or max(flat.size, 1)
  for start in range(0, flat.size, b):
    block = flat[start : start + b]
    scale = np.mean(np.abs(block)) if norm == "l1" else math.sqrt(np.mean(block * block))
    out[start : start + b] = sign[start : start + b] * scale
  return out.reshape(np.shape(x))


def np_qsgd(x, key, levels, bucket_size=None):
  """QSGD (Alistarh et al. 2017): ‖x_B‖·sign(x_i)·⌊s|x_i|/‖x_B‖ + u_i⌋/s per bucket B of
  `bucket_size` consecutive entries (the whole array if None), in float64."""
  flat = _flat64(x)
  u = uniforms(key, flat.size)
  out = np.zeros_like(flat)
  b = bucket_size or max(flat.size, 1)
  for start in range(0, flat.size, b):
    block = flat[start : start + b]
    norm = math.sqrt(float(np.sum(block * block)))
    if norm == 0:
      continue
    level = np.minimum(np.floor(levels * np.abs(block) / norm + u[start : start + b]), levels)
    out[start : start + b] = np.sign(block) * level * norm / levels
  return out.reshape(np.shape(x))


def np_terngrad(x, u):
  """TernGrad (Wen et al. 2017) with the uniforms u: s·sign(x_i)·b_i, s = max|x|.

  b_i = [u_i·s < |x_i|] (probability |x_i|/s; the max entry always, zeros never), computed in
  float32 exactly as the compressor does, so the result is bit-identical to it.
  """
  x = np.asarray(x)
  flat = x.reshape(-1).astype(np.float32)
  a = np.abs(flat)
  s = a.max() if a.size else np.float32(0)
  sent = (a > 0) & ((np.asarray(u, np.float32) * s < a) | (a >= s))
  out = np.where(sent, np.where(flat < 0, -s, s), np.float32(0)).astype(np.float32)
  return out.astype(x.dtype).reshape(x.shape)


# ----------------------------------------------------------------- chunked codes (SparseLoCo, DeMo)


def np_largest_divisor(n, limit):
  """The largest divisor of n that is ≤ limit, by trial from the top."""
  for s in range(min(n, limit), 0, -1):
    if n % s == 0:
      return s
  return 1


def np_chunk_layout(shape, side, vector_side):
  """(rows, cols, r, c): the array read as a (rows, cols) matrix (a vector or scalar: one row;
  more than 2 dimensions: (prod(shape[:-1]), shape[-1])) cut into (r, c) chunks, r the largest
  divisor of rows ≤ side and c of cols ≤ side (a vector: c ≤ vector_side, r = 1)."""
  size = int(np.prod(shape, dtype=np.int64))
  if len(shape) <= 1:
    return 1, size, 1, np_largest_divisor(size, vector_side)
  rows, cols = size // shape[-1], shape[-1]
  return rows, cols, np_largest_divisor(rows, side), np_largest_divisor(cols, side)


def np_chunks(shape, side, vector_side):
  """For every chunk (row-major over the grid of chunks), the flat row-major indices of its
  entries into the array, in chunk-local order (row-major inside the chunk): a list of lists."""
  rows, cols, r, c = np_chunk_layout(shape, side, vector_side)
  out = []
  for br in range(rows // r if cols else 0):
    for bc in range(cols // c):
      out.append([(br * r + i) * cols + bc * c + j for i in range(r) for j in range(c)])
  return out


def np_top_k_positions(values, k):
  """Positions of the k largest |values| (ties towards the lower position)."""
  return list(np.argsort(-np.abs(np.asarray(values, np.float64)), kind="stable")[:k])


def np_quantize(values, bits, sigmas=3.0):
  """SparseLoCo/Templar's value quantizer in float64: codes in [0, 2^bits) and per-bin means.

  μ, σ (sample standard deviation, ddof 1; 0 for fewer than two values) of the values; bin
  b covers [μ − 3σ + b·w, μ − 3σ + (b + 1)·w), w = 6σ / 2^bits, values outside the range go to
  the first or last bin (every value to bin 0 when σ = 0); bin b decodes to the mean of its
  values (0 when it holds none)."""
  v = np.asarray(values, np.float64)
  bins = 2**bits
  mu = float(np.mean(v)) if v.size else 0.0
  sigma = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
  codes = np.zeros(v.size, np.int64)
  if sigma > 0:
    width = 2 * sigmas * sigma / bins
    for i, value in enumerate(v):
      codes[i] = min(bins - 1, max(0, math.floor((value - (mu - sigmas * sigma)) / width)))
  table = np.zeros(bins)
  for b in range(bins):
    if np.any(codes == b):
      table[b] = np.mean(v[codes == b])
  return codes, table


def np_pack12(indices):
  """12-bit indices two to three bytes, by arithmetic on Python ints: a pair (a, b) is the
  24-bit number a + 4096·b in little-endian byte order (an odd count padded with a 0)."""
  idx = [int(i) for i in indices] + ([0] if len(indices) % 2 else [])
  out = []
  for a, b in zip(idx[0::2], idx[1::2]):
    word = a + 4096 * b
    out += [word % 256, (word // 256) % 256, word // 65536]
  return np.array(out, np.uint8)


def np_pack_bits(codes, bits):
  """b-bit codes, 8 // b per byte, the first code in the lowest bits (count padded with 0s)."""
  per = 8 // bits
  codes = [int(c) for c in codes]
  codes += [0] * (-len(codes) % per)
  return np.array(
    [sum(codes[i + j] * 2 ** (bits * j) for j in range(per)) for i in range(0, len(codes), per)],
    np.uint8,
  )


def np_chunked_top_k(x, key=None, k=64, chunk=64, value_bits=2, value_dtype=None):
  """SparseLoCo's compressor: per chunk of m entries the k_m = min(m, max(1, ⌈k·m/chunk²⌉))
  largest magnitudes, their values quantized per leaf (`np_quantize`, means sent in
  `value_dtype` or float32) or cast to `value_dtype`."""
  del key
  x = np.asarray(x)
  flat = x.reshape(-1)
  kept = []
  for entries in np_chunks(x.shape, chunk, chunk * chunk):
    m = len(entries)
    k_m = min(m, max(1, -(-k * m // (chunk * chunk))))
    kept += [entries[p] for p in np_top_k_positions(flat[entries], k_m)]
  out = np.zeros(flat.size, np.float64)
  values = flat[kept].astype(np.float64)
  if value_bits is None:
    wire = x.dtype if value_dtype is None else value_dtype
    out[kept] = values.astype(wire).astype(np.float64)
  else:
    codes, table = np_quantize(values, value_bits)
    wire = np.float32 if value_dtype is None else value_dtype
    out[kept] = table.astype(wire).astype(np.float64)[codes]
  return out.reshape(x.shape)


def np_dct_matrix(n):
  """Orthonormal DCT-II matrix by its definition: D[k, j] = s_k cos(π(2j + 1)k / 2n),
  s_0 = √(1/n), s_k = √(2/n)."""
  d = np.zeros((n, n))
  for k in range(n):
    s = math.sqrt((1.0 if k == 0 else 2.0) / n)
    for j in range(n):
      d[k, j] = s * math.cos(math.pi * (2 * j + 1) * k / (2 * n))
  return d


def np_dct_top_k(x, key=None, k=32, chunk=64, value_dtype=None):
  """DeMo's compressor in float64: per chunk X (r×c; vectors 1×c, c ≤ chunk), Y = D_r X D_cᵀ,
  the min(m, k) largest |Y| kept (cast to `value_dtype`, default x's dtype), X' = D_rᵀ Y' D_c."""
  del key
  x = np.asarray(x)
  rows, cols, r, c = np_chunk_layout(x.shape, chunk, chunk)
  xm = x.astype(np.float64).reshape(rows, cols)
  dr, dc = np_dct_matrix(r), np_dct_matrix(c)
  wire = x.dtype if value_dtype is None else value_dtype
  out = np.zeros_like(xm)
  for br in range(rows // r if cols else 0):
    for bc in range(cols // c):
      y = dr @ xm[br * r : (br + 1) * r, bc * c : (bc + 1) * c] @ dc.T
      keep = np_top_k_positions(y.reshape(-1), min(r * c, k))
      sent = np.zeros(r * c)
      sent[keep] = y.reshape(-1)[keep].astype(wire).astype(np.float64)
      out[br * r : (br + 1) * r, bc * c : (bc + 1) * c] = dr.T @ sent.reshape(r, c) @ dc
  return out.reshape(x.shape)


def np_dct_scatter_mean(xs, k=32, chunk=64):
  """DeMo's scatter-mean over workers: each chunk's coefficient averaged over the workers whose
  top-k sent it (coefficients no worker sent stay 0), then the inverse transform."""
  x0 = np.asarray(xs[0])
  rows, cols, r, c = np_chunk_layout(x0.shape, chunk, chunk)
  dr, dc = np_dct_matrix(r), np_dct_matrix(c)
  out = np.zeros((rows, cols))
  for br in range(rows // r):
    for bc in range(cols // c):
      total, count = np.zeros(r * c), np.zeros(r * c)
      for x in xs:
        xm = np.asarray(x, np.float64).reshape(rows, cols)
        y = (dr @ xm[br * r : (br + 1) * r, bc * c : (bc + 1) * c] @ dc.T).reshape(-1)
        for p in np_top_k_positions(y, min(r * c, k)):
          total[p] += y[p]
          count[p] += 1
      mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
      out[br * r : (br + 1) * r, bc * c : (bc + 1) * c] = dr.T @ mean.reshape(r, c) @ dc
  return out.reshape(x0.shape)


REFERENCES = {
  "identity": lambda x, key: np_identity(x),
  "cast": lambda x, key, dtype: np_cast(x, dtype),
  "top_k": lambda x, key, ratio: np_top_k(x, ratio),
  "random_k": np_random_k,
  "block_sign": lambda x, key, **kw: np_block_sign_exact(x, **kw),
  "scaled_sign": lambda x, key, exact_zeros=False: np_block_sign_exact(x, exact_zeros),
  "qsgd": np_qsgd,
  "terngrad": lambda x, key: np_terngrad(x, uniforms(key, np.size(x))),
  "chunked_top_k": np_chunked_top_k,
  "dct_top_k": np_dct_top_k,
}


def np_comp_ams(params, grads, compress, *, lr, b1=0.9, b2=0.999, eps=1e-8):
  """COMP-AMS (Li, Karimi, Li 2022, Algorithm 2) for n workers, per-leaf compression.

  Args:
    params: dict of float32 arrays θ₀.
    grads: dict of arrays shaped (T, n, *leaf_shape): worker i's gradient at step t.
    compress: per-array compressor C, or a list of T of them (step t uses compress[t]).
  Returns:
    (params after T steps, residuals dict of (n, *shape), (m, v, vhat) dicts).
  """
  theta = {k: np.array(v, np.float32) for k, v in params.items()}
  steps, n = next(iter(grads.values())).shape[:2]
  err = {k: np.zeros((n,) + v.shape, np.float32) for k, v in theta.items()}
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  v_ = {k: np.zeros_like(v) for k, v in theta.items()}
  vhat = {k: np.zeros_like(v) for k, v in theta.items()}
  for t in range(steps):
    for k in theta:
      sent = np.zeros((n,) + theta[k].shape, np.float32)
      for i in range(n):
        corrected = grads[k][t, i].astype(np.float32) + err[k][i]
        sent[i] = compress[t](corrected) if isinstance(compress, list) else compress(corrected)
        err[k][i] = corrected - sent[i]
      gbar = sent.mean(axis=0, dtype=np.float64).astype(np.float32)
      m[k] = b1 * m[k] + (1 - b1) * gbar
      v_[k] = b2 * v_[k] + (1 - b2) * gbar * gbar
      vhat[k] = np.maximum(vhat[k], v_[k])
      theta[k] = theta[k] - lr * m[k] / np.sqrt(vhat[k] + eps)
  return theta, err, (m, v_, vhat)


def np_predictive(xs, compress, *, rho=None, error_feedback=False):
  """Predictive (innovation) coding (Adikari & Draper 2021) for n workers, per-leaf compression.

  Per worker i, step t (x̂_0 = 0, e_0 = 0, x̄_0 = 0; ρ_t one scalar per leaf, shared)::

      target = x_{t,i} + e_i;  p = ρ_t x̂_{t−1,i};  u = target − p
      x̂_{t,i} = p + C(u);  e_i ← target − x̂_{t,i}
      x̄_t = ρ_t x̄_{t−1} + (1/n) Σ_i C(u_i)

  Args:
    xs: dict of arrays shaped (T, n, *leaf_shape): worker i's input vector at step t.
    compress: per-array compressor C (deterministic).
    rho: a float (fixed predictor) or None for the shared least-squares predictor
      ρ_t = Σ_i⟨target_i, x̂_{t−1,i}⟩ / Σ_i‖x̂_{t−1,i}‖² (0 when the denominator is 0).
    error_feedback: carry the residual e.
  Returns:
    (outputs: list over t of dicts x̄_t, reconstructions dict (n, *shape),
     residuals dict (n, *shape) (zeros without feedback), rhos: list over t of dicts ρ_t).
  """
  steps, n = next(iter(xs.values())).shape[:2]
  recon = {k: np.zeros(v.shape[1:], np.float32) for k, v in xs.items()}
  err = {k: np.zeros(v.shape[1:], np.float32) for k, v in xs.items()}
  avg = {k: np.zeros(v.shape[2:], np.float32) for k, v in xs.items()}
  outputs, rhos = [], []
  for t in range(steps):
    out, rho_t = {}, {}
    for k in xs:
      target = xs[k][t].astype(np.float32)
      if error_feedback:
        target = target + err[k]
      if rho is None:
        h = recon[k].astype(np.float64)
        num = float(np.sum(target.astype(np.float64) * h))
        den = float(np.sum(h * h))
        r = np.float32(num / den if den > 0 else 0.0)
      else:
        r = np.float32(rho)
      sent = np.zeros_like(recon[k])
      for i in range(n):
        p = (r * recon[k][i]).astype(np.float32)
        sent[i] = compress(target[i] - p)
        recon[k][i] = p + sent[i]
        err[k][i] = target[i] - recon[k][i]
      avg[k] = (r * avg[k] + sent.mean(axis=0, dtype=np.float64)).astype(np.float32)
      out[k], rho_t[k] = avg[k].copy(), float(r)
    outputs.append(out)
    rhos.append(rho_t)
  if not error_feedback:
    err = {k: np.zeros_like(v) for k, v in err.items()}
  return outputs, recon, err, rhos


def np_heavy_ball(theta0, grad_fn, *, lr, momentum, steps):
  """Plain heavy-ball SGD: m ← β m + g(θ, t); θ ← θ − η m. Returns the list of iterates."""
  theta = np.array(theta0, np.float64)
  m = np.zeros_like(theta)
  trace = [theta.copy()]
  for t in range(steps):
    m = momentum * m + grad_fn(theta, t)
    theta = theta - lr * m
    trace.append(theta.copy())
  return trace


def np_flatten(tree):
  """Leaves in jax's order (dict keys sorted) raveled into one float32 vector."""
  return np.concatenate([np.asarray(tree[k], np.float32).reshape(-1) for k in sorted(tree)])


def np_unflatten(vec, like):
  out, start = {}, 0
  for k in sorted(like):
    size = int(np.prod(np.shape(like[k])))
    out[k] = vec[start : start + size].reshape(np.shape(like[k]))
    start += size
  return out


def np_two_phase_comp_ams(params, grads, compress, *, lr, b1=0.9, b2=0.999, eps=1e-8):
  """COMP-AMS with the two-phase compressed all-reduce (worker and server error feedback).

  Worker i: v_i = flat(g_i) + e_i, split into n chunks (zero-padded), each compressed; e_i ← v_i −
  C(chunks). Device j: a_j = mean_i C(v_i[j]) + s_j; sends C(a_j); s_j ← a_j − C(a_j). The
  average is the concatenation of the C(a_j), fed to AMSGrad (ε inside the root, no bias
  correction).
  """
  theta = {k: np.array(v, np.float32) for k, v in params.items()}
  steps, n = next(iter(grads.values())).shape[:2]
  size = sum(int(np.prod(v.shape)) for v in theta.values())
  c = -(-size // n)
  err = np.zeros((n, size), np.float32)
  server = np.zeros((n, c), np.float32)
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  v_ = {k: np.zeros_like(v) for k, v in theta.items()}
  vhat = {k: np.zeros_like(v) for k, v in theta.items()}
  for t in range(steps):
    sent = np.zeros((n, n, c), np.float32)  # [worker, chunk]
    for i in range(n):
      vec = np_flatten({k: grads[k][t, i] for k in theta}) + err[i]
      chunks = np.pad(vec, (0, n * c - size)).reshape(n, c)
      sent[i] = np.stack([compress(ch) for ch in chunks])
      err[i] = vec - sent[i].reshape(-1)[:size]
    out = np.zeros((n, c), np.float32)
    for j in range(n):
      a = sent[:, j].mean(axis=0, dtype=np.float64).astype(np.float32) + server[j]
      out[j] = compress(a)
      server[j] = a - out[j]
    gbar = np_unflatten(out.reshape(-1)[:size], theta)
    for k in theta:
      m[k] = b1 * m[k] + (1 - b1) * gbar[k]
      v_[k] = b2 * v_[k] + (1 - b2) * gbar[k] * gbar[k]
      vhat[k] = np.maximum(vhat[k], v_[k])
      theta[k] = theta[k] - lr * m[k] / np.sqrt(vhat[k] + eps)
  return theta, err, server


def np_orthonormalize(p, eps=1e-8):
  cols = []
  for j in range(p.shape[1]):
    v = p[:, j].astype(np.float64)
    for u in cols:
      v = v - np.dot(u, v) * u
    cols.append(v / (np.linalg.norm(v) + eps))
  return np.stack(cols, axis=1)


def np_powersgd(grads, q0, *, rank):
  """PowerSGD (Vogels et al. 2019, Alg. 1 with error feedback) for one matrix leaf.

  Args:
    grads: (T, n, m, k) worker gradients; q0: (k, r) initial Q shared by all workers.
  Returns:
    (outputs (T, m, k), final residuals (n, m, k), final Q).
  """
  steps, n, mdim, kdim = grads.shape
  err = np.zeros((n, mdim, kdim))
  q = np.asarray(q0, np.float64)
  outs = []
  for t in range(steps):
    ms = grads[t].astype(np.float64) + err
    p = np.mean([mi @ q for mi in ms], axis=0)
    p_hat = np_orthonormalize(p)
    q_locals = [mi.T @ p_hat for mi in ms]
    q = np.mean(q_locals, axis=0)
    for i in range(n):
      err[i] = ms[i] - p_hat @ q_locals[i].T
    outs.append(p_hat @ q.T)
  return np.stack(outs), err, q


def np_scaled_sign_model(vecs):
  """EF-signSGD's scaled sign over a whole flattened model: sign(x)·‖x‖₁/d (zeros → +)."""
  flat = np_flatten(vecs)
  scale = np.mean(np.abs(flat), dtype=np.float64).astype(np.float32)
  return np_unflatten(np.where(flat < 0, -scale, scale).astype(np.float32), vecs)


def np_onebit_adam(params, grads, *, lr, warmup, b1=0.9, b2=0.999, eps=1e-8):
  """1-bit Adam (Tang et al. 2021) for n workers: dense Adam warm-up (no bias correction), then
  frozen v and scaled-sign compressed momentum with worker error feedback."""
  theta = {k: np.array(v, np.float32) for k, v in params.items()}
  steps, n = next(iter(grads.values())).shape[:2]
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  v = {k: np.zeros_like(x) for k, x in theta.items()}
  err = [{k: np.zeros_like(x) for k, x in theta.items()} for _ in range(n)]
  for t in range(steps):
    if t < warmup:
      gbar = {k: grads[k][t].mean(0, dtype=np.float64).astype(np.float32) for k in theta}
      m = {k: b1 * m[k] + (1 - b1) * gbar[k] for k in theta}
      v = {k: b2 * v[k] + (1 - b2) * gbar[k] * gbar[k] for k in theta}
    else:
      sent = []
      for i in range(n):
        target = {k: b1 * m[k] + (1 - b1) * grads[k][t, i] + err[i][k] for k in theta}
        c = np_scaled_sign_model(target)
        err[i] = {k: target[k] - c[k] for k in theta}
        sent.append(c)
      m = {
        k: np.mean([s[k] for s in sent], axis=0, dtype=np.float64).astype(np.float32) for k in theta
      }
    theta = {k: theta[k] - lr * m[k] / (np.sqrt(v[k]) + eps) for k in theta}
  return theta, m, v, err


def np_qadam(params, grads, compress, *, lr, b1=0.9, b2=0.999, eps=1e-8):
  """QAdam (Chen et al. 2021): local Adam per worker, compressed update with error feedback."""
  theta = {k: np.array(v, np.float32) for k, v in params.items()}
  steps, n = next(iter(grads.values())).shape[:2]
  m = [{k: np.zeros_like(x) for k, x in theta.items()} for _ in range(n)]
  v = [{k: np.zeros_like(x) for k, x in theta.items()} for _ in range(n)]
  err = [{k: np.zeros_like(x) for k, x in theta.items()} for _ in range(n)]
  for t in range(steps):
    total = {k: np.zeros_like(x, dtype=np.float64) for k, x in theta.items()}
    for i in range(n):
      for k in theta:
        g = grads[k][t, i]
        m[i][k] = b1 * m[i][k] + (1 - b1) * g
        v[i][k] = b2 * v[i][k] + (1 - b2) * g * g
        delta = m[i][k] / (np.sqrt(v[i][k]) + eps) + err[i][k]
        c = compress(delta)
        err[i][k] = delta - c
        total[k] += c
    theta = {k: theta[k] - lr * (total[k] / n).astype(np.float32) for k in theta}
  return theta


def np_adam_step(theta, g, state, *, lr, b1=0.9, b2=0.999, eps=1e-8):
  """One step of Adam with bias correction (optax.adam), in place on `state` (m, v, t)."""
  m, v, t = state
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  t = t + 1
  mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
  return theta - lr * mhat / (np.sqrt(vhat) + eps), (m, v, t)


def np_diloco(
  theta0,
  grad_fn,
  *,
  n,
  steps,
  sync_every,
  inner_lr,
  outer_lr=0.7,
  momentum=0.9,
  compress=None,
  decay=1.0,
  feedback=True,
):
  """DiLoCo (Douillard et al. 2023) with an optional compressed pseudo-gradient (SparseLoCo).

  Each of n workers takes Adam steps on grad_fn(i, θ_i) (state kept across syncs); after every
  `sync_every`-th step: d_i = θ − θ_i; with `compress` and `feedback`, e_i ← decay·e_i + d_i,
  c_i = C(e_i), e_i ← e_i − c_i (without feedback c_i = C(d_i); without a compressor
  c_i = d_i); d̄ = mean_i c_i; Nesterov SGD: b ← μ b + d̄, θ ← θ − lr (d̄ + μ b); θ_i ← θ.

  Args:
    theta0: float64 vector θ₀ (one flat parameter vector).
    grad_fn: grad_fn(i, θ_i) -> worker i's gradient at its own parameters.
  Returns:
    (θ, [θ_i], residuals (n, d)) after `steps` inner steps.
  """
  theta = np.array(theta0, np.float64)
  local = [theta.copy() for _ in range(n)]
  adam = [(np.zeros_like(theta), np.zeros_like(theta), 0) for _ in range(n)]
  err = np.zeros((n,) + theta.shape)
  buf = np.zeros_like(theta)
  for t in range(1, steps + 1):
    for i in range(n):
      local[i], adam[i] = np_adam_step(local[i], grad_fn(i, local[i]), adam[i], lr=inner_lr)
    if t % sync_every:
      continue
    sent = []
    for i in range(n):
      d = theta - local[i]
      if compress is None:
        sent.append(d)
      elif feedback:
        err[i] = decay * err[i] + d
        c = compress(err[i])
        err[i] = err[i] - c
        sent.append(c)
      else:
        sent.append(compress(d))
    dbar = np.mean(sent, axis=0)
    buf = momentum * buf + dbar
    theta = theta - outer_lr * (dbar + momentum * buf)
    local = [theta.copy() for _ in range(n)]
  return theta, local, err


# ------------------------------------------------- averaging over senders, median clipping, DeMo


def np_top_k_mask(x, k):
  """The k largest magnitudes of x (flattened) as a boolean mask shaped like x (ties: lower
  index first)."""
  flat = np.asarray(x).reshape(-1)
  mask = np.zeros(flat.size, bool)
  mask[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
  return mask.reshape(np.shape(x))


def np_senders_mean(sent, count=None):
  """Per entry, Σ_i sent[i] / max(1, count): the mean over the workers that sent the entry.

  sent: (n, ...) every worker's decoded message. count: how many workers sent each entry
  (default: the workers whose message is non-zero there)."""
  sent = np.asarray(sent, np.float64)
  if count is None:
    count = (sent != 0).sum(axis=0)
  return sent.sum(axis=0) / np.maximum(count, 1)


def np_clip_to_median(sent, block_ndim=None):
  """Every worker's message scaled to at most the median over workers of the L2 norms.

  sent: (n, ...). The norm is over the last `block_ndim` axes (default all but the worker
  axis): with block_ndim = ndim − 2, axis 1 indexes layers, each clipped on its own."""
  sent = np.asarray(sent, np.float64)
  block_ndim = sent.ndim - 1 if block_ndim is None else block_ndim
  axes = tuple(range(sent.ndim - block_ndim, sent.ndim))
  norms = np.sqrt((sent**2).sum(axis=axes, keepdims=True))
  median = np.median(norms, axis=0, keepdims=True)
  scale = np.where(norms > median, median / np.where(norms > 0, norms, 1.0), 1.0)
  return sent * scale


def np_demo(params, grads, *, lr, decay, weight_decay, select, transform=None, clip=False):
  """DeMo as bloc97/DeMo's demo.py runs it, for n workers, per leaf.

  Per step t (η = lr(t) if lr is callable), per leaf, per worker i (δ₀ = 0)::

      θ ← θ·(1 − η·λ);   δ_i ← β·δ_i + η·g_i
      c_i = forward(δ_i);  m_i = select(c_i) (a boolean mask: the coefficients sent)
      δ_i ← δ_i − inverse(c_i·m_i)
      q = inverse(Σ_i c_i·m_i / max(1, Σ_i m_i))   # scatter-mean per coefficient
      θ ← θ − η·sign(q)

  Computed in float32 in the library's order (β·δ + η·g). transform(shape) gives a leaf's
  (forward, inverse) (default: the identity, a top-k in the parameters' own domain). clip:
  every worker's sent message is first scaled to at most the median of their norms
  (`np_clip_to_median`; the identity domain only).

  Returns:
    (θ after T steps, the momenta: dict of (n, *shape)).
  """
  transform = transform or (lambda shape: (lambda x: x, lambda c: c))
  theta = {k: np.array(v, np.float32) for k, v in params.items()}
  steps, n = next(iter(grads.values())).shape[:2]
  delta = {k: np.zeros((n,) + v.shape, np.float32) for k, v in theta.items()}
  for t in range(steps):
    eta = np.float32(lr(t) if callable(lr) else lr)
    for k in theta:
      forward, inverse = transform(theta[k].shape)
      theta[k] = (theta[k] * (np.float32(1) - eta * np.float32(weight_decay))).astype(np.float32)
      coeffs, masks = [], []
      for i in range(n):
        delta[k][i] = np.float32(decay) * delta[k][i] + eta * grads[k][t, i].astype(np.float32)
        c = np.array(forward(delta[k][i]))  # a copy: δ_i changes below
        m = select(c)
        delta[k][i] = (delta[k][i] - inverse(np.where(m, c, 0))).astype(np.float32)
        coeffs.append(np.where(m, c, 0))
        masks.append(m)
      if clip:
        coeffs = np_clip_to_median(coeffs)
      q = inverse(np_senders_mean(coeffs, np.sum(masks, axis=0)))
      theta[k] = (theta[k] - eta * np.sign(q)).astype(np.float32)
  return theta, delta
