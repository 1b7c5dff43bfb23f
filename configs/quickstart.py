"""Quickstart: a tiny MLLM (ViT + MLP projector + decoder) on ``shapes_vqa``, on CPU.

COMMAND (what ``make demo`` runs, data + train + eval + report):
    python -m experiments.demo
or step by step:
    python -m experiments.train --config configs/quickstart.py --workdir runs/quickstart
    python -m experiments.evaluate --config configs/quickstart.py --checkpoint runs/quickstart

EXPECTED: see the numbers filled in below by the measured run (EXPECTED_* constants).
"""

import ml_collections

from efficient_mllm.train.config import base_config, dataset_knobs


def get_config(arg=None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "quickstart"
    c.seed = 0
    c.data.name = "shapes_vqa"
    c.data.knobs = dataset_knobs(
        "shapes_vqa",
        image_size=32, min_objects=1, max_objects=2, min_object_size=0.3,
        max_object_size=0.45, num_train=30000, num_validation=500, num_test=0, seed=0,
    )
    c.model = ml_collections.ConfigDict(
        dict(
            language=dict(vocab_size=0, width=96, depth=2, heads=4, mlp_dim=192),
            vision=dict(image_size=0, patch_size=4, width=64, depth=1, heads=4, mlp_dim=128,
                        use_cls=False),
            projector="mlp2x_gelu",
            pixel_shuffle=2,
            image_token_id=-1,
            compressor=ml_collections.FieldReference(None, field_type=str),
        )
    )
    c.train.steps = 2000
    c.train.batch_size = 128
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.min_lr_ratio = 0.05
    c.train.weight_decay = 0.01
    c.train.log_every = 25
    c.eval.batch_size = 100
    c.eval.every = 500
    c.eval.max_batches = 2
    c.checkpoint.every = 500
    c.lock()
    return c
