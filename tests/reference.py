"""Independent plain-NumPy references of the papers' algorithms (no compams_jax code)."""

import math

import numpy as np


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


def np_comp_ams(params, grads, compress, *, lr, b1=0.9, b2=0.999, eps=1e-8):
  """COMP-AMS (Li, Karimi, Li 2022, Algorithm 2) for n workers, per-leaf compression.

  Args:
    params: dict of float32 arrays θ₀.
    grads: dict of arrays shaped (T, n, *leaf_shape): worker i's gradient at step t.
    compress: per-array compressor C.
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
        sent[i] = compress(corrected)
        err[k][i] = corrected - sent[i]
      gbar = sent.mean(axis=0, dtype=np.float64).astype(np.float32)
      m[k] = b1 * m[k] + (1 - b1) * gbar
      v_[k] = b2 * v_[k] + (1 - b2) * gbar * gbar
      vhat[k] = np.maximum(vhat[k], v_[k])
      theta[k] = theta[k] - lr * m[k] / np.sqrt(vhat[k] + eps)
  return theta, err, (m, v_, vhat)
