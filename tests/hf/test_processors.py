"""Processors equal to Hugging Face's (transformers 5.x, PIL backend) on real images.

Pixels are compared with max abs diff == 0 (the same PIL resize on the same uint8 image, then the
same float64 rescale and float32 normalisation: bit-identical). Token ids are compared exactly.
Tokenizers are trained here (byte-level BPE on scikit-learn's dataset descriptions), with each
family's special tokens and a chat template modelled on the family's, saved to ``tmp_path``.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers import InternVLProcessor as HFInternVLProcessor
from transformers import LlavaProcessor as HFLlavaProcessor
from transformers import Qwen2VLProcessor as HFQwen2VLProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as hf_got
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from efficient_mllm.hf import processors as P
from efficient_mllm.hf.chat_template import load_chat_template, render_chat_template

# --------------------------------------------------------------------------- real images


def _real_images():
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images  # 427 x 640 x 3 each
    imgs = {"china": china, "flower": flower}
    try:  # scikit-image ships more (astronaut 512x512, coffee 400x600, chelsea 300x451)
        import skimage.data as skd

        imgs.update(astronaut=skd.astronaut(), coffee=skd.coffee(), chelsea=skd.chelsea())
    except ImportError:
        pass
    # Odd sizes and aspect ratios cut from the real photos.
    imgs["tall_odd"] = np.ascontiguousarray(china[13:314, 200:357])  # 301 x 157
    imgs["wide_strip"] = np.ascontiguousarray(flower[100:147, 5:606])  # 47 x 601
    imgs["tiny"] = np.ascontiguousarray(flower[200:217, 300:323])  # 17 x 23
    imgs["square_odd"] = np.ascontiguousarray(china[:225, 100:325])  # 225 x 225
    return imgs


IMAGES = _real_images()
NAMES = sorted(IMAGES)


def _diff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


# --------------------------------------------------------------------------- image processors


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "size,crop",
    [(224, (224, 224)), (57, (48, 40)), (30, (40, 36))],  # the last pads (crop > resized image)
)
def test_clip_image_processor_matches_hf(name, size, crop):
    img = IMAGES[name]
    kw = dict(size={"shortest_edge": size}, crop_size={"height": crop[0], "width": crop[1]})
    ref = CLIPImageProcessorPil(**kw)(img, return_tensors="np")["pixel_values"]
    out = P.ClipImageProcessor(**kw)(img)["pixel_values"]
    assert out.dtype == np.float32 and out.shape == (1, 3, *crop)
    assert _diff(out, ref) == 0.0


@pytest.mark.parametrize("name", ["china", "tall_odd", "wide_strip", "square_odd"])
def test_llava_pad_to_square_matches_hf(name):
    kw = dict(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}, do_pad=True)
    ref = LlavaImageProcessorPil(**kw)(IMAGES[name], return_tensors="np")["pixel_values"]
    out = P.ClipImageProcessor(**kw)(IMAGES[name])["pixel_values"]
    assert _diff(out, ref) == 0.0


def test_clip_batch_and_fixed_size_and_longest_edge_match_hf():
    batch = [IMAGES[n] for n in ("china", "tall_odd", "tiny")]
    kw = dict(size={"height": 33, "width": 50}, do_center_crop=False)
    ref = CLIPImageProcessorPil(**kw)(batch, return_tensors="np")["pixel_values"]
    assert _diff(P.ClipImageProcessor(**kw)(batch)["pixel_values"], ref) == 0.0
    kw = dict(size={"shortest_edge": 64, "longest_edge": 90}, crop_size={"height": 60, "width": 60})
    for img in batch:
        ref = CLIPImageProcessorPil(**kw)(img, return_tensors="np")["pixel_values"]
        assert _diff(P.ClipImageProcessor(**kw)(img)["pixel_values"], ref) == 0.0


@pytest.mark.parametrize("size", [(224, 224), (37, 61)])
def test_siglip_image_processor_matches_hf(size):
    batch = [IMAGES[n] for n in NAMES]
    kw = dict(size={"height": size[0], "width": size[1]})
    ref = SiglipImageProcessorPil(**kw)(batch, return_tensors="np")["pixel_values"]
    out = P.SiglipImageProcessor(**kw)(batch)["pixel_values"]
    assert out.shape == (len(batch), 3, *size) and _diff(out, ref) == 0.0


def test_input_kinds_match_hf():
    """PIL RGBA / L / P images and numpy gray and RGBA arrays are converted to RGB as HF does."""
    base = IMAGES["tall_odd"]
    alpha = (np.arange(base.size // 3) % 256).reshape(base.shape[:2]).astype(np.uint8)
    rgba = np.concatenate([base, alpha[..., None]], axis=-1)
    gray = np.ascontiguousarray(base[..., 1])
    inputs = [Image.fromarray(rgba, "RGBA"), Image.fromarray(base).convert("L")]
    inputs += [Image.fromarray(base).convert("P"), rgba, gray[..., None]]
    kw = dict(size={"height": 40, "width": 30})
    for img in inputs:
        ref = SiglipImageProcessorPil(**kw)(img, return_tensors="np")["pixel_values"]
        assert _diff(P.SiglipImageProcessor(**kw)(img)["pixel_values"], ref) == 0.0
    # A 2-D gray array (HF wants [H, W, 1]) gives the same.
    ref = SiglipImageProcessorPil(**kw)(gray[..., None], return_tensors="np")["pixel_values"]
    assert _diff(P.SiglipImageProcessor(**kw)(gray)["pixel_values"], ref) == 0.0


def test_smart_resize_matches_hf():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (400, 2))]
    sizes += [(14, 14), (28, 28), (27, 29), (1000, 5), (5, 999), (1, 150)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                P.smart_resize(h, w)
            continue
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 16), (3136, 3136)]:
            assert P.smart_resize(h, w, 28, lo, hi) == hf_qwen.smart_resize(h, w, 28, lo, hi)


def test_patchify_order_against_loop_reference():
    """Row r holds patch (window row, window col, in-row, in-col) -> (C, T, p, p), written as a loop."""
    rng = np.random.default_rng(1)
    c, p, m, t = 3, 2, 2, 3
    img = rng.standard_normal((c, p * m * 3, p * m * 2)).astype(np.float32)
    rows, gh, gw = P.patchify_qwen2vl(img, p, m, t)
    assert (gh, gw) == (6, 4) and rows.shape == (24, c * t * p * p)
    r = 0
    for wr in range(gh // m):
        for wc in range(gw // m):
            for i in range(m):
                for j in range(m):
                    py, px = wr * m + i, wc * m + j
                    patch = img[:, py * p : (py + 1) * p, px * p : (px + 1) * p]
                    expect = np.stack([patch] * t, axis=1).reshape(-1)
                    np.testing.assert_array_equal(rows[r], expect)
                    r += 1
    with pytest.raises(ValueError, match="multiples"):
        P.patchify_qwen2vl(img[:, :5], p, m, t)


@pytest.mark.parametrize(
    "min_pixels,max_pixels",
    [(28 * 28 * 4, 28 * 28 * 64), (28 * 28 * 130, 28 * 28 * 400), (56 * 56, 28 * 28 * 1280)],
)
def test_qwen2vl_image_processor_matches_hf(min_pixels, max_pixels):
    batch = [IMAGES[n] for n in NAMES]
    kw = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    ref = hf_qwen.Qwen2VLImageProcessorPil(**kw)(batch, return_tensors="np")
    out = P.Qwen2VLImageProcessor(**kw)(batch)
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert out["pixel_values"].dtype == np.float32
    assert _diff(out["pixel_values"], ref["pixel_values"]) == 0.0
    ip = P.Qwen2VLImageProcessor(**kw)
    for img, thw in zip(batch, ref["image_grid_thw"]):
        assert ip.num_image_tokens(*img.shape[:2]) == thw.prod() // 4


def test_tile_grid_matches_hf():
    rng = np.random.default_rng(2)
    sizes = [tuple(map(int, s)) for s in rng.integers(1, 2500, (300, 2))]
    sizes += [(448, 448), (448, 896), (100, 125), (125, 100), (300, 450), (448, 1344), (10, 3000)]
    for lo, hi in [(1, 12), (1, 6), (2, 9), (1, 1), (3, 3)]:
        hf_got.get_optimal_tiled_canvas.cache_clear()
        for h, w in sizes:
            ref = hf_got.get_optimal_tiled_canvas((h, w), (448, 448), lo, hi)
            assert P.tile_grid(h, w, 448, 448, lo, hi) == ref, (h, w, lo, hi)


@pytest.mark.parametrize("tile,lo,hi", [(448, 1, 12), (56, 1, 6), (28, 2, 9), (56, 1, 1)])
def test_internvl_tiling_matches_hf(tile, lo, hi):
    names = NAMES if tile < 448 else ["china", "tall_odd", "wide_strip"]
    batch = [IMAGES[n] for n in names]
    kw = dict(size={"height": tile, "width": tile}, min_patches=lo, max_patches=hi)
    ref = hf_got.GotOcr2ImageProcessorPil(crop_to_patches=True, **kw)(batch, return_tensors="np")
    out = P.InternVLImageProcessor(
        crop_to_patches=True, image_mean=P.OPENAI_CLIP_MEAN, image_std=P.OPENAI_CLIP_STD, **kw
    )(batch)
    np.testing.assert_array_equal(out["num_patches"], ref["num_patches"])
    assert _diff(out["pixel_values"], ref["pixel_values"]) == 0.0
    ip = P.InternVLImageProcessor(**kw)
    assert [ip.num_patches(*im.shape[:2]) for im in batch] == list(ref["num_patches"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="dtype uint8"):
        P.ClipImageProcessor()(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        P.ClipImageProcessor()(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="PIL image"):
        P.ClipImageProcessor()("not an image")
    with pytest.raises(ValueError, match="min_pixels"):
        P.Qwen2VLImageProcessor(min_pixels=100, max_pixels=10)
    with pytest.raises(ValueError, match="min_patches"):
        P.InternVLImageProcessor(min_patches=3, max_patches=2)
    with pytest.raises(ValueError, match="resample"):
        P.ClipImageProcessor(resample=17)


# --------------------------------------------------------------------------- tokenizers


LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# A Llama-style variant that writes the BOS itself (the processor must not add a second one).
LLAVA_BOS_TEMPLATE = "{{ bos_token }}" + LLAVA_TEMPLATE

QWEN2VL_TEMPLATE = """{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}<|im_end|>
{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>
{% endif %}{% endfor %}{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

INTERNVL_TEMPLATE = """{% if messages[0]['role'] == 'system' and messages[0]['content'] is not string %}{{ raise_exception('system content must be a string') }}{% endif %}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"""


def _corpus():
    from sklearn import datasets

    texts = [datasets.load_iris().DESCR, datasets.load_wine().DESCR, datasets.load_diabetes().DESCR]
    texts += ["What is shown in this image? Describe it in detail.", "A cat sits on the mat."]
    return texts * 2


def _bpe(special):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


LLAVA_SPECIALS = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_TOKENS += ["<|image_pad|>", "<|video_pad|>"]
INTERNVL_EXTRA = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """One saved tokenizer folder per family (HF-side tokenizer objects alongside)."""
    root = tmp_path_factory.mktemp("tok")
    out = {}
    # LLaVA: Llama-style, BOS added by the post-processor, <image> as a model-specific token.
    bpe = _bpe(["<unk>", "<s>", "</s>"])
    bpe.save(str(root / "llava.json"))
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(root / "llava.json"),
        add_bos_token=True,
        extra_special_tokens={"image_token": "<image>"},
        chat_template=LLAVA_TEMPLATE,
        **LLAVA_SPECIALS,
    )
    hf.save_pretrained(root / "llava")
    out["llava"] = (root / "llava", hf)
    # Qwen2-VL: no BOS, chat-ML tokens; pad is <|endoftext|>.
    bpe = _bpe(QWEN_TOKENS)
    bpe.save(str(root / "qwen.json"))
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(root / "qwen.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2VL_TEMPLATE,
    )
    hf.save_pretrained(root / "qwen")
    out["qwen"] = (root / "qwen", hf)
    # InternVL: Qwen2-style LM plus <img>, </img>, <IMG_CONTEXT> named as HF's InternVL names them.
    bpe = _bpe(QWEN_TOKENS[:3])
    bpe.save(str(root / "internvl.json"))
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(root / "internvl.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=INTERNVL_EXTRA,
        chat_template=INTERNVL_TEMPLATE,
    )
    hf.save_pretrained(root / "internvl")
    out["internvl"] = (root / "internvl", hf)
    return out


TEXTS = [
    "What is shown in this image? Describe it in detail.",
    "  leading spaces, tabs\tand\nnew lines  ",
    "Ünïcödé — 画像 🙂 and numbers 3.14159",
    "special <|im_start|>inside<|im_end|> text <image> and <s> </s>",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Describe the data set."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Iris: 150 samples."}]},
        {"role": "user", "content": [{"type": "text", "text": "And wine?"}]},
    ],
    [{"role": "user", "content": "plain string content"}],
]


@pytest.mark.parametrize("family", ["llava", "qwen", "internvl"])
def test_tokenizer_and_chat_template_match_hf(family_dirs, family):
    path, _ = family_dirs[family]
    ref = AutoTokenizer.from_pretrained(path)
    tok = P.PretrainedTokenizer.from_pretrained(path)
    assert tok.vocab_size == len(ref)
    assert tok.named_special_tokens == ref.special_tokens_map
    for t in TEXTS:
        assert tok(t, return_tensors=None)["input_ids"] == [ref(t)["input_ids"]]
        assert tok.encode(t) == ref.encode(t, add_special_tokens=False)
    for side in ("left", "right"):
        got = tok(TEXTS, padding=True, padding_side=side)
        exp = ref(TEXTS, padding=True, padding_side=side, return_tensors="np")
        np.testing.assert_array_equal(got["input_ids"], exp["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], exp["attention_mask"])
    for t in TEXTS:
        ids = ref.encode(t)
        assert tok.decode(ids, skip_special=False) == ref.decode(ids)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    for conv in CONVERSATIONS:
        if family == "llava" and isinstance(conv[-1]["content"], str):
            continue  # the LLaVA template reads content blocks only
        for gen in (False, True):
            text = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == text
            assert tok.apply_chat_template(
                conv, add_generation_prompt=gen
            ) == ref.apply_chat_template(
                conv, add_generation_prompt=gen, tokenize=True, return_dict=False
            )


def test_tokenizer_built_in_code_and_saved(tmp_path):
    """Constructor BOS/EOS flags as transformers applies them; save_pretrained round trip."""
    bpe = _bpe(["<unk>", "<s>", "</s>"])
    ref = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        add_bos_token=True,
        add_eos_token=True,
        extra_special_tokens={"image_token": "<image>"},
        **LLAVA_SPECIALS,
    )
    tok = P.PretrainedTokenizer(
        tokenizers.Tokenizer.from_str(bpe.to_str()),
        special_tokens={**LLAVA_SPECIALS, "image_token": "<image>"},
        add_bos_token=True,
        add_eos_token=True,
        chat_template=LLAVA_TEMPLATE,
    )
    for t in TEXTS:
        assert tok(t)["input_ids"].tolist() == [ref(t)["input_ids"]]
    assert tok.image_token == "<image>" and tok.image_token_id == tok.token_to_id("<image>")
    tok.save_pretrained(tmp_path)
    again = P.PretrainedTokenizer.load(tmp_path)
    hf_again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.named_special_tokens == tok.named_special_tokens == hf_again.special_tokens_map
    for t in TEXTS:
        assert again(t)["input_ids"].tolist() == tok(t)["input_ids"].tolist()
        assert hf_again(t)["input_ids"] == ref(t)["input_ids"]
    conv = CONVERSATIONS[0]
    assert again.apply_chat_template(conv) == hf_again.apply_chat_template(conv, return_dict=False)
    with pytest.raises(ValueError, match="save_pretrained"):
        tok.save(tmp_path / "t.json")


def test_tokenizer_from_hand_written_config(tmp_path):
    """A checkpoint-style folder: AddedToken dicts, add_bos/add_eos flags, template list in the
    config, a tokenizer.json without post-processor, a special token missing from its vocabulary."""
    bpe = _bpe(["<unk>", "<s>", "</s>"])
    bpe.save(str(tmp_path / "tokenizer.json"))

    def added(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True, "__type": "AddedToken"}  # fmt: skip

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": added("<s>"),
        "eos_token": added("</s>"),
        "unk_token": added("<unk>"),
        "pad_token": "<pad>",  # not in tokenizer.json: added as a special token
        "add_bos_token": True,
        "add_eos_token": True,
        "padding_side": "left",
        "chat_template": [
            {"name": "default", "template": LLAVA_TEMPLATE},
            {"name": "tool_use", "template": QWEN2VL_TEMPLATE},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = AutoTokenizer.from_pretrained(tmp_path)
    tok = P.PretrainedTokenizer.from_pretrained(tmp_path)
    assert tok.pad_id == ref.pad_token_id and tok.bos_id == ref.bos_token_id == 1
    # transformers 5 ignores add_bos_token / add_eos_token when tokenizer.json exists.
    assert tok("a b")["input_ids"][0, 0] != tok.bos_id
    assert tok.padding_side == ref.padding_side == "left"
    got = tok(TEXTS[:3], padding=True)
    exp = ref(TEXTS[:3], padding=True, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], exp["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], exp["attention_mask"])
    conv = CONVERSATIONS[1][1:]
    assert tok.apply_chat_template(conv, tokenize=False) == ref.apply_chat_template(
        conv, tokenize=False
    )
    assert load_chat_template(tmp_path, "tool_use") == QWEN2VL_TEMPLATE
    with pytest.raises(ValueError, match="no chat template 'nope'"):
        load_chat_template(tmp_path, "nope")


def test_render_chat_template_features():
    conv = CONVERSATIONS[1]
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"x": "<&>"}}}]
    text = render_chat_template(QWEN2VL_TEMPLATE, conv, tools=tools, add_generation_prompt=True)
    assert '"x": "<&>"' in text and text.endswith("<|im_start|>assistant\n")
    conv2 = [
        {
            "role": "user",
            "content": [{"type": "image", "image": np.zeros(3)}, {"type": "text", "text": "hi"}],
        }
    ]
    text = render_chat_template(QWEN2VL_TEMPLATE, conv2, add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>hi" in text
    text, spans = render_chat_template(LLAVA_TEMPLATE, conv[1:3], return_generation_spans=True)
    assert [text[a:b] for a, b in spans] == ["Iris: 150 samples. "]
    bad = [{"role": "system", "content": [{"type": "text", "text": "x"}]}]
    with pytest.raises(Exception, match="system content must be a string"):
        render_chat_template(INTERNVL_TEMPLATE, bad)
    with pytest.raises(ValueError, match="messages"):
        render_chat_template(QWEN2VL_TEMPLATE, [])
    with pytest.raises(Exception, match="underscore|may not start"):
        render_chat_template("{% set ns = namespace(_x=1) %}", conv)


# --------------------------------------------------------------------------- full processors


class _NoVideo:
    """HF Qwen2-VL / InternVL processors insist on a video processor (torchvision); none is used."""

    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return super().check_argument_for_proper_class(name, arg)


class _HFQwen(_NoVideo, HFQwen2VLProcessor):
    pass


class _HFInternVL(_NoVideo, HFInternVLProcessor):
    pass


def _image_conv(n_images, text="Describe the picture.", system=False):
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    conv = [{"role": "user", "content": content}]
    if system:
        conv = [{"role": "system", "content": "Be brief."}] + conv
    return conv


def _compare(out, ref, keys):
    assert set(out) == set(keys), (sorted(out), keys)
    for k in keys:
        r = np.asarray(ref[k])
        assert out[k].shape == r.shape, (k, out[k].shape, r.shape)
        if np.issubdtype(r.dtype, np.floating):
            assert _diff(out[k], r) == 0.0, k
        else:
            np.testing.assert_array_equal(out[k], r, err_msg=k)


@pytest.mark.parametrize("template", ["plain", "bos"])
def test_llava_processor_matches_hf(family_dirs, tmp_path, template):
    path, _ = family_dirs["llava"]
    hf_tok = AutoTokenizer.from_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 42})
    chat = LLAVA_TEMPLATE if template == "plain" else LLAVA_BOS_TEMPLATE
    ref = HFLlavaProcessor(
        image_processor=ip,
        tokenizer=hf_tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat,
    )
    ref.save_pretrained(tmp_path)  # processor_config.json with a nested image_processor
    proc = P.LlavaProcessor.from_pretrained(tmp_path)
    keys = ["input_ids", "attention_mask", "pixel_values"]
    texts = ["USER: <image>\nWhat is this? ASSISTANT:", "<image> and <image> compared", "no image"]
    imgs = [IMAGES["china"], IMAGES["tall_odd"], IMAGES["tiny"]]
    exp = ref(text=texts, images=imgs, padding=True, return_tensors="np")
    _compare(proc(texts, imgs, padding=True), exp, keys)
    assert (exp["input_ids"] == proc.image_token_id).sum() == 3 * (4 * 3 + 1 - 1)
    # Chat: messages carrying their images; the BOS is not doubled when the template writes it.
    for system in (False, True):
        conv = _image_conv(1, system=system)
        conv[-1]["content"][0]["image"] = IMAGES["wide_strip"]
        exp = ref.apply_chat_template(
            conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
        )
        _compare(proc(conv, add_generation_prompt=True), exp, keys)
        assert proc.apply_chat_template(
            conv, add_generation_prompt=True
        ) == ref.apply_chat_template(conv, add_generation_prompt=True)


def test_qwen2vl_processor_matches_hf(family_dirs, tmp_path):
    path, _ = family_dirs["qwen"]
    hf_tok = AutoTokenizer.from_pretrained(path)
    ip = hf_qwen.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40)
    ref = _HFQwen(
        image_processor=ip, tokenizer=hf_tok, video_processor=None, chat_template=QWEN2VL_TEMPLATE
    )
    hf_tok.save_pretrained(tmp_path)  # checkpoint layout: tokenizer files +
    ip.save_pretrained(tmp_path)  # preprocessor_config.json
    proc = P.Qwen2VLProcessor.from_pretrained(tmp_path)
    keys = ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"{pad}{pad} two pictures", f"one {pad} here", "none"]
    imgs = [IMAGES["china"], IMAGES["wide_strip"], IMAGES["square_odd"]]
    for side in ("left", "right"):
        exp = ref(text=texts, images=imgs, padding=True, padding_side=side, return_tensors="np")
        _compare(proc(texts, imgs, padding=True, padding_side=side), exp, keys)
    convs = [_image_conv(2), _image_conv(1, "Short.", system=True)]
    conv_imgs = [IMAGES["tiny"], IMAGES["flower"], IMAGES["tall_odd"]]
    exp = ref.apply_chat_template(
        convs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np",
        padding=True, images=conv_imgs,
    )  # fmt: skip
    _compare(proc(convs, conv_imgs, add_generation_prompt=True, padding=True), exp, keys)


def test_internvl_processor_matches_hf(family_dirs, tmp_path):
    path, _ = family_dirs["internvl"]
    hf_tok = AutoTokenizer.from_pretrained(path)
    # Saved with crop_to_patches=False, as InternVL checkpoints are: the processor turns it on.
    ip = hf_got.GotOcr2ImageProcessorPil(
        size={"height": 28, "width": 28}, max_patches=6, crop_to_patches=False,
        image_mean=P.IMAGENET_DEFAULT_MEAN, image_std=P.IMAGENET_DEFAULT_STD,
    )  # fmt: skip
    ref = _HFInternVL(
        image_processor=ip, tokenizer=hf_tok, video_processor=None, image_seq_length=3,
        chat_template=INTERNVL_TEMPLATE,
    )  # fmt: skip
    hf_tok.save_pretrained(tmp_path)
    ip.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": 3}))
    proc = P.InternVLProcessor.from_pretrained(tmp_path)
    keys = ["input_ids", "attention_mask", "pixel_values"]
    texts = ["<IMG_CONTEXT>\nfirst", "text only", "a <IMG_CONTEXT> b <IMG_CONTEXT>"]
    imgs = [IMAGES["china"], IMAGES["square_odd"], IMAGES["wide_strip"]]
    exp = ref(text=texts, images=imgs, padding=True, return_tensors="np")  # pads on the left
    _compare(proc(texts, imgs, padding=True), exp, keys)
    conv = _image_conv(1, system=True)
    conv[-1]["content"][0]["image"] = Image.fromarray(IMAGES["tall_odd"])
    exp = ref.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    _compare(proc(conv, add_generation_prompt=True), exp, keys)


def test_processor_errors(family_dirs, tmp_path):
    path, _ = family_dirs["qwen"]
    hf_qwen.Qwen2VLImageProcessorPil().save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    proc = P.Qwen2VLProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="1 '<\\|image_pad\\|>' placeholders but 0 images"):
        proc("<|image_pad|>")
    with pytest.raises(ValueError, match="unknown arguments"):
        proc("text", add_vision_id=True)
    with pytest.raises(ValueError, match="videos"):
        proc("<|video_pad|>")
    with pytest.raises(ValueError, match="different lengths"):
        proc(["a", "a much longer text"])
    with pytest.raises(ValueError, match="padding"):
        proc(["a"], padding="sideways")
    with pytest.raises(ValueError, match="max_length"):
        proc(["a b c d"], padding="max_length", max_length=1)
    with pytest.raises(ValueError, match="urls are not fetched"):
        proc([{"role": "user", "content": [{"type": "image", "url": "http://x/y.png"}]}])
    with pytest.raises(ValueError, match="no tokenizer.json"):
        P.PretrainedTokenizer.from_pretrained(tmp_path / "missing")
