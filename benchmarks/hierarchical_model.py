"""Hierarchical network model: dense hierarchical all-reduce vs hierarchical COMP-AMS.

A mesh ("dcn", "ici"): `slices` slices of `chips` chips each. Projected time of one training step
per chip, for GPT-2 small and ResNet-18 (CIFAR, 32x32x3), 2 to 64 slices, on the link figures of
TPU v5p, TPU v5e and H200 (NVLink + InfiniBand), for:

  dense f32          reduce-scatter over ici, ring all-reduce of the chunk over dcn, all-gather
                     over ici (`cj.comp_ams(..., compressors.identity(), axis_name="dcn",
                     dense_axis_name="ici")` is exactly this; its dcn bytes are measured the same
                     way as the compressed ones)
  dense bf16         the same with 2 bytes per entry on every link (analytic: half of dense f32)
  LABEL/WIRE         hierarchical COMP-AMS (`axis_name="dcn", dense_axis_name="ici"`): the same
                     dense reduce-scatter / all-gather over ici, and the compressed exchange of
                     each chip's chunk over dcn with the gather or the two-phase wire

Inputs, per chip and step:

* dcn bytes: `cj.wire_bytes(tx, params, num_workers=slices, dense_workers=chips)`, read from the
  traced program (exact, per slice count). Gather: one all-gather of P bytes. Two-phase: one
  all-to-all of n chunk payloads and one all-gather of one chunk payload, so P = (n + 1)·c and
  c = P / (n + 1). Cross-checked (unless --no-hlo-check) against the compiled HLO of the step on
  a (2, 4) CPU mesh (`cj.sharding.compile_step`), the collectives split by replica-group size
  (2: dcn, 4: ici).
* ici bytes: each leaf padded to a multiple of `chips` (the library's chunk layout): one
  reduce-scatter of S_pad bytes and one all-gather of S_pad / chips bytes per step.
* compression compute (codec): measured on this CPU, one device, for the chunk one chip owns
  (every leaf's chunk, as the library splits them), through the same internals the wire
  strategies run (`compams_jax._src`): gather = error feedback + encode of the chunk, then
  unpacking and `decode_sum` of n gathered payloads; two-phase = error feedback + row-wise
  encode of the n sub-chunks, `decode_sum` of n received sub-chunk payloads, server-side error
  feedback + encode, decode of n gathered sub-chunk payloads. Collectives are replaced by copies
  (their cost is the link term). Timed at `--codec-ns` slice counts and interpolated linearly
  in n between them (gather's decode loop is linear in n). CPU compute is a pessimistic
  stand-in for GPU/TPU codec time: every projection is given with the CPU codec time and with
  a free codec (the two bounds).
* model compute (forward + backward), an ASSUMPTION: FLOPs per chip / (peak bf16 FLOP/s x
  `--mfu`). GPT-2 small: (6·N + 12·layers·d·ctx) FLOPs per token, `--gpt2-tokens` tokens per chip.
  ResNet-18: XLA's cost analysis of one forward + backward of `--resnet-batch` images per chip.

Time model (no overlap of communication with compute or with each other; ring algorithms):

    T = T_compute + T_ici + T_dcn + T_codec
    reduce-scatter over k:   (k−1)·α + (k−1)/k·S / B            all-gather:  (k−1)·α + (k−1)·S / B
    all-reduce over n:     2(n−1)·α + 2(n−1)/n·S / B            all-to-all:  (n−1)·α + (n−1)/n·S / B

with S the operand bytes of each collective, α the latency per message (`--alpha-dcn-us`,
`--alpha-ici-us`: assumptions) and B the per-chip bandwidth of the link.

Link figures (per chip; from the project's design notes): TPU v5p ICI 1,200 GB/s, DCN 50 Gb/s;
TPU v5e ICI 400 GB/s, 2 x 100 Gb/s NICs per 8-chip host (25 Gb/s per chip); H200 NVLink
900 GB/s, one 400 Gb/s InfiniBand NIC per GPU. Chips per slice: v5p 4 (one host), v5e 8 (one
host), H200 8 (one node). Peak bf16 FLOP/s (vendor figures, assumptions): v5p 459 T, v5e 197 T,
H200 989 T.

Run from the repository root:

    python benchmarks/hierarchical_model.py
    python benchmarks/hierarchical_model.py --alpha-dcn-us 20 --mfu 0.3 --no-hlo-check

Writes benchmarks/results/network_model_hierarchical.json and .png (or --out / --png) and
prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common

_common.force_devices(8)  # the (2, 4) mesh of the HLO cross-check

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import compams_jax as cj  # noqa: E402
from compams_jax._src import bucket  # noqa: E402
from compams_jax._src.feedback import TreeCodec, compress_with_feedback  # noqa: E402
from compams_jax._src.tree import decode_sum_tree  # noqa: E402
from compams_jax.transforms import _two_phase as two_phase  # noqa: E402

SYSTEMS = {
  "tpu_v5p": {
    "label": "TPU v5p",
    "fast_GBps": 1200.0,
    "slow_Gbps": 50.0,
    "chips": 4,
    "peak_tflops": 459.0,
    "links": "ICI 1,200 GB/s per chip; DCN 50 Gb/s per chip; 4 chips per slice",
  },
  "tpu_v5e": {
    "label": "TPU v5e",
    "fast_GBps": 400.0,
    "slow_Gbps": 25.0,
    "chips": 8,
    "peak_tflops": 197.0,
    "links": "ICI 400 GB/s per chip; 2 x 100 Gb/s NICs per 8-chip host = 25 Gb/s per chip",
  },
  "h200": {
    "label": "H200",
    "fast_GBps": 900.0,
    "slow_Gbps": 400.0,
    "chips": 8,
    "peak_tflops": 989.0,
    "links": "NVLink 900 GB/s; one 400 Gb/s InfiniBand NIC per GPU; 8 GPUs per node",
  },
}
MODELS = ("gpt2_small", "resnet18")
WIRES = ("gather", "two_phase")
DENSE, DENSE_BF16 = "dense f32", "dense bf16"


# ------------------------------------------------------------------------------ models


def model_params(name):
  """Parameter ShapeDtypeStructs (nothing model-sized is allocated)."""
  if name == "gpt2_small":
    from scale import gpt2_small_shapes

    return gpt2_small_shapes()
  from compams_jax.experiments.models import create_model

  model = create_model("resnet18", 10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)[
    "params"
  ]


def model_flops(name, args):
  """Forward + backward FLOPs of one step on one chip (and how they were obtained)."""
  if name == "gpt2_small":
    n = sum(x.size for x in jax.tree.leaves(model_params(name)))
    layers, d, ctx = 12, 768, 1024
    per_token = 6 * n + 12 * layers * d * ctx
    return per_token * args.gpt2_tokens, (
      f"(6·N + 12·layers·d·ctx) x {args.gpt2_tokens} tokens per chip (formula)"
    )
  import optax

  from compams_jax.experiments.models import create_model

  model = create_model("resnet18", 10)
  params = model_params(name)
  x = jax.ShapeDtypeStruct((args.resnet_batch, 32, 32, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((args.resnet_batch,), jnp.int32)

  def loss(p, x, y):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  cost = jax.jit(jax.grad(loss)).lower(params, x, y).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), (
    f"XLA cost analysis of forward + backward, {args.resnet_batch} images 32x32x3 per chip"
  )


def chunk_tree(params, k):
  """The chunk one of k chips owns: every leaf flattened, padded, split k ways."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((-(-x.size // k),), x.dtype), params)


def tree_bytes(tree):
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------ optimizers


def build_tx(variant):
  """variant: "dense" or (compressor spec, wire)."""
  if variant == "dense":
    return cj.comp_ams(1e-3, cj.compressors.identity(), axis_name="dcn", dense_axis_name="ici")
  spec, wire = variant
  w = cj.wire.two_phase() if wire == "two_phase" else cj.wire.gather()
  return cj.comp_ams(1e-3, spec.build(), axis_name="dcn", dense_axis_name="ici", wire=w)


def dcn_bytes(variant, params, slices, chips):
  """{n: bytes per chip handed to dcn collectives}, measured by cj.wire_bytes."""
  tx = build_tx(variant)
  if variant == "dense" or variant[1] == "gather":  # flat in n: measured at the ends, checked
    lo = cj.wire_bytes(tx, params, num_workers=min(slices), dense_workers=chips)
    hi = cj.wire_bytes(tx, params, num_workers=max(slices), dense_workers=chips)
    if lo != hi:
      return {n: cj.wire_bytes(tx, params, num_workers=n, dense_workers=chips) for n in slices}
    return dict.fromkeys(slices, lo)
  return {n: cj.wire_bytes(tx, params, num_workers=n, dense_workers=chips) for n in slices}


def hlo_check(params, variants, p_bytes_at):
  """dcn / ici operand bytes of the compiled step on a (2, 4) CPU mesh vs the accounting."""
  mesh = jax.make_mesh((2, 4), ("dcn", "ici"))
  out = {}
  for name, variant in variants.items():
    t0 = time.perf_counter()
    compiled = cj.sharding.compile_step(
      build_tx(variant), params, mesh=mesh, axis_name=("dcn", "ici")
    )
    cb = cj.collective_bytes(compiled)
    by_group = {}
    for c in cb.collectives:
      axis = {2: "dcn", 4: "ici"}.get(c.group_size, f"group {c.group_size}")
      by_group.setdefault(axis, {}).setdefault(c.opcode, 0)
      by_group[axis][c.opcode] += c.operand_bytes
    dcn = sum(by_group.get("dcn", {}).values())
    out[name] = {
      "hlo_operand_bytes_by_axis": by_group,
      "hlo_dcn_bytes": dcn,
      "wire_bytes_dcn": p_bytes_at(name),
      "equal": dcn == p_bytes_at(name),
      "collectives": cb.count,
      "compile_seconds": time.perf_counter() - t0,
    }
    print(
      f"  HLO (2,4) {name}: dcn {dcn:,} B vs wire_bytes {p_bytes_at(name):,} B; "
      f"ici {by_group.get('ici', {})}",
      flush=True,
    )
  return out


# ------------------------------------------------------------------------------ codec timing


def _median_time(f, *args, repeats):
  jax.block_until_ready(f(*args))  # compile + first run
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _random_tree(like, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype)),
    like,
  )


def codec_gather(comp, chunks, ns, repeats):
  """Seconds per chip: error feedback + encode of the chunk (once), and unpack + decode_sum of n
  gathered payloads + 1/n (per n), as `cj.wire.gather` runs them."""
  if comp.needs_key:
    raise SystemExit(f"codec timing supports key-free compressors only, not {comp!r}")
  codec = TreeCodec(comp)
  value, residual = _random_tree(chunks, 1), _random_tree(chunks, 2)

  @jax.jit
  def encode(v, r):
    out = compress_with_feedback(codec, v, r, None)
    return bucket.pack(out.payload), out.residual

  payload = jax.eval_shape(lambda v: codec.encode(v, None), chunks)
  buffer, _ = encode(value, residual)
  t_enc = _median_time(encode, value, residual, repeats=repeats)
  out = {}
  for n in ns:
    gathered = jnp.tile(buffer[None], (n, 1))

    @jax.jit
    def average(g, n=n):
      total = decode_sum_tree(comp, bucket.unpack(g, payload, lead=(n,)), chunks, None)
      return jax.tree.map(lambda t: (t / n).astype(t.dtype), total)

    out[n] = {"encode_s": t_enc, "decode_s": _median_time(average, gathered, repeats=repeats)}
    out[n]["total_s"] = out[n]["encode_s"] + out[n]["decode_s"]
    del gathered
  return out


def codec_two_phase(comp, chunks, ns, repeats):
  """Seconds per chip of `cj.wire.two_phase`'s compute on the chunk, per n (collectives
  replaced by copies): row-wise error feedback + encode, the server step on n received
  sub-chunk payloads, decode of n gathered sub-chunk payloads. Each phase is the library's
  own code (`compams_jax.transforms._two_phase`)."""
  if comp.needs_key:
    raise SystemExit(f"codec timing supports key-free compressors only, not {comp!r}")
  comp = comp.batched()
  value, residual = _random_tree(chunks, 1), _random_tree(chunks, 2)
  size = sum(x.size for x in jax.tree.leaves(chunks))
  out = {}
  for n in ns:
    c = two_phase.chunk_size(size, n)
    chunk = jax.ShapeDtypeStruct((c,), jnp.float32)
    row_payload = jax.eval_shape(lambda x: comp.encode(x, None), chunk)
    codec = two_phase.ChunkCodec(comp, n)

    @jax.jit
    def phase1(v, r, codec=codec):
      res = compress_with_feedback(codec, v, r, None)
      return bucket.pack(res.payload, lead=1), res.residual

    @jax.jit
    def phase2(received, s, n=n, chunk=chunk, row_payload=row_payload):
      got = bucket.unpack(received, row_payload, lead=(n,))
      payload, s = two_phase.reduce_chunk(comp, got, chunk, s, key=None, me=0, n=n)
      return bucket.pack(payload), s

    @jax.jit
    def finish(gathered, n=n, chunk=chunk, row_payload=row_payload):
      got = bucket.unpack(gathered, row_payload, lead=(n,))
      return two_phase.decode_chunks(comp, got, chunk, chunks, key=None, n=n)

    sent, _ = phase1(value, residual)  # (n, bytes): this worker's n rows stand for the n received
    server_res = jnp.asarray(np.random.default_rng(3).standard_normal(c).astype(np.float32))
    one, _ = phase2(sent, server_res)
    gathered = jnp.tile(one[None], (n, 1))
    t1 = _median_time(phase1, value, residual, repeats=repeats)
    t2 = _median_time(phase2, sent, server_res, repeats=repeats)
    t3 = _median_time(finish, gathered, repeats=repeats)
    out[n] = {"encode_s": t1, "server_s": t2, "decode_s": t3, "total_s": t1 + t2 + t3}
    del sent, gathered
  return out


def interpolate(measured, n):
  """Linear interpolation in n between measured slice counts (clamped at the ends)."""
  xs = sorted(measured)
  if n in measured:
    return measured[n], True
  if n <= xs[0]:
    return measured[xs[0]], False
  if n >= xs[-1]:
    return measured[xs[-1]], False
  hi = next(x for x in xs if x > n)
  lo = max(x for x in xs if x < n)
  w = (n - lo) / (hi - lo)
  return measured[lo] + w * (measured[hi] - measured[lo]), False


# ------------------------------------------------------------------------------ the model


def ring(op, s, n, alpha, bw):
  """(seconds, messages, received bytes) of one collective of operand s bytes over n members."""
  if n <= 1:
    return 0.0, 0, 0.0
  msgs, rx = {
    "all-reduce": (2 * (n - 1), 2 * (n - 1) / n * s),
    "reduce-scatter": (n - 1, (n - 1) / n * s),
    "all-gather": (n - 1, (n - 1) * s),
    "all-to-all": (n - 1, (n - 1) / n * s),
  }[op]
  return msgs * alpha + rx / bw, msgs, rx


def project(system, model_info, methods, n, args):
  """Rows of one (system, model, n): every method's time components."""
  k = system["chips"]
  b_fast = system["fast_GBps"] * 1e9
  b_slow = system["slow_Gbps"] * 1e9 / 8
  a_fast, a_slow = args.alpha_ici_us * 1e-6, args.alpha_dcn_us * 1e-6
  s_pad = model_info["padded_bytes"][k]
  t_compute = model_info["flops"] / (system["peak_tflops"] * 1e12 * args.mfu)
  rows = []
  for name, m in methods.items():
    scale = 0.5 if name == DENSE_BF16 else 1.0
    t_rs = ring("reduce-scatter", scale * s_pad, k, a_fast, b_fast)[0]
    t_ag = ring("all-gather", scale * s_pad / k, k, a_fast, b_fast)[0]
    p = m["dcn_bytes"][k][n] * scale
    if m["wire"] == "dense":
      t_dcn, _, rx = ring("all-reduce", p, n, a_slow, b_slow)
    elif m["wire"] == "gather":
      t_dcn, _, rx = ring("all-gather", p, n, a_slow, b_slow)
    else:
      c = p / (n + 1)
      t1, _, rx1 = ring("all-to-all", n * c, n, a_slow, b_slow)
      t2, _, rx2 = ring("all-gather", c, n, a_slow, b_slow)
      t_dcn, rx = t1 + t2, rx1 + rx2
    codec, measured = (0.0, True) if m["codec"] is None else interpolate(m["codec"][k], n)
    comm = t_rs + t_ag + t_dcn
    rows.append(
      {
        "method": name,
        "dcn_operand_bytes": p,
        "dcn_received_bytes": rx,
        "ici_s": t_rs + t_ag,
        "dcn_s": t_dcn,
        "codec_cpu_s": codec,
        "codec_measured_at_this_n": measured,
        "compute_s": t_compute,
        "step_s": t_compute + comm + codec,
        "step_free_codec_s": t_compute + comm,
        "comm_plus_codec_s": comm + codec,
      }
    )
  base = next(r for r in rows if r["method"] == DENSE)
  for r in rows:
    r["speedup"] = base["step_s"] / r["step_s"]
    r["speedup_free_codec"] = base["step_free_codec_s"] / r["step_free_codec_s"]
    # The codec time per step below which this method beats dense (negative: never).
    r["break_even_codec_s"] = base["step_s"] - r["step_free_codec_s"]
  return rows


def plot(projection, methods, slices, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  systems = list(SYSTEMS)
  models = sorted({p["model"] for p in projection}, key=MODELS.index)
  fig, axes = plt.subplots(
    len(models), len(systems), figsize=(4.6 * len(systems), 3.6 * len(models)), squeeze=False
  )
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, model in enumerate(models):
    for j, sysname in enumerate(systems):
      ax = axes[i][j]
      for c, name in enumerate(m for m in methods if m != DENSE):
        pts = [
          (p["slices"], p["speedup"], p["speedup_free_codec"])
          for p in projection
          if p["model"] == model and p["system"] == sysname and p["method"] == name
        ]
        xs, ys, free = zip(*sorted(pts))
        col = colors[c % len(colors)]
        has_codec = methods[name]["codec"] is not None
        label = f"{name} (CPU codec)" if has_codec else name
        ax.plot(xs, ys, marker="o", color=col, label=label)
        if has_codec:
          ax.plot(xs, free, ls="--", color=col, alpha=0.7, label=f"{name} (codec free)")
      ax.axhline(1.0, color="k", lw=0.8)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xticks(slices)
      ax.set_xticklabels([str(s) for s in slices])
      s = SYSTEMS[sysname]
      ax.set_title(f"{model}, {s['label']} ({s['chips']} chips/slice)", fontsize=9)
      if j == 0:
        ax.set_ylabel("speedup vs dense f32 hierarchical")
      if i == len(models) - 1:
        ax.set_xlabel("slices")
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _fmt_ms(s):
  ms = s * 1e3
  return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _cells(projection, slices, model):
  """(system, slices, {method: projection row}) for every system and slice count."""
  for sysname in SYSTEMS:
    for n in slices:
      yield (
        sysname,
        n,
        {
          p["method"]: p
          for p in projection
          if p["model"] == model and p["system"] == sysname and p["slices"] == n
        },
      )


def markdown(projection, methods, slices, model):
  names = [m for m in methods if m != DENSE]
  lines = [
    f"**{model}**: dense f32 step in ms (compute + comm); every other column: speedup over it "
    "with the CPU codec time / with a free codec",
    "",
    "| system | slices | dense f32 ms (dcn ms) | " + " | ".join(names) + " |",
    "|---|---|---|" + "---|" * len(names),
  ]
  for sysname, n, cell in _cells(projection, slices, model):
    d = cell[DENSE]
    row = [SYSTEMS[sysname]["label"], str(n), f"{_fmt_ms(d['step_s'])} ({_fmt_ms(d['dcn_s'])})"]
    for name in names:
      p = cell[name]
      if methods[name]["codec"] is None:
        row.append(f"{p['speedup']:.2f}")
      else:
        row.append(f"{p['speedup']:.2f} / {p['speedup_free_codec']:.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def markdown_codec(projection, methods, slices, model):
  names = [m for m in methods if methods[m]["codec"] is not None]
  lines = [
    f"**{model}**: codec time per step below which each method beats dense f32 (ms; "
    "negative: never) / codec time measured on this CPU (ms)",
    "",
    "| system | slices | " + " | ".join(names) + " |",
    "|---|---|" + "---|" * len(names),
  ]
  for sysname, n, cell in _cells(projection, slices, model):
    row = [SYSTEMS[sysname]["label"], str(n)]
    for name in names:
      p = cell[name]
      row.append(f"{p['break_even_codec_s'] * 1e3:.3g} / {p['codec_cpu_s'] * 1e3:.3g}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  ap.add_argument("--slices", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64])
  ap.add_argument(
    "--codec-ns",
    nargs="+",
    type=int,
    default=[2, 8, 64],
    help="slice counts at which the codec is timed (linear interpolation in between)",
  )
  ap.add_argument("--compressors", nargs="+", default=["top_k", "block_sign"], metavar="NAME")
  ap.add_argument("--alpha-dcn-us", type=float, default=10.0, help="latency per dcn message")
  ap.add_argument("--alpha-ici-us", type=float, default=2.0, help="latency per ici message")
  ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
  ap.add_argument("--gpt2-tokens", type=int, default=8 * 1024, help="tokens per chip per step")
  ap.add_argument("--resnet-batch", type=int, default=128, help="images per chip per step")
  ap.add_argument("--repeats", type=int, default=3, help="timed runs per codec measurement")
  ap.add_argument("--no-hlo-check", action="store_true")
  ap.add_argument("--out", default=str(_common.RESULTS / "network_model_hierarchical.json"))
  ap.add_argument("--png", default=str(_common.RESULTS / "network_model_hierarchical.png"))
  args = ap.parse_args(argv)
  start = time.perf_counter()
  slices = sorted(args.slices)
  codec_ns = sorted(set(args.codec_ns))
  chips = sorted({s["chips"] for s in SYSTEMS.values()})
  specs = _common.compressor_specs(args.compressors)
  result = {
    **_common.run_info("hierarchical_model"),
    "assumptions": {
      "alpha_dcn_s": args.alpha_dcn_us * 1e-6,
      "alpha_ici_s": args.alpha_ici_us * 1e-6,
      "mfu": args.mfu,
      "gpt2_tokens_per_chip": args.gpt2_tokens,
      "resnet_images_per_chip": args.resnet_batch,
      "systems": SYSTEMS,
      "no_overlap": True,
      "codec": "measured on this CPU (one device): a pessimistic stand-in for GPU/TPU; "
      "projections are also given with a free codec",
    },
    "slices": slices,
    "codec_ns": codec_ns,
    "models": {},
  }
  projection = []
  all_methods = {}
  for model in args.models:
    print(f"# {model}", flush=True)
    params = model_params(model)
    flops, how = model_flops(model, args)
    info = {
      "num_params": sum(x.size for x in jax.tree.leaves(params)),
      "num_leaves": len(jax.tree.leaves(params)),
      "param_bytes": tree_bytes(params),
      "padded_bytes": {k: k * tree_bytes(chunk_tree(params, k)) for k in chips},
      "flops": flops,
      "flops_source": how,
    }
    methods = {
      DENSE: {"wire": "dense", "variant": "dense", "codec": None},
      DENSE_BF16: {"wire": "dense", "variant": "dense", "codec": None},
    }
    for spec in specs:
      for wire in WIRES:
        methods[f"{spec.label}/{wire}"] = {"wire": wire, "variant": (spec, wire), "codec": {}}
    t0 = time.perf_counter()
    for name, m in methods.items():
      if name == DENSE_BF16:
        m["dcn_bytes"] = methods[DENSE]["dcn_bytes"]
        continue
      m["dcn_bytes"] = {k: dcn_bytes(m["variant"], params, slices, k) for k in chips}
      print(f"  wire_bytes {name}: { {k: v[slices[-1]] for k, v in m['dcn_bytes'].items()} }")
    info["wire_bytes_seconds"] = time.perf_counter() - t0
    for name, m in methods.items():
      if m["codec"] is None:
        continue
      spec, wire = m["variant"]
      m["codec_detail"] = {}
      for k in chips:
        t0 = time.perf_counter()
        fn = codec_gather if wire == "gather" else codec_two_phase
        detail = fn(spec.build(), chunk_tree(params, k), codec_ns, args.repeats)
        m["codec_detail"][k] = detail
        m["codec"][k] = {n: d["total_s"] for n, d in detail.items()}
        print(
          f"  codec {name}, chunk of {k} chips: "
          + ", ".join(f"n={n} {d['total_s'] * 1e3:.1f} ms" for n, d in detail.items())
          + f" ({time.perf_counter() - t0:.0f} s)",
          flush=True,
        )
    if not args.no_hlo_check:
      variants = {name: m["variant"] for name, m in methods.items() if name != DENSE_BF16}
      info["hlo_check_mesh_2x4"] = hlo_check(
        params, variants, lambda name: methods[name]["dcn_bytes"][4][2] if 2 in slices else None
      )
    for sysname, system in SYSTEMS.items():
      for n in slices:
        for row in project(system, info, methods, n, args):
          projection.append({"system": sysname, "model": model, "slices": n, **row})
    info["methods"] = {
      name: {
        "wire": m["wire"],
        "dcn_bytes": m["dcn_bytes"],
        "codec_cpu_s": m["codec"],
        "codec_detail": m.get("codec_detail"),
      }
      for name, m in methods.items()
    }
    result["models"][model] = info
    all_methods = methods
    result["projection"] = projection
    _common.write_json(args.out, result)  # partial results survive an interruption
  result["runtime_seconds"] = round(time.perf_counter() - start, 1)
  _common.write_json(args.out, result)
  for model in args.models:
    print("\n" + markdown(projection, all_methods, slices, model))
    print("\n" + markdown_codec(projection, all_methods, slices, model))
  plot(projection, all_methods, slices, args.png)
  print(f"\ntotal {result['runtime_seconds']:.0f} s; wrote {args.out} and {args.png}")


if __name__ == "__main__":
  main()
