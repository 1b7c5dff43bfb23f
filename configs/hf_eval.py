"""Generation + visual-token compression sweep on a converted Hugging Face model.

The argument is the model directory (written by ``python -m experiments.convert``, or an HF
directory converted on the fly), optionally followed by ``,quick`` (3 budgets, 100 questions)
or ``,smoke`` (2 methods, 2 budgets, 8 questions, a few tokens: a CI check). Defaults suit a
LLaVA-1.5 checkpoint (special tokens ``<s>``, ``</s>``, ``<unk>``, ``<image>``; its pad is
``<pad>``); override ``--config.hf.special.*`` for other LLaVA-style tokenizers. Converted
Qwen2-VL / Qwen2.5-VL / InternVL directories need no override: their own tokenizer config and
image processor are used (``experiments/hf_eval.py`` doc); ``<image>`` in
``config.generate.prompts`` still marks the image. The questions come from
``config.data`` (default: the procedural ``shapes_vqa``, no download; set
``--config.data.name=vqa_folder --config.data.data_dir=DIR`` for your own images + JSON).

COMMAND:
    python -m experiments.convert --hf_dir /path/to/llava-1.5-7b-hf --out runs/llava15_7b
    python -m experiments.hf_eval --config configs/hf_eval.py:runs/llava15_7b
    python -m experiments.hf_eval --config configs/hf_eval.py:runs/llava15_7b,quick \
        --config.data.name=vqa_folder --config.data.data_dir=/data/my_vqa

EXPECTED: ``runs/hf_eval/generations.json`` (a description of the sample image for a real
LLaVA-1.5), and ``compression_sweep.md`` with one row per method x budget plus the
uncompressed baseline (visual tokens 576 -> 288 ... 32 for LLaVA-1.5). No numbers are recorded
yet for a real checkpoint on the project's data (GPU run pending); the CPU smoke variant on a
tiny random model only checks that every row runs.
"""

import importlib.util
import os

import ml_collections

from efficient_mllm.train.config import base_config, dataset_knobs


def _compression_sweep_config():
    """``configs/compression_sweep.py`` loaded by path (``configs`` is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compression_sweep.py")
    spec = importlib.util.spec_from_file_location("_compression_sweep_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_CS = _compression_sweep_config()
BUDGETS, METHODS, QUICK_BUDGETS = _CS.BUDGETS, _CS.METHODS, _CS.QUICK_BUDGETS

SMOKE_METHODS = ("random: random(keep={keep})", "fastv: fastv(layer=1, keep={keep})")
OPTIONS = ("quick", "smoke")


def get_config(arg=None) -> ml_collections.ConfigDict:
    parts = [a.strip() for a in (arg or "").split(",") if a.strip()]
    opts = {p for p in parts if p in OPTIONS}
    paths = [p for p in parts if p not in OPTIONS]
    if len(paths) > 1:
        raise ValueError(f"configs/hf_eval.py: expected one model path, got {paths}")
    quick, smoke = "quick" in opts, "smoke" in opts
    c = base_config()
    c.name = "hf_eval" + ("_smoke" if smoke else "_quick" if quick else "")
    c.hf = ml_collections.ConfigDict(
        dict(
            path=paths[0] if paths else "",
            special=dict(pad="<pad>", bos="<s>", eos="</s>", unk="<unk>", image="<image>"),
        )
    )
    c.data.name = "shapes_vqa"
    c.data.knobs = dataset_knobs(
        "shapes_vqa",
        image_size=64,
        num_train=1,
        num_validation=16 if smoke else 500,
        num_test=0,
        seed=0,
    )
    c.eval.batch_size = 4 if smoke else 16
    c.generate = ml_collections.ConfigDict(
        dict(
            prompts=("USER: <image>\nWhat is shown in this image? ASSISTANT:",),
            image="",  # a file path; "" = scikit-learn's china.jpg sample
            add_bos=True,
            max_new_tokens=4 if smoke else 48,
        )
    )
    c.sweep = ml_collections.ConfigDict(
        dict(
            enabled=True,
            budgets=(1.0, 1 / 2) if smoke else QUICK_BUDGETS if quick else BUDGETS,
            methods=SMOKE_METHODS if smoke else METHODS,
            only="",
            learned=(),  # learned compressors need training: not part of this evaluation
            learned_checkpoints=(),
            eval_examples=8 if smoke else 100 if quick else 500,
            max_new_tokens=0,
            latency_batch=1,
            latency_warmup=1 if smoke else 2,
            latency_repeats=1 if smoke else 10,
            kv_capacity="fitted",
            benchmark_out="",
        )
    )
    c.lock()
    return c
