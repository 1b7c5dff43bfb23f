"""Fine-tuning a converted Hugging Face checkpoint (``config.init_from``) and exporting it back.

    python -m experiments.train --config configs/quickstart.py --config.init_from=runs/llava15_7b

With ``config.init_from`` set to a directory written by ``python -m experiments.convert``,
``train.loop.build_components`` returns :func:`converted_components`:

- model: the checkpoint's family and config (``hf/converted.py``); ``config.model`` is ignored
  except a non-empty ``config.model.compressor``, which replaces the checkpoint's (a compressor
  with parameters starts from its fresh initialisation). The Trainer starts from the
  checkpoint's parameters, restored straight into the train-state shardings; the optimizer
  state is fresh (``train.step.init_train_state(params=...)``).
- tokenizer: the checkpoint's ``hf/tokenizer.json`` as transformers reads it
  (``hf.processors.PretrainedTokenizer``: special tokens from ``tokenizer_config.json`` /
  ``special_tokens_map.json``); the image token is the model's ``image_token_id``; a missing
  pad token becomes the EOS token (padding is masked out of the loss). Without a
  ``tokenizer.json`` the dataset's own tokenizer is used when its ids fit the model (vocabulary
  size and image token id), else ``ValueError`` (always for Qwen / InternVL, whose image
  wrapper tokens come from the checkpoint's tokenizer).
- data: prompts keep the project's VQA format ``<bos> <image> question ? answer <eos>`` (not the
  model's chat template); ``data.seq_len = 0`` becomes the longest encoded row among the first
  512 of each split plus a margin (a longer row later raises, nothing is truncated).
  LLaVA: images are resized to the vision tower's size and renormalised with ``image_mean`` /
  ``image_std`` of ``hf/preprocessor_config.json`` when it exists.
  Qwen2-VL / Qwen2.5-VL / InternVL (one image token per feature): every batch goes through
  ``train.placeholder_batches.PlaceholderBatches``: images (dataset size, or
  ``data.image_size``) run through the checkpoint's HF image processor (Qwen: smart resize +
  patchify; InternVL: tiles + thumbnail), the placeholder becomes the family's wrapper + ``N``
  image tokens as HF's processor writes them (no loss on any inserted slot), and a tokenizer
  without a BOS (Qwen's) starts the prompt at the image. The model is the family's with a
  batch axis on its image input (``BatchedQwenVL`` / ``BatchedInternVL``, same parameters).

:func:`export_hf` writes the trained model as HF ``config.json`` + safetensors + the tokenizer
/ processor files (``train_and_evaluate`` does it to ``<workdir>/hf_export``); a compressor's
own parameters have no place in the HF format and are left out (they stay in the orbax
checkpoint).

Supported: ``llava``, ``qwen2_vl``, ``qwen2_5_vl`` and ``internvl`` checkpoints, one image per
row. Llama / Qwen2 (text-only) checkpoints: ``ValueError``. Export runs in a single process
only (multi-process runs skip it with a warning).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

__all__ = ["ConvertedInit", "checkpoint_tokenizer", "converted_components", "export_hf"]

log = logging.getLogger(__name__)

_SCAN_ROWS = 512  # rows per split scanned for data.seq_len = 0
_SEQ_MARGIN = 4


@dataclasses.dataclass
class ConvertedInit:
    """A converted checkpoint as the starting point of a run (``Components.init_from``).

    ``config``: the model trained (the checkpoint's, compressor possibly replaced);
    ``base_config``: the checkpoint's own (what is exported)."""

    path: str
    family: Any
    config: Any
    base_config: Any
    hf_config: dict
    param_dtype: str

    def params(self, mesh: jax.sharding.Mesh, rules: Any) -> dict:
        """The checkpoint's parameters (pure dict) placed with their shardings on ``mesh``."""
        from efficient_mllm.hf.converted import load_converted

        pre = load_converted(self.path, mesh=mesh, rules=rules)
        return nnx.to_pure_dict(nnx.state(pre.model, nnx.Param))

    def export(self, params: Any, out_dir: str | os.PathLike, *, dtype: str | None = None) -> str:
        """Trained ``params`` (pure dict) -> HF safetensors + config + tokenizer files in
        ``out_dir``; ``dtype`` default: the checkpoint's parameter dtype."""
        from efficient_mllm.hf.convert import Pretrained, abstract_model
        from efficient_mllm.hf.converted import build_with_params, export_pretrained

        _, aparams, _ = abstract_model(self.family, self.base_config)
        want = traverse_util.flatten_dict(nnx.to_pure_dict(aparams))
        have = traverse_util.flatten_dict(params)
        missing = sorted("/".join(map(str, p)) for p in want if p not in have)
        if missing:
            raise ValueError(
                f"params: missing {len(missing)} parameter(s) of the checkpoint's model, e.g. "
                f"{missing[:3]}; expected the trained state of a run started from {self.path!r}"
            )
        dropped = sorted("/".join(map(str, p)) for p in have if p not in want)
        if dropped:
            log.warning("export: %d parameter(s) without a place in the HF checkpoint are left "
                        "out: %s", len(dropped), ", ".join(dropped[:8]))
        nnx.replace_by_pure_dict(aparams, traverse_util.unflatten_dict({p: have[p] for p in want}))
        model = build_with_params(self.family, self.base_config, aparams)
        pre = Pretrained(model=model, config=self.base_config, family=self.family,
                         hf_config=self.hf_config)
        return export_pretrained(pre, out_dir, side_dir=os.path.join(self.path, "hf"),
                                 dtype=dtype or self.param_dtype)


def export_hf(trainer: Any, out_dir: str | os.PathLike, *, dtype: str | None = None) -> str | None:
    """Writes ``trainer``'s current parameters as a Hugging Face checkpoint in ``out_dir``
    (a trainer of a run with ``config.init_from``); returns ``out_dir`` (None when skipped in a
    multi-process run)."""
    src = trainer.components.init_from
    if not isinstance(src, ConvertedInit):
        raise ValueError(
            f"trainer.components.init_from = {src!r}: expected a run started from a converted "
            "checkpoint (config.init_from)"
        )
    if jax.process_count() > 1:
        log.warning("export_hf: skipped in a multi-process run (%d processes); export the "
                    "orbax checkpoint from one process", jax.process_count())
        return None
    return src.export(trainer.state.params, out_dir, dtype=dtype)


def checkpoint_tokenizer(
    hf_dir: str, model_config: Any, ds: Any, *, require_bos: bool = True,
    require_file: bool = False,
) -> Any:
    """The tokenizer that encodes the data for the checkpoint's model (module doc).
    ``require_bos=False``: a tokenizer without a BOS token is accepted (its ``bos_id`` stays
    None); ``require_file``: no fallback to the dataset's tokenizer."""
    vocab = int(model_config.language.vocab_size)
    image_id = model_config.image_token_id
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        if require_file:
            raise ValueError(
                f"init_from: {hf_dir!r} has no tokenizer.json; expected the checkpoint's "
                "tokenizer there (its image wrapper tokens are needed)"
            )
        tok = ds.tokenizer
        if tok is None or ds.vocab_size > vocab or tok.image_token_id != image_id:
            raise ValueError(
                f"init_from: {hf_dir!r} has no tokenizer.json and dataset {ds.name!r}'s tokenizer "
                f"(vocabulary {ds.vocab_size}, image token id "
                f"{getattr(tok, 'image_token_id', None)}) does not fit the model (vocab_size "
                f"{vocab}, image_token_id {image_id}); expected the checkpoint's tokenizer.json "
                "in that directory"
            )
        return tok
    from efficient_mllm.hf.processors import PretrainedTokenizer

    tok = PretrainedTokenizer.from_pretrained(hf_dir)
    for name in ("bos", "eos") if require_bos else ("eos",):
        if getattr(tok, f"{name}_id") is None:
            raise ValueError(
                f"init_from: the tokenizer in {hf_dir!r} defines no {name}_token "
                "(tokenizer_config.json / special_tokens_map.json); the VQA format "
                "<bos> <image> question ? answer <eos> needs one"
            )
    if tok.image_token_id is None:
        tok.image_token_id = image_id
    elif tok.image_token_id != image_id:
        raise ValueError(
            f"init_from: the tokenizer's image token id {tok.image_token_id} != the model's "
            f"image_token_id {image_id}"
        )
    if tok.pad_id is None:
        tok.pad_id = tok.eos_id
    if tok.vocab_size > vocab:
        raise ValueError(
            f"init_from: the tokenizer has {tok.vocab_size} ids, more than the model's vocab_size "
            f"{vocab}; expected a tokenizer whose ids fit the embedding"
        )
    return tok


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    return str(np.asarray(x).item()) if np.ndim(x) == 0 and not isinstance(x, str) else str(x)


def _seq_len(ds: Any, tokenizer: Any, splits: tuple[str, ...]) -> int:
    from efficient_mllm.data.tokenizer import encode_vqa

    longest = 0
    for split in splits:
        src = ds[split]
        for i in range(min(len(src), _SCAN_ROWS)):
            r = src[i]
            ids, _ = encode_vqa(tokenizer, _text(r["question"]), _text(r["answer"]),
                                multimodal="image" in r)
            longest = max(longest, len(ids))
    return longest + _SEQ_MARGIN


def _image_transform(hf_dir: str):
    """Batch map: the pipeline's ``(x - 0.5) / 0.5`` images -> the model's ``(x - mean) / std``
    (None without a ``preprocessor_config.json``)."""
    path = os.path.join(hf_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        pp = json.load(f)
    if "image_mean" not in pp or "image_std" not in pp:
        return None
    mean = np.asarray(pp["image_mean"], np.float32)
    std = np.asarray(pp["image_std"], np.float32)

    def transform(batch: dict) -> dict:
        if "image" in batch:
            batch = dict(batch)
            batch["image"] = ((np.asarray(batch["image"]) * 0.5 + 0.5) - mean) / std
        return batch

    return transform


def converted_components(config: Any):
    """``train.loop.Components`` for fine-tuning ``config.init_from`` (module doc)."""
    from efficient_mllm.hf.converted import converted_config
    from efficient_mllm.nn.mllm import MLLMConfig
    from efficient_mllm.train.loop import Components, build_dataset_of, data_components
    from efficient_mllm.train.placeholder_batches import PlaceholderBatches, is_placeholder_config

    path = os.path.abspath(os.fspath(config.init_from))
    if not os.path.isdir(path):
        raise ValueError(
            f"init_from = {config.init_from!r}: not a directory; expected one written by "
            "`python -m experiments.convert`"
        )
    family, base, hf_config, meta = converted_config(path)
    placeholder = is_placeholder_config(base)
    if not placeholder and not (isinstance(base, MLLMConfig) and base.vision is not None):
        raise ValueError(
            f"init_from = {config.init_from!r}: model_type {meta['model_type']!r} does not build "
            "a multimodal model with a vision tower; fine-tuning supports 'llava', 'qwen2_vl', "
            "'qwen2_5_vl' and 'internvl' checkpoints"
        )
    mc = config.get("model") or {}
    spec = mc.get("compressor") if hasattr(mc, "get") else None
    model_config = base.replace(compressor=spec) if spec else base
    ds = build_dataset_of(config)
    if not ds.multimodal:
        raise ValueError(f"data.name = {ds.name!r} is text-only; expected a multimodal dataset")
    hf_dir = os.path.join(path, "hf")
    tokenizer = checkpoint_tokenizer(hf_dir, model_config, ds, require_bos=not placeholder,
                                     require_file=placeholder)
    dc = config.data
    want = dc.get("image_size", 0) or 0
    want_hw = tuple(int(x) for x in np.broadcast_to(want, (2,))) if want else None
    split = config.eval.get("split", "validation")
    if placeholder:
        # Images keep the dataset's size (or data.image_size); the checkpoint's processor
        # resizes / tiles them (train/placeholder_batches.py).
        adapter = PlaceholderBatches.from_checkpoint(
            model_config, hf_dir, hf_config, tokenizer, want_hw or ds.image_size
        )
        data_tok, image_size, transform = adapter.data_tokenizer, want_hw, adapter
    else:
        hw = tuple(int(x) for x in np.broadcast_to(base.vision.image_size, (2,)))
        if want_hw and want_hw != hw:
            raise ValueError(
                f"data.image_size = {want!r}: expected 0 or the vision tower's image size {hw}"
            )
        adapter, data_tok, image_size = None, tokenizer, hw
        transform = _image_transform(hf_dir)
    seq_len = int(dc.get("seq_len", 0) or 0) or _seq_len(ds, data_tok, ("train", split))
    train_loader, eval_batches, info = data_components(
        config, ds, data_tok, seq_len=seq_len, image_size=image_size, transform=transform
    )
    info.update(init_from=path, model_type=meta["model_type"])
    if adapter is not None:
        info.update(image_tokens=adapter.tokens_per_image, seq_len=adapter.seq_len(seq_len))

    def model_fn(rngs: nnx.Rngs) -> nnx.Module:
        if adapter is not None:
            return adapter.build_model(model_config, rngs)
        return family.build(model_config, rngs)

    init = ConvertedInit(path=path, family=family, config=model_config, base_config=base,
                         hf_config=hf_config, param_dtype=meta["param_dtype"])
    return Components(model_fn, train_loader, eval_batches, ds.question_types, tokenizer, info,
                      init_from=init)
