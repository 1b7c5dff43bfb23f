"""Generation and the visual-token compression sweep on a converted Hugging Face model.

    python -m experiments.hf_eval --config configs/hf_eval.py:runs/llava15_7b
    python -m experiments.hf_eval --config configs/hf_eval.py:runs/llava15_7b,quick \
        --config.data.name=vqa_folder --config.data.data_dir=/path/to/vqa

``config.hf.path`` is a directory written by ``python -m experiments.convert`` (or an HF
model directory, converted on the fly). Steps:

1. generation: each of ``config.generate.prompts`` (``<image>`` marks the image placeholder;
   the image is ``config.generate.image``, a file path, or scikit-learn's ``china.jpg`` sample
   when empty)
   is tokenized with the model's ``tokenizer.json`` and continued greedily
   (``kvcache.generate``); prompts and continuations go to ``generations.json``.
2. sweep (``config.sweep.enabled``): every training-free method x budget of ``config.sweep``
   (the templates of ``configs/compression_sweep.py``) is applied to the loaded weights
   (``MLLMConfig.compressor``; parameters are shared, never re-initialised) and measured on the
   first ``sweep.eval_examples`` questions of ``config.data`` with
   ``experiments.compression_sweep``'s accounting (exact match, visual tokens, FLOPs, KV bytes,
   latency); outputs as that experiment writes them (``compression_sweep.md`` / ``.json`` /
   Pareto plots).

Images: the processor of ``efficient_mllm.hf.processors`` when the model directory has a
``preprocessor_config.json`` (generation); dataset images are resized by the data pipeline
(bilinear) and renormalised with the model's ``image_mean`` / ``image_std``. Dataset prompts use
the project's VQA format (``<bos> <image> question ?``), not the model's chat template, so
absolute accuracies of chat-tuned models are lower than with their template; the comparison
between methods is what the sweep reports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["hf_components", "load_model", "run_generation", "run_hf_eval", "run_hf_sweep"]

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


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(np.asarray(x).item() if np.ndim(x) else x)


def hf_components(config: Any, pre: Any, tokenizer: Any, hf_dir: str):
    """``train.loop.Components`` for the sweep: ``config.data`` encoded with the model's
    tokenizer, images at the model's resolution and normalisation."""
    from efficient_mllm.data.datasets import build_dataset
    from efficient_mllm.data.pipeline import make_loader
    from efficient_mllm.train.loop import Components, _pad_batch

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
    mean, std = _image_stats(hf_dir)
    seq_len = int(dc.get("seq_len", 0) or 0)
    if not seq_len:  # longest of the first 512 rows with this tokenizer, plus specials
        split = ds[config.eval.split]
        seq_len = 8 + max(
            len(tokenizer.encode(_text(r["question"])))
            + len(tokenizer.encode(" " + _text(r["answer"])))
            for r in (split[i] for i in range(min(len(split), 512)))
        )
    batch = int(config.eval.batch_size)

    def eval_batches():
        loader = make_loader(
            ds[config.eval.split],
            tokenizer,
            batch_size=batch,
            seq_len=seq_len,
            image_size=vis.image_size,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            worker_count=0,
        )
        for b in loader:
            b = _pad_batch(b, batch)
            if "image" in b:  # pipeline: (u - 0.5) / 0.5 -> the model's (u - mean) / std
                b["image"] = ((np.asarray(b["image"]) * 0.5 + 0.5) - mean) / std
            yield b

    def model_fn(rngs):
        return pre.family.build(pre.config, rngs)

    return Components(
        model_fn,
        None,
        eval_batches,
        ds.question_types,
        tokenizer,
        {"dataset": ds.name, "seq_len": seq_len},
    )


def run_generation(config: Any, pre: Any, tokenizer: Any, hf_dir: str) -> list[dict]:
    """Greedy continuations of ``config.generate.prompts`` (see the module doc)."""
    import jax.numpy as jnp

    from efficient_mllm.kvcache.generate import generate

    gen = config.generate
    image = None
    if getattr(pre.config, "vision", None) is not None:
        image = _generation_image(str(gen.get("image", "") or ""), pre, hf_dir)
    out = []
    for prompt in gen.prompts:
        ids = [tokenizer.bos_id] if gen.get("add_bos", True) else []
        parts = prompt.split("<image>")
        for i, part in enumerate(parts):
            if i:
                ids.append(tokenizer.image_token_id)
            if part:
                ids += tokenizer.encode(part)
        has_image = len(parts) > 1
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


def _generation_image(path: str, pre: Any, hf_dir: str):
    import jax.numpy as jnp
    from PIL import Image

    if path:
        img = np.asarray(Image.open(path).convert("RGB"))
    else:
        from sklearn.datasets import load_sample_image

        img = load_sample_image("china.jpg")
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


def run_hf_sweep(config: Any, pre: Any, comps: Any, workdir: str) -> dict:
    """The compression sweep on the loaded weights (training-free methods only)."""
    import gc

    import jax
    from flax import nnx

    from efficient_mllm.hf.converted import build_with_params
    from experiments import compression_sweep as cs

    t_start = time.perf_counter()
    base = pre.config
    gh, gw = base.grid
    n = gh * gw
    params = nnx.state(pre.model, nnx.Param)
    batches, count = [], 0
    n_eval = int(config.sweep.get("eval_examples", 0) or 0)
    for b in comps.eval_batches():
        batches.append(b)
        count += int(np.sum(b.get("valid", np.ones(len(b["tokens"]), bool))))
        if n_eval and count >= n_eval:
            break
    rows = []
    for job in cs.plan_jobs(config.sweep, n):
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
            model = build_with_params(pre.family, base.replace(compressor=job.spec), params)
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
    )


def run_hf_eval(config: Any, workdir: str) -> dict:
    """Generation then (if enabled) the sweep; writes ``workdir/generations.json``."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    pre, hf_dir = load_model(config.hf.path)
    tokenizer = tokenizer_for(hf_dir, config.hf.special)
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
