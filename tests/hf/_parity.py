"""Shared helpers for the Hugging Face parity tests: padding, greedy generation on both sides,
and the export round-trip check. Reference = ``transformers`` (torch CPU, float32)."""

from __future__ import annotations

import os

import numpy as np
import torch

import jax.numpy as jnp

from efficient_mllm.hf import load_pretrained, save_pretrained
from efficient_mllm.kvcache.generate import generate

FP32_TOL = 1e-4  # max abs logit difference, float32
BF16_TOL = 0.1  # max abs logit difference, bfloat16 parameters and compute (logits ~ O(1))


def save_hf(model, path) -> str:
    """``save_pretrained`` + the path as str."""
    model.save_pretrained(path)
    return str(path)


def right_pad(rows: list[np.ndarray], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> (right-padded int32 ``[B, T]``, lengths ``[B]``) as our ``generate`` expects."""
    t = max(len(r) for r in rows)
    out = np.full((len(rows), t), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


def left_pad(rows: list[np.ndarray], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> (left-padded ids, attention mask) as HF ``generate`` expects."""
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad, np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    return torch.tensor(ids), torch.tensor(mask)


def hf_greedy(model, rows, steps: int, **inputs) -> np.ndarray:
    """``steps`` greedy tokens per row from ``model.generate`` (left padding, no early stop)."""
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **inputs,
        )
    return out[:, ids.shape[1] :].numpy()


def our_greedy(model, rows, steps: int, images=None) -> np.ndarray:
    """``steps`` greedy tokens per row from our ``kvcache.generate`` (right padding)."""
    tokens, lengths = right_pad(rows)
    out = generate(
        model,
        jnp.asarray(tokens),
        lengths=jnp.asarray(lengths),
        images=None if images is None else jnp.asarray(images),
        max_new_tokens=steps,
    )
    return np.asarray(out.tokens)


def check_export_roundtrip(pre, hf_cls, hf_ref, out_dir, forward) -> None:
    """Exports ``pre`` to ``out_dir``, reloads it with ``hf_cls.from_pretrained`` and checks
    every tensor equals ``hf_ref``'s and ``forward(model)`` is identical on both."""
    save_pretrained(
        pre.model, pre.config, out_dir, family=pre.family, original_hf_config=pre.hf_config
    )
    reloaded = hf_cls.from_pretrained(out_dir).eval()
    ref_sd, new_sd = hf_ref.state_dict(), reloaded.state_dict()
    assert sorted(ref_sd) == sorted(new_sd)
    for k, v in ref_sd.items():
        assert torch.equal(v, new_sd[k]), k
    with torch.no_grad():
        assert torch.equal(forward(hf_ref), forward(reloaded))
    again = load_pretrained(out_dir)
    assert again.config == pre.config


LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def tiny_llava_dir(path, *, seed: int = 0) -> str:
    """A tiny random LLaVA-1.5 (CLIP 28 px / 14 px patches, 2-layer Llama) saved with
    ``save_pretrained``, plus a word-level ``tokenizer.json`` covering the synthetic VQA words
    with LLaVA's special tokens (``<image>`` is the model's image token)."""
    import tokenizers
    import transformers
    from tokenizers import models, normalizers, pre_tokenizers

    from efficient_mllm.data.datasets import synthetic_tokenizer

    words = [w for w in synthetic_tokenizer().vocab if not w.startswith("<")]
    vocab = {t: i for i, t in enumerate(list(LLAVA_SPECIALS) + words)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(LLAVA_SPECIALS))
    torch.manual_seed(seed)
    vc = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    tc = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=vocab["<image>"]
    )
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    tok.save(os.path.join(str(path), "tokenizer.json"))
    return str(path)


def jit_logits(model, *args, **kwargs):
    """``model(*args, **kwargs).logits`` as one jitted program (faster than eager op-by-op
    dispatch for these tiny models)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, args):
        return nnx.merge(graphdef, state)(*args, **kwargs).logits

    return run(state, args)
