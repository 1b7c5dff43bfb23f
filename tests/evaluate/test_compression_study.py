"""The compression study: which learned models it trains (one per distinct training spec), the
study / smoke configs, and the smoke study end to end (train the baseline and an MQT model,
sweep random + FastV + MQT, write the tables), then a resumed call that redoes nothing."""

import json
import os

import pytest

from efficient_mllm.train.config import load_config
from experiments import compression_study as study
from experiments import compression_sweep as cs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "compression_sweep.py")


def test_learned_models_one_per_training_spec():
    cfg = load_config(CONFIG, "study")
    jobs = cs.plan_jobs(cfg.sweep, 256, learned_dir="/m")
    models = cs.learned_models(jobs)
    specs = [spec for _, spec, _ in models]
    # attn_pool: the avgpool windows 2 (128 and 85 tokens), 3, 4, 6; mqt: one model for all
    # budgets; pmod: one per ratio
    assert specs == ["attn_pool(pool=2)", "attn_pool(pool=3)", "attn_pool(pool=4)",
                     "attn_pool(pool=6)", "mqt(max_queries=128)",
                     "pmod(ratio=0.5000, min_ratio=0.02)",
                     "pmod(ratio=0.3333, min_ratio=0.02)", "pmod(ratio=0.2222, min_ratio=0.02)",
                     "pmod(ratio=0.1111, min_ratio=0.02)", "pmod(ratio=0.0556, min_ratio=0.02)"]
    assert all(ck == os.path.join("/m", cs.model_dir_name(lab, spec)) for ck, spec, lab in models)
    mqt = [j for j in jobs if j.label == "mqt"]
    assert [j.spec for j in mqt] == [f"mqt(max_queries=128, budget={k})"
                                     for k in (128, 85, 57, 28, 14)]
    assert len({j.checkpoint for j in mqt}) == 1 and not any(j.note for j in mqt)
    ap = [j for j in jobs if j.label == "attn_pool"]
    assert ap[1].note.startswith("same spec as budget 1/2")
    assert len({j.key() for j in jobs}) == len(jobs)  # row files do not collide
    # without learned_dir: templated checkpoints per budget, or one skipped row
    sweep = dict(cfg.sweep.to_dict(), learned_checkpoints=("ck/ap{kernel}", "ck/mqt", ""))
    jobs = cs.plan_jobs(sweep, 256)
    assert {j.checkpoint for j in jobs if j.label == "attn_pool"} == {
        "ck/ap2", "ck/ap3", "ck/ap4", "ck/ap6"}
    (pm,) = [j for j in jobs if j.label == "pmod"]
    assert pm.note.startswith("skipped")
    bad = [cs.Job("a", 0.5, "x", "learned", checkpoint="c", train_spec="s1"),
           cs.Job("a", 0.25, "y", "learned", checkpoint="c", train_spec="s2")]
    with pytest.raises(ValueError, match="two training specs"):
        cs.learned_models(bad)
    with pytest.raises(ValueError, match="learned_train has 1"):
        cs.plan_jobs(dict(sweep, learned_train=("",)), 256)


@pytest.mark.parametrize("arg", ["study", "study,digit_grid", "train,study", "smoke"])
def test_study_configs(arg):
    cfg = load_config(CONFIG, arg)
    grid = cfg.data.knobs.image_size // cfg.model.vision.patch_size
    assert ("sweep" in cfg) == ("study" in cfg) == ("train" not in arg)
    if arg != "smoke":
        assert grid * grid >= 256 and cfg.model.language.depth == 8
        if "sweep" in cfg:  # in-LLM methods drop after layer 2 of 8
            assert any(m.startswith("fastv: fastv(layer=2,") for m in cfg.sweep.methods)
    if "sweep" in cfg:
        cs.plan_jobs(cfg.sweep, grid * grid, learned_dir="/m")
    with pytest.raises(ValueError, match="exclude"):
        load_config(CONFIG, "quick,study")


def test_smoke_study_end_to_end_and_resume(tmp_path):
    overrides = {"data.data_dir": str(tmp_path / "data"), "sweep.budgets": (1.0, 0.5),
                 "train.steps": 1}
    cfg = load_config(CONFIG, "smoke", overrides)
    work = tmp_path / "study"
    res = study.run_study(cfg, str(work), benchmark_out=str(tmp_path / "bench" / "sweep_smoke"),
                          command="python -m experiments.compression_study ...")
    rows = res["rows"]
    assert [(r["method"], r["budget_label"]) for r in rows] == [
        ("baseline", "all"), ("random", "1/2"), ("fastv", "1/2"), ("mqt", "1/2")]
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
    n = 64
    by = {r["method"]: r for r in rows}
    assert by["random"]["visual_tokens"] == by["mqt"]["visual_tokens"] == n / 2  # MQT budget set
    assert by["fastv"]["stage"] == "in_llm" and by["fastv"]["visual_tokens"] == n
    assert n / 2 < by["fastv"]["layer_avg_visual_tokens"] < n
    assert by["mqt"]["train_spec"] == "mqt(max_queries=32)"
    assert all(r["prefill_ms"] > 0 and r["kv_match"] for r in rows)
    assert {m["model"]: m["state"] for m in res["meta"]["trained_models"]} == {
        "baseline": "done", "mqt-mqt_max_queries_32": "done"}
    assert res["device"].startswith("cpu")
    for name in ("compression_sweep.md", "compression_sweep.json", "pareto_flops.png",
                 "pareto_latency.png"):
        assert os.path.getsize(work / "sweep" / name) > 0
    assert sorted(os.listdir(tmp_path / "bench")) == [
        "sweep_smoke.json", "sweep_smoke.md", "sweep_smoke_pareto_flops.png",
        "sweep_smoke_pareto_latency.png"]
    md = (work / "sweep" / "compression_sweep.md").read_text()
    assert "## Trained models" in md and "`mqt(max_queries=32)`" in md
    table = (work / "readme_table.md").read_text()
    assert "| mqt (learned) |" in table and "| fastv (in-LLM) |" in table
    assert "python -m experiments.compression_study" in table
    # resume: nothing is retrained or re-measured
    stamps = {p: os.path.getmtime(work / "sweep" / "rows" / p)
              for p in os.listdir(work / "sweep" / "rows")}
    res2 = study.run_study(cfg, str(work))
    assert {m["state"] for m in res2["meta"]["trained_models"]} == {"done"}
    assert all("earlier invocation" in m["note"] for m in res2["meta"]["trained_models"])
    assert stamps == {p: os.path.getmtime(work / "sweep" / "rows" / p) for p in stamps}
    with open(work / "sweep" / "compression_sweep.json") as f:
        assert [r["accuracy"] for r in json.load(f)["rows"]] == [r["accuracy"] for r in rows]


def test_deadline_still_writes_the_tables(tmp_path):
    # a deadline already passed: nothing is trained or measured, every row says why
    overrides = {"data.data_dir": str(tmp_path / "data"), "study.deadline_s": 1.0}
    cfg = load_config(CONFIG, "smoke", overrides)
    res = study.run_study(cfg, str(tmp_path / "study"))
    assert {m["state"] for m in res["meta"]["trained_models"]} == {"not started"}
    assert all(r["status"] == "skipped" for r in res["rows"])
    assert any("not trained" in r["note"] for r in res["rows"] if r["kind"] == "learned")
    assert os.path.getsize(res["paths"]["markdown"]) > 0
    assert "| random |" in (tmp_path / "study" / "readme_table.md").read_text()
