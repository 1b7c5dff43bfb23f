"""Project batches -> the inputs of the placeholder-expanded models (Qwen2-VL, Qwen2.5-VL,
InternVL), for fine-tuning converted checkpoints (``train/finetune.py``).

Our pipeline (``data/pipeline.py``) yields ``image [B, H, W, 3]`` float ``(x / 255 - 0.5) / 0.5``
and rows ``[<bos>] <image> question ? answer <eos>`` with ONE image placeholder.
:class:`PlaceholderBatches` (a host batch map, as ``data_components(transform=...)`` takes)
turns such a batch into what the checkpoint's Hugging Face processor would give:

- pixels: each image is recovered exactly as uint8 and run through the checkpoint's image
  processor (``hf/image_processors.py``: ``Qwen2VLImageProcessor`` = smart resize, normalise,
  patchify; ``InternVLImageProcessor`` = dynamic tiles + thumbnail, normalise), settings from
  ``hf/preprocessor_config.json`` (defaults from the model config when absent). Output
  ``image``: Qwen ``[B, n_patches, C*T*P*P]`` (patch rows of each image), InternVL
  ``[B, tiles, S, S, 3]`` (NHWC tiles). One fixed image size per run gives one grid / tile
  count, so every shape is static.
- tokens: the placeholder becomes the family's wrapper + ``N`` image tokens
  (``<|vision_start|> <|image_pad|> x N <|vision_end|>`` with the ids of the HF config;
  ``<img> <IMG_CONTEXT> x N </img>`` with the tokenizer's), ``N`` = LLM tokens per image.
  ``loss_mask`` is shifted with the tokens and is 0 on every inserted slot; ``lengths`` and
  ``prompt_lengths`` grow by ``N + 1``; ``seq_len`` becomes ``seq_len + N + 1``.
- tokenizers without a BOS token (Qwen's): the pipeline's BOS slot holds a stand-in
  (:attr:`data_tokenizer` reports ``bos_id = image_token_id``) that is removed, so prompts
  start with the image as with HF's processor (``seq_len + N``).

The models take images with a leading batch axis so that batch sharding and microbatch
splitting work unchanged: :class:`BatchedQwenVL` / :class:`BatchedInternVL` are the family
models (same parameter tree) whose ``check_inputs`` / ``embed_inputs`` first turn such arrays
into the model's own format (``QwenVLImages`` with the static grid; tiles ``[B*tiles, ...]``);
``__call__`` / ``prefill`` convert too, and the model's own formats are passed through.

Not covered: several images per row, videos, chat templates (the project's VQA format is kept),
the processors' torchvision ("fast") resize (PIL is used, as ``hf/image_processors.py``).
"""

from __future__ import annotations

import abc
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from efficient_mllm.hf.image_processors import (
    InternVLImageProcessor,
    Qwen2VLImageProcessor,
    _image_processor_config,
)
from efficient_mllm.nn.internvl import InternVLConfig, InternVLModel
from efficient_mllm.nn.qwen2_vl import QwenVLConfig, QwenVLImages, QwenVLModel

__all__ = [
    "BatchedInternVL",
    "BatchedQwenVL",
    "PlaceholderBatches",
    "is_placeholder_config",
    "to_uint8",
]


def is_placeholder_config(config: Any) -> bool:
    """Whether ``config`` builds a placeholder-expanded model this module adapts to."""
    return isinstance(config, (QwenVLConfig, InternVLConfig))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The pipeline's ``(x / 255 - 0.5) / 0.5`` float images -> the uint8 ``x`` (exact)."""
    x = np.asarray(images, np.float32)
    return np.clip(np.rint((x * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- models


class _BatchedImages:
    """Turns batched images into the model's format before the base class sees them."""

    @abc.abstractmethod
    def model_images(self, images: Any) -> Any:
        """Batched images -> what the family model takes (each concrete class implements it)."""

    def check_inputs(self, tokens, images=None, lengths=None):
        return super().check_inputs(tokens, self.model_images(images), lengths)

    def embed_inputs(self, tokens, images=None, *args, **kwargs):
        return super().embed_inputs(tokens, self.model_images(images), *args, **kwargs)

    def __call__(self, tokens, images=None, *args, **kwargs):
        return super().__call__(tokens, self.model_images(images), *args, **kwargs)

    def prefill(self, tokens, images, *args, **kwargs):
        return super().prefill(tokens, self.model_images(images), *args, **kwargs)


class BatchedQwenVL(_BatchedImages, QwenVLModel):
    """``QwenVLModel`` taking ``images [B, gh * gw, C*T*P*P]`` (one image of patch grid
    ``grid = (gh, gw)`` per row) besides ``QwenVLImages``."""

    def __init__(self, cfg: QwenVLConfig, *, grid: tuple[int, int], rngs):
        super().__init__(cfg, rngs=rngs)
        self.grid = (int(grid[0]), int(grid[1]))

    def model_images(self, images):
        if images is None or isinstance(images, QwenVLImages):
            return images
        gh, gw = self.grid
        if getattr(images, "ndim", None) != 3 or images.shape[1] != gh * gw:
            raise ValueError(
                f"images shape={tuple(getattr(images, 'shape', ()))}: expected [B, {gh * gw}, "
                "patch dim] (patch rows of one image per row) or QwenVLImages"
            )
        x = jnp.asarray(images)
        return QwenVLImages(x.reshape(-1, x.shape[-1]), ((1, gh, gw),) * x.shape[0])


class BatchedInternVL(_BatchedImages, InternVLModel):
    """``InternVLModel`` taking ``images [B, tiles, S, S, C]`` besides ``[N, S, S, C]``."""

    def __init__(self, cfg: InternVLConfig, *, rngs):
        super().__init__(cfg, rngs=rngs)

    def model_images(self, images):
        if images is None or getattr(images, "ndim", None) != 5:
            return images
        x = jnp.asarray(images)
        return x.reshape(-1, *x.shape[2:])


# --------------------------------------------------------------------------- batches


class _StandInBos:
    """A tokenizer proxy whose ``bos_id`` is a stand-in (the image token) for tokenizers that
    define none; :class:`PlaceholderBatches` removes it."""

    def __init__(self, tokenizer: Any):
        self._inner = tokenizer
        self.bos_id = tokenizer.image_token_id

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _token_id(tokenizer: Any, token: str, what: str) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise ValueError(
            f"init_from: the checkpoint's tokenizer has no {what} token {token!r}; expected it "
            "in tokenizer.json (the model's processor wraps each image with it)"
        )
    return int(tid)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


class PlaceholderBatches:
    """The batch map described in the module doc; build it with :meth:`from_checkpoint`.

    ``image_processor``: a ``Qwen2VLImageProcessor`` / ``InternVLImageProcessor``;
    ``image_hw``: the (fixed) size of the pipeline's images; ``image_token_id``; ``start_id`` /
    ``end_id``: the wrapper tokens; ``tokens_per_image``: ``N``; ``drop_bos``: remove the
    stand-in BOS slot (see :attr:`data_tokenizer`)."""

    def __init__(
        self,
        config: Any,
        image_processor: Any,
        *,
        image_hw: tuple[int, int],
        image_token_id: int,
        start_id: int,
        end_id: int,
        drop_bos: bool,
        tokenizer: Any = None,
    ):
        if not is_placeholder_config(config):
            raise ValueError(
                f"config={type(config).__name__}: expected a QwenVLConfig or InternVLConfig"
            )
        self.config = config
        self.image_processor = image_processor
        self.image_hw = (int(image_hw[0]), int(image_hw[1]))
        self.image_token_id = int(image_token_id)
        self.start_id, self.end_id = int(start_id), int(end_id)
        self.drop_bos = bool(drop_bos)
        self.tokenizer = tokenizer
        self._check_processor()
        self.tokens_per_image = self._tokens_per_image()
        if self.tokens_per_image < 1:
            raise ValueError(f"image_hw={self.image_hw}: gives no image tokens")

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls, config: Any, hf_dir: str, hf_config: dict, tokenizer: Any, image_hw
    ) -> PlaceholderBatches:
        """From a converted checkpoint's ``hf/`` folder (processor settings, wrapper tokens) and
        its tokenizer (``finetune.checkpoint_tokenizer(..., require_bos=False)``)."""
        hw = tuple(int(x) for x in np.broadcast_to(image_hw, (2,)))
        try:
            pp = _image_processor_config(hf_dir)
        except ValueError:
            pp = None
        if isinstance(config, QwenVLConfig):
            v = config.vision
            if pp is None:  # HF defaults with the model's patch geometry
                proc = Qwen2VLImageProcessor(
                    patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                    temporal_patch_size=v.temporal_patch_size,
                )
            else:
                proc = Qwen2VLImageProcessor.from_config(pp)
            ids = []
            for key, name in (("vision_start_token_id", "<|vision_start|>"),
                              ("vision_end_token_id", "<|vision_end|>")):
                tid = hf_config.get(key)
                if tid is None:
                    tid = _token_id(tokenizer, name, key.split("_token")[0].replace("_", " "))
                ids.append(int(tid))
            start, end = ids
        else:
            vis = config.vision
            cfg = dict(pp or {"size": {"height": vis.image_size[0], "width": vis.image_size[1]}})
            cfg["crop_to_patches"] = True  # InternVLProcessor's setting for its image processor
            proc = InternVLImageProcessor.from_config(cfg)
            named = getattr(tokenizer, "named_special_tokens", {}) or {}
            start = _token_id(tokenizer, named.get("start_image_token", "<img>"), "start-image")
            end = _token_id(tokenizer, named.get("end_image_token", "</img>"), "end-image")
            seq = _read_json(os.path.join(hf_dir, "processor_config.json")).get(
                "image_seq_length", hf_config.get("image_seq_length")
            )
            if seq is not None and int(seq) != config.tokens_per_image:
                raise ValueError(
                    f"init_from: image_seq_length={seq} (processor_config.json / config.json) "
                    f"!= the model's tokens per tile {config.tokens_per_image}"
                )
        image_id = int(config.image_token_id)
        tok_image = getattr(tokenizer, "image_token_id", None)
        if tok_image is not None and int(tok_image) != image_id:
            raise ValueError(
                f"init_from: the tokenizer's image token id {tok_image} != the model's "
                f"image_token_id {image_id}"
            )
        return cls(config, proc, image_hw=hw, image_token_id=image_id, start_id=start,
                   end_id=end, drop_bos=getattr(tokenizer, "bos_id", None) is None,
                   tokenizer=tokenizer)

    def _check_processor(self) -> None:
        p, cfg = self.image_processor, self.config
        if isinstance(cfg, QwenVLConfig):
            v = cfg.vision
            want = (v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
            got = (p.patch_size, p.merge_size, p.temporal_patch_size)
            if not isinstance(p, Qwen2VLImageProcessor) or got != want:
                raise ValueError(
                    f"image_processor: patch_size, merge_size, temporal_patch_size = {got}: "
                    f"expected a Qwen2VLImageProcessor with the vision tower's {want}"
                )
        else:
            size = (p.size["height"], p.size["width"]) if isinstance(
                p, InternVLImageProcessor) else None
            if size != tuple(cfg.vision.image_size):
                raise ValueError(
                    f"image_processor: tile size {size}: expected an InternVLImageProcessor with "
                    f"the vision tower's image size {tuple(cfg.vision.image_size)}"
                )

    def _tokens_per_image(self) -> int:
        h, w = self.image_hw
        if isinstance(self.config, QwenVLConfig):
            return self.image_processor.num_image_tokens(h, w)
        return self.image_processor.num_patches(h, w) * self.config.tokens_per_image

    # -- static layout --------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """Qwen: the patch grid ``(gh, gw)`` of every image."""
        return self.image_processor.grid_hw(*self.image_hw)

    @property
    def tiles(self) -> int:
        """InternVL: tiles per image (thumbnail included)."""
        return self.image_processor.num_patches(*self.image_hw)

    @property
    def data_tokenizer(self) -> Any:
        """The tokenizer the pipeline encodes with (a stand-in BOS when there is none)."""
        return _StandInBos(self.tokenizer) if self.drop_bos else self.tokenizer

    def seq_len(self, data_seq_len: int) -> int:
        """Row length after expansion of a pipeline row of ``data_seq_len``."""
        return int(data_seq_len) + self.tokens_per_image + 1 - self.drop_bos

    def build_model(self, config: Any, rngs: Any):
        """The family model taking this adapter's ``image`` (parameters as ``family.build``)."""
        if isinstance(config, QwenVLConfig):
            return BatchedQwenVL(config, grid=self.grid, rngs=rngs)
        return BatchedInternVL(config, rngs=rngs)

    # -- the map --------------------------------------------------------------------------

    def images(self, images: np.ndarray) -> np.ndarray:
        """Pipeline images ``[B, H, W, 3]`` -> the model's batched pixels (module doc)."""
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:3]) != self.image_hw:
            raise ValueError(
                f"image shape={images.shape}: expected [B, {self.image_hw[0]}, "
                f"{self.image_hw[1]}, 3] (the run's fixed image size)"
            )
        u8 = images if images.dtype == np.uint8 else to_uint8(images)
        out = []
        for im in u8:
            if isinstance(self.config, QwenVLConfig):
                rows, thw = self.image_processor.preprocess_one(im)
                if thw != (1, *self.grid):
                    raise ValueError(f"image grid {thw}: expected (1, {self.grid})")
                out.append(rows)
            else:
                out.append(self.image_processor.preprocess_one(im).transpose(0, 2, 3, 1))
        return np.stack(out).astype(np.float32)

    def expand(self, tokens, loss_mask, lengths, prompt_lengths=None) -> dict:
        """Rows with one placeholder -> expanded ``tokens``, ``loss_mask``, ``lengths``,
        ``prompt_lengths`` (module doc)."""
        tokens = np.asarray(tokens)
        loss_mask = np.asarray(loss_mask)
        lengths = np.asarray(lengths).astype(np.int32)
        plen = None if prompt_lengths is None else np.asarray(prompt_lengths).astype(np.int32)
        if tokens.ndim != 2 or loss_mask.shape != tokens.shape or lengths.shape != tokens.shape[:1]:
            raise ValueError(
                f"tokens {tokens.shape}, loss_mask {loss_mask.shape}, lengths {lengths.shape}: "
                "expected [B, T], [B, T], [B]"
            )
        b, t = tokens.shape
        if self.drop_bos:
            if not np.all(tokens[:, 0] == self.image_token_id):
                raise ValueError(
                    f"tokens[:, 0] = {tokens[:, 0].tolist()}: expected the stand-in BOS "
                    f"{self.image_token_id} of data_tokenizer (the tokenizer has no BOS)"
                )
            tokens, loss_mask, lengths = tokens[:, 1:], loss_mask[:, 1:], lengths - 1
            plen = None if plen is None else plen - 1
            t -= 1
        valid = np.arange(t)[None, :] < lengths[:, None]
        is_img = (tokens == self.image_token_id) & valid
        count = is_img.sum(1)
        if np.any(count != 1):
            raise ValueError(
                f"tokens: image placeholders (id {self.image_token_id}) per row = "
                f"{count.tolist()}: expected exactly one per row"
            )
        pos = np.argmax(is_img, axis=1)
        if np.any(loss_mask[np.arange(b), pos] != 0):
            raise ValueError("loss_mask: the image placeholder is marked as a target")
        n = self.tokens_per_image
        ins = np.array([self.start_id] + [self.image_token_id] * n + [self.end_id], tokens.dtype)
        k = ins.size
        j = np.arange(t - 1 + k)[None, :]
        p = pos[:, None]
        inside = (j >= p) & (j < p + k)
        src = np.where(j < p, j, j - k + 1)
        src = np.clip(np.where(inside, 0, src), 0, t - 1)
        new_tokens = np.where(inside, ins[np.clip(j - p, 0, k - 1)],
                              np.take_along_axis(tokens, src, 1)).astype(tokens.dtype)
        new_mask = np.where(inside, 0, np.take_along_axis(loss_mask, src, 1)).astype(
            loss_mask.dtype)
        out = {"tokens": new_tokens, "loss_mask": new_mask, "lengths": lengths + k - 1}
        if plen is not None:
            out["prompt_lengths"] = plen + k - 1
        return out

    def __call__(self, batch: dict) -> dict:
        """A pipeline batch -> the model's batch (other fields pass through)."""
        if "image" not in batch:
            raise ValueError(f"batch keys {sorted(batch)}: no 'image'; expected a multimodal batch")
        out = dict(batch)
        out.update(self.expand(batch["tokens"], batch["loss_mask"], batch["lengths"],
                               batch.get("prompt_lengths")))
        out["image"] = self.images(batch["image"])
        return out
