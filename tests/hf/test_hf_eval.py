"""``configs/hf_eval.py`` + ``experiments/hf_eval.py`` on a converted tiny random LLaVA (smoke
variant, one compressor): generation output, the sweep table/JSON with a baseline row and a
compressed row whose visual tokens match the budget."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from efficient_mllm.hf.converted import convert_to_orbax
from efficient_mllm.train.config import load_config
from experiments.hf_eval import run_hf_eval

from ._parity import tiny_llava_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_hf_eval_smoke(tmp_path):
    hf_dir = tiny_llava_dir(tmp_path / "hf")
    convert_to_orbax(hf_dir, tmp_path / "conv")
    cfg = load_config(os.path.join(ROOT, "configs", "hf_eval.py"), f"{tmp_path / 'conv'},smoke")
    assert cfg.hf.path == str(tmp_path / "conv")
    cfg.unlock()
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.sweep.only = "random"
    cfg.sweep.eval_examples = 4
    cfg.eval.batch_size = 4
    cfg.generate.max_new_tokens = 2
    cfg.lock()
    res = run_hf_eval(cfg, str(tmp_path / "run"))
    gen = json.loads((tmp_path / "run" / "generations.json").read_text())
    assert len(gen) == 1 and 1 <= len(gen[0]["tokens"]) <= 2
    rows = res["sweep"]["rows"]
    assert [r["kind"] for r in rows] == ["baseline", "training_free"]
    assert all(r["status"] == "ok" for r in rows), [r.get("note") for r in rows]
    assert rows[0]["visual_tokens"] == 4 and rows[1]["visual_tokens"] == 2
    assert os.path.isfile(res["sweep"]["paths"]["markdown"])
