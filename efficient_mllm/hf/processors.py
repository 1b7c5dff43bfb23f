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

Pixels equal HF's exactly: the same PIL resize calls on uint8 images, then the same float64
rescale and float32 normalisation. Inputs are PIL images or uint8 ``[H, W, C]`` arrays
(C in 1, 3, 4; alpha is composited on white, as HF does); images are always converted to RGB.
Not implemented: videos, torch tensors as input, the torchvision ("fast") resize, which
differs slightly from PIL's.
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


def _images_in_messages(conversation) -> list:
    """Image payloads of ``{"type": "image", "image" | "path": ...}`` blocks, in order."""
    from PIL import Image

    found = []
    for m in conversation:
        content = m.get("content")
        if not isinstance(content, (list, tuple)):
            continue
        for block in content:
            if not isinstance(block, Mapping) or block.get("type") != "image":
                continue
            if block.get("image") is not None:
                found.append(block["image"])
            elif block.get("path") is not None:
                found.append(Image.open(block["path"]))
            elif block.get("url") is not None:
                raise ValueError(
                    f"messages: image urls are not fetched ({block['url']!r}); pass the image"
                )
    return found


class _Processor(abc.ABC):
    """Text + images -> model inputs; subclasses define the placeholder expansion."""

    image_token: str
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
        image. Returns numpy arrays (``return_tensors="np"``) or lists (``None``)."""
        if text is None:
            if images is None:
                raise ValueError("text, images: at least one of them is needed")
            return dict(self.image_processor(images))
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
            if any(tok in t for t in texts):
                raise ValueError(f"text: {tok!r} placeholders (videos) are not supported")
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
        return out

    def _text_extras(self, input_ids) -> dict:
        return {}

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
    """Qwen2-VL / Qwen2.5-VL (HF ``Qwen2VLProcessor``): each ``<|image_pad|>`` becomes
    ``t*h*w / merge_size**2`` copies. Returns ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` (1 on image tokens), ``pixel_values`` (patch rows) and
    ``image_grid_thw``."""

    _extra_tokens = ("<|video_pad|>",)

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessor,
        tokenizer: PretrainedTokenizer,
        *,
        image_token: str = "<|image_pad|>",
        chat_template: str | None = None,
    ):
        self.image_token = getattr(tokenizer, "named_special_tokens", {}).get(
            "image_token", image_token
        )
        super().__init__(image_processor, tokenizer, chat_template)

    def _replacements(self, image_inputs):
        m2 = self.image_processor.merge_size**2
        return [
            self.image_token * (int(np.prod(thw)) // m2) for thw in image_inputs["image_grid_thw"]
        ]

    def _text_extras(self, input_ids) -> dict:
        if isinstance(input_ids, np.ndarray):
            return {"mm_token_type_ids": (input_ids == self.image_token_id).astype(np.int64)}
        return {
            "mm_token_type_ids": [[int(i == self.image_token_id) for i in row] for row in input_ids]
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Qwen2VLProcessor:
        image_processor = Qwen2VLImageProcessor.from_config(_image_processor_config(path))
        tok = PretrainedTokenizer.from_pretrained(path)
        return cls(image_processor, tok, chat_template=tok.chat_template)


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
