"""The compression sweep: budget mapping (LLaVA-1.5's 576 -> 288/192/128/64/32 protocol), job
planning (dedupe, learned methods skipped without a checkpoint), the Pareto front, the config
file, and an end-to-end sweep on a tiny randomly initialised model (2 methods x 2 budgets)
that writes the table, the JSON and the PNG plots."""

import json
import os

import numpy as np
import pytest

from efficient_mllm.train.config import load_config
from experiments import compression_sweep as cs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "compression_sweep.py")
BUDGETS = (1.0, 1 / 2, 1 / 3, 2 / 9, 1 / 9, 1 / 18)


def test_budgets_follow_the_llava_protocol():
    keeps = [cs.budget_fields(f, 576)["keep"] for f in BUDGETS]
    assert keeps == [576, 288, 192, 128, 64, 32]
    assert [cs.budget_fields(f, 256)["keep"] for f in BUDGETS] == [256, 128, 85, 57, 28, 14]
    f = cs.budget_fields(1 / 9, 576)  # VisionZip's 54 + 10 split of 64
    assert (f["dominant"], f["contextual"]) == (54, 10)
    # smallest ceil-mode window leaving <= keep tokens of the 16 x 16 grid
    assert [cs.budget_fields(f, 256)["kernel"] for f in BUDGETS] == [1, 2, 2, 3, 4, 6]
    assert [cs.budget_fields(f, 256)["side"] for f in BUDGETS] == [16, 11, 9, 7, 5, 3]
    assert cs.format_spec("fastv(layer=2, keep={keep})", 0.5, 576) == "fastv(layer=2, keep=288)"
    with pytest.raises(ValueError, match="budget=1.5"):
        cs.budget_fields(1.5, 576)
    with pytest.raises(ValueError, match="unknown field"):
        cs.format_spec("random(keep={budget})", 0.5, 16)


def test_plan_jobs():
    sweep = {
        "budgets": (1.0, 0.5, 1 / 3, 2 / 9),
        "methods": ("random(keep={keep})", "pool: avgpool(kernel={kernel})"),
        "learned": ("mqt: mqt(max_queries=64, budget={keep})", "attn_pool(pool=2)"),
        "learned_checkpoints": ("runs/mqt", ""),
        "only": "",
    }
    jobs = cs.plan_jobs(sweep, 256)
    assert [(j.label, j.spec) for j in jobs[:4]] == [
        ("baseline", None), ("random", "random(keep=128)"), ("random", "random(keep=85)"),
        ("random", "random(keep=57)"),
    ]
    pool = [j for j in jobs if j.label == "pool"]
    # 128 and 85 tokens both give the 2 x 2 window (64 tokens): the second is not rerun
    assert [j.spec for j in pool] == ["avgpool(kernel=2)", "avgpool(kernel=2)", "avgpool(kernel=3)"]
    assert pool[1].note.startswith("same spec as budget 1/2") and not pool[2].note
    mqt = [j for j in jobs if j.label == "mqt"]
    assert len(mqt) == 3 and all(j.checkpoint == "runs/mqt" and not j.note for j in mqt)
    (ap,) = [j for j in jobs if j.label == "attn_pool"]
    assert ap.note.startswith("skipped: learned method")
    only = cs.plan_jobs(dict(sweep, only="random"), 256)
    assert {j.label for j in only} == {"baseline", "random"}
    with pytest.raises(ValueError, match="unknown labels"):
        cs.plan_jobs(dict(sweep, only="nope"), 256)
    with pytest.raises(ValueError, match="duplicate labels"):
        cs.plan_jobs(dict(sweep, methods=("random(keep={keep})", "random(keep=3)")), 256)
    with pytest.raises(ValueError, match="learned_checkpoints has 1"):
        cs.plan_jobs(dict(sweep, learned_checkpoints=("",)), 256)


def test_pareto_front():
    costs = [1.0, 2.0, 3.0, 2.0, 0.5, 4.0]
    accs = [0.5, 0.6, 0.55, 0.7, 0.2, 0.7]
    assert cs.pareto_front(costs, accs) == [4, 0, 3]


@pytest.mark.parametrize("arg", [None, "train", "quick", "digit_grid", "train,digit_grid"])
def test_config_modes(arg):
    cfg = load_config(CONFIG, arg)
    assert ("sweep" in cfg) == (arg is None or "train" not in arg)
    grid = cfg.data.knobs.image_size // cfg.model.vision.patch_size
    assert grid * grid >= 256 and cfg.model.pixel_shuffle == 1
    if "sweep" in cfg:
        assert cfg.sweep.budgets[0] == 1.0
        cs.plan_jobs(cfg.sweep, grid * grid)  # every template formats and parses
    with pytest.raises(ValueError, match="unknown argument"):
        load_config(CONFIG, "nope")


def test_sweep_end_to_end(tmp_path):
    overrides = {
        "data.data_dir": str(tmp_path / "data"),
        "data.knobs.image_size": 16, "data.knobs.min_object_size": 0.5,
        "data.knobs.max_object_size": 0.6, "data.knobs.max_objects": 1,
        "data.knobs.num_train": 16, "data.knobs.num_validation": 8,
        "model.language.width": 32, "model.language.depth": 2, "model.language.mlp_dim": 48,
        "model.vision.width": 16, "model.vision.depth": 1, "model.vision.mlp_dim": 32,
        "train.batch_size": 8, "eval.batch_size": 8,
        "sweep.budgets": (1.0, 0.5, 0.25), "sweep.only": "random,uniform",
        "sweep.eval_examples": 8, "sweep.latency_batch": 8, "sweep.latency_warmup": 1,
        "sweep.latency_repeats": 1, "sweep.benchmark_out": str(tmp_path / "bench" / "sweep"),
    }
    cfg = load_config(CONFIG, "quick", overrides)
    out = str(tmp_path / "out")
    res = cs.run_sweep(cfg, "", out, progress=False)
    rows = res["rows"]
    assert [(r["method"], r["budget_label"]) for r in rows] == [
        ("baseline", "all"), ("random", "1/2"), ("random", "1/4"), ("uniform", "1/2"),
        ("uniform", "1/4"),
    ]
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
    n = 64  # 16 px / patch 2
    assert [r["visual_tokens"] for r in rows] == [n, n / 2, n / 4, n / 2, n / 4]
    assert all(r["layer_avg_visual_tokens"] == r["visual_tokens"] for r in rows)  # pre-LLM
    assert all(r["kv_match"] for r in rows)
    flops = [r["prefill_gflops"] for r in rows]
    assert flops[0] > flops[1] > flops[2] and flops[1] == pytest.approx(flops[3])
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)
    assert rows[0]["eval_examples"] == 8
    for name in ("compression_sweep.json", "compression_sweep.md", "pareto_flops.png",
                 "pareto_latency.png", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "pareto_flops.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "compression_sweep.json")) as f:
        data = json.load(f)
    assert len(data["rows"]) == 5 and data["meta"]["num_visual_tokens"] == n
    assert np.isfinite(data["rows"][1]["prefill_gflops"])
    md = open(os.path.join(out, "compression_sweep.md")).read()
    assert "| random | 1/2 | `random(keep=32)` | 32.0 |" in md
    bench = tmp_path / "bench"
    assert sorted(os.listdir(bench)) == ["sweep.json", "sweep.md", "sweep_pareto_flops.png",
                                         "sweep_pareto_latency.png"]
    assert "(sweep_pareto_flops.png)" in (bench / "sweep.md").read_text()
