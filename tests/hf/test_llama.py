"""Llama / Qwen2 checkpoints: logits, greedy generation and export against ``transformers``.

Tiny random models (width 32-48, 2 layers) saved with ``save_pretrained``; configs cover GQA
ratios (6:2, 4:4, 8:1), explicit odd ``head_dim``, q/k/v(/o) and MLP biases, tied and untied
embeddings, odd vocabularies and the linear / llama3 / yarn RoPE scalings.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp

from efficient_mllm.hf import load_pretrained
from efficient_mllm.nn.language import LanguageModel

from ._parity import (
    BF16_TOL,
    FP32_TOL,
    check_export_roundtrip,
    hf_greedy,
    jit_logits,
    our_greedy,
    save_hf,
)

BASE = dict(num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.1)
CONFIGS = {
    "llama_gqa3_untied": (
        "llama",
        dict(
            vocab_size=101,
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=6,
            num_key_value_heads=2,
        ),
    ),
    "llama_mha_tied_bias_linear": (
        "llama",
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    "llama_mqa_headdim12_llama3": (
        "llama",
        dict(
            vocab_size=77,
            hidden_size=40,
            intermediate_size=72,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=12,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "qwen2_gqa2_tied_yarn": (
        "qwen2",
        dict(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2_gqa4_untied": (
        "qwen2",
        dict(
            vocab_size=120,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=8,
            num_key_value_heads=2,
        ),
    ),
}


def _hf_model(kind: str, kw: dict, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**BASE, **kw), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.Qwen2Config(**BASE, **kw), transformers.Qwen2ForCausalLM
    return cls(cfg).eval(), cls


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    kind, kw = CONFIGS[request.param]
    hf, cls = _hf_model(kind, kw)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param) / "hf")
    return request.param, hf, cls, load_pretrained(path), tmp_path_factory.mktemp("export")


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids, np.int64))).logits


def test_logits_match_fp32(converted):
    name, hf, _, pre, _ = converted
    assert isinstance(pre.model, LanguageModel)
    vocab = pre.config.vocab_size
    for b, t in ((1, 5), (2, 23)):
        ids = np.random.default_rng(t).integers(0, vocab, (b, t))
        ref = _hf_logits(hf, ids).numpy()
        ours = np.asarray(jit_logits(pre.model, jnp.asarray(ids, jnp.int32)))
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= FP32_TOL, name


def test_export_roundtrip(converted):
    name, hf, cls, pre, out = converted
    ids = torch.tensor(np.random.default_rng(1).integers(0, pre.config.vocab_size, (2, 9)))
    check_export_roundtrip(pre, cls, hf, out, lambda m: m(ids).logits)


@pytest.mark.parametrize("name", ["llama_gqa3_untied", "qwen2_gqa2_tied_yarn"])
def test_greedy_generation_matches(name, tmp_path):
    kind, kw = CONFIGS[name]
    hf, _ = _hf_model(kind, kw, seed=1)
    pre = load_pretrained(save_hf(hf, tmp_path / "hf"))
    rng = np.random.default_rng(2)
    rows = [rng.integers(1, kw["vocab_size"], 7), rng.integers(1, kw["vocab_size"], 12)]
    ref = hf_greedy(hf, rows, 20)
    ours = our_greedy(pre.model, rows, 20)
    np.testing.assert_array_equal(ours, ref)


def test_bf16_logits_within_tolerance(tmp_path):
    """bfloat16 parameters and compute on both sides: max abs diff <= BF16_TOL (logits are
    O(1); the two implementations round in different places)."""
    kind, kw = CONFIGS["llama_gqa3_untied"]
    hf, _ = _hf_model(kind, kw)
    path = save_hf(hf.to(torch.bfloat16), tmp_path / "hf")
    pre = load_pretrained(path)  # "auto" keeps the checkpoint's bfloat16
    assert pre.config.param_dtype == "bfloat16" and pre.config.dtype == "bfloat16"
    ids = np.random.default_rng(3).integers(0, kw["vocab_size"], (2, 11))
    ref = _hf_logits(hf, ids).float().numpy()
    ours = np.asarray(jit_logits(pre.model, jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - ref).max() <= BF16_TOL
    # Casting on request: float32 parameters hold the bf16 values exactly.
    pre32 = load_pretrained(path, param_dtype="float32")
    assert pre32.model.embed.embedding[...].dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(pre32.model.embed.embedding[...]),
        hf.model.embed_tokens.weight.detach().float().numpy(),
    )
