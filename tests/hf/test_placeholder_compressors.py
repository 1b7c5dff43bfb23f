"""Every registered compressor on the placeholder models (Qwen2-VL, Qwen2.5-VL, InternVL).

Tiny random models built from our configs (fp32); batch 2 with different prompt lengths, row 1
holding two images (tiles) separated by text, both rows with the same number of image tokens
(what in-LLM compressors need here). References: the uncompressed model on a physically pruned
prompt, a numpy float64 attention probe, and FastV recomputed by hand (blocks before the drop on
the full sequence, the probe's top tokens kept, the rest on the short sequence).
"""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import efficient_mllm.compress  # noqa: F401  (registers the compressors)
from efficient_mllm import registry
from efficient_mllm.nn.attention import apply_positions
from efficient_mllm.nn.internvit import InternViTConfig
from efficient_mllm.nn.internvl import InternVLConfig, InternVLModel
from efficient_mllm.nn.language import LanguageConfig
from efficient_mllm.nn.placeholder_mllm import scatter_features
from efficient_mllm.nn.qwen2_vl import QwenVLConfig, QwenVLImages, QwenVLModel
from efficient_mllm.nn.qwen2_vl_vision import QwenVisionConfig

IMG = 5
V = 61
QWEN_GRIDS = ((1, 4, 8), (1, 4, 4), (1, 4, 4))  # 8, 4 and 4 LLM tokens
N_ROW = 8  # image tokens per row (both models)

# One spec per registered compressor (a new registry entry must be added here).
PRE = {
    "attn_pool": "attn_pool(pool=2)",
    "avgpool": "avgpool(kernel=2)",
    "divprune": "divprune(keep=2)",
    "dymu": "dymu(threshold=0.5, capacity=3)",
    "fastervlm": "fastervlm(keep=2, fallback='mean_query')",
    "flashvlm": "flashvlm(keep=2, fallback='mean_query')",
    "fourier_vlm": "fourier_vlm(keep_side=(1, 2))",
    "mqt": "mqt(max_queries=3)",
    "pixel_shuffle": "pixel_shuffle(factor=2)",
    "prumerge_plus": "prumerge_plus(keep=2, neighbors=2, fallback='mean_query')",
    "random": "random(keep=2, seed=1)",
    "todre": "todre(keep=2)",
    "tome": "tome(keep=2)",
    "uniform": "uniform(keep=2)",
    "visionzip": "visionzip(dominant=1, contextual=1, fallback='mean_query')",
    "vtc_cls": "vtc_cls(keep=2, layers=(-1, -2), fallback='mean_query')",
}
IN_LLM = {
    "fastv": "fastv(layer=1, keep=3)",
    "pmod": "pmod(ratio=0.5)",
    "sparsevlm": "sparsevlm(layers=(1, 2), keep=(5, 3))",
    "zipvl": "zipvl(layer=2, tau=0.5, capacity=4)",
}
LEARNED = ("attn_pool", "mqt", "pixel_shuffle", "pmod")


def _lang(rope_type):
    kw = dict(mrope_sections=(1, 1, 2)) if rope_type == "mrope" else {}
    return LanguageConfig(
        vocab_size=V, width=32, depth=3, heads=4, kv_heads=2, mlp_dim=48, rope_type=rope_type, **kw
    )


def _config(kind, compressor=None):
    if kind == "internvl":
        vis = InternViTConfig(
            image_size=8,
            patch_size=2,
            width=16,
            depth=2,
            heads=2,
            mlp_dim=24,
            qkv_bias=True,
            use_mean_pooling=False,
        )
        return InternVLConfig(
            language=_lang("rope"), vision=vis, image_token_id=IMG, compressor=compressor
        )
    common = dict(width=16, depth=2, heads=2, mlp_dim=24, out_dim=32, patch_size=2)
    if kind == "qwen2_vl":
        vis = QwenVisionConfig(**common)
    else:  # Qwen2.5-VL: window blocks (2x2 merged tokens) except the last
        vis = QwenVisionConfig(
            **common,
            norm="rmsnorm",
            mlp="swiglu",
            mlp_activation="silu",
            window_size=8,
            fullatt_block_indexes=(1,),
        )
    return QwenVLConfig(
        language=_lang("mrope"), vision=vis, image_token_id=IMG, compressor=compressor
    )


def _inputs(kind, seed=0):
    """(tokens [2, T], lengths [2], images): row 0 one image (2 tiles), row 1 two (1 + 1)."""
    rng = np.random.default_rng(seed)

    def text(n):
        return list(rng.integers(10, V, n))

    if kind == "internvl":
        images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
        per = [8, 4, 4]
    else:
        n = sum(t * h * w for t, h, w in QWEN_GRIDS)
        images = QwenVLImages(jnp.asarray(rng.normal(size=(n, 24)), jnp.float32), QWEN_GRIDS)
        per = [t * h * w // 4 for t, h, w in QWEN_GRIDS]
    rows = [
        text(3) + [IMG] * per[0] + text(4),
        text(1) + [IMG] * per[1] + text(2) + [IMG] * per[2] + text(1),
    ]
    t = max(map(len, rows))
    tokens = np.zeros((2, t), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32), images


_BASE = {}


def _base(kind):
    if kind not in _BASE:
        cls = InternVLModel if kind == "internvl" else QwenVLModel
        _BASE[kind] = cls(_config(kind), rngs=nnx.Rngs(0))
    return _BASE[kind]


def _with(kind, spec):
    """A model with compressor ``spec`` sharing the base model's weights."""
    base = _base(kind)
    model = type(base)(dataclasses.replace(base.cfg, compressor=spec), rngs=nnx.Rngs(1))
    nnx.update(model, nnx.state(base))
    return model


@nnx.jit
def _run(model, tokens, lengths, images):
    out = model(tokens, images, lengths=lengths)
    return out.logits, out.state.lengths, out.state.extra.get("visual_tokens")


KINDS = ("qwen2_vl", "qwen2_5_vl", "internvl")


def test_every_compressor_is_covered():
    # other test modules register throwaway '_test_*' entries in the same process
    names = {n for n in registry.COMPRESSORS.names() if not n.startswith("_")}
    assert names == set(PRE) | set(IN_LLM)


# (kind, name) pairs the dedicated tests below run in more detail; the loop skips them.
DEDICATED = {
    ("qwen2_5_vl", "fastervlm"),
    ("internvl", "fastervlm"),
    ("qwen2_5_vl", "flashvlm"),
    ("internvl", "flashvlm"),
    ("qwen2_vl", "fastv"),
    ("qwen2_5_vl", "fastv"),
    ("internvl", "fastv"),
    ("qwen2_5_vl", "attn_pool"),
    ("internvl", "pmod"),
    ("qwen2_5_vl", "mqt"),
    ("internvl", "mqt"),
}
# Qwen2.5-VL runs every method. InternVL runs those that read its signals, text context or
# parameters; the token-only ones (TOKEN_ONLY) take the path test_vl_compress checks on InternVL
# with random / divprune / uniform. Qwen2-VL (no window blocks) runs the probe-driven path.
LOOP = {
    "qwen2_vl": ("fastervlm",),
    "qwen2_5_vl": tuple(sorted(PRE) + sorted(IN_LLM)),
    "internvl": (
        "attn_pool",
        "pixel_shuffle",
        "prumerge_plus",
        "sparsevlm",
        "todre",
        "visionzip",
        "vtc_cls",
        "zipvl",
    ),
}


TOKEN_ONLY = {"avgpool", "divprune", "dymu", "fourier_vlm", "random", "tome", "uniform"}


def test_loop_covers_the_registry():
    everything = set(PRE) | set(IN_LLM)
    assert set(LOOP["qwen2_5_vl"]) == everything
    internvl = set(LOOP["internvl"]) | {n for k, n in DEDICATED if k == "internvl"}
    assert internvl | TOKEN_ONLY == everything


@pytest.mark.parametrize(
    "kind,name", [(k, n) for k in KINDS for n in LOOP[k] if (k, n) not in DEDICATED]
)
def test_every_compressor_runs(kind, name):
    spec = {**PRE, **IN_LLM}[name]
    model = _with(kind, spec)
    tokens, lengths, images = _inputs(kind)
    logits, seen, visual = _run(model, tokens, lengths, images)
    b, t = tokens.shape
    assert logits.shape == (b, t, V)
    valid = np.arange(t)[None] < np.asarray(lengths)[:, None]
    assert np.isfinite(np.asarray(logits)[valid]).all()
    text = np.asarray(lengths) - N_ROW
    if name in IN_LLM:
        visual = np.asarray(visual)
        assert visual.shape == (b, 3)
        np.testing.assert_array_equal(visual[:, 0], N_ROW)  # block 0 sees every image token
        assert (visual[:, -1] < N_ROW).all() and (visual >= 0).all()
        if name != "pmod":  # drop stages shorten the sequence (p-MoD routes, keeps all)
            np.testing.assert_array_equal(np.asarray(seen), lengths - N_ROW + visual[:, -1])
    else:
        kept = np.asarray(seen) - text  # image tokens the decoder sees per row
        assert ((kept >= 1) & (kept < N_ROW)).all(), kept
        if name in ("fastervlm", "uniform", "divprune", "random", "todre", "vtc_cls"):
            # keep=2 per image: Qwen rows hold 1 and 2 images, InternVL rows 2 tiles each
            np.testing.assert_array_equal(kept, [4, 4] if kind == "internvl" else [2, 4])


def _np_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _qwen_probe_ref(visual, images, block):
    """numpy float64 mean-query probe of ViT block ``block`` per attention segment."""
    from efficient_mllm.nn.qwen2_vl_vision import vision_layout
    from efficient_mllm.ops import masks as masks_lib
    from efficient_mllm.ops import rope as rope_ops

    cfg = visual.cfg
    pos, frames, windows = vision_layout(images.grid_thw, 2, cfg.window_merged)
    full = masks_lib.segment_ids(jnp.asarray(frames)[None])
    win = None if windows is None else masks_lib.segment_ids(jnp.asarray(windows)[None])
    x = visual.patch_embed(images.pixel_values)[None]
    p = jnp.asarray(pos)[None]
    for i in range(block):
        x = visual.blocks[i](x, positions=p, mask=win if cfg.is_window_block(i) else full)
    qkv = visual.blocks[block].attn.qkv(visual.blocks[block].norm1(x))
    q = np.asarray(rope_ops.apply_rope_2d(qkv[:, :, 0], p, theta=cfg.rope_theta)[0], np.float64)
    k = np.asarray(rope_ops.apply_rope_2d(qkv[:, :, 1], p, theta=cfg.rope_theta)[0], np.float64)
    seg = windows if cfg.is_window_block(block) else frames
    out = np.zeros(len(seg))
    for s in np.unique(seg):
        idx = np.flatnonzero(seg == s)
        qbar = q[idx].mean(0)  # [H, d]
        logits = np.einsum("hd,nhd->hn", qbar, k[idx]) / np.sqrt(q.shape[-1])
        out[idx] = _np_softmax(logits).mean(0)
    return out.reshape(-1, 4).sum(-1)  # merge cells: 4 consecutive patches


def _internvl_probe_ref(model, images, block):
    """numpy float64 [CLS] row of InternViT block ``block``, patches, summed per 2x2 cell."""
    vit = model.vision
    x = vit.forward(images, layer=block)[0]  # the input of block ``block``
    attn = vit.blocks[block].attn
    h = vit.blocks[block].norm1(x)
    q = np.asarray(attn.q(h), np.float64)
    k = np.asarray(attn.k(h), np.float64)
    logits = np.einsum("bhd,bnhd->bhn", q[:, 0], k) / np.sqrt(q.shape[-1])
    row = _np_softmax(logits).mean(1)[:, 1:]  # drop the CLS key
    n = row.shape[0]
    return row.reshape(n, 2, 2, 2, 2).sum((2, 4)).reshape(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_signals_match_reference(kind):
    model = _base(kind)
    _, _, images = _inputs(kind)
    sig = model.image_signals(
        images, cls_attention=True, cls_attention_layers=(-1, -2), features=True
    )
    k = model.num_image_features(images)
    assert sig.tokens.shape == (k, 32)
    np.testing.assert_allclose(sig.tokens, model.image_features(images), atol=1e-6)
    if kind == "internvl":
        ref_last = _internvl_probe_ref(model, images, 1)
        np.testing.assert_allclose(
            sig.layer_cls_attention[1], _internvl_probe_ref(model, images, 0), atol=1e-6
        )
        assert sig.cls.shape == (4, 16)
        assert sig.features.shape == (k, 64)
        # rows sum to 1 - p(CLS -> CLS) per tile: below 1
        assert (np.asarray(sig.cls_attention).reshape(4, -1).sum(1) < 1).all()
    else:
        ref_last = _qwen_probe_ref(model.visual, images, 1)
        ref_first = _qwen_probe_ref(model.visual, images, 0)  # a window block on Qwen2.5-VL
        assert sig.cls is None
        hidden = model.visual(images.pixel_values, images.grid_thw).hidden
        np.testing.assert_allclose(sig.features, np.asarray(hidden).reshape(k, 64), atol=1e-6)
        np.testing.assert_allclose(sig.layer_cls_attention[1], ref_first, atol=1e-6)
        # per image (full block) the probe sums to 1
        sums = np.add.reduceat(np.asarray(sig.cls_attention), [0, 8, 12])
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    np.testing.assert_allclose(sig.cls_attention, ref_last, atol=1e-6)
    np.testing.assert_allclose(sig.layer_cls_attention[0], ref_last, atol=1e-6)


@nnx.jit
def _embed_and_run(model, tokens, lengths, images):
    _, positions, new_lengths, aux = model.embed_inputs(tokens, images, lengths)
    return model(tokens, images, lengths=lengths).logits, positions, new_lengths, aux["kept"]


@pytest.mark.parametrize(
    "kind,name",
    [
        ("qwen2_5_vl", "fastervlm"),
        ("internvl", "fastervlm"),
        ("qwen2_5_vl", "flashvlm"),
        ("internvl", "flashvlm"),
    ],
)
def test_signal_pruning_equals_pruned_prompt(kind, name):
    """Pre-LLM pruning driven by the ViT probe (and text): the kept slots are the compressor's
    choice on the model's signals, and the logits equal the uncompressed decoder on the
    physically pruned prompt (kept tokens with their original 3D / 1D positions)."""
    base, model = _base(kind), _with(kind, PRE[name])
    tokens, lengths, images = _inputs(kind)
    logits, positions, new_lengths, live = map(
        np.asarray, _embed_and_run(model, tokens, lengths, images)
    )
    image_mask = np.asarray(tokens == IMG) & (
        np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    )
    sig = base.image_signals(images, cls_attention=True)
    sizes = [4] * 4 if kind == "internvl" else [8, 4, 4]
    assert live[image_mask].sum() == 2 * len(sizes)  # keep=2 per image (tile)
    if name == "fastervlm":  # top-2 probe scores of each image (tile), in slot order
        scores = np.asarray(sig.cls_attention)
        want, off = [], 0
        for n in sizes:
            top = np.argsort(-scores[off : off + n])[:2]
            want.append(np.isin(np.arange(n), top))
            off += n
        np.testing.assert_array_equal(live[image_mask], np.concatenate(want))
    full_embeds = np.asarray(
        scatter_features(base.language.embed_tokens(tokens), jnp.asarray(image_mask), sig.tokens)
    )
    full_pos = base.positions(tokens, images, lengths, None)
    if full_pos is None:
        full_pos = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
    full_pos = np.asarray(full_pos)
    short_e, short_p = np.zeros_like(full_embeds), np.zeros_like(full_pos)
    for b in range(2):
        idx = np.flatnonzero(live[b])
        assert idx.size == new_lengths[b]
        short_e[b, : idx.size] = full_embeds[b, idx]
        short_p[..., b, : idx.size] = full_pos[..., b, idx]
        np.testing.assert_array_equal(positions[..., b, : idx.size], full_pos[..., b, idx])
    ref = np.asarray(
        base.language(
            jnp.asarray(short_e), positions=jnp.asarray(short_p), lengths=jnp.asarray(new_lengths)
        ).logits
    )
    for b in range(2):
        idx = np.flatnonzero(live[b])
        np.testing.assert_allclose(logits[b, idx], ref[b, : idx.size], atol=1e-5, rtol=1e-5)


def _fastv_reference(base, tokens, lengths, images, layer, keep):
    """FastV by hand: blocks < ``layer`` on the full prompt, the top-``keep`` image tokens of
    the last token's head-averaged attention in block ``layer - 1`` (numpy float64) kept, the
    later blocks on the physically shortened prompt. Returns (kept [B, T], logits [B, T, V])
    with a dropped position reading the last kept one before it."""
    embeds, positions, lens, _ = base.embed_inputs(tokens, images, lengths)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    hidden = {}

    def capture(i, h, state):
        hidden[i] = h
        return h, state

    base.language(embeds, positions=positions, lengths=lens, layer_hook=capture)
    block = base.language.blocks[layer - 1]
    x = block.attn_norm(hidden[layer - 1])
    q = np.asarray(apply_positions(block.attn.q(x), positions, block.attn.cfg), np.float64)
    k = np.asarray(apply_positions(block.attn.k(x), positions, block.attn.cfg), np.float64)
    group = q.shape[2] // k.shape[2]
    lens = np.asarray(lens)
    image = np.asarray(tokens == IMG) & (np.arange(t)[None] < lens[:, None])
    kept = np.arange(t)[None] < lens[:, None]
    for r in range(b):
        last = lens[r] - 1
        logit = np.einsum("hd,thd->ht", q[r, last], np.repeat(k[r, : last + 1], group, axis=1))
        score = _np_softmax(logit / np.sqrt(q.shape[-1])).mean(0)
        img = np.flatnonzero(image[r])
        drop = img[np.argsort(-score[img], kind="stable")[keep:]]
        kept[r, drop] = False
    count = kept.sum(1)
    order = np.argsort(~kept, axis=1, kind="stable")
    pos = np.asarray(positions)
    short_pos = np.take_along_axis(pos, np.broadcast_to(order, pos.shape), axis=-1)
    after = jnp.take_along_axis(hidden[layer], jnp.asarray(order)[..., None], axis=1)

    def replace(i, h, state):
        return (after if i == layer else h), state

    ref = np.asarray(
        base.language(
            jnp.take_along_axis(embeds, jnp.asarray(order)[..., None], 1),
            positions=jnp.asarray(short_pos),
            lengths=jnp.asarray(count),
            layer_hook=replace,
        ).logits
    )
    src = np.maximum(np.cumsum(kept, axis=1) - 1, 0)  # short index of the last kept token <= t
    return kept, np.take_along_axis(ref, src[..., None], axis=1)


@pytest.mark.parametrize("kind", KINDS)
def test_fastv_equals_manual_drop(kind):
    layer, keep = 2, 3
    model = _with(kind, f"fastv(layer={layer}, keep={keep})")
    tokens, lengths, images = _inputs(kind)
    logits, _, visual = _run(model, tokens, lengths, images)
    kept, ref = _fastv_reference(_base(kind), tokens, lengths, images, layer, keep)
    np.testing.assert_array_equal(np.asarray(visual), [[N_ROW, N_ROW, keep]] * 2)
    valid = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    # every valid position (dropped ones read the last kept token before them)
    np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert (~kept & valid).sum() == 2 * (N_ROW - keep)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "internvl"])
def test_prefill_decode_with_in_llm_compressor(kind):
    """Cached generation after FastV's prefill equals the full forward over prompt + answer
    (``prompt_lengths``: the prompt alone rates the image tokens), step by step."""
    model = _with(kind, "fastv(layer=1, keep=3)")
    tokens, lengths, images = _inputs(kind)
    steps = 3
    cache = model.language.init_cache(2, tokens.shape[1] + steps)
    prefill = nnx.jit(lambda m, t, i, n, c: m.prefill(t, i, n, c))
    decode = nnx.jit(lambda m, t, c: m.decode(t, c))
    logits, cache, info = prefill(model, tokens, images, lengths, cache)
    np.testing.assert_array_equal(np.asarray(info["visual_tokens_per_layer"])[:, -1], 3)
    step_logits, gen = [np.asarray(logits)], []
    for _ in range(steps):
        tok = np.argmax(step_logits[-1], axis=-1).astype(np.int32)
        gen.append(tok)
        if len(gen) < steps:
            logits, cache = decode(model, jnp.asarray(tok)[:, None], cache)
            step_logits.append(np.asarray(logits))
    full = np.zeros((2, tokens.shape[1] + steps), np.int32)
    full[:, : tokens.shape[1]] = np.asarray(tokens)
    for r, n in enumerate(np.asarray(lengths)):
        full[r, n : n + steps] = [g[r] for g in gen]
    fwd = nnx.jit(lambda m, t, i, n, p: m(t, i, lengths=n, prompt_lengths=p).logits)
    ref = np.asarray(fwd(model, jnp.asarray(full), images, lengths + steps, lengths))
    for j, lg in enumerate(step_logits):
        np.testing.assert_allclose(
            lg, ref[np.arange(2), np.asarray(lengths) - 1 + j], atol=1e-4, rtol=1e-4
        )


def _loss(model, tokens, lengths, images):
    logits = model(tokens, images, lengths=lengths).logits
    return jnp.mean(jax.nn.log_softmax(logits)[..., 11] ** 2)


@pytest.mark.parametrize(
    "kind,name", [("qwen2_5_vl", "attn_pool"), ("internvl", "pmod"), ("qwen2_5_vl", "mqt")]
)
def test_learned_compressor_gradients(kind, name):
    model = _with(kind, {**PRE, **IN_LLM}[name])
    comp = model.in_llm_compressor if name in IN_LLM else model.compressor
    assert isinstance(comp, nnx.Module)  # a submodule: trained with the model
    tokens, lengths, images = _inputs(kind)
    grads = nnx.jit(nnx.grad(_loss))(model, tokens, lengths, images)
    sub = grads.in_llm_compressor if name in IN_LLM else grads.compressor
    leaves = jax.tree.leaves(sub)
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "internvl"])
def test_mqt_budgets(kind):
    model = _with(kind, "mqt(max_queries=3)")
    model.eval()
    tokens, lengths, images = _inputs(kind)
    images_per_row = np.array([2, 2]) if kind == "internvl" else np.array([1, 2])
    for m in (1, 2, 3):
        model.compressor.set_budget(m)
        logits, seen, _ = _run(model, tokens, lengths, images)
        np.testing.assert_array_equal(np.asarray(seen), lengths - N_ROW + m * images_per_row)
        assert np.isfinite(np.asarray(logits)).all()


def test_unsupported_layouts_raise():
    tokens, lengths, images = _inputs("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"QwenVLModel.*fastervlm.*\[CLS\]"):
        _with("qwen2_5_vl", "fastervlm(keep=2)")(tokens, images, lengths=lengths)
    # in-LLM compression needs the same number of image tokens in every row
    grids = ((1, 4, 8), (1, 4, 4))
    n = sum(t * h * w for t, h, w in grids)
    imgs = QwenVLImages(jnp.zeros((n, 24)), grids)
    tok = np.full((2, 12), 11, np.int32)
    tok[0, 1:9] = IMG
    tok[1, 2:6] = IMG
    with pytest.raises(ValueError, match=r"fastv.*rows hold \[8, 4\] image tokens"):
        _with("qwen2_5_vl", IN_LLM["fastv"])(jnp.asarray(tok), imgs)
