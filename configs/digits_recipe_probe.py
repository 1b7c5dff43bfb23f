"""Recipe probe for the digit_grid_vqa compression-study baseline (issue #4): the study's
training config (``configs/compression_sweep.py:train,study,digit_grid``) with one variant's
changes. ``arg`` is the variant name; the study's own recipe is ``gread50_lr1e3_3k``.

Each variant trains one model and reports teacher-forced accuracy per question type, which is how
the study recipe was chosen (``benchmarks/digits_recipe_probe.md``). Variants:
``base*`` (no "read the grid" examples: the four question types only), ``gread<P>*`` (``P`` % of
the train examples read the grid: ``read_fraction``), ``_lr<x>`` (peak learning rate), ``_3k``
(3000 steps instead of 1500), ``mrope`` (M-RoPE 2D positions for the image tokens in the LLM).

COMMAND (GPU machine; all variants at once, one process each, about 6 minutes on an H200):
    bash experiments/gpu_digits_recipe_probe.sh
    VARIANTS="base gread50_lr1e3_3k" bash experiments/gpu_digits_recipe_probe.sh
One variant anywhere:
    python -m experiments.train --config configs/digits_recipe_probe.py:gread50_lr1e3 \\
        --workdir runs/probe/gread50_lr1e3
"""

import os

import ml_collections

from efficient_mllm.train.config import load_config

# name -> (read_fraction, peak learning rate, steps, M-RoPE)
VARIANTS = {
    "base": (0.0, 2e-3, 1500, False),
    "base_lr1e3": (0.0, 1e-3, 1500, False),
    "base_lr5e4": (0.0, 5e-4, 1500, False),
    "mrope": (0.0, 2e-3, 1500, True),
    "gread25_lr1e3": (0.25, 1e-3, 1500, False),
    "gread50_lr5e4": (0.5, 5e-4, 1500, False),
    "gread50_lr1e3": (0.5, 1e-3, 1500, False),
    "gread50_lr2e3": (0.5, 2e-3, 1500, False),
    "gread50_lr1e3_3k": (0.5, 1e-3, 3000, False),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/digits_recipe_probe.py: variant {arg!r}; expected one of "
                         f"{sorted(VARIANTS)}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compression_sweep.py")
    c = load_config(path, "train,study,digit_grid")
    read, lr, steps, mrope = VARIANTS[arg]
    c.unlock()
    c.name = f"digits_probe_{arg}"
    c.data.knobs.read_fraction = read
    c.train.update(lr=lr, steps=steps)
    if mrope:  # head_dim 32 -> 16 frequency pairs: 4 temporal, 6 row, 6 column
        c.model.language.rope_type = "mrope"
        c.model.language.mrope_sections = (4, 6, 6)
    c.lock()
    return c
