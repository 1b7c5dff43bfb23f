"""LoLCATs linearisation of a trained quickstart model (issue #7): attention transfer of a
Hedgehog + sliding-window linear attention, then LoRA on q/k/v/o (``train/linearize.py``).

The config is the base run's (``arg``: ``quickstart`` (default) or another file of configs/, so
the checkpoint's model and data are rebuilt) plus a ``linearize`` section:
``variant`` (registry.ATTENTION spec), ``layers`` ("" = all decoder layers, else "0,1"),
``batch_size`` (replaces ``train.batch_size`` for both stages), ``transfer`` / ``lora``
(steps, lr, warmup, ...), ``evaluators`` and ``eval_max_batches`` (0 = the whole split).

COMMAND:
    python -m experiments.train --config configs/quickstart.py --workdir runs/quickstart
    python -m experiments.linearize --config configs/lolcats.py --checkpoint runs/quickstart \
        --workdir runs/lolcats
    # another variant, linearised the same way
    python -m experiments.linearize --config configs/lolcats.py --checkpoint runs/quickstart \
        --workdir runs/lolcats_hedgehog --config.linearize.variant="hedgehog(feature_dim=32)"
    # the whole thing on the GPU machine: bash experiments/gpu_lolcats.sh

EXPECTED (measured on an H200 by experiments/gpu_lolcats.sh, benchmarks/lolcats_quickstart.md;
2000-step quickstart teacher at 73.6% exact match, 500 validation questions): the default variant
gives 62.0% exact match with the copied weights, 73.0% after attention transfer and 73.4% after
LoRA; pure ``hedgehog(feature_dim=32)`` 20.4% -> 72.2% -> 73.0%. The other variants are in
experiments/linearize.py's docstring.
"""

import os

import ml_collections

from efficient_mllm.train.config import load_config


def get_config(arg=None) -> ml_collections.ConfigDict:
    base = arg or "quickstart"
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{base}.py"))
    c.unlock()
    c.name = "lolcats" if base == "quickstart" else f"lolcats_{base}"
    c.linearize = ml_collections.ConfigDict(
        dict(
            variant="linear_swa(feature_map='hedgehog', feature_dim=32, window=16)",
            layers="",
            batch_size=64,
            seed=0,
            compute_dtype="",  # "" = the model's own; "bfloat16" casts the state in the steps
            transfer=dict(steps=300, lr=1e-2, warmup_steps=20, weight_decay=0.0),
            lora=dict(steps=300, lr=1e-3, warmup_steps=20, weight_decay=0.0, rank=8,
                      alpha=16.0, targets="q,k,v,o", train_feature_maps=False),
            evaluators=("exact_match", "teacher_forced", "perplexity"),
            eval_max_batches=0,
            log_every=50,
            save_student=True,
        )
    )
    c.lock()
    return c
