"""Visual-token compression sweep: methods x budgets on a trained 256-visual-token MLLM.

The model keeps 256 visual tokens per image (a 16 x 16 patch grid, no pixel shuffle), so the
LLaVA-1.5 protocol (576 tokens -> 288 / 192 / 128 / 64 / 32) applies in proportion: budgets
1, 1/2, 1/3, 2/9, 1/9, 1/18 of the visual tokens -> 256, 128, 85, 57, 28, 14. ``shapes_vqa``
uses 32 x 32 images with 2 x 2 patches, ``digit_grid_vqa`` 48 x 48 images with 3 x 3 patches;
the ViT has a [CLS] token (the [CLS]-attention methods need it, as CLIP provides it in LLaVA).

COMMAND:
    # 1. train the uncompressed baseline (the same config file, mode "train")
    python -m experiments.train --config configs/compression_sweep.py:train \
        --workdir runs/sweep_shapes_base
    # 2. sweep every method x budget on it (training-free methods reuse its parameters)
    python -m experiments.compression_sweep --config configs/compression_sweep.py \
        --checkpoint runs/sweep_shapes_base --workdir runs/compression_sweep_shapes
    # the same on digit_grid_vqa
    python -m experiments.train --config configs/compression_sweep.py:train,digit_grid \
        --workdir runs/sweep_digits_base
    python -m experiments.compression_sweep --config configs/compression_sweep.py:digit_grid \
        --checkpoint runs/sweep_digits_base --workdir runs/compression_sweep_digits
    # a reduced sweep (3 budgets, 200 examples; what fits on a 2-core CPU)
    python -m experiments.compression_sweep --config configs/compression_sweep.py:quick \
        --checkpoint runs/sweep_shapes_base --workdir runs/compression_sweep_quick

    # the whole study in one command per dataset (GPU): trains the baseline and the learned
    # models with one recipe, sweeps everything, writes benchmarks/compression_sweep_<ds>.*
    python -m experiments.compression_study --config configs/compression_sweep.py:study \
        --workdir runs/study_shapes --benchmark_out benchmarks/compression_sweep_shapes
    python -m experiments.compression_study --config configs/compression_sweep.py:study,digit_grid \
        --workdir runs/study_digits --benchmark_out benchmarks/compression_sweep_digits
    bash experiments/gpu_compression_study.sh shapes   # the same on the GPU machine (+ wheels)

Arguments (comma-separated): ``train`` (the training config; it omits the ``sweep`` block),
``digit_grid`` (dataset ``digit_grid_vqa`` instead of ``shapes_vqa``), ``quick`` (reduced sweep:
budgets 1, 1/2, 2/9, 1/18, 200 examples, no learned methods), ``study`` (the GPU study of
``experiments/compression_study.py``: an 8-layer, 128-wide decoder and a 64-wide ViT, 1500 steps
of batch 64, in-LLM methods dropping after layer 2 of 8 (FastV's K = 2; SparseVLM keeps
``keep`` at layer 2 and half of those at layer 5), learned methods ``attn_pool`` (one model per
pooling window, the avgpool windows), ``mqt`` (one model, max 128 queries, evaluated at every
budget), ``pmod`` (one model per budget, ``ratio`` = the budget fraction, ``min_ratio`` 0.02);
the ``study`` block sets processes and the time limit), ``smoke`` (the study at toy scale:
random, fastv and mqt at budgets 1/2 and 1/4 on 64 tokens, 3 train steps; a CPU check).

Method templates: ``"label: spec"`` (label optional, default the registry name). The spec is a
``registry.COMPRESSORS`` string with ``str.format`` fields filled per budget from the fraction
``f`` of the ``N`` visual tokens: ``{keep}`` = ``max(1, round(f N))``, ``{frac}`` = ``f``,
``{dominant}`` / ``{contextual}`` (VisionZip's 54 : 10 split of ``keep``), ``{kernel}``
(the smallest average-pooling window leaving at most ``keep`` tokens), ``{side}`` (the largest
square ``side x side <= keep``: Fourier-VLM's low-frequency block). Budget 1 is the
uncompressed model (one row). In-LLM methods keep ``{keep}`` image tokens after their drop
layer, so their layer-averaged count is higher than ``keep``; the table reports both.

Learned compressors (``sweep.learned``) have parameters the baseline does not; each needs a
checkpoint trained with it (``sweep.learned_checkpoints``, same order; train one with
``--config.model.compressor='mqt(max_queries=64)'``), else its row says it was skipped.

EXPECTED (default mode, measured on the 2-core CPU development machine, jax 0.10.2; its full
table and Pareto plots were committed as ``benchmarks/compression_sweep_shapes.md`` in fd8f284,
which the GPU ``study`` results replace): the ``train`` run (1200 steps
of batch 32, 37 min) reaches 66.5% exact match on 200 validation questions (colour 79%, shape
27%, count 88%, exist 81%, relative position 71%, left-of 36%). The sweep (default methods and
budgets, ``--config.sweep.eval_examples=200``, 24 min) keeps 91-104% of that at 1/2 to 2/9 of
the visual tokens for every pre-LLM method; at 1/18 (14 tokens) DivPrune 94.7%, FlashVLM
98.5%, DyMU 91%, VisionZip 90%, random / uniform 89.5%, FasterVLM 88%, PruMerge+ 83.5%. Prefill
FLOPs fall from 0.134 to 0.053 GFLOPs per example (the ViT, 0.045, is not compressed). With
3 decoder layers and the drop after layer 1, in-LLM methods cannot go below (256 + 2 keep) / 3
layer-averaged tokens: FastV keeps 86-88% at every budget, SparseVLM 96-100%, ZipVL 94-101%.
The standard error of each accuracy is about 3.3 points (200 questions).

``digit_grid``: half the train examples are grounded "read the grid" answers (the dataset's
``read_fraction`` knob; validation unchanged) in every mode, and the ``study`` trains 3000 steps at
lr 1e-3: on the four question types alone the models stay at the language prior (~33%), see
``benchmarks/digits_recipe_probe.md``.

EXPECTED (``study``, measured on one NVIDIA H200, jax 0.11.2, ``bash
experiments/gpu_compression_study.sh shapes`` / ``digits``): shapes' 11 models of 1500 steps train
all at once in 310-390 s; the 94 distinct shapes rows then take about 10 more minutes in 12
processes (two ~9-minute calls on one warm machine: the second resumes). digits' 11 models of
3000 steps take ~14 minutes and its 94 rows ~15 more (four calls back to back). Baselines:
shapes_vqa 66.4% exact match (500 questions, s.e. 2.1 pts; 68.4% in an earlier training run),
digit_grid_vqa 58.2% (digit_at 97.4%, compare 79.0%; count and where_is at the prior).
Tables: ``benchmarks/compression_sweep_{shapes,digits}.md``.
"""

import ml_collections

from efficient_mllm.train.config import base_config, dataset_knobs

BUDGETS = (1.0, 1 / 2, 1 / 3, 2 / 9, 1 / 9, 1 / 18)

# Training-free methods (pre-LLM, then in-LLM), one spec template each.
METHODS = (
    "random: random(keep={keep})",
    "uniform: uniform(keep={keep})",
    "avgpool: avgpool(kernel={kernel})",
    "fastervlm: fastervlm(keep={keep})",
    "vtc_cls: vtc_cls(keep={keep}, layers=(-1, -2))",
    "visionzip: visionzip(dominant={dominant}, contextual={contextual})",
    "divprune: divprune(keep={keep})",
    "todre: todre(keep={keep})",
    "fourier_vlm: fourier_vlm(keep_side={side})",
    "tome: tome(keep={keep})",
    "prumerge_plus: prumerge_plus(keep={keep})",
    "dymu: dymu(threshold=0.9, capacity={keep})",
    "flashvlm: flashvlm(keep={keep})",
    "fastv: fastv(layer=1, keep={keep})",
    "sparsevlm: sparsevlm(layers=(1,), keep=({keep},))",
    "zipvl: zipvl(layer=1, tau=0.9, capacity={keep})",
)
QUICK_BUDGETS = (1.0, 1 / 2, 2 / 9, 1 / 18)

# Learned methods: each needs its own trained checkpoint.
LEARNED = (
    "attn_pool: attn_pool(pool=2)",
    "mqt: mqt(max_queries=64, budget={keep})",
    "pmod: pmod(ratio=0.5)",
)


# The study (experiments/compression_study.py, GPU): an 8-layer decoder so that dropping after
# layer 2 (FastV's K = 2) leaves 6 of 8 layers compressed; every learned model trains with the
# baseline's recipe. attn_pool: one model per pooling window (the avgpool windows),
# mqt: one model for every budget (random budget in training), pmod: one model per ratio.
STUDY_METHODS = tuple(
    m.replace("fastv(layer=1,", "fastv(layer=2,")
    .replace("sparsevlm(layers=(1,), keep=({keep},))",
             "sparsevlm(layers=(2, 5), keep=({keep}, 0.5))")
    .replace("zipvl(layer=1,", "zipvl(layer=2,")
    for m in METHODS
)
STUDY_LEARNED = (
    "attn_pool: attn_pool(pool={kernel})",
    "mqt: mqt(max_queries=128, budget={keep})",
    "pmod: pmod(ratio={frac:.4f}, min_ratio=0.02)",
)
STUDY_LEARNED_TRAIN = ("", "mqt(max_queries=128)", "")
# smoke: 3 methods (one learned, one in-LLM), 2 budgets, a tiny model and a few steps (CPU test)
SMOKE_METHODS = ("random: random(keep={keep})", "fastv: fastv(layer=2, keep={keep})")
SMOKE_LEARNED = ("mqt: mqt(max_queries=32, budget={keep})",)
SMOKE_LEARNED_TRAIN = ("mqt(max_queries=32)",)


def _options(arg):
    opts = [a.strip() for a in (arg or "").split(",") if a.strip()]
    known = ("train", "digit_grid", "quick", "study", "smoke")
    bad = [o for o in opts if o not in known]
    if bad:
        raise ValueError(
            f"configs/compression_sweep.py: unknown argument(s) {bad}; expected {known}"
        )
    opts = set(opts)
    if "smoke" in opts:
        opts.add("study")
    if "quick" in opts and "study" in opts:
        raise ValueError("configs/compression_sweep.py: 'quick' and 'study'/'smoke' exclude "
                         "each other")
    return opts


def get_config(arg=None) -> ml_collections.ConfigDict:
    opts = _options(arg)
    digits = "digit_grid" in opts
    c = base_config()
    c.seed = 0
    if digits:
        c.name = "sweep_digits"
        c.data.name = "digit_grid_vqa"
        # half the train examples are grounded "read the grid" answers (see the docstring)
        c.data.knobs = dataset_knobs(
            "digit_grid_vqa", image_size=48, rows=3, cols=3, fill=0.75, num_train=20000,
            num_validation=500, num_test=0, seed=0, read_fraction=0.5,
        )
        patch = 3
    else:
        c.name = "sweep_shapes"
        c.data.name = "shapes_vqa"
        c.data.knobs = dataset_knobs(
            "shapes_vqa", image_size=32, min_objects=1, max_objects=2, min_object_size=0.3,
            max_object_size=0.45, num_train=30000, num_validation=500, num_test=0, seed=0,
        )
        patch = 2
    c.model = ml_collections.ConfigDict(
        dict(
            language=dict(vocab_size=0, width=64, depth=3, heads=4, kv_heads=2, mlp_dim=128),
            vision=dict(image_size=0, patch_size=patch, width=48, depth=2, heads=4, mlp_dim=96,
                        use_cls=True),
            projector="mlp2x_gelu",
            pixel_shuffle=1,
            image_token_id=-1,
            compressor=ml_collections.FieldReference(None, field_type=str),
        )
    )
    c.train.steps = 1200
    c.train.batch_size = 32
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.min_lr_ratio = 0.05
    c.train.weight_decay = 0.01
    c.train.log_every = 25
    c.eval.batch_size = 50
    c.eval.every = 500
    c.eval.max_batches = 2
    c.eval.final_max_batches = 4
    c.checkpoint.every = 200
    study, smoke = "study" in opts, "smoke" in opts
    if study:
        c.name = c.name.replace("sweep_", "study_") + ("_smoke" if smoke else "")
        c.model.language.update(width=128, depth=8, heads=4, kv_heads=2, mlp_dim=256)
        c.model.vision.update(width=64, depth=2, heads=4, mlp_dim=128)
        c.train.steps = 1500
        c.train.batch_size = 64
        c.eval.every = 0
        c.eval.batch_size = 250
        c.eval.final = ("teacher_forced",)  # the sweep measures exact match
        c.eval.final_max_batches = 2
        c.checkpoint.every = 500
        if digits:  # the recipe that leaves the language-prior plateau (see the docstring)
            c.train.update(steps=3000, lr=1e-3)
            c.checkpoint.every = 250
        c.output.tensorboard = False
        c.output.progress = False
    if smoke:
        c.data.knobs.update(num_train=64, num_validation=16)
        if not digits:
            c.data.knobs.update(image_size=16, max_objects=1, min_object_size=0.5,
                                max_object_size=0.6)
        else:
            c.data.knobs.update(image_size=24)
        c.model.language.update(width=32, depth=3, heads=2, kv_heads=1, mlp_dim=48)
        c.model.vision.update(width=16, depth=1, heads=2, mlp_dim=32)
        c.train.update(steps=3, batch_size=8, warmup_steps=0, log_every=1)
        c.eval.batch_size = 8
        c.eval.final = ()  # no final evaluation in training (the sweep measures)
        c.checkpoint.every = 0
    if "train" not in opts and study:
        c.sweep = ml_collections.ConfigDict(
            dict(
                budgets=(1.0, 1 / 2, 1 / 4) if smoke else BUDGETS,
                methods=SMOKE_METHODS if smoke else STUDY_METHODS,
                only="",
                learned=SMOKE_LEARNED if smoke else STUDY_LEARNED,
                learned_train=SMOKE_LEARNED_TRAIN if smoke else STUDY_LEARNED_TRAIN,
                learned_checkpoints=(),  # the study trains them under <workdir>/models/
                eval_examples=16 if smoke else 500,
                max_new_tokens=0,
                latency_batch=1,
                latency_warmup=1 if smoke else 2,
                latency_repeats=2 if smoke else 20,
                kv_capacity="fitted",
                benchmark_out="",
            )
        )
        c.study = ml_collections.ConfigDict(
            dict(
                # concurrent processes sharing the device (compilation is host-bound); 0 or 1:
                # everything in this process, one after the other
                train_parallel=0 if smoke else 11,  # all 11 models at once (16-core host)
                sweep_workers=0 if smoke else 12,
                deadline_s=0.0,  # soft wall-clock limit of one invocation (0 = none)
                sweep_reserve_s=150.0,  # no training is started later than this before it
                # sweep workers take no new job after this before it (> the slowest row, ~70 s)
                finalize_reserve_s=25.0 if smoke else 100.0,
            )
        )
    elif "train" not in opts:
        quick = "quick" in opts
        c.name += "_quick" if quick else ""
        c.sweep = ml_collections.ConfigDict(
            dict(
                budgets=QUICK_BUDGETS if quick else BUDGETS,
                methods=METHODS,
                only="",  # comma-separated labels to keep (e.g. "random,fastv"); "" = all
                learned=() if quick else LEARNED,
                learned_checkpoints=() if quick else ("",) * len(LEARNED),
                eval_examples=200 if quick else 500,
                max_new_tokens=0,  # 0: the longest reference answer
                latency_batch=1,
                latency_warmup=2,
                latency_repeats=20,
                kv_capacity="fitted",  # latency cache: "fitted" per layer, or "uniform"
                benchmark_out="",  # also write <path>.md / <path>.json (e.g. benchmarks/...)
            )
        )
    c.lock()
    return c
