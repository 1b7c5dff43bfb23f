"""The Zoology / BASED recall-vs-state-size study on MQAR, at small scale, in one GPU call.

    python -m experiments.mqar_study --out benchmarks/mqar_study            # ~8 min on one GPU
    python -m experiments.mqar_study --preset smoke --out /tmp/mqar_smoke   # CPU check, seconds

Protocol (Arora et al. 2023, "Zoology", arXiv:2312.04927; Arora et al. 2024, "Simple linear
attention language models balance the recall-throughput tradeoff" (BASED), arXiv:2402.18668):
2-layer decoders (:class:`~efficient_mllm.nn.language.LanguageModel`: RoPE, SwiGLU MLP) whose
token mixer is one attention variant per layer (``LanguageConfig.attention`` /
``layer_attention`` registry specs) learn multi-query associative recall and are scored on
held-out rows by the fraction of query values recalled (teacher-forced argmax at the answer
positions). As in Zoology, one model per (variant, model dim) is trained on a mixture of every
sequence length and every ``num_kv_pairs`` value that fits it, and scored on each (seq len,
pairs) cell separately; each score is placed at the recurrent state size of that model at that
length (``Attention.state_floats(seq_len)`` summed over the layers: the KV cache for softmax,
the window's for sliding window, ``heads * F * (dv + 1)`` for linear maps): the
recall-memory frontier of Zoology Fig. 2 / BASED Fig. 1.

Recipe choices, each measured on the CPU at d=64, T <= 128 (details in the issue #7 report):

* Answers are labels only (:func:`hide_answers`), as in Zoology. ``generate_example`` writes
  each answer after its query; under teacher forcing the last query of a row is then answered
  by elimination, with no key-value binding at all.
* Every variant gets the same input stage: the token embedding, a learned causal depthwise
  convolution of width ``short_conv`` (the short convolutions of BASED / H3's shift) and
  Zoology's learned absolute positions. Without the convolution a 2-layer model must first
  discover a previous-token head and then an induction head; at this budget it does not (a
  softmax model stayed at chance, 1/pairs, for 3000 steps at lr 5e-4 and 1e-3). With it, the
  value's position carries its key, and what is left is the mixer's key->value lookup: the
  memory the study is about (softmax: 8 pairs at T=64 recalled 100% after 500 steps).
* Two learning rates, 1e-3 and 3e-3 (AdamW, warm-up + cosine), the best kept per cell: with
  the convolution softmax learned at both, elu+1 linear attention only at 3e-3 within 1000
  steps (7% vs 91% of 16 pairs at T=64). Without it, the higher rates never left the
  bag-of-values plateau.
* vocab 1024 (the papers: 8192): with few distinct keys (vocab 136: 67 keys) a linear map can
  give every key its own direction, and elu+1 linear attention at d=64 recalled 99% of 32
  pairs; with 511 keys it recalled 99 / 97 / 90 / 77% of 4 / 8 / 16 / 32 pairs while softmax
  stayed at 100%, the papers' gap. No query-section noise (``random_non_queries=False``, as in
  the BASED sweeps), fresh rows every step.

How it fits in one call. Every training step takes, per sequence length, ``batch_tokens //
seq_len`` fresh rows split evenly over the pairs values, sampled on the device
(:func:`sample_batch`, the distribution of ``efficient_mllm.data.mqar.generate_example``); the
validation and test rows come from ``generate_example`` itself. The learning rates of a group
train together (``jax.vmap`` over stacked model and optimizer states fed the same batches),
``chunk`` steps run in a ``lax.scan`` inside one compiled program (one host sync per chunk),
programs are lowered in a background thread and compiled in a thread pool while earlier groups
run. With ``budget_s`` (default 480 s) the step count is measured, not guessed: each group
first runs and times its first chunk, then every group trains for the largest step count (at
most ``steps``) that the remaining budget allows, the lowest-priority groups (the last
``dims``) being dropped if that is under ``min_steps``. The best lr of each (variant, dim,
cell) on the validation rows gives the reported test accuracy; all are in the JSON, with the
loss curves.

Outputs (``--out PREFIX``): ``PREFIX.json`` (device, versions, config, schedule, one record per
(variant, dim, seq len, pairs)), ``PREFIX.md`` (table) and ``PREFIX.png`` (accuracy vs state,
rows = seq lens, columns = pairs); rewritten after every group, so a killed call keeps what is
done.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import logging
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.data.mqar import FILLER_ID, MQARConfig, generate_example
from efficient_mllm.nn.language import LanguageConfig, LanguageModel

log = logging.getLogger("mqar_study")

__all__ = [
    "VARIANTS",
    "PRESETS",
    "StudyConfig",
    "sample_batch",
    "eval_arrays",
    "hide_answers",
    "eval_sets",
    "language_config",
    "state_floats",
    "with_impl",
    "input_stage",
    "mixture_rows",
    "lr_factor",
    "plan_groups",
    "choose_chunks",
    "run_study",
    "main",
]

# label -> one spec per layer (a 1-tuple applies to every layer); StudyConfig.impl is added to
# every spec (default "xla": the reference forms, robust under vmap at these small sizes).
VARIANTS: dict[str, tuple[str, ...]] = {
    "softmax": ("softmax",),
    "sliding_window": ("sliding_window(window=64)",),
    "linear": ("linear(feature_map='elu_plus_one')",),
    "lightning": ("lightning",),
    "retnet": ("retnet",),
    "based": ("based(feature_dim=16)",),
    "hedgehog": ("hedgehog(feature_dim=32)",),
    "performer": ("performer(feature_dim=64)",),
    "ssd": ("ssd",),
    "linear_swa": ("linear_swa(feature_map='taylor2', feature_dim=16, window=32)",),
    "based+window": ("based(feature_dim=16)", "sliding_window(window=32)"),
    "linear+softmax": ("linear(feature_map='elu_plus_one')", "softmax"),
}


def with_impl(spec: str, impl: str | None) -> str:
    """``spec`` with ``impl=...`` set (unchanged when ``impl`` is None or already given)."""
    name, kwargs = registry.parse_spec(spec)
    if impl is None or "impl" in kwargs:
        return spec
    args = ", ".join(f"{k}={v!r}" for k, v in {**kwargs, "impl": impl}.items())
    return f"{name}({args})"


def _check_ints(obj: Any, names: Sequence[str], low: int = 1) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"StudyConfig.{name}={v!r}: expected an int >= {low}")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The grid and the recipe: one model per (variant, dim) and lr, trained on every
    (seq len, pairs) with ``4 * pairs <= seq_len`` and scored on each. ``dims`` are in priority
    order (a tight budget drops the last)."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    dims: tuple[int, ...] = (128, 64, 256)
    seq_lens: tuple[int, ...] = (64, 128, 256, 512)
    pairs: tuple[int, ...] = (4, 8, 16, 32, 64)
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    vocab_size: int = 1024
    depth: int = 2
    head_dim: int = 64  # heads = max(1, dim // head_dim)
    mlp_ratio: int = 2
    position_embedding: bool = True  # learned absolute positions added to the token embeddings
    rope_theta: float = 10000.0
    short_conv: int = 3  # > 1: a learned causal depthwise conv of this width on the embeddings
    dtype: str = "float32"
    impl: str | None = "xla"  # added to every attention spec; None keeps the specs' own
    steps: int = 6000  # the step count, or its cap when budget_s > 0
    min_steps: int = 1000  # budget_s > 0: drop the lowest-priority groups rather than go below
    chunk: int = 100  # steps per compiled call (one host sync each)
    batch_tokens: int = 4096  # per sequence length and step: batch_tokens // seq_len rows
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    clip_norm: float = 1.0
    power_a: float = 0.01
    random_non_queries: bool = False
    answers_in_input: bool = False  # True: the repo generator's layout (see hide_answers)
    num_eval: int = 1000  # validation and test rows per (seq len, pairs)
    eval_batch: int = 250
    seed: int = 0
    compile_workers: int = 8
    budget_s: float = 0.0  # > 0: wall-clock budget of the whole study; sets the step count
    reserve_s: float = 15.0  # of the budget, kept for writing the outputs

    def __post_init__(self):
        _check_ints(self, ("vocab_size", "depth", "head_dim", "mlp_ratio", "steps", "min_steps",
                           "chunk", "batch_tokens", "num_eval", "eval_batch"))
        _check_ints(self, ("warmup_steps", "seed", "compile_workers"), low=0)
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"StudyConfig.warmup_steps={self.warmup_steps}: expected < steps ({self.steps})"
            )
        if self.budget_s > 0 and self.chunk > self.warmup_steps:
            raise ValueError(
                f"StudyConfig.chunk={self.chunk}: with budget_s > 0 the first chunk (run before "
                f"the step count is known) must lie in the warm-up; expected <= warmup_steps="
                f"{self.warmup_steps}"
            )
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(
                f"StudyConfig.variants={self.variants!r}: expected labels from {sorted(VARIANTS)}"
            )
        for v in self.variants:
            if len(VARIANTS[v]) not in (1, self.depth):
                raise ValueError(
                    f"variant {v!r} has {len(VARIANTS[v])} layer specs: expected 1 or "
                    f"depth={self.depth}"
                )
        for name in ("dims", "seq_lens", "pairs"):
            v = getattr(self, name)
            if (not v or len(set(v)) != len(v)
                    or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v)):
                raise ValueError(f"StudyConfig.{name}={v!r}: expected distinct positive ints")
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"StudyConfig.lrs={self.lrs!r}: expected positive floats")
        if max(self.pairs) > (self.vocab_size - 2) // 2:  # distinct keys (and values) per row
            raise ValueError(
                f"StudyConfig.vocab_size={self.vocab_size}: too small for {max(self.pairs)} "
                f"pairs; expected >= {2 * max(self.pairs) + 2}"
            )
        for t in self.seq_lens:
            if not self.pairs_for(t):
                raise ValueError(
                    f"StudyConfig.seq_lens: {t} fits no pairs value of {self.pairs} (needs "
                    "4 * pairs <= seq_len)"
                )
            mixture_rows(self.rows_for(t), len(self.pairs_for(t)))

    def pairs_for(self, seq_len: int) -> tuple[int, ...]:
        """The ``pairs`` values whose keys, values, queries and answers fit in ``seq_len``."""
        return tuple(p for p in self.pairs if 4 * p <= seq_len)

    def rows_for(self, seq_len: int) -> int:
        """Training rows of length ``seq_len`` per step."""
        return max(1, self.batch_tokens // seq_len)

    def layer_specs(self, variant: str) -> tuple[str, ...]:
        """One spec per layer, with ``impl``."""
        specs = VARIANTS[variant]
        specs = specs * self.depth if len(specs) == 1 else specs
        return tuple(with_impl(s, self.impl) for s in specs)


PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(budget_s=480.0),
    "smoke": dict(
        variants=("softmax",), dims=(16,), seq_lens=(16, 24), pairs=(2, 4), lrs=(3e-3, 1e-2),
        vocab_size=32, head_dim=8, steps=60, min_steps=20, chunk=20, batch_tokens=384,
        warmup_steps=20, num_eval=24, eval_batch=12, compile_workers=0,
    ),
}


def mixture_rows(batch: int, n_values: int) -> list[int]:
    """Rows of a training batch per pairs value: ``batch`` split as evenly as possible."""
    if batch < n_values:
        raise ValueError(f"batch={batch} rows: expected >= the {n_values} pairs values it mixes")
    return [batch // n_values + (i < batch % n_values) for i in range(n_values)]


# -- data ----------------------------------------------------------------------------------------


def sample_batch(key: jax.Array, batch: int, seq_len: int, num_pairs: int, vocab_size: int, *,
                 power_a: float = 0.01, random_non_queries: bool = True):
    """``batch`` MQAR rows drawn on the device, distributed as ``generate_example`` (every key
    queried): ``tokens`` int32 ``[B, T]`` and ``qpos`` int32 ``[B, n]``, the positions of the
    query keys (ascending); the answer to query ``j`` is ``tokens[b, qpos[b, j] + 1]``.

    Distinct keys from ``[2, 2 + K)`` and values from ``[2 + K, V)`` (``K = (V - 2) // 2``) in
    random order, the query slots drawn without replacement with weights ``(j + 1) **
    (power_a - 1)`` (Gumbel top-k, the same law as sequential weighted draws), the queried keys
    in random order."""
    cfg = MQARConfig(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_pairs,
                     power_a=power_a, num_train=0, num_validation=0, num_test=0)
    n, k_count = num_pairs, cfg.num_keys
    kk, kv, kq, kw, kf = jax.random.split(key, 5)
    keys = 2 + jnp.argsort(jax.random.uniform(kk, (batch, k_count)), axis=1)[:, :n]
    values = 2 + k_count + jnp.argsort(
        jax.random.uniform(kv, (batch, vocab_size - 2 - k_count)), axis=1)[:, :n]
    slots = (seq_len - 2 * n) // 2
    logw = (power_a - 1.0) * jnp.log(jnp.arange(1, slots + 1, dtype=jnp.float32))
    _, chosen = jax.lax.top_k(logw + jax.random.gumbel(kq, (batch, slots)), n)
    qpos = (2 * n + 2 * jnp.sort(chosen, axis=1)).astype(jnp.int32)
    which = jnp.argsort(jax.random.uniform(kw, (batch, n)), axis=1)
    if random_non_queries:
        tokens = jax.random.randint(kf, (batch, seq_len), 2, vocab_size, jnp.int32)
    else:
        tokens = jnp.full((batch, seq_len), FILLER_ID, jnp.int32)
    rows = jnp.arange(batch)[:, None]
    tokens = tokens.at[:, 0 : 2 * n : 2].set(keys).at[:, 1 : 2 * n : 2].set(values)
    tokens = tokens.at[rows, qpos].set(jnp.take_along_axis(keys, which, 1))
    tokens = tokens.at[rows, qpos + 1].set(jnp.take_along_axis(values, which, 1))
    return tokens.astype(jnp.int32), qpos


def eval_arrays(cfg: MQARConfig, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rows of ``split`` from ``generate_example``: tokens int32 ``[N, T]`` and the
    query-key positions int32 ``[N, num_queries]`` (a target at ``t`` is predicted at ``t - 1``)."""
    tokens = np.zeros((count, cfg.seq_len), np.int32)
    qpos = np.zeros((count, cfg.num_queries), np.int32)
    for i in range(count):
        ex = generate_example(cfg, split, i)
        tokens[i] = ex["tokens"]
        qpos[i] = np.flatnonzero(ex["targets"]) - 1
    return tokens, qpos


def hide_answers(tokens, qpos, weight, fill):
    """Zoology's layout: the answers are labels only. Returns ``(inputs, targets)``:
    ``targets [B, Q] = tokens[b, qpos + 1]``, ``inputs`` = ``tokens`` with those slots (where
    ``weight > 0``) set to ``fill`` (scalar or ``[B, Q]``). ``generate_example`` writes each
    answer after its query, so under teacher forcing a later query sees the earlier answers and
    the last query of a row is answerable by elimination (the value not yet named) without any
    key-value binding: a 2-layer softmax model trained that way (52% recalled) answered the last
    of 4 queries 99% right and the first 26%, chance."""
    tokens, qpos = jnp.asarray(tokens), jnp.asarray(qpos)
    targets = jnp.take_along_axis(tokens, qpos + 1, axis=1)
    slots = jnp.where(jnp.asarray(weight) > 0, qpos + 1, tokens.shape[1])  # padding: dropped
    rows = jnp.arange(tokens.shape[0])[:, None]
    fill = jnp.broadcast_to(jnp.asarray(fill, tokens.dtype), qpos.shape)
    return tokens.at[rows, slots].set(fill, mode="drop"), targets


# -- models --------------------------------------------------------------------------------------


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    """``(graphdef, params, rest)`` as pure dicts (``efficient_mllm.train.step.split_model``,
    whose package needs ml-collections, not installed on the GPU machines)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def merge_model(graphdef: nnx.GraphDef, params: Any, rest: Any) -> nnx.Module:
    return nnx.merge(graphdef, params, rest)


def input_stage(emb: jax.Array, conv: jax.Array | None, pos: jax.Array | None) -> jax.Array:
    """The input stage every variant shares: ``x_t = sum_j conv[j] * emb_{t-j} + pos[t]``, a
    causal depthwise convolution (``conv [K, D]``, taps before the sequence start read zeros)
    and learned absolute positions (``pos [T_max, D]``); either may be None (skipped)."""
    x = emb
    if conv is not None:
        taps = conv.astype(emb.dtype)
        x = sum(taps[j] * jnp.pad(emb, ((0, 0), (j, 0), (0, 0)))[:, : emb.shape[1]]
                for j in range(taps.shape[0]))
    if pos is not None:
        x = x + pos[: emb.shape[1]].astype(x.dtype)[None]
    return x


def _has_layer_attention() -> bool:
    return "layer_attention" in {f.name for f in dataclasses.fields(LanguageConfig)}


def language_config(study: StudyConfig, variant: str, dim: int) -> LanguageConfig:
    """The 2-layer decoder of ``variant`` at width ``dim`` (``heads = dim // head_dim``, at
    least 1, SwiGLU ``mlp_ratio * dim``, untied head)."""
    specs = study.layer_specs(variant)
    kw: dict[str, Any] = dict(
        vocab_size=study.vocab_size, width=dim, depth=study.depth,
        heads=max(1, dim // study.head_dim), mlp_dim=study.mlp_ratio * dim, dtype=study.dtype,
        rope_theta=study.rope_theta,
    )
    if len(set(specs)) == 1:
        kw["attention"] = specs[0]
    elif _has_layer_attention():
        kw["layer_attention"] = specs
    else:
        raise ValueError(
            f"variant {variant!r} needs LanguageConfig.layer_attention (one spec per layer)"
        )
    return LanguageConfig(**kw)


def unavailable_reason(study: StudyConfig, variant: str) -> str | None:
    """Why ``variant`` cannot be built in this checkout (an unregistered spec name or no
    ``layer_attention`` field), else None."""
    specs = study.layer_specs(variant)
    missing = sorted({registry.parse_spec(s)[0] for s in specs} - set(registry.ATTENTION.names()))
    if missing:
        return f"attention {missing} not registered"
    if len(set(specs)) > 1 and not _has_layer_attention():
        return "LanguageConfig.layer_attention is missing"
    return None


def state_floats(model: LanguageModel, seq_len: int) -> list[int] | None:
    """Recurrent-state floats per layer per sequence: ``block.attn.state_floats(seq_len)``
    where the attention module has it; a softmax layer without it counts its KV cache
    ``2 * seq_len * kv_heads * head_dim``; None if any layer has neither."""
    out = []
    for block in model.blocks:
        attn = block.attn
        if hasattr(attn, "state_floats"):
            out.append(int(attn.state_floats(seq_len)))
        elif registry.parse_spec(attn.cfg.attention)[0] == "softmax":
            out.append(2 * seq_len * attn.cfg.num_kv_heads * attn.cfg.head_dim)
        else:
            return None
    return out


# -- one group: a (variant, dim) model per lr, trained on every (seq len, pairs) -----------------


@dataclasses.dataclass
class Group:
    variant: str
    dim: int
    cells: tuple[tuple[int, int], ...]  # (seq_len, pairs) it is trained and scored on
    lcfg: LanguageConfig | None = None
    reason: str | None = None  # why it is not run
    state_floats: dict[int, list[int] | None] = dataclasses.field(default_factory=dict)
    compiled: Any = None  # future of the (init, train_chunk, evaluate) executables
    # while running: model/optimizer states [L, ...], per-chunk losses [C, L], timings
    state: Any = None
    losses: list = dataclasses.field(default_factory=list)
    chunk_s: float = 0.0
    eval_s: float = 0.0
    compile_wait_s: float = 0.0


def _optimizer(study: StudyConfig):
    """AdamW without its learning rate: ``lr * lr_factor(step, total)`` multiplies the update
    outside, so one program serves every lr and every step count (the same update as
    ``optax.adamw`` with that schedule)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(study.clip_norm),
        optax.scale_by_adam(b1=study.b1, b2=study.b2, eps=1e-8),
        optax.add_decayed_weights(study.weight_decay, mask=decay_mask),
    )


def lr_factor(step, total, warmup: int, min_ratio: float):
    """Linear warm-up to 1 over ``warmup`` steps (``(step + 1) / warmup``), then cosine decay
    to ``min_ratio`` at ``total``; ``total`` may be traced (steps < warmup do not depend on it)."""
    step = jnp.asarray(step, jnp.float32)
    warm = (step + 1.0) / max(warmup, 1)
    frac = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    cos = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup, warm, cos)


def _programs(study: StudyConfig, g: Group):
    """The pure functions of a group (``L`` lrs, ``C`` (seq len, pairs) cells):
    ``init(keys [L]) -> state``; ``train_chunk(state, lrs [L], step0, total) -> (state, mean
    loss per cell [C, L])``, each step one batch per seq len mixing its pairs values, the same
    batches for every lr, loss = mean NLL over all target tokens; ``evaluate(state, sets) ->
    hits`` with ``sets`` one ``(inputs [P, N, T], qpos [P, N, Q], targets [P, N, Q], weight
    [P, N, Q])`` per seq len and ``hits`` one ``[P, L]`` per seq len."""
    lcfg = g.lcfg
    seq_lens = study.seq_lens
    tx = _optimizer(study)
    with nnx.use_eager_sharding(False):
        graphdef = nnx.split(nnx.eval_shape(lambda: LanguageModel(lcfg, rngs=nnx.Rngs(0))))[0]
    layout = []  # per seq len: (T, pairs, rows per pairs value, first cell index)
    for t in seq_lens:
        pairs = study.pairs_for(t)
        layout.append((t, pairs, mixture_rows(study.rows_for(t), len(pairs)),
                       sum(len(x[1]) for x in layout)))

    def init(keys):
        def one(key):
            with nnx.use_eager_sharding(False):
                _, params, rest = split_model(LanguageModel(lcfg, rngs=nnx.Rngs(key)))
            params = {"lm": params}
            if study.position_embedding:
                params["pos"] = 0.02 * jax.random.normal(
                    jax.random.fold_in(key, 7), (max(seq_lens), lcfg.width))
            if study.short_conv > 1:  # tap 0 starts at 1 (identity), the others ~ N(0, 1)
                taps = jax.random.normal(jax.random.fold_in(key, 8), (study.short_conv, lcfg.width))
                params["conv"] = taps.at[0].set(1.0)
            return params, tx.init(params), rest

        return jax.vmap(one)(keys)

    def query_logits(params, rest, inputs, qpos):
        """Logits ``[B, Q, V]`` at the query keys (they predict the answers)."""
        model = merge_model(graphdef, params["lm"], rest)
        if "pos" not in params and "conv" not in params:
            return model(inputs, logits_at=qpos).logits
        x = input_stage(model.embed_tokens(inputs), params.get("conv"), params.get("pos"))
        return model(x, logits_at=qpos).logits

    def nll_rows(params, rest, inputs, qpos, targets, weight):
        logits = query_logits(params, rest, inputs, qpos)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weight, 1), jnp.sum(weight, 1)

    def loss_fn(params, rest, batches):
        total, count, cells = 0.0, 0.0, []
        for (_, _, rows, _), batch in zip(layout, batches):
            s, n = nll_rows(params, rest, *batch)
            total, count = total + s.sum(), count + n.sum()
            bounds = np.cumsum([0, *rows])
            cells += [s[a:b].sum() / n[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
        return total / count, jnp.stack(cells)

    def update(params, opt, rest, lr, batches):
        (_, cells), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batches)
        upd, opt = tx.update(grads, opt, params)
        params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), params, upd)
        return params, opt, cells

    update_all = jax.vmap(update, in_axes=(0, 0, 0, 0, None))  # over the lrs
    data_key = jax.random.key(study.seed)

    def batches_at(step):
        key = jax.random.fold_in(data_key, step)
        out = []
        for t, pairs, rows, c0 in layout:
            q_max = max(pairs)
            toks, qps, ws = [], [], []
            for i, (n, r) in enumerate(zip(pairs, rows)):
                tok, qp = sample_batch(jax.random.fold_in(key, c0 + i), r, t, n,
                                       study.vocab_size, power_a=study.power_a,
                                       random_non_queries=study.random_non_queries)
                toks.append(tok)
                qps.append(jnp.pad(qp, ((0, 0), (0, q_max - n))))
                ws.append(jnp.broadcast_to(jnp.arange(q_max) < n, (r, q_max)).astype(jnp.float32))
            tokens, qpos, weight = map(jnp.concatenate, (toks, qps, ws))
            if study.answers_in_input:
                inputs, targets = tokens, jnp.take_along_axis(tokens, qpos + 1, axis=1)
            else:
                fill = (jax.random.randint(jax.random.fold_in(key, 10_000 + t), qpos.shape, 2,
                                           study.vocab_size, jnp.int32)
                        if study.random_non_queries else FILLER_ID)
                inputs, targets = hide_answers(tokens, qpos, weight, fill)
            out.append((inputs, qpos, targets, weight))
        return out

    def train_chunk(state, lrs, step0, total):
        def body(carry, step):
            params, opt, rest = carry
            scale = lrs * lr_factor(step, total, study.warmup_steps, study.min_lr_ratio)
            params, opt, cells = update_all(params, opt, rest, scale, batches_at(step))
            return (params, opt, rest), cells

        state, losses = jax.lax.scan(body, state, step0 + jnp.arange(study.chunk))
        return state, losses.mean(axis=0).T  # [C, L]

    def hits(params, rest, inputs, qpos, targets, weight):  # one model, one eval batch
        logits = query_logits(params, rest, inputs, qpos)
        return jnp.sum((jnp.argmax(logits, -1) == targets) * weight)

    hits_lrs = jax.vmap(hits, in_axes=(0, 0, None, None, None, None))

    def evaluate(state, sets):
        params, _, rest = state
        out = []
        for arrays in sets:
            p, n = arrays[0].shape[:2]
            shape = (p * (n // study.eval_batch), study.eval_batch)
            per_batch = jax.lax.map(  # [P * batches, L]
                lambda a: hits_lrs(params, rest, *a),
                tuple(x.reshape(*shape, *x.shape[2:]) for x in arrays))
            out.append(per_batch.reshape(p, n // study.eval_batch, -1).sum(axis=1))
        return out

    return init, train_chunk, evaluate


def _eval_shapes(study: StudyConfig) -> list[tuple]:
    n = -(-study.num_eval // study.eval_batch) * study.eval_batch
    out = []
    for t in study.seq_lens:
        p = study.pairs_for(t)
        q = jax.ShapeDtypeStruct((len(p), n, max(p)), jnp.int32)
        out.append((jax.ShapeDtypeStruct((len(p), n, t), jnp.int32), q, q,
                    jax.ShapeDtypeStruct((len(p), n, max(p)), jnp.float32)))
    return out


def _compile(study: StudyConfig, g: Group, pool: futures.Executor | None):
    """Lowers the group's programs (caller's thread) and compiles them (``pool`` or here);
    returns a future of ``(init, train_chunk, evaluate)`` executables."""
    init, train_chunk, evaluate = _programs(study, g)
    n_lr = len(study.lrs)
    keys = jax.ShapeDtypeStruct((n_lr,), jax.random.key(0).dtype)
    state = jax.eval_shape(init, keys)
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
    lowered = (
        jax.jit(init).lower(keys),
        jax.jit(train_chunk, donate_argnums=0).lower(
            state, jax.ShapeDtypeStruct((n_lr,), jnp.float32), scalar(jnp.int32),
            scalar(jnp.float32)),
        jax.jit(evaluate).lower(state, _eval_shapes(study)),
    )
    done = lambda: tuple(x.compile() for x in lowered)  # noqa: E731
    if pool is None:
        f: futures.Future = futures.Future()
        f.set_result(done())
        return f
    return pool.submit(done)


# -- the study -----------------------------------------------------------------------------------


def plan_groups(study: StudyConfig) -> list[Group]:
    """Groups in priority order: dim by dim (``study.dims`` order), every variant."""
    cells = tuple((t, p) for t in study.seq_lens for p in study.pairs_for(t))
    groups = []
    for dim in study.dims:
        for variant in study.variants:
            g = Group(variant, dim, cells)
            g.reason = unavailable_reason(study, variant)
            if g.reason is None:
                try:
                    g.lcfg = language_config(study, variant, dim)
                    with nnx.use_eager_sharding(False):
                        model = nnx.eval_shape(lambda c=g.lcfg: LanguageModel(c, rngs=nnx.Rngs(0)))
                    g.state_floats = {t: state_floats(model, t) for t in study.seq_lens}
                except Exception as e:  # a variant that rejects this shape: record, go on
                    g.reason = f"{type(e).__name__}: {e}"
            groups.append(g)
    return groups


def eval_sets(study: StudyConfig) -> dict[str, list[tuple]]:
    """Per split, one ``(inputs [P, N, T], qpos [P, N, Q], targets [P, N, Q], weight [P, N, Q])``
    device tuple per seq len, from ``generate_example`` (answers hidden as in training, see
    :func:`hide_answers`); rows past ``num_eval`` (padding to a multiple of ``eval_batch``) have
    weight 0."""
    n = study.num_eval
    out: dict[str, list] = {"validation": [], "test": []}
    rng = np.random.default_rng(study.seed + 77)
    for (tok_s, q_s, _, _), t in zip(_eval_shapes(study), study.seq_lens):
        pairs = study.pairs_for(t)
        for split in out:
            toks, qpos = np.zeros(tok_s.shape, np.int32), np.zeros(q_s.shape, np.int32)
            w = np.zeros(q_s.shape, np.float32)
            for i, p in enumerate(pairs):
                cfg = MQARConfig(vocab_size=study.vocab_size, seq_len=t, num_kv_pairs=p,
                                 power_a=study.power_a,
                                 random_non_queries=study.random_non_queries, num_train=0,
                                 num_validation=n, num_test=n, seed=study.seed)
                toks[i, :n], qpos[i, :n, :p] = eval_arrays(cfg, split, n)
                w[i, :n, :p] = 1.0
            if study.answers_in_input:
                inputs = toks
                targets = np.take_along_axis(toks, qpos + 1, axis=2)
            else:
                fill = (rng.integers(2, study.vocab_size, size=qpos.shape)
                        if study.random_non_queries else FILLER_ID)
                inputs, targets = jax.vmap(hide_answers)(
                    toks, qpos, w, np.broadcast_to(fill, qpos.shape).astype(np.int32))
            out[split].append(tuple(jnp.asarray(x) for x in (inputs, qpos, targets, w)))
    return out


def environment() -> dict[str, Any]:
    import flax

    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "device_count": jax.device_count(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": flax.__version__, "optax": optax.__version__,
                     "numpy": np.__version__},
    }


def _record(study: StudyConfig, g: Group, t: int, pairs: int, **kw) -> dict:
    sf = g.state_floats.get(t)
    rec = {
        "variant": g.variant,
        "layer_specs": list(study.layer_specs(g.variant)),
        "dim": g.dim,
        "heads": max(1, g.dim // study.head_dim),
        "seq_len": t,
        "num_kv_pairs": pairs,
        "state_floats": None if sf is None else int(sum(sf)),
        "state_floats_per_layer": sf,
    }
    rec.update(kw)
    return rec


def _skip_records(study: StudyConfig, g: Group, reason: str, status: str = "skipped") -> list:
    return [_record(study, g, t, p, status=status, reason=reason) for t, p in g.cells]


def _calibrate(study: StudyConfig, g: Group, evals: dict, total: int) -> None:
    """Phase 1 of a group: initialise its models and run the first chunk (inside the warm-up,
    so independent of the final step count), timing one chunk and one evaluation."""
    init, train_chunk, evaluate = g.compiled.result()
    g.state = init(jax.random.split(jax.random.key(1000 + study.seed), len(study.lrs)))
    jax.block_until_ready(g.state)
    t0 = time.perf_counter()
    g.state, loss = train_chunk(g.state, jnp.asarray(study.lrs, jnp.float32), jnp.int32(0),
                                jnp.float32(total))
    g.losses = [np.asarray(loss)]
    g.chunk_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(evaluate(g.state, evals["validation"]))
    g.eval_s = 2 * (time.perf_counter() - t0)


def _finish(study: StudyConfig, g: Group, evals: dict, n_chunks: int, stop_at: float) -> list:
    """Phase 2: the remaining chunks, then validation and test accuracy of every (seq len,
    pairs) cell and lr; the best lr on validation gives the reported test accuracy."""
    _, train_chunk, evaluate = g.compiled.result()
    lrs, total = jnp.asarray(study.lrs, jnp.float32), jnp.float32(n_chunks * study.chunk)
    t0 = time.perf_counter()
    for c in range(1, n_chunks):
        g.state, loss = train_chunk(g.state, lrs, jnp.int32(c * study.chunk), total)
        g.losses.append(np.asarray(loss))  # one host sync per chunk
        if stop_at and time.perf_counter() > stop_at:
            g.state = None
            return _skip_records(study, g, f"budget: stopped after {(c + 1) * study.chunk} steps")
    train_s = g.chunk_s + time.perf_counter() - t0
    acc = {}
    for split, sets in evals.items():
        hits = evaluate(g.state, sets)
        acc[split] = np.concatenate(
            [np.asarray(h) / np.asarray(s[-1].sum(axis=(1, 2)))[:, None] for h, s in
             zip(hits, sets)])  # [C, L]
    losses = np.stack(g.losses)  # [chunks, C, L]
    g.state = None
    recs = []
    for i, (t, p) in enumerate(g.cells):
        best = int(np.argmax(acc["validation"][i]))
        recs.append(_record(
            study, g, t, p, status="ok",
            accuracy=float(acc["test"][i, best]),
            val_accuracy=float(acc["validation"][i, best]),
            best_lr=float(study.lrs[best]),
            lr_results=[{"lr": float(lr), "val_accuracy": float(acc["validation"][i, j]),
                         "test_accuracy": float(acc["test"][i, j]),
                         "loss_curve": [round(float(x), 4) for x in losses[:, i, j]]}
                        for j, lr in enumerate(study.lrs)],
            train_loss_first=float(losses[0, i, best]),
            train_loss_last=float(losses[-1, i, best]),
            steps=n_chunks * study.chunk,
            train_examples=n_chunks * study.chunk * sum(study.rows_for(x) for x in study.seq_lens),
            train_time_s=round(train_s, 2),
            compile_wait_s=round(g.compile_wait_s, 2),
        ))
    return recs


def choose_chunks(study: StudyConfig, groups: list[Group], elapsed: float) -> tuple[int, int]:
    """``(n_chunks, n_groups)``: without a budget ``ceil(steps / chunk)`` for all; with one,
    the most chunks (capped by ``steps``) that the remaining budget gives every group, from the
    measured chunk and evaluation times, dropping the lowest-priority groups while that is
    fewer than ``min_steps``."""
    cap = math.ceil(study.steps / study.chunk)
    if study.budget_s <= 0:
        return cap, len(groups)
    floor_chunks = math.ceil(study.min_steps / study.chunk)
    n = len(groups)
    while True:
        left = study.budget_s - study.reserve_s - elapsed - sum(g.eval_s for g in groups[:n])
        per_chunk = sum(g.chunk_s for g in groups[:n])
        chunks = 1 + max(0, int(0.95 * left / per_chunk)) if per_chunk > 0 else cap
        if chunks >= floor_chunks or n <= 1:
            return min(chunks, cap), n
        n -= 1


def run_study(study: StudyConfig, out: str | None = None) -> dict:
    """Trains and evaluates the grid and returns the result dict; with ``out``, writes
    ``out.{json,md,png}`` after every finished group.

    Phase 1, in priority order: wait for the group's programs (lowered in a background thread,
    compiled in a pool of ``compile_workers``), initialise, run and time its first chunk.
    Then the step count is fixed (:func:`choose_chunks`) and phase 2 trains every group to it
    and evaluates."""
    from experiments import mqar_study_report as report

    t_start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t_start  # noqa: E731
    groups = plan_groups(study)
    result: dict[str, Any] = {"study": "mqar", **environment(),
                              "config": dataclasses.asdict(study), "runs": [], "wall_s": 0.0}
    records: dict[int, list[dict]] = {}
    for g in groups:
        if g.reason is not None:
            log.warning("skip %s dim=%d: %s", g.variant, g.dim, g.reason)
            records[id(g)] = _skip_records(study, g, g.reason)
    todo = [g for g in groups if g.reason is None]
    pool = futures.ThreadPoolExecutor(study.compile_workers) if study.compile_workers > 0 else None
    ready = {id(g): threading.Event() for g in todo}

    def lower(g):
        try:
            g.compiled = _compile(study, g, pool)
        except Exception as e:  # noqa: BLE001 - recorded with the group
            g.compiled = futures.Future()
            g.compiled.set_exception(e)
        ready[id(g)].set()

    if pool is not None:  # one thread traces (nnx graphs stay in one thread), the pool compiles
        threading.Thread(target=lambda: [lower(g) for g in todo], daemon=True).start()

    def fail(g, e):
        log.error("group %s dim=%d failed: %s", g.variant, g.dim, e, exc_info=e)
        records[id(g)] = _skip_records(study, g, f"error: {type(e).__name__}: {str(e)[:300]}",
                                       status="error")
        g.state = None

    def emit(g):
        recs = records[id(g)]
        accs = " ".join(f"{r['seq_len']}/{r['num_kv_pairs']}:{r['accuracy']:.2f}" for r in recs
                        if r["status"] == "ok")
        print(f"[mqar] {elapsed():6.1f}s {g.variant:15s} d={g.dim:<4d} {recs[0]['status']} "
              f"{accs or recs[0]['reason']}", flush=True)
        result["runs"] = [r for gg in groups if id(gg) in records for r in records[id(gg)]]
        result["wall_s"] = round(elapsed(), 1)
        if out:
            report.write_outputs(result, out)

    evals = eval_sets(study) if todo else {}
    cap = math.ceil(study.steps / study.chunk) * study.chunk
    calibrated = []
    for g in todo:  # phase 1
        if study.budget_s > 0 and elapsed() > study.budget_s - study.reserve_s - 30:
            records[id(g)] = _skip_records(study, g, f"budget: {elapsed():.0f} s spent compiling "
                                           "and calibrating earlier groups")
            continue
        if pool is not None:
            ready[id(g)].wait()
        tw = time.perf_counter()
        try:
            if pool is None:
                lower(g)
            g.compiled.result()
            g.compile_wait_s = time.perf_counter() - tw
            _calibrate(study, g, evals, cap)
            calibrated.append(g)
            print(f"[mqar] {elapsed():6.1f}s ready {g.variant} d={g.dim}: "
                  f"{1e3 * g.chunk_s / study.chunk:.2f} ms/step, eval {g.eval_s:.1f} s "
                  f"(waited {g.compile_wait_s:.1f} s for its compilation)", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing variant must not end the study
            fail(g, e)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)

    n_chunks, n_keep = choose_chunks(study, calibrated, elapsed())
    result["schedule"] = {
        "steps": n_chunks * study.chunk, "groups_trained": n_keep,
        "groups_calibrated": len(calibrated), "calibration_end_s": round(elapsed(), 1),
        "ms_per_step": {f"{g.variant}@{g.dim}": round(1e3 * g.chunk_s / study.chunk, 3)
                        for g in calibrated},
        "rows_per_step": {t: study.rows_for(t) for t in study.seq_lens},
    }
    print(f"[mqar] {elapsed():6.1f}s training {n_keep}/{len(calibrated)} groups for "
          f"{n_chunks * study.chunk} steps", flush=True)
    for g in calibrated[n_keep:]:
        g.state = None
        records[id(g)] = _skip_records(
            study, g, f"budget: {n_chunks * study.chunk} steps for all would be < min_steps")
    stop_at = t_start + study.budget_s - study.reserve_s / 2 if study.budget_s > 0 else 0.0
    for g in calibrated[:n_keep]:  # phase 2
        try:
            records[id(g)] = _finish(study, g, evals, n_chunks, stop_at)
        except Exception as e:  # noqa: BLE001
            fail(g, e)
        emit(g)
    result["runs"] = [r for g in groups for r in records.get(id(g), [])]
    result["wall_s"] = round(elapsed(), 1)
    if out:
        report.write_outputs(result, out)
    return result


def _csv(cast):
    return lambda s: tuple(cast(x) for x in s.split(",") if x)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--out", default="benchmarks/mqar_study", help="output prefix")
    ap.add_argument("--variants", type=_csv(str), help="labels, comma-separated")
    for name in ("dims", "seq_lens", "pairs"):
        ap.add_argument(f"--{name}", type=_csv(int))
    ap.add_argument("--lrs", type=_csv(float))
    for name in ("steps", "min_steps", "chunk", "batch_tokens", "vocab_size", "num_eval",
                 "eval_batch", "warmup_steps", "compile_workers", "seed", "head_dim",
                 "mlp_ratio", "short_conv"):
        ap.add_argument(f"--{name}", type=int)
    for name in ("weight_decay", "power_a", "min_lr_ratio", "reserve_s", "rope_theta"):
        ap.add_argument(f"--{name}", type=float)
    for name in ("random_non_queries", "position_embedding", "answers_in_input"):
        ap.add_argument(f"--{name}", type=lambda s: s.lower() in ("1", "true", "yes"))
    ap.add_argument("--dtype")
    ap.add_argument("--impl", help="attention impl added to every spec ('none': the specs' own)")
    ap.add_argument("--budget_s", type=float, help="0: no budget, train exactly --steps")
    ap.add_argument("--cache_dir", default=os.environ.get("MQAR_JAX_CACHE", ""),
                    help="persistent compilation cache (a rerun compiles nothing)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    kw = dict(PRESETS[args.preset])
    for f in dataclasses.fields(StudyConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            kw[f.name] = None if (f.name == "impl" and v == "none") else v
    study = StudyConfig(**kw)
    result = run_study(study, args.out)
    ok = sum(r["status"] == "ok" for r in result["runs"])
    print(f"[mqar] done: {ok}/{len(result['runs'])} cells in {result['wall_s']} s -> "
          f"{args.out}.{{json,md,png}}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
