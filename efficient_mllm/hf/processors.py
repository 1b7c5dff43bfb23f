"""Hugging Face processors re-implemented in numpy + PIL: images, tokenizer, chat template.

Each piece gives what the transformers 5.x processor (PIL backend) gives for the same inputs:

- :class:`ClipImageProcessor` (CLIP, LLaVA-1.5; ``do_pad`` is LLaVA's pad-to-square) and
  :class:`SiglipImageProcessor`: resize (bicubic, PIL), center crop, rescale, normalise.
- :class:`Qwen2VLImageProcessor` (Qwen2-VL and Qwen2.5-VL): :func:`smart_resize`, normalise and
  :func:`patchify_qwen2vl` into ``[grid_t*grid_h*grid_w, C*temporal*patch*patch]`` rows, in the
  order the 2x2 patch merger expects, plus ``image_grid_thw``.
- :class:`InternVLImageProcessor` (HF ``GotOcr2ImageProcessor`` as ``InternVLProcessor`` calls it):
  the tile grid (:func:`tile_grid`) whose aspect ratio is closest to the image, tiles read in
  row-major order, plus a thumbnail when there is more than one tile.
- :class:`PretrainedTokenizer`: ``tokenizer.json`` with the ``tokenizers`` library, special
  tokens and BOS/EOS rules from ``tokenizer_config.json``, the chat template of the folder.
- :class:`LlavaProcessor`, :class:`Qwen2VLProcessor`, :class:`InternVLProcessor`:
  ``processor(text or messages, images)`` -> ``input_ids``, ``attention_mask``, ``pixel_values``
  (channels first, float32, as HF) and the family's extras, with the image placeholder expanded
  to the number of vision tokens.
- Videos (Qwen2-VL, Qwen2.5-VL): :class:`Qwen2VLProcessor` / :class:`Qwen2_5_VLProcessor` with a
  ``hf.video_processors.Qwen2VLVideoProcessor`` take ``videos=`` (uint8 ``[T, H, W, C]`` frames)
  and expand each ``<|video_pad|>`` to ``t*h*w / merge_size**2`` tokens; they return
  ``pixel_values_videos``, ``video_grid_thw``, ``mm_token_type_ids`` 2 on video tokens and
  (Qwen2.5-VL) ``second_per_grid_ts = temporal_patch_size / fps`` (``video_fps``, default 24 as
  HF without metadata).

Pixels equal HF's exactly: the same PIL resize calls on uint8 images, then the same float64
rescale and float32 normalisation. Inputs are PIL images or uint8 ``[H, W, C]`` arrays
(C in 1, 3, 4; alpha is composited on white, as HF does); images are always converted to RGB.
Not implemented: torch tensors as input, the torchvision ("fast") image resize, which
differs slightly from PIL's (videos use torch's uint8 resize, as HF's video processor does),
video decoding and frame sampling.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping

import numpy as np

from efficient_mllm.hf.chat_template import _read_json, render_chat_template
from efficient_mllm.hf.hf_tokenizer import PretrainedTokenizer
from efficient_mllm.hf.image_ops import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    patchify_qwen2vl,
    resize,
    shortest_edge_size,
    smart_resize,
    tile_grid,
    to_rgb,
)
from efficient_mllm.hf.image_processors import (
    ClipImageProcessor,
    InternVLImageProcessor,
    Qwen2VLImageProcessor,
    SiglipImageProcessor,
    _image_processor_config,
)
from efficient_mllm.hf.video_processors import Qwen2VLVideoProcessor, _video_processor_config

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipImageProcessor",
    "InternVLImageProcessor",
    "InternVLProcessor",
    "LlavaProcessor",
    "PretrainedTokenizer",
    "Qwen2VLImageProcessor",
    "Qwen2VLProcessor",
    "Qwen2VLVideoProcessor",
    "Qwen2_5_VLProcessor",
    "SiglipImageProcessor",
    "center_crop",
    "patchify_qwen2vl",
    "resize",
    "shortest_edge_size",
    "smart_resize",
    "tile_grid",
    "to_rgb",
]


# --------------------------------------------------------------------------- processors


def _is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], Mapping) and "role" in x[0]


def _images_in_messages(conversation, kind: str = "image") -> list:
    """Payloads of ``{"type": kind, kind | "path": ...}`` blocks, in order (image paths are
    opened; videos must be given as frames)."""
    from PIL import Image

    found = []
    for m in conversation:
        content = m.get("content")
        if not isinstance(content, (list, tuple)):
            continue
        for block in content:
            if not isinstance(block, Mapping) or block.get("type") != kind:
                continue
            if block.get(kind) is not None:
                found.append(block[kind])
            elif block.get("path") is not None and kind == "image":
                found.append(Image.open(block["path"]))
            elif block.get("url") is not None:
                raise ValueError(
                    f"messages: {kind} urls are not fetched ({block['url']!r}); pass the "
                    f"{'image' if kind == 'image' else 'frames (uint8 [T, H, W, C])'}"
                )
            elif block.get("path") is not None:
                raise ValueError(
                    f"messages: video files are not decoded ({block['path']!r}); pass the "
                    "frames (uint8 [T, H, W, C])"
                )
    return found


class _Processor(abc.ABC):
    """Text + images -> model inputs; subclasses define the placeholder expansion."""

    image_token: str
    video_token: str | None = None  # set with a video_processor (Qwen2-VL family)
    video_processor = None
    default_padding_side: str | None = None
    _extra_tokens: tuple[str, ...] = ()  # other placeholders this family refuses (videos)

    def __init__(self, image_processor, tokenizer: PretrainedTokenizer, chat_template=None):
        if not isinstance(tokenizer, PretrainedTokenizer):
            raise ValueError(
                f"tokenizer: expected a PretrainedTokenizer, got {type(tokenizer).__name__}"
            )
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        if tokenizer.token_to_id(self.image_token) is None:
            raise ValueError(
                f"tokenizer: the image token {self.image_token!r} is not in its vocabulary"
            )
        self.image_token_id = tokenizer.token_to_id(self.image_token)

    @abc.abstractmethod
    def _replacements(self, image_inputs: dict) -> list[str]:
        """Per image, the token string its placeholder expands to."""

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, **kwargs):
        """The prompt string(s) of one conversation or a batch of them."""
        if self.chat_template is None:
            raise ValueError("chat_template: this processor has no chat template")
        batch = [messages] if _is_conversation(messages) else list(messages)
        if not batch or not all(_is_conversation(c) for c in batch):
            raise ValueError(
                "messages: expected a conversation [{'role', 'content'}, ...] or a list of them"
            )
        texts = [
            render_chat_template(
                self.chat_template,
                c,
                add_generation_prompt=add_generation_prompt,
                special_tokens=self.tokenizer.named_special_tokens,
                **kwargs,
            )
            for c in batch
        ]
        return texts if not _is_conversation(messages) else texts[0]

    def __call__(
        self,
        text=None,
        images=None,
        *,
        videos=None,
        video_fps=None,
        add_generation_prompt: bool = False,
        add_special_tokens: bool | None = None,
        padding: bool | str = False,
        padding_side: str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "np",
        **template_kwargs,
    ) -> dict:
        """Model inputs for ``text`` (a string, a list of strings, a conversation or a list of
        conversations, rendered with the chat template) and ``images`` (taken from the
        conversation's image blocks when not given). Each placeholder in the text takes the next
        image; each video placeholder the next of ``videos`` (families with a video processor;
        ``video_fps``: one fps or one per video, for Qwen2.5-VL's ``second_per_grid_ts``).
        Returns numpy arrays (``return_tensors="np"``) or lists (``None``)."""
        if videos is not None and self.video_token is None:
            raise ValueError(
                f"videos: {type(self).__name__} has no video processor (videos not supported)"
            )
        if text is None:
            if images is None and videos is None:
                raise ValueError("text, images, videos: at least one of them is needed")
            out = {} if images is None else dict(self.image_processor(images))
            if videos is not None:
                out.update(self._video_outputs(self.video_processor(videos), video_fps))
            return out
        add_special = True if add_special_tokens is None else add_special_tokens
        if _is_conversation(text) or (
            isinstance(text, (list, tuple)) and text and all(_is_conversation(c) for c in text)
        ):
            batch = [text] if _is_conversation(text) else list(text)
            texts = [
                self.apply_chat_template(
                    c, add_generation_prompt=add_generation_prompt, **template_kwargs
                )
                for c in batch
            ]
            if images is None:
                found = [im for c in batch for im in _images_in_messages(c)]
                images = found or None
            if videos is None and self.video_token is not None:
                found = [v for c in batch for v in _images_in_messages(c, "video")]
                videos = found or None
            bos = self.tokenizer.named_special_tokens.get("bos_token")
            if add_special_tokens is None and bos is not None and texts[0].startswith(bos):
                add_special = False  # the template wrote the BOS already
        elif template_kwargs:
            raise ValueError(
                f"{sorted(template_kwargs)}: unknown arguments (chat-template variables are only "
                "used when text is a conversation)"
            )
        elif isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise ValueError(
                "text: expected a string, a list of strings, a conversation or a list of "
                f"conversations, got {type(text).__name__}"
            )
        for tok in self._extra_tokens:
            if tok != self.video_token and any(tok in t for t in texts):
                raise ValueError(
                    f"text: {tok!r} placeholders (videos) are not supported without a "
                    "video_processor"
                )
        n_slots = sum(t.count(self.image_token) for t in texts)
        image_list = [] if images is None else self.image_processor._as_list(images)
        if n_slots != len(image_list):
            raise ValueError(
                f"images: the text has {n_slots} {self.image_token!r} placeholders but "
                f"{len(image_list)} images were given"
            )
        image_inputs = self.image_processor(image_list) if image_list else {}
        if image_list:
            reps = iter(self._replacements(image_inputs))
            texts = [
                "".join(
                    piece if i == 0 else next(reps) + piece
                    for i, piece in enumerate(t.split(self.image_token))
                )
                for t in texts
            ]
        video_inputs = {}
        if self.video_token is not None:
            n_slots = sum(t.count(self.video_token) for t in texts)
            video_list = [] if videos is None else self.video_processor._as_list(videos)
            if n_slots != len(video_list):
                raise ValueError(
                    f"videos: the text has {n_slots} {self.video_token!r} placeholders but "
                    f"{len(video_list)} videos were given"
                )
            if video_list:
                video_inputs = self.video_processor(video_list)
                m2 = self.video_processor.merge_size**2
                reps = iter(
                    self.video_token * (int(np.prod(thw)) // m2)
                    for thw in video_inputs["video_grid_thw"]
                )
                texts = [
                    "".join(
                        piece if i == 0 else next(reps) + piece
                        for i, piece in enumerate(t.split(self.video_token))
                    )
                    for t in texts
                ]
                video_inputs = self._video_outputs(video_inputs, video_fps)
        out = self.tokenizer(
            texts,
            add_special_tokens=add_special,
            padding=padding,
            padding_side=padding_side or self.default_padding_side,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        out.update(self._text_extras(out["input_ids"]))
        out.update(self._image_outputs(image_inputs))
        out.update(video_inputs)
        return out

    def _text_extras(self, input_ids) -> dict:
        return {}

    def _video_outputs(self, video_inputs: dict, video_fps) -> dict:
        return dict(video_inputs)

    def _image_outputs(self, image_inputs: dict) -> dict:
        return dict(image_inputs)

    @staticmethod
    def _processor_config(path) -> dict:
        f = os.path.join(os.fspath(path), "processor_config.json")
        if not os.path.isfile(f):
            return {}
        cfg = _read_json(f)
        return {k: v for k, v in cfg.items() if not isinstance(v, Mapping)}


class LlavaProcessor(_Processor):
    """LLaVA-1.5 (HF ``LlavaProcessor``): each ``<image>`` becomes
    ``(crop_h // patch_size) * (crop_w // patch_size) + num_additional_image_tokens`` image
    tokens, minus one when ``vision_feature_select_strategy == "default"`` (CLS dropped).
    Returns ``input_ids``, ``attention_mask``, ``pixel_values [N, 3, H, W]``."""

    def __init__(
        self,
        image_processor: ClipImageProcessor,
        tokenizer: PretrainedTokenizer,
        *,
        patch_size: int,
        vision_feature_select_strategy: str | None = None,
        num_additional_image_tokens: int = 0,
        image_token: str = "<image>",
        chat_template: str | None = None,
    ):
        if int(patch_size) < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
        if vision_feature_select_strategy not in (None, "default", "full"):
            raise ValueError(
                "vision_feature_select_strategy: expected 'default', 'full' or None, got "
                f"{vision_feature_select_strategy!r}"
            )
        self.image_token = getattr(tokenizer, "named_special_tokens", {}).get(
            "image_token", image_token
        )
        self.patch_size = int(patch_size)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens)
        super().__init__(image_processor, tokenizer, chat_template)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens for processed pixels of this size."""
        n = (height // self.patch_size) * (
            width // self.patch_size
        ) + self.num_additional_image_tokens
        return n - (self.vision_feature_select_strategy == "default")

    def _replacements(self, image_inputs):
        pv = image_inputs["pixel_values"]
        return [self.image_token * self.num_image_tokens(*p.shape[-2:]) for p in pv]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LlavaProcessor:
        cfg = cls._processor_config(path)
        kwargs = {
            k: cfg[k]
            for k in (
                "vision_feature_select_strategy",
                "num_additional_image_tokens",
                "image_token",
            )
            if k in cfg
        }
        if "patch_size" not in cfg:
            raise ValueError(
                f"path: processor_config.json in {os.fspath(path)!r} has no patch_size"
            )
        image_cfg = _image_processor_config(path)
        if image_cfg.get("image_processor_type", "").startswith("Siglip"):
            image_processor = SiglipImageProcessor.from_config(image_cfg)
        else:
            image_processor = ClipImageProcessor.from_config(image_cfg)
        tok = PretrainedTokenizer.from_pretrained(path)
        return cls(
            image_processor,
            tok,
            patch_size=cfg["patch_size"],
            chat_template=tok.chat_template,
            **kwargs,
        )


class Qwen2VLProcessor(_Processor):
    """Qwen2-VL (HF ``Qwen2VLProcessor``): each ``<|image_pad|>`` becomes ``t*h*w /
    merge_size**2`` copies, and with a ``video_processor`` each ``<|video_pad|>`` likewise.
    Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (1 on image tokens, 2 on
    video tokens), ``pixel_values`` (patch rows) and ``image_grid_thw``; with videos also
    ``pixel_values_videos`` and ``video_grid_thw``."""

    _extra_tokens = ("<|video_pad|>",)

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessor,
        tokenizer: PretrainedTokenizer,
        video_processor: Qwen2VLVideoProcessor | None = None,
        *,
        image_token: str = "<|image_pad|>",
        video_token: str = "<|video_pad|>",
        chat_template: str | None = None,
    ):
        named = getattr(tokenizer, "named_special_tokens", {})
        self.image_token = named.get("image_token", image_token)
        super().__init__(image_processor, tokenizer, chat_template)
        if video_processor is not None:
            if not isinstance(video_processor, Qwen2VLVideoProcessor):
                raise ValueError(
                    f"video_processor: expected a Qwen2VLVideoProcessor, got "
                    f"{type(video_processor).__name__}"
                )
            self.video_processor = video_processor
            self.video_token = named.get("video_token", video_token)
            self.video_token_id = tokenizer.token_to_id(self.video_token)
            if self.video_token_id is None:
                raise ValueError(
                    f"tokenizer: the video token {self.video_token!r} is not in its vocabulary"
                )

    def _replacements(self, image_inputs):
        m2 = self.image_processor.merge_size**2
        return [
            self.image_token * (int(np.prod(thw)) // m2) for thw in image_inputs["image_grid_thw"]
        ]

    def _text_extras(self, input_ids) -> dict:
        vid = getattr(self, "video_token_id", None)

        def types(row):
            row = np.asarray(row)
            return (row == self.image_token_id) * 1 + (row == vid) * 2 if vid is not None else (
                (row == self.image_token_id) * 1)

        if isinstance(input_ids, np.ndarray):
            return {"mm_token_type_ids": types(input_ids).astype(np.int64)}
        return {"mm_token_type_ids": [[int(v) for v in types(row)] for row in input_ids]}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Qwen2VLProcessor:
        """Tokenizer, image processor and video processor (``video_preprocessor_config.json``,
        else HF's defaults with the image processor's patch / merge / temporal sizes)."""
        image_processor = Qwen2VLImageProcessor.from_config(_image_processor_config(path))
        saved = _video_processor_config(path)
        video_cfg = saved or {
            "patch_size": image_processor.patch_size,
            "merge_size": image_processor.merge_size,
            "temporal_patch_size": image_processor.temporal_patch_size,
        }
        tok = PretrainedTokenizer.from_pretrained(path)
        video_processor = None
        if saved or tok.token_to_id("<|video_pad|>") is not None:
            video_processor = Qwen2VLVideoProcessor.from_config(video_cfg)
        return cls(image_processor, tok, video_processor, chat_template=tok.chat_template)


class Qwen2_5_VLProcessor(Qwen2VLProcessor):
    """Qwen2.5-VL (HF ``Qwen2_5_VLProcessor``): :class:`Qwen2VLProcessor` plus
    ``second_per_grid_ts`` (float64 ``[V]``), ``temporal_patch_size / fps`` per video, with
    ``video_fps`` one number or one per video (default 24, HF's fps without metadata)."""

    def _video_outputs(self, video_inputs: dict, video_fps) -> dict:
        n = len(video_inputs["video_grid_thw"])
        fps = 24 if video_fps is None else video_fps
        fps = [fps] * n if isinstance(fps, (int, float, np.number)) else list(fps)
        if len(fps) != n or not all(float(f) > 0 for f in fps):
            raise ValueError(f"video_fps={video_fps!r}: expected a number > 0 or one per video ({n})")
        out = dict(video_inputs)
        tp = self.video_processor.temporal_patch_size
        out["second_per_grid_ts"] = np.asarray([tp / f for f in fps], np.float64)
        return out


class InternVLProcessor(_Processor):
    """InternVL (HF ``InternVLProcessor``): each ``<IMG_CONTEXT>`` in the text becomes
    ``<img>`` + ``<IMG_CONTEXT>`` x ``image_seq_length * tiles`` + ``</img>``. Pads on the left
    by default. Returns ``input_ids``, ``attention_mask``, ``pixel_values [tiles, 3, H, W]``
    (images concatenated in text order)."""

    default_padding_side = "left"
    _extra_tokens = ("<video>",)

    def __init__(
        self,
        image_processor: InternVLImageProcessor,
        tokenizer: PretrainedTokenizer,
        *,
        image_seq_length: int = 256,
        start_image_token: str = "<img>",
        end_image_token: str = "</img>",
        context_image_token: str = "<IMG_CONTEXT>",
        chat_template: str | None = None,
    ):
        if int(image_seq_length) < 1:
            raise ValueError(f"image_seq_length: expected a positive int, got {image_seq_length!r}")
        named = getattr(tokenizer, "named_special_tokens", {})
        self.start_image_token = named.get("start_image_token", start_image_token)
        self.end_image_token = named.get("end_image_token", end_image_token)
        self.image_token = named.get("context_image_token", context_image_token)
        self.image_seq_length = int(image_seq_length)
        super().__init__(image_processor, tokenizer, chat_template)
        for t in (self.start_image_token, self.end_image_token):
            if tokenizer.token_to_id(t) is None:
                raise ValueError(f"tokenizer: {t!r} is not in its vocabulary")

    def _replacements(self, image_inputs):
        return [
            self.start_image_token
            + self.image_token * (self.image_seq_length * int(n))
            + self.end_image_token
            for n in image_inputs["num_patches"]
        ]

    def _image_outputs(self, image_inputs: dict) -> dict:
        return {k: v for k, v in image_inputs.items() if k != "num_patches"}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> InternVLProcessor:
        cfg = cls._processor_config(path)
        image_cfg = dict(_image_processor_config(path))
        image_cfg["crop_to_patches"] = True  # InternVLProcessor's default for its image processor
        tok = PretrainedTokenizer.from_pretrained(path)
        return cls(
            InternVLImageProcessor.from_config(image_cfg),
            tok,
            image_seq_length=cfg.get("image_seq_length", 256),
            chat_template=tok.chat_template,
        )
