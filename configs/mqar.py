"""Multi-query associative recall (Zoology), language only: a decoder with the attention
variant named by the config argument (any ``registry.ATTENTION`` spec).

COMMAND:
    python -m experiments.train --config configs/mqar.py --workdir runs/mqar_softmax
    python -m experiments.train --config "configs/mqar.py:softmax(impl='xla')" --workdir runs/mqar_xla

The evaluators are teacher-forced (``token_accuracy`` is the fraction of recalled values,
``tf_accuracy`` the fraction of rows with every value right) and perplexity; MQAR targets are
interleaved with the queries, so exact match of a generated suffix does not apply.

EXPECTED (measured on the shared 2-core development machine, attention ``softmax``): a
600-step run (``--config.train.steps=600``) recalled 18.9% of the values (``token_accuracy``;
chance is under 2%), no row entirely right yet, perplexity 8.7, at 0.33 s/step (9.3 GFLOP/step,
12.5k tokens/s). Associative recall is learned late (induction-style heads form after a
plateau); the full 2000-step run has not been measured.
"""

import ml_collections

from efficient_mllm.train.config import base_config, dataset_knobs


def get_config(arg=None) -> ml_collections.ConfigDict:
    attention = arg or "softmax"
    c = base_config()
    c.name = "mqar"
    c.data.name = "mqar"
    c.data.knobs = dataset_knobs(
        "mqar",
        vocab_size=128, seq_len=64, num_kv_pairs=8, num_train=20000, num_validation=500,
        num_test=0, seed=0,
    )
    c.model = ml_collections.ConfigDict(
        dict(
            language=dict(vocab_size=0, width=128, depth=2, heads=4, mlp_dim=256,
                          attention=attention, layer_attention=()),
            vision=ml_collections.FieldReference(None, field_type=dict),
            image_token_id=ml_collections.FieldReference(None, field_type=int),
        )
    )
    c.train.steps = 2000
    c.train.batch_size = 64
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.min_lr_ratio = 0.05
    c.train.log_every = 25
    c.eval.batch_size = 100
    c.eval.every = 500
    c.eval.max_batches = 2
    c.eval.during = ("teacher_forced",)
    c.eval.final = ("teacher_forced", "perplexity")
    c.checkpoint.every = 500
    c.lock()
    return c
