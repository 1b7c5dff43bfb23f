"""``experiments/hf_eval.py`` on converted tiny random Qwen2.5-VL and InternVL checkpoints (built
as ``test_finetune_placeholder.py`` builds them): greedy generation, then a 2-method x 2-budget
sweep (pre-LLM ``random``, in-LLM ``fastv``; InternVL one budget) on ``shapes_vqa``. Every row must run; the
baseline's visual tokens equal the model's image tokens per example (Qwen: 16 merged tokens;
InternVL: 2 x 2 tiles + thumbnail, 4 tokens each), compressed rows keep the budget (InternVL's
pre-LLM budget per tile), accuracies and FLOPs are finite, and the analytic KV bytes equal the
real cache's. The Qwen vision FLOPs are checked against a per-block sum written out here."""

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from efficient_mllm.hf.converted import convert_to_orbax
from efficient_mllm.train.config import load_config
from experiments.hf_eval import run_hf_eval

from .test_finetune_placeholder import _hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (image tokens per example, pre-LLM budget unit, budgets): Qwen 64x64 -> 16x16 -> 8x8 patches
# -> 16 tokens; InternVL 4 + 1 tiles of 4 tokens. One budget for InternVL keeps the file's CPU
# time down (every row compiles a prefill, a generation loop and a decode step).
EXPECTED = {"qwen2_5_vl": (16, 16, (1 / 2, 1 / 4)), "internvl": (20, 4, (1 / 2,))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_hf_eval_placeholder(family, tmp_path, data_dir):
    _hf_checkpoint(family, str(tmp_path / "hf"))
    convert_to_orbax(tmp_path / "hf", tmp_path / "conv")
    cfg = load_config(os.path.join(ROOT, "configs", "hf_eval.py"), f"{tmp_path / 'conv'},smoke")
    cfg.unlock()
    cfg.data.data_dir = data_dir
    cfg.sweep.methods = ("random: random(keep={keep})", "fastv: fastv(layer=1, keep={keep})")
    n, unit, budgets = EXPECTED[family]
    cfg.sweep.budgets = budgets
    cfg.sweep.eval_examples = 3  # one batch of 4 rows: the last one is padding
    cfg.eval.batch_size = 4
    cfg.data.knobs.num_validation = 3
    cfg.generate.max_new_tokens = 2
    cfg.generate.prompts = ("<image> what color is the shape ?", "what is it ?")
    cfg.lock()
    res = run_hf_eval(cfg, str(tmp_path / "run"))

    gen = res["generations"]
    assert len(gen) == 2 and all(1 <= len(g["tokens"]) <= 2 for g in gen)
    rows = res["sweep"]["rows"]
    want_rows = [("baseline", 1.0)] + [(m, b) for m in ("random", "fastv") for b in budgets]
    assert [(r["method"], r["budget"]) for r in rows] == want_rows
    assert all(r["status"] == "ok" for r in rows), [r.get("note") for r in rows]
    assert res["sweep"]["meta"]["num_visual_tokens"] == n
    base = rows[0]
    assert base["visual_tokens"] == n and base["layer_avg_visual_tokens"] == n
    for r in rows:
        assert math.isfinite(r["accuracy"]) and 0 <= r["accuracy"] <= 1
        assert r["eval_examples"] == 3
        assert math.isfinite(r["prefill_gflops"]) and r["prefill_gflops"] > 0
        assert r["kv_match"], r
        assert r["prefill_flops"]["vit"] == base["prefill_flops"]["vit"] > 0
    for r in rows[1:]:
        keep = max(1, round(r["budget"] * (unit if r["method"] == "random" else n)))
        want = keep * (n // unit) if r["method"] == "random" else keep
        assert r["budget_tokens"] == want, r
        if r["method"] == "random":  # pre-LLM: fewer tokens at the decoder input
            assert r["stage"] == "pre_llm" and r["visual_tokens"] == want
        else:  # FastV keeps all n through block 1, then `keep` in block 2 (depth 2)
            assert r["stage"] == "in_llm" and r["visual_tokens"] == n
            assert r["layer_avg_visual_tokens"] == (n + keep) / 2
        assert r["prefill_gflops"] < base["prefill_gflops"]
        assert r["kv_bytes"] < base["kv_bytes"]
    assert os.path.isfile(res["sweep"]["paths"]["markdown"])


def _qwen_vit_reference(v, width, grid):
    """Qwen2.5-VL ViT + merger FLOPs, block by block, windows enumerated patch by patch."""
    gh, gw = grid
    m, n = v.spatial_merge_size, gh * gw
    side = (v.window_size or 10**9) // v.patch_size  # patches per window side
    win = np.zeros((gh, gw), np.int64)
    for i in range(gh):
        for j in range(gw):
            win[i, j] = (i // side) * 1000 + j // side
    _, counts = np.unique(win, return_counts=True)
    total = 2.0 * n * v.in_channels * v.temporal_patch_size * v.patch_size**2 * v.width
    for b in range(v.depth):
        qkv_o = 2.0 * n * (3 * v.width * v.width + v.width * v.width)
        mlp = 2.0 * n * v.width * v.mlp_dim * (3 if v.mlp == "swiglu" else 2)
        full = not v.window_size or b in v.fullatt_block_indexes
        pairs = n * n if full else float(np.sum(counts**2))
        total += qkv_o + mlp + 2.0 * 2.0 * v.width * pairs
    h = m * m * v.width
    return total + 2.0 * (n // (m * m)) * (h * h + h * width)


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (14, 4)])
def test_qwen_vision_flops(grid, version):
    from efficient_mllm.evaluate.efficiency import vision_flops
    from efficient_mllm.nn.qwen2_vl import QwenVLConfig

    vision = dict(width=8, depth=3, heads=2, mlp_dim=12, out_dim=16, patch_size=2)
    if version == "2.5":  # SwiGLU, 2 x 2 merged-token windows, block 1 full attention
        vision.update(mlp="swiglu", mlp_activation="silu", norm="rmsnorm", window_size=8,
                      fullatt_block_indexes=(1,))
    cfg = QwenVLConfig.from_dict(dict(
        language=dict(vocab_size=50, width=16, depth=1, heads=2, mlp_dim=8, rope_type="mrope",
                      mrope_sections=(1, 1, 2)),
        vision=vision, image_token_id=7))
    got = vision_flops(cfg, grid=grid)
    np.testing.assert_allclose(got["total"], _qwen_vit_reference(cfg.vision, 16, grid),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="patch grid"):
        vision_flops(cfg)
