"""shapes_vqa at a GPU-sized setting: 64x64 images with up to 6 objects, a 4-layer ViT and a
6-layer 384-wide decoder, bf16 compute with fp32 parameters.

COMMAND:
    python -m experiments.train --config configs/shapes_vqa_base.py --workdir runs/shapes_vqa_base
    # several GPUs / a TPU slice: FSDP over the devices, 2-way tensor parallelism
    python -m experiments.train --config configs/shapes_vqa_base.py \
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=2

EXPECTED (measured, one NVIDIA H100, jax 0.11.2): a 400-step smoke run (20k training examples,
``--config.train.steps=400 --config.train.warmup_steps=50``) reached 51.6% exact match on 500
validation questions (shape 22%, exist 76%) at 0.046 s/step = 5.5k examples/s = 63k text
tokens/s; 2.63 TFLOP per step (jaxpr count), i.e. about 6% MFU (the input pipeline bounds it).
The full 6000-step run has not been made yet, so its final accuracy is not known.
"""

import ml_collections

from efficient_mllm.train.config import base_config, dataset_knobs


def get_config(arg=None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "shapes_vqa_base"
    c.data.name = "shapes_vqa"
    c.data.knobs = dataset_knobs(
        "shapes_vqa",
        image_size=64, min_objects=1, max_objects=6, min_object_size=0.14,
        max_object_size=0.24, num_train=100_000, num_validation=2000, num_test=2000, seed=0,
    )
    c.data.worker_count = 4
    c.model = ml_collections.ConfigDict(
        dict(
            language=dict(vocab_size=0, width=384, depth=6, heads=6, mlp_dim=1024),
            vision=dict(image_size=0, patch_size=4, width=256, depth=4, heads=4, mlp_dim=768,
                        use_cls=False),
            projector="mlp2x_gelu",
            pixel_shuffle=2,
            image_token_id=-1,
            compressor=ml_collections.FieldReference(None, field_type=str),
        )
    )
    c.train.steps = 6000
    c.train.batch_size = 256
    c.train.lr = 1e-3
    c.train.warmup_steps = 300
    c.train.min_lr_ratio = 0.05
    c.train.weight_decay = 0.05
    c.train.compute_dtype = "bfloat16"
    c.train.param_dtype = "float32"
    c.train.log_every = 50
    c.eval.batch_size = 500
    c.eval.every = 1000
    c.eval.max_batches = 2
    c.checkpoint.every = 1000
    c.lock()
    return c
