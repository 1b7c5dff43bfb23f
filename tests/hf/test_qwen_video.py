"""Qwen2-VL / Qwen2.5-VL video inputs against ``transformers`` (torch CPU, no downloads).

Processor: torch's uint8 antialiased bicubic resize re-implemented bit-exactly; the video
processor equals HF's ``Qwen2VLVideoProcessor`` (when torchvision imports; otherwise its
pipeline on torch ops: HF's ``smart_resize``, the ``interpolate`` call torchvision makes for
uint8 bicubic, HF's fused normalisation and ``view``/``permute`` patching) on procedural frames
(a moving square, odd frame counts and sizes); HF's ``Qwen2VLProcessor`` /
``Qwen2_5_VLProcessor`` expand the same prompts (images and videos mixed) to the same ids.
Model: tiny random HF models converted with ``hf.load_pretrained``; video + image + text logits
(batch 2, rows of different lengths, a video and an image in each row, in both orders) within
FP32_TOL, 3D positions equal to ``get_rope_index`` (Qwen2.5-VL: fractional
``tokens_per_second * second_per_grid``), 20 greedy tokens identical.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax.numpy as jnp
from flax import nnx
from transformers import PreTrainedTokenizerFast
from transformers import Qwen2_5_VLProcessor as HFQwen25Processor
from transformers import Qwen2VLProcessor as HFQwen2Processor
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen_img

from efficient_mllm.hf import load_pretrained
from efficient_mllm.hf import processors as P
from efficient_mllm.hf.video_processors import Qwen2VLVideoProcessor, resize_uint8_antialias
from efficient_mllm.kvcache.generate import generate
from efficient_mllm.nn.qwen2_vl import QwenVLImages
from efficient_mllm.ops import rope as rope_ops

from ._parity import FP32_TOL, hf_greedy, left_pad, right_pad, save_hf
from .test_qwen2_vl import IMG, VEND, VSTART, _hf_model

VID = 6  # video_token_id of test_qwen2_vl's tiny models


# --------------------------------------------------------------------------- processor


def _moving_square(frames, height, width, channels=3, seed=0):
    """uint8 [T, H, W, C]: a bright square moving diagonally over a smooth noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = (40 + 60 * np.sin(yy / 5.0) + 50 * np.cos(xx / 7.0))[..., None]
    out = np.empty((frames, height, width, channels), np.uint8)
    side = max(3, min(height, width) // 3)
    for t in range(frames):
        img = base + rng.normal(0, 12, (height, width, channels)) + np.arange(channels) * 20
        y0, x0 = (3 * t) % max(1, height - side), (5 * t) % max(1, width - side)
        img[y0 : y0 + side, x0 : x0 + side] = [230, 60, 200][:channels]
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _torch_resize(frames, h, w):
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    y = torch.nn.functional.interpolate(x, size=[h, w], mode="bicubic", align_corners=False,
                                        antialias=True)
    return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape", [(37, 53, 28, 56), (100, 61, 28, 28), (13, 9, 56, 84),
                                   (50, 50, 50, 28), (31, 77, 84, 28), (240, 320, 112, 168)])
def test_resize_is_torch_uint8_antialias(shape):
    h, w, oh, ow = shape
    x = np.random.default_rng(h * w).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_uint8_antialias(x, oh, ow), _torch_resize(x, oh, ow))


class _TorchVideoReference:
    """HF ``Qwen2VLVideoProcessor``'s pipeline on torch ops (used when torchvision, which
    transformers' video processors import, is not installed)."""

    def __init__(self, min_pixels, max_pixels, patch_size=14, temporal_patch_size=2,
                 merge_size=2, cap_pixels_per_frame=False, max_video_tokens=128000):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size, self.merge_size = patch_size, merge_size
        self.temporal_patch_size = temporal_patch_size
        self.cap, self.max_video_tokens = cap_pixels_per_frame, max_video_tokens

    def _one(self, video):
        x = torch.from_numpy(video).permute(0, 3, 1, 2).contiguous()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        t, c, h, w = x.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        max_pixels = self.max_pixels
        if self.cap:
            total = int(self.max_video_tokens * p * m * p * m * 0.9)
            max_pixels = max(min(max_pixels, total * tp // t), int(self.min_pixels * 1.05))
        rh, rw = hf_qwen_img.smart_resize(h, w, p * m, self.min_pixels, max_pixels)
        if (rh, rw) != (h, w):
            x = torch.nn.functional.interpolate(x, size=[rh, rw], mode="bicubic",
                                                align_corners=False, antialias=True)
        mean = torch.tensor(P.OPENAI_CLIP_MEAN) * (1.0 / (1 / 255))
        std = torch.tensor(P.OPENAI_CLIP_STD) * (1.0 / (1 / 255))
        x = (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        x = x[None]
        if pad := -t % tp:
            x = torch.cat((x, x[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        gt, gh, gw = x.shape[1] // tp, rh // p, rw // p
        x = x.view(1, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        return x.reshape(gt * gh * gw, c * tp * p * p), [gt, gh, gw]

    def __call__(self, videos, return_metadata=False, video_metadata=None, **kwargs):
        videos = [videos] if isinstance(videos, np.ndarray) and videos.ndim == 4 else list(videos)
        done = [self._one(v) for v in videos]
        out = {"pixel_values_videos": torch.cat([d[0] for d in done]),
               "video_grid_thw": torch.tensor([d[1] for d in done])}
        if return_metadata:
            from transformers.video_utils import VideoMetadata

            meta = video_metadata or [{"total_num_frames": len(v)} for v in videos]
            out["video_metadata"] = [VideoMetadata(**m) for m in meta]
        return out


def _hf_video_processor(**kw):
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
            Qwen2VLVideoProcessor as HFVideo,
        )
    except ImportError:  # no torchvision
        return _TorchVideoReference(**kw)
    kw = dict(kw)
    size = {"shortest_edge": kw.pop("min_pixels"), "longest_edge": kw.pop("max_pixels")}
    return HFVideo(size=size, **kw)


VIDEOS = [_moving_square(5, 45, 61), _moving_square(3, 70, 33, channels=1, seed=1)]


@pytest.mark.parametrize("cap", [False, True])
def test_video_processor_matches_hf(cap):
    kw = dict(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 6, cap_pixels_per_frame=cap,
              max_video_tokens=24)
    ours = Qwen2VLVideoProcessor(**kw)(VIDEOS)
    ref = _hf_video_processor(**kw)(VIDEOS)
    np.testing.assert_array_equal(ours["video_grid_thw"], np.asarray(ref["video_grid_thw"]))
    np.testing.assert_array_equal(ours["pixel_values_videos"],
                                  np.asarray(ref["pixel_values_videos"]))
    assert ours["pixel_values_videos"].dtype == np.float32
    t, h, w = ours["video_grid_thw"][0]
    assert t == 3  # 5 frames -> 3 temporal patches (the last frame repeated)
    # The padded temporal patch holds frame 4 twice.
    rows = ours["pixel_values_videos"][: t * h * w].reshape(t, h * w, 3, 2, 14, 14)
    np.testing.assert_array_equal(rows[-1, :, :, 0], rows[-1, :, :, 1])


def _qwen_tokenizer(tmp_path):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Describe the video and the picture.", "What moves? A square."] * 4,
                            trainer)
    tok.save(str(tmp_path / "tok.json"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok.json"),
                                 eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.save_pretrained(tmp_path)
    return hf


def _accepting(cls):
    class Ref(cls):  # HF checks the video processor's class; ours is a stand-in without torchvision
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    return Ref


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_processor_with_videos_matches_hf(tmp_path, kind):
    hf_tok = _qwen_tokenizer(tmp_path)
    img_kw = dict(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 4)
    vid_kw = dict(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 6)
    ip = hf_qwen_img.Qwen2VLImageProcessorPil(**img_kw)
    hf_cls = HFQwen2Processor if kind == "qwen2_vl" else HFQwen25Processor
    ref = _accepting(hf_cls)(image_processor=ip, tokenizer=hf_tok,
                             video_processor=_hf_video_processor(**vid_kw))
    ip.save_pretrained(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": vid_kw["min_pixels"], "longest_edge": vid_kw["max_pixels"]},
         "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "video_processor_type": "Qwen2VLVideoProcessor"}))
    ours_cls = P.Qwen2VLProcessor if kind == "qwen2_vl" else P.Qwen2_5_VLProcessor
    proc = ours_cls.from_pretrained(tmp_path)
    assert proc.video_processor.max_pixels == vid_kw["max_pixels"]
    vs, ve = "<|vision_start|>", "<|vision_end|>"
    texts = [f"{vs}<|video_pad|>{ve}What moves? {vs}<|image_pad|>{ve}",
             f"Describe {vs}<|image_pad|>{ve} the picture and {vs}<|video_pad|>{ve}."]
    image = _moving_square(1, 40, 57, seed=3)[0]
    images = [image, image[::-1].copy()]
    fps = [2.0, 6.0]
    meta = [{"total_num_frames": len(v), "fps": f} for v, f in zip(VIDEOS, fps)]
    extra = {"video_metadata": meta} if kind == "qwen2_5_vl" else {}
    exp = ref(text=texts, images=images, videos=VIDEOS, padding=True, return_tensors="np",
              **extra)
    got = proc(texts, images, videos=VIDEOS, video_fps=fps, padding=True)
    keys = ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw"]
    keys += ["second_per_grid_ts"] if kind == "qwen2_5_vl" else []
    assert set(got) == set(keys), sorted(got)
    for k in keys:
        np.testing.assert_array_equal(got[k], np.asarray(exp[k]), err_msg=k)
    assert (got["mm_token_type_ids"] == 2).sum() == sum(
        int(np.prod(g)) // 4 for g in got["video_grid_thw"])
    # Messages carrying their frames render and expand as the same text with videos=.
    conv = [{"role": "user", "content": [{"type": "video", "video": VIDEOS[0]},
                                         {"type": "text", "text": "What moves?"}]}]
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'video' %}"
                "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}{% endfor %}")
    proc.chat_template = template
    a = proc(conv, video_fps=2.0)
    b = proc(proc.apply_chat_template(conv), videos=VIDEOS[:1], video_fps=2.0)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(ValueError, match="1 '<\\|video_pad\\|>' placeholders but 2 videos"):
        proc(texts[:1], images[:1], videos=VIDEOS)
    with pytest.raises(ValueError, match="no video processor"):
        P.Qwen2VLProcessor(proc.image_processor, proc.tokenizer)("x", videos=VIDEOS[:1])


# --------------------------------------------------------------------------- model

IMAGE_GRID = (1, 4, 4)
VIDEO_GRIDS = ((3, 4, 6), (4, 6, 4))  # (t, h, w) patches: 18 and 24 LLM tokens
SECONDS = (0.5, 1 / 12)  # second_per_grid_ts: with tokens_per_second 4, intervals 2 and 1/3


def _mm_inputs(vocab, seed=0):
    """Row 0: text, video 0, text, image 0, text. Row 1 (shorter): text, image 1, video 1, text.
    Returns the rows and HF's image / video inputs (items in modality order)."""
    rng = np.random.default_rng(seed)

    def text(n):
        return list(rng.integers(10, vocab, n))

    def item(tok, g):
        return [VSTART] + [tok] * (g[0] * g[1] * g[2] // 4) + [VEND]

    rows = [
        np.array(text(3) + item(VID, VIDEO_GRIDS[0]) + text(4) + item(IMG, IMAGE_GRID) + text(5)),
        np.array(text(1) + item(IMG, IMAGE_GRID) + item(VID, VIDEO_GRIDS[1]) + text(2)),
    ]
    dim = 3 * 2 * 2 * 2  # C * temporal_patch * patch^2 of the tiny models (patch 2)
    n_img, n_vid = 2 * int(np.prod(IMAGE_GRID)), sum(int(np.prod(g)) for g in VIDEO_GRIDS)
    inputs = dict(
        pixel_values=rng.normal(size=(n_img, dim)).astype(np.float32),
        image_grid_thw=np.array([IMAGE_GRID] * 2),
        pixel_values_videos=rng.normal(size=(n_vid, dim)).astype(np.float32),
        video_grid_thw=np.array(VIDEO_GRIDS),
        second_per_grid_ts=np.array(SECONDS, np.float32),
    )
    return rows, inputs


def _types(ids):
    return (ids == IMG).long() + 2 * (ids == VID).long()


def _to_torch(inputs, kind):
    out = {k: torch.tensor(v) for k, v in inputs.items()}
    if kind == "qwen2_vl":
        out.pop("second_per_grid_ts")
    return out


@nnx.jit
def _forward(model, tokens, lengths, images):
    return model(tokens, images, lengths=lengths).logits


@pytest.fixture(scope="module", params=["qwen2_vl_gqa2_untied", "qwen2_5_vl_window_gqa3_tied"])
def converted(request, tmp_path_factory):
    hf, _ = _hf_model(request.param)
    pre = load_pretrained(save_hf(hf, tmp_path_factory.mktemp(request.param) / "hf"))
    return request.param.split("_gqa")[0].removesuffix("_window"), hf, pre


def test_config_reads_video_fields(converted):
    kind, hf, pre = converted
    assert pre.config.video_token_id == VID
    tps = pre.config.tokens_per_second
    assert tps == (hf.config.vision_config.tokens_per_second if kind == "qwen2_5_vl" else None)
    back = pre.family.config_to_hf(pre.config, pre.hf_config)
    assert back["video_token_id"] == VID
    if kind == "qwen2_5_vl":
        assert back["vision_config"]["tokens_per_second"] == tps


def test_video_logits_and_positions_match_fp32(converted):
    kind, hf, pre = converted
    rows, inputs = _mm_inputs(pre.config.language.vocab_size)
    tokens, lengths = right_pad(rows)
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
    ids = torch.tensor(tokens.astype(np.int64))
    ref_in = dict(input_ids=ids, attention_mask=torch.tensor(mask),
                  mm_token_type_ids=_types(ids) * torch.tensor(mask), **_to_torch(inputs, kind))
    with torch.no_grad():
        ref = hf(**ref_in).logits.numpy()
    images = pre.model.visual_inputs(dict(input_ids=tokens, attention_mask=mask, **inputs))
    assert images.is_video == (True, False, False, True)  # prompt order
    logits = np.asarray(_forward(pre.model, jnp.asarray(tokens), jnp.asarray(lengths), images))
    for b, row in enumerate(rows):
        diff = np.abs(logits[b, : len(row)] - ref[b, : len(row)]).max()
        assert diff <= FP32_TOL, (kind, b, diff)
    # 3D positions and the decode start (HF: rope_deltas + length).
    rope_kw = {"second_per_grid_ts": ref_in["second_per_grid_ts"]} if kind == "qwen2_5_vl" else {}
    pos_ref, deltas = hf.model.get_rope_index(
        ids, ref_in["mm_token_type_ids"], image_grid_thw=ref_in["image_grid_thw"],
        video_grid_thw=ref_in["video_grid_thw"], attention_mask=ref_in["attention_mask"],
        **rope_kw,
    )
    vision = np.isin(tokens, [IMG, VID])
    pos, nxt = rope_ops.mrope_grid_positions(
        jnp.asarray(vision), pre.model.llm_grids(images), lengths=jnp.asarray(lengths),
        time_interval=pre.model.time_intervals(images),
    )
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(np.asarray(pos)[:, b, :n], pos_ref.numpy()[:, b, :n])
    np.testing.assert_array_equal(np.asarray(nxt), deltas.numpy()[:, 0] + lengths)
    if kind == "qwen2_5_vl":  # fractional interval: temporal ids 0, 0, 0, 1 for video 1
        assert pre.model.time_intervals(images)[3] == np.float32(4) * np.float32(1 / 12)


@pytest.mark.parametrize("name", ["qwen2_vl_gqa2_untied", "qwen2_5_vl_window_gqa3_tied"])
def test_greedy_generation_after_video_matches(name, tmp_path):
    """20 greedy tokens for 2 prompts of different lengths holding videos (and an image)."""
    hf, _ = _hf_model(name, seed=1)
    pre = load_pretrained(save_hf(hf, tmp_path / "hf"))
    rows, inputs = _mm_inputs(pre.config.language.vocab_size, seed=2)
    ids, mask = left_pad(rows)
    ref_in = _to_torch(inputs, name.split("_gqa")[0].removesuffix("_window"))
    ref = hf_greedy(hf, rows, 20, mm_token_type_ids=_types(ids) * mask, **ref_in)
    tokens, lengths = right_pad(rows)
    images = pre.model.visual_inputs(dict(input_ids=tokens, attention_mask=(
        np.arange(tokens.shape[1])[None] < lengths[:, None]), **inputs))
    out = generate(pre.model, jnp.asarray(tokens), lengths=jnp.asarray(lengths), images=images,
                   max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_bad_video_inputs_raise(converted):
    _, _, pre = converted
    rows, inputs = _mm_inputs(pre.config.language.vocab_size)
    tokens, lengths = right_pad(rows)
    images = pre.model.visual_inputs(dict(input_ids=tokens, **inputs))
    as_images = QwenVLImages(images.pixel_values, images.grid_thw)  # videos flagged as images
    with pytest.raises(ValueError, match="8 image tokens .* expected 50"):
        pre.model(jnp.asarray(tokens), as_images, lengths=jnp.asarray(lengths))
    no_video = tokens.copy()
    no_video[no_video == VID] = 11
    with pytest.raises(ValueError, match="0 video tokens .* expected 42"):
        pre.model(jnp.asarray(no_video), images, lengths=jnp.asarray(lengths))
    with pytest.raises(ValueError, match="more video slots"):
        pre.model.visual_inputs(dict(input_ids=tokens, **{
            **inputs, "video_grid_thw": inputs["video_grid_thw"][:1],
            "pixel_values_videos": inputs["pixel_values_videos"][:72],
            "second_per_grid_ts": inputs["second_per_grid_ts"][:1]}))
    with pytest.raises(ValueError, match="is_video"):
        QwenVLImages(images.pixel_values, images.grid_thw, (True,))
    with pytest.raises(ValueError, match="time_interval"):
        rope_ops.mrope_grid_positions(jnp.zeros((1, 4), bool), ((1, 2, 2),), time_interval=0.5)
    cfg = pre.config.__class__(**{**pre.config.__dict__, "video_token_id": None})
    model = type(pre.model)(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="video_token_id is None"):
        model.image_features(images)
