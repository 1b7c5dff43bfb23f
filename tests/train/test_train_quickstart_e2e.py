"""End to end: the quickstart config, shrunk by overrides, trains 20 steps on real shapes_vqa
data with the real MLLM, its loss goes down, and the final evaluation (generation, teacher
forcing, perplexity) and report are written; then the ``experiments.evaluate`` command restores
the checkpoint onto a different mesh and reproduces the teacher-forced numbers."""

import json
import os
import subprocess
import sys

import pytest

from efficient_mllm.train.config import load_config
from efficient_mllm.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "quickstart.py")


def _overrides(tmp_path):
    return {
        "data.data_dir": str(tmp_path / "data"),
        "data.knobs.num_train": 320,
        "data.knobs.num_validation": 32,
        "train.steps": 20,
        "train.batch_size": 16,
        "train.warmup_steps": 4,
        "train.lr": 3e-3,
        "train.log_every": 4,
        "eval.batch_size": 16,
        "eval.every": 0,
        "checkpoint.every": 10,
        "model.language.depth": 1,
        "model.vision.depth": 1,
        "output.progress": False,
    }


def test_quickstart_20_steps_end_to_end(tmp_path):
    cfg = load_config(CONFIG, overrides=_overrides(tmp_path))
    run = tmp_path / "run"
    summary = train_and_evaluate(cfg, run)
    recs = [json.loads(x) for x in open(run / "metrics.jsonl")]
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"], [r["loss"] for r in train]
    final = summary["final"]
    for k in ("accuracy", "tf_accuracy", "token_accuracy", "perplexity", "accuracy/color"):
        assert k in final, k
    assert final["examples"] == 32
    assert 0.0 <= final["accuracy"] <= 1.0
    text = open(run / "report.md").read()
    assert "Per question type" in text and "tokens/s" in text
    assert (run / "loss.png").exists() and (run / "accuracy.png").exists()

    # experiments.evaluate restores the checkpoint onto another mesh (8 devices: data 2 x
    # fsdp 2 x tensor 2) and reproduces the teacher-forced numbers
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--config={CONFIG}",
           f"--checkpoint={run}", "--evaluators=teacher_forced,perplexity", f"--output={out}",
           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    cmd += [f"--config.{k}={v}" for k, v in _overrides(tmp_path).items()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(out))
    assert res["step"] == 20 and res["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "seq": 1}
    assert res["metrics"]["tf_accuracy"] == pytest.approx(final["tf_accuracy"])
    assert res["metrics"]["perplexity"] == pytest.approx(final["perplexity"], rel=1e-4)
