"""benchmarks/lm_study.py's queue and lm_study_report.py's measures, on made-up runs."""

import importlib
import json
import math
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def modules(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCH))
  try:
    yield importlib.import_module("lm_study"), importlib.import_module("lm_study_report")
  finally:
    sys.modules.pop("lm_study", None)
    sys.modules.pop("lm_study_report", None)


def _run(S, method, lr, h, val, curve=None, per_step=100, per_sync=None, steps=None):
  steps = S.STEPS if steps is None else steps
  return {
    "method": method,
    "learning_rate": lr,
    "sync_every": h,
    "workers": S.WORKERS,
    "steps": steps,
    "tokens_per_step": 4096,
    "val_curve": curve or [[steps, val]],
    "val_loss": val,
    "perplexity": math.exp(val),
    "bytes_per_step": per_step if per_sync is None else per_sync / h,
    "bytes_per_sync": per_sync,
    "run_seconds": 1.0,
  }


def test_run_names(modules):
  S, _ = modules
  assert S.run_name("adamw", 3e-3, None) == "adamw_lr3e-3_s0"
  assert S.run_name("demo", 3e-4, None) == "demo_lr3e-4_s0"
  assert S.run_name("diloco", 1e-2, 30) == "diloco_lr1e-2_H30_s0"


def test_queue_starts_every_method_at_its_middle_rate_and_holds_the_sweep(modules):
  S, _ = modules
  todo, waiting = S.queue({})
  first = todo[: len(S.GRIDS)]
  assert [t[0] for t in first] == list(S.GRIDS)
  assert [t[1] for t in first] == [g[1] for g in S.GRIDS.values()]
  assert len(todo) == sum(len(g) for g in S.GRIDS.values()) and waiting
  assert {seed for *_, seed in todo} == {S.SEED}
  # The diloco grid done (its best rate the lowest loss): its H sweep is queued at that rate.
  runs = {}
  for lr, val in zip(S.GRIDS["diloco"], (2.0, 1.5, float("nan"))):
    runs[S.run_name("diloco", lr, S.SYNC_EVERY)] = _run(S, "diloco", lr, 30, val)
  assert S.best_lr(runs, "diloco") == S.GRIDS["diloco"][1]
  todo, waiting = S.queue(runs)
  best = S.GRIDS["diloco"][1]
  assert [t for t in todo if t[0] == "diloco"] == [
    *[("diloco", best, h, S.SEED) for h in S.H_SWEEP["diloco"]],
    *[("diloco", best, S.SYNC_EVERY, seed) for seed in S.EXTRA_SEEDS],
  ]
  assert waiting  # sparseloco's grid is not done


def test_bytes_iso_loss_and_claims(modules, tmp_path):
  S, R = modules
  # Local SGD sends at completed syncs only.
  local = _run(S, "diloco", 1e-3, 30, 1.0, per_sync=3000)
  assert R.sent_after(local, 29) == 0 and R.sent_after(local, 61) == 6000
  curve = [[100, 3.0], [200, 1.9], [800, 1.5]]
  dense = _run(S, "adamw", 3e-3, None, 2.0, curve=[[100, 3.0], [800, 2.0]], per_step=1000)
  topk = _run(S, "comp_ams_top_k", 3e-3, None, 1.5, curve=curve, per_step=10)
  assert R.reach(topk, 2.0) == (200, 2000) and R.reach(topk, 1.0) is None
  runs = {S.run_name("adamw", 3e-3, None): dense, S.run_name("comp_ams_top_k", 3e-3, None): topk}
  table = "\n".join(R.methods_table(runs))
  # AdamW's 800,000 bytes over top-k's 2,000 at its first validation below 2.0: 400x.
  assert "| 400× |" in table and "100×" in table  # and 100x fewer bytes over the run
  rows = "\n".join(R.claims(runs, None))
  assert "within 1% of AdamW's validation loss | 1.5000 vs 2.0000 (-25.00%) | holds" in rows
  # A second seed of top-k at its rate: the claims and the table use the mean over seeds.
  curve2 = [[100, 3.2], [200, 2.1], [800, 1.7]]
  runs[S.run_name("comp_ams_top_k", 3e-3, None, 1)] = _run(
    S, "comp_ams_top_k", 3e-3, None, 1.7, curve=curve2, per_step=10
  )
  rows = "\n".join(R.claims(runs, None))
  assert "| 1.6000 vs 2.0000 (-20.00%) | holds at this scale, 1/2 seeds |" in rows
  assert "1.6000 ± 0.1414 (2)" in "\n".join(R.methods_table(runs))
  # The mean curve reaches 2.0 at step 200 ((1.9 + 2.1) / 2): 200 x 10 bytes.
  assert R.reach(R.best_runs(runs)["comp_ams_top_k"], 2.0) == (200, 2000)
  assert "DiLoCo at H = 30" in rows and "not yet measured" in rows


def test_utilization_is_compute_over_compute_plus_messages(modules):
  _, R = modules
  models = {
    "gpt2_small": {
      "params": 1_000_000,
      "methods": {
        "adamw": {"bytes_per_step": 4_000_000, "sync_every": 1, "collective": "all-reduce"}
      },
    }
  }
  peak, _ = R.CHIPS["H200 InfiniBand"]
  u, step = R.utilization(models, "gpt2_small", "adamw", 100e9, "H200 InfiniBand", {}, 16)
  compute = 6 * 1e6 * R.TOKENS_PER_WORKER_STEP["gpt2_small"] / (peak * R.MFU)
  comm = 8 * (2 * 15 / 16 * 4e6) / 100e9  # ring all-reduce, bits over bits/s
  assert step == pytest.approx(compute + comm) and u == pytest.approx(compute / (compute + comm))


def test_section_renders_from_the_json(modules, tmp_path):
  S, R = modules
  (tmp_path / "lm_study").mkdir()
  runs = {
    S.run_name("adamw", 3e-3, None): _run(S, "adamw", 3e-3, None, 2.0, per_step=1000),
    S.run_name("diloco", 3e-3, 30): _run(S, "diloco", 3e-3, 30, 2.1, per_sync=1000),
  }
  for name, r in runs.items():
    (tmp_path / "lm_study" / f"{name}.json").write_text(json.dumps(r))
  figs = tmp_path / "figs"
  figs.mkdir()
  text = "\n".join(R.section(tmp_path, figs, "x.png"))
  assert "Runs recorded: 2 of" in text and (figs / "lm_study.png").exists()
  assert (
    "matches data parallelism's loss at equal tokens (≤ 1%) | 2.1000 vs 2.0000 (+5.00%)" in text
  )
  assert "(grid incomplete: 1/3)" in text
  assert "no compressed or local-SGD method reaches AdamW's final loss" in text
  assert "The lowest loss among them: DiLoCo, dense pseudo-gradient (2.1000, +5.0%" in text


def test_rate_claim_reads_the_median_reduction(modules):
  _, R = modules
  rows = [
    {"delta_over_sigma": d, "rate_reduction_least_squares": r}
    for d, r in ((2.0, 1.00), (1.0, 1.03), (0.5, 1.05))
  ]
  rate = {
    "rows": rows,
    "sync_every": 30,
    "syncs": 26,
    "workers": 16,
    "coords": 100,
    "mean_consecutive_cosine_of_the_average": 0.5,
  }
  assert "1.000–1.050× fewer bits" in R._rate_claim(rate)
  assert R._rate_claim(rate).endswith("| holds, by 3.0% (median over Δ) |")
  rows[1]["rate_reduction_least_squares"] = 1.005
  assert "does not hold beyond 1% (median +0.5%)" in R._rate_claim(rate)


def test_a_best_rate_at_the_edge_extends_the_grid(modules):
  S, _ = modules
  low, mid, high = S.GRIDS["amsgrad"]
  runs = {
    S.run_name("amsgrad", lr, None): _run(S, "amsgrad", lr, None, v)
    for lr, v in ((low, 1.0), (mid, 2.0), (high, 3.0))
  }
  below = S.LADDER[S.LADDER.index(low) - 1]
  assert S.grid(runs, "amsgrad") == ([below, low, mid, high], False)
  assert S.best_lr(runs, "amsgrad") is None  # not settled: no seeds yet
  assert ("amsgrad", below, None, S.SEED) in S.queue(runs)[0]
  # The extension is worse: settled at the old edge.
  runs[S.run_name("amsgrad", below, None)] = _run(S, "amsgrad", below, None, 1.5)
  assert S.grid(runs, "amsgrad") == ([below, low, mid, high], True)
  assert S.best_lr(runs, "amsgrad") == low
  # At most MAX_EXTENSIONS: the best keeps moving down, then the grid settles anyway.
  lr = below
  for _ in range(S.MAX_EXTENSIONS):
    runs[S.run_name("amsgrad", lr, None)] = _run(S, "amsgrad", lr, None, 0.5 * lr / low)
    lr = S.LADDER[S.LADDER.index(lr) - 1]
  rates, settled = S.grid(runs, "amsgrad")
  assert settled and len(rates) == 3 + S.MAX_EXTENSIONS
