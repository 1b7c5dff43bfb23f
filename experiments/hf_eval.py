"""Generation and the visual-token compression sweep on a converted Hugging Face model.

    python -m experiments.hf_eval --config configs/hf_eval.py:runs/llava15_7b
    python -m experiments.hf_eval --config configs/hf_eval.py:runs/qwen25_vl_3b,quick
    python -m experiments.hf_eval --config configs/hf_eval.py:runs/llava15_7b,quick \
        --config.data.name=vqa_folder --config.data.data_dir=/path/to/vqa

``config.hf.path`` is a directory written by ``python -m experiments.convert`` (or an HF
model directory, converted on the fly). Steps:

1. generation: each of ``config.generate.prompts`` (``<image>`` marks the image placeholder;
   the image is ``config.generate.image``, a file path, or scikit-learn's ``china.jpg`` sample
   when empty) is tokenized with the model's tokenizer and continued greedily
   (``kvcache.generate``); prompts and continuations go to ``generations.json``.
2. sweep (``config.sweep.enabled``): every training-free method x budget of ``config.sweep``
   (the templates of ``configs/compression_sweep.py``) is applied to the loaded weights
   (``MLLMConfig.compressor``; parameters are shared, never re-initialised) and measured on the
   first ``sweep.eval_examples`` questions of ``config.data`` with
   ``experiments.compression_sweep``'s accounting (exact match, visual tokens, FLOPs, KV bytes,
   latency); outputs as that experiment writes them (``compression_sweep.md`` / ``.json`` /
   Pareto plots).

Families: LLaVA (and other ``MLLMConfig`` models) and Qwen2-VL / Qwen2.5-VL / InternVL.

- LLaVA: the tokenizer is ``tokenizer.json`` with ``config.hf.special``; generation images go
  through ``efficient_mllm.hf.processors`` when the model directory has a
  ``preprocessor_config.json``; dataset images are resized by the data pipeline (bilinear) and
  renormalised with the model's ``image_mean`` / ``image_std``; ``n`` (visual tokens per
  example) is the model's ``grid``.
- Qwen2-VL / Qwen2.5-VL / InternVL: the checkpoint's tokenizer as fine-tuning reads it
  (``train.finetune.checkpoint_tokenizer``; ``config.hf.special`` is not used), and every
  prompt / batch goes through ``train.placeholder_batches.PlaceholderBatches``: the image runs
  through the checkpoint's HF image processor at its own size (dataset images at the dataset's
  size or ``data.image_size``; Qwen: smart resize + patchify, InternVL: tiles + thumbnail) and the
  ``<image>`` placeholder becomes the family's wrapper + ``N`` image tokens; a tokenizer without
  BOS (Qwen's) starts the prompt at the image. The sweep's models are the batched-image
  ``BatchedQwenVL`` / ``BatchedInternVL`` with the loaded parameters. ``n`` is the model's
  ``num_image_features`` of one example's image (checked against the expansion). InternVL runs
  a pre-LLM compressor per tile, so budgets of pre-LLM methods are filled per tile
  (``budget_tokens`` = tiles x keep); in-LLM methods (FastV, ...) rank a row's image tokens
  jointly (keep of ``n``). FLOPs: ``evaluate.efficiency`` counts Qwen's ViT on the image's patch
  grid (window attention of Qwen2.5-VL included) and InternViT per tile. One ``<image>`` per
  prompt; methods a family cannot run (e.g. a grid-based pooling on Qwen's dynamic grid) give an
  ``error`` row with the model's message.

Dataset prompts use the project's VQA format (``<bos> <image> question ?``), not the model's
chat template, so absolute accuracies of chat-tuned models are lower than with their template;
the comparison between methods is what the sweep reports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "hf_components",
    "load_model",
    "load_tokenizer",
    "run_generation",
    "run_hf_eval",
    "run_hf_sweep",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_model(path: str):
    """``Pretrained`` of a converted dir, or of an HF dir (converted in memory)."""
    from efficient_mllm.hf import load_pretrained
    from efficient_mllm.hf.converted import META, load_converted

    if os.path.isfile(os.path.join(path, META)):
        return load_converted(path), os.path.join(path, "hf")
    return load_pretrained(path), path


def _image_stats(hf_dir: str) -> tuple[np.ndarray, np.ndarray]:
    path = os.path.join(hf_dir, "preprocessor_config.json")
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if os.path.isfile(path):
        with open(path) as f:
            pp = json.load(f)
        mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def tokenizer_for(hf_dir: str, special: Any):
    """The model's ``tokenizer.json`` behind the data pipeline's tokenizer interface."""
    from efficient_mllm.data.tokenizer import HFTokenizer

    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"no tokenizer.json in {hf_dir!r}: the model directory needs one")
    return HFTokenizer.from_file(
        path,
        pad_token=special.pad,
        bos_token=special.bos,
        eos_token=special.eos,
        unk_token=special.unk,
        image_token=special.image,
    )


def _placeholder(pre: Any) -> bool:
    """Whether ``pre`` is a Qwen2-VL / Qwen2.5-VL / InternVL model (one token per feature)."""
    from efficient_mllm.train.placeholder_batches import is_placeholder_config

    return is_placeholder_config(pre.config)


def load_tokenizer(config: Any, pre: Any, hf_dir: str):
    """LLaVA / text models: :func:`tokenizer_for` with ``config.hf.special``; Qwen / InternVL:
    the checkpoint's tokenizer as fine-tuning reads it (``finetune.checkpoint_tokenizer``:
    special tokens from its tokenizer config, image token = the model's; no BOS required)."""
    if not _placeholder(pre):
        return tokenizer_for(hf_dir, config.hf.special)
    from efficient_mllm.train.finetune import checkpoint_tokenizer

    return checkpoint_tokenizer(hf_dir, pre.config, None, require_bos=False, require_file=True)


class _AdapterFamily:
    """``family.build`` of the batched-image model of a ``PlaceholderBatches`` adapter (for
    ``hf.converted.build_with_params``)."""

    def __init__(self, adapter: Any):
        self.adapter = adapter

    def build(self, cfg: Any, rngs: Any):
        return self.adapter.build_model(cfg, rngs)


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(np.asarray(x).item() if np.ndim(x) else x)


def hf_components(config: Any, pre: Any, tokenizer: Any, hf_dir: str):
    """``train.loop.Components`` for the sweep: ``config.data`` encoded with the model's
    tokenizer. LLaVA: images at the model's resolution and normalisation. Qwen / InternVL:
    every batch through ``train.placeholder_batches.PlaceholderBatches`` (HF-equal pixels,
    the placeholder expanded to the family's wrapper + image tokens); ``info["adapter"]`` holds
    it and ``model_fn`` builds the batched-image model."""
    from efficient_mllm.data.datasets import build_dataset
    from efficient_mllm.data.pipeline import make_loader
    from efficient_mllm.train.loop import Components, _pad_batch

    placeholder = _placeholder(pre)
    vis = pre.config.vision
    if vis is None:
        raise ValueError("the compression sweep needs a multimodal model (this one has no vision)")
    if tokenizer.image_token_id != pre.config.image_token_id:
        raise ValueError(
            f"tokenizer image token id {tokenizer.image_token_id} != the model's image_token_id "
            f"{pre.config.image_token_id}: set config.hf.special.image to the model's image token"
        )
    dc = config.data
    ds = build_dataset(dc.name, dc.get("data_dir") or None, **dict(dc.get("knobs") or {}))
    adapter = None
    if placeholder:  # images keep the dataset's size (or data.image_size): the HF processor
        from efficient_mllm.train.placeholder_batches import PlaceholderBatches

        want = dc.get("image_size", 0) or 0
        hw = tuple(int(x) for x in np.broadcast_to(want, (2,))) if want else None
        adapter = PlaceholderBatches.from_checkpoint(
            pre.config, hf_dir, pre.hf_config, tokenizer, hw or ds.image_size
        )
        data_tok, image_size = adapter.data_tokenizer, hw
    else:
        data_tok, image_size = tokenizer, vis.image_size
    mean, std = _image_stats(hf_dir)
    seq_len = int(dc.get("seq_len", 0) or 0)
    if not seq_len:  # longest of the first 512 rows with this tokenizer, plus specials
        split = ds[config.eval.split]
        seq_len = 8 + max(
            len(data_tok.encode(_text(r["question"])))
            + len(data_tok.encode(" " + _text(r["answer"])))
            for r in (split[i] for i in range(min(len(split), 512)))
        )
    batch = int(config.eval.batch_size)

    def eval_batches():
        loader = make_loader(
            ds[config.eval.split],
            data_tok,
            batch_size=batch,
            seq_len=seq_len,
            image_size=image_size,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            worker_count=0,
        )
        for b in loader:
            b = _pad_batch(b, batch)
            if adapter is not None:
                b = adapter(b)
            elif "image" in b:  # pipeline: (u - 0.5) / 0.5 -> the model's (u - mean) / std
                b["image"] = ((np.asarray(b["image"]) * 0.5 + 0.5) - mean) / std
            yield b

    def model_fn(rngs):
        if adapter is not None:
            return adapter.build_model(pre.config, rngs)
        return pre.family.build(pre.config, rngs)

    info = {"dataset": ds.name, "seq_len": seq_len}
    if adapter is not None:
        info.update(adapter=adapter, image_tokens=adapter.tokens_per_image,
                    seq_len=adapter.seq_len(seq_len))
    return Components(model_fn, None, eval_batches, ds.question_types, tokenizer, info)


def run_generation(config: Any, pre: Any, tokenizer: Any, hf_dir: str) -> list[dict]:
    """Greedy continuations of ``config.generate.prompts`` (see the module doc)."""
    import jax.numpy as jnp

    from efficient_mllm.kvcache.generate import generate

    gen = config.generate
    image = adapter = None
    if _placeholder(pre):
        image, adapter = _placeholder_image(str(gen.get("image", "") or ""), pre, tokenizer,
                                            hf_dir)
        tokenizer = adapter.data_tokenizer  # Qwen: a stand-in BOS that expand() removes
    elif getattr(pre.config, "vision", None) is not None:
        image = _generation_image(str(gen.get("image", "") or ""), pre, hf_dir)
    out = []
    for prompt in gen.prompts:
        add_bos = gen.get("add_bos", True) and tokenizer.bos_id is not None
        ids = [tokenizer.bos_id] if add_bos or (adapter is not None and adapter.drop_bos) else []
        parts = prompt.split("<image>")
        for i, part in enumerate(parts):
            if i:
                ids.append(tokenizer.image_token_id)
            if part:
                ids += tokenizer.encode(part)
        has_image = len(parts) > 1
        if adapter is not None and has_image:  # the family's wrapper + N image tokens
            ids = adapter.expand([ids], [[0] * len(ids)], [len(ids)])["tokens"][0].tolist()
        elif adapter is not None and adapter.drop_bos:
            ids = ids[1:]
        tokens = jnp.asarray([ids], jnp.int32)
        res = generate(
            pre.model,
            tokens,
            images=image if has_image else None,
            max_new_tokens=int(gen.max_new_tokens),
            stop_tokens=(tokenizer.eos_id,),
        )
        new = np.asarray(res.tokens[0, : int(res.lengths[0])]).tolist()
        out.append({"prompt": prompt, "tokens": new, "text": tokenizer.decode(new)})
    return out


def _load_image(path: str) -> np.ndarray:
    from PIL import Image

    if path:
        return np.asarray(Image.open(path).convert("RGB"))
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg")


def _placeholder_image(path: str, pre: Any, tokenizer: Any, hf_dir: str):
    """Qwen / InternVL: ``(images in the model's own format, PlaceholderBatches)`` for the
    generation image at its own size (the checkpoint's processor resizes / tiles it)."""
    import jax.numpy as jnp

    from efficient_mllm.nn.qwen2_vl import QwenVLConfig, QwenVLImages
    from efficient_mllm.train.placeholder_batches import PlaceholderBatches

    img = _load_image(path)
    adapter = PlaceholderBatches.from_checkpoint(
        pre.config, hf_dir, pre.hf_config, tokenizer, img.shape[:2]
    )
    px = adapter.images(img[None].astype(np.uint8))[0]
    if isinstance(pre.config, QwenVLConfig):  # patch rows of one image of grid (gh, gw)
        gh, gw = adapter.grid
        return QwenVLImages(jnp.asarray(px), ((1, gh, gw),)), adapter
    return jnp.asarray(px), adapter  # InternVL: tiles [tiles, S, S, 3]


def _generation_image(path: str, pre: Any, hf_dir: str):
    import jax.numpy as jnp
    from PIL import Image

    img = _load_image(path)
    h, w = pre.config.vision.image_size
    if os.path.isfile(os.path.join(hf_dir, "preprocessor_config.json")):
        try:
            from efficient_mllm.hf.processors import ClipImageProcessor

            px = np.asarray(ClipImageProcessor.from_pretrained(hf_dir)(img)["pixel_values"])
            if px.shape[-2:] == (h, w):
                return jnp.asarray(px.transpose(0, 2, 3, 1))
        except Exception as e:  # a processor for another family: fall back below
            log.warning("preprocessor_config.json not usable (%s); plain resize", e)
    mean, std = _image_stats(hf_dir)
    u = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC), np.float32) / 255.0
    return jnp.asarray(((u - mean) / std)[None])


def _visual_tokens(pre: Any, comps: Any, batches: list) -> tuple[int, int, Any]:
    """``(n, n_unit, family)``: uncompressed visual tokens per example, the count a pre-LLM
    compressor's budget applies to (InternVL: one tile; else ``n``) and the family building
    the sweep's models. Qwen / InternVL: ``n`` from the model's ``num_image_features`` on the
    first example's image (checked against the adapter's expansion)."""
    adapter = comps.info.get("adapter")
    if adapter is None:
        gh, gw = pre.config.grid
        return gh * gw, gh * gw, pre.family
    from flax import nnx

    family = _AdapterFamily(adapter)
    model = nnx.eval_shape(lambda: family.build(pre.config, nnx.Rngs(0)))
    n = int(model.num_image_features(model.model_images(np.asarray(batches[0]["image"])[:1])))
    if n != adapter.tokens_per_image:
        raise ValueError(
            f"the model encodes {n} image tokens per image but the prompts hold "
            f"{adapter.tokens_per_image}: expected them equal"
        )
    unit = n
    if hasattr(pre.config, "tokens_per_image") and adapter.tiles > 1:  # InternVL: per tile
        unit = int(pre.config.tokens_per_image)
    return n, unit, family


def run_hf_sweep(config: Any, pre: Any, comps: Any, workdir: str) -> dict:
    """The compression sweep on the loaded weights (training-free methods only).

    ``n`` (budget 1.0) is the visual tokens of one example: LLaVA's ``grid``, Qwen's merged
    image tokens, InternVL's tiles x tokens per tile. InternVL runs a pre-LLM compressor on
    each tile, so its templates are filled for one tile's tokens (the row's ``budget_tokens``
    = tiles x keep); in-LLM methods rank the row's image tokens jointly (budget of ``n``)."""
    import gc

    import jax
    from flax import nnx

    from efficient_mllm.hf.converted import build_with_params
    from experiments import compression_sweep as cs

    t_start = time.perf_counter()
    base = pre.config
    params = nnx.state(pre.model, nnx.Param)
    batches, count = [], 0
    n_eval = int(config.sweep.get("eval_examples", 0) or 0)
    for b in comps.eval_batches():
        batches.append(b)
        count += int(np.sum(b.get("valid", np.ones(len(b["tokens"]), bool))))
        if n_eval and count >= n_eval:
            break
    if not batches:
        raise ValueError(f"eval split {config.eval.split!r} has no examples")
    n, unit, family = _visual_tokens(pre, comps, batches)
    jobs = cs.plan_jobs(config.sweep, n)
    unit_jobs = cs.plan_jobs(config.sweep, unit) if unit != n else jobs
    if [(j.label, j.frac) for j in unit_jobs] != [(j.label, j.frac) for j in jobs]:
        raise ValueError("sweep: the per-tile plan differs from the per-example one")
    rows = []
    for job, unit_job in zip(jobs, unit_jobs, strict=True):
        row = {
            "method": job.label,
            "budget": job.frac,
            "budget_label": cs._frac_label(job.frac),
            "budget_tokens": None if job.frac is None else cs.budget_fields(job.frac, n)["keep"],
            "spec": job.spec,
            "kind": job.kind,
            "note": job.note,
            "status": "skipped" if job.note else "ok",
        }
        if job.kind == "learned":
            row.update(status="skipped", note="learned methods need training (not in hf_eval)")
        if row["status"] == "skipped":
            rows.append(row)
            continue
        t0 = time.perf_counter()
        try:
            model = build_with_params(family, base.replace(compressor=job.spec), params)
            if unit_job is not job and getattr(model, "compressor", None) is not None:
                model = build_with_params(family, base.replace(compressor=unit_job.spec), params)
                keep = cs.budget_fields(job.frac, unit)["keep"] if job.frac else None
                row.update(spec=unit_job.spec,
                           budget_tokens=None if keep is None else keep * n // unit)
            model.eval()
            if job.kind != "baseline":
                row["stage"] = "in_llm" if model.in_llm_compressor is not None else "pre_llm"
            fields, _ = cs._measure(model, batches, config.sweep, comps)
            row.update(fields)
            row["frac_tokens_input"] = row["visual_tokens"] / n
        except Exception as e:  # one failing method must not end the sweep
            log.warning("%s %s failed: %s", job.label, job.spec, e)
            row.update(status="error", note=f"error: {type(e).__name__}: {e}"[:300])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"{job.label:>14s} {row['budget_label']:>6s}: {row['status']}"
            + (
                f" acc {row['accuracy']:.4f}, tokens {row['visual_tokens']:.1f}"
                if row["status"] == "ok"
                else f" {row['note']}"
            )
        )
        jax.clear_caches()
        gc.collect()
    return cs.finish_sweep(
        config,
        rows,
        workdir,
        base_mcfg=base,
        checkpoint=config.hf.path,
        step=None,
        eval_examples=count,
        device=cs.device_summary(),
        wall_time_s=time.perf_counter() - t_start,
        extra_meta={"hf_model_type": pre.hf_config.get("model_type")},
        num_visual_tokens=n,
    )


def run_hf_eval(config: Any, workdir: str) -> dict:
    """Generation then (if enabled) the sweep; writes ``workdir/generations.json``."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    pre, hf_dir = load_model(config.hf.path)
    tokenizer = load_tokenizer(config, pre, hf_dir)
    result: dict[str, Any] = {}
    if config.generate.prompts:
        result["generations"] = run_generation(config, pre, tokenizer, hf_dir)
        with open(os.path.join(workdir, "generations.json"), "w") as f:
            json.dump(result["generations"], f, indent=2)
        for g in result["generations"]:
            print(f"{g['prompt']!r} -> {g['text']!r}")
    if config.sweep.enabled:
        comps = hf_components(config, pre, tokenizer, hf_dir)
        result["sweep"] = run_hf_sweep(config, pre, comps, workdir)
    return result


def main(argv):
    from absl import app, flags
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = _CONFIG.value
    if not cfg.hf.path:
        raise app.UsageError("config.hf.path is empty: --config configs/hf_eval.py:<model dir>")
    workdir = _WORKDIR.value or os.path.join("runs", cfg.name)
    res = run_hf_eval(cfg, workdir)
    if "sweep" in res:
        print(f"table: {res['sweep']['paths']['markdown']}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/hf_eval.py:<model dir>", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<name>).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
