"""Linearising a trained softmax model, LoLCATs style (Zhang et al. 2025, "LoLCATs: On Low-Rank
Linearizing of Large Language Models", arXiv:2410.10254).

1. :func:`make_student`: the same model with chosen decoder layers switched to a linear
   attention variant (``LanguageConfig.layer_attention``), every teacher weight copied (q/k/v/o,
   MLP, norms, embeddings, vision tower, projector); only the variant's own parameters are new
   (Hedgehog ``hh_weight``/``hh_bias``, LoLCATs ``window_factor``, BASED ``proj``, gates ...).
2. :func:`attention_transfer`: the teacher runs teacher-forced on real batches; a
   ``layer_hook`` records each block's input. For every linearised layer ``l`` the loss is the
   MSE between the student's and the teacher's attention outputs (after ``o``) on the teacher's
   normed layer input, over valid tokens; the layer losses are summed (layers are trained
   independently on teacher inputs, as in LoLCATs). Only the variant's parameters train.
3. :func:`lora_finetune`: LoRA (``nn/lora.py``) on q/k/v/o of the student, trained with the
   repo's answer-token next-token loss (``train/loss.py``), then merged into plain weights.

    >>> student = make_student(teacher, "linear_swa(feature_map='hedgehog', feature_dim=32, window=16)")
    >>> tr = attention_transfer(teacher, student, batches, steps=300, lr=1e-2)
    >>> lo = lora_finetune(student, batches, steps=300, lr=1e-3, rank=8)

Steps are jitted (``nnx.split`` states, donated trainable state, optax AdamW with warm-up and
cosine decay, gradient clipping); the arrays stay where the models are (one device; the
experiment entry point restores onto one). ``compute_dtype="bfloat16"`` casts the floating
state to bf16 inside the step as ``train/step.py`` does (updates stay in the parameter dtype);
models built with ``dtype="bfloat16"`` compute in bf16 themselves. Losses are float32.

Not implemented (vs the paper): LoLCATs' optional attention-weight cross-entropy term and its
early stopping on a held-out set; models whose decoder drops tokens inside the LLM (an ``in_llm``
compressor) are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.nn.language import LanguageModel
from efficient_mllm.nn.lora import ATTENTION_TARGETS, LoRAParam, apply_lora, merge_lora
from efficient_mllm.ops import masks as masks_lib
from efficient_mllm.train.loss import answer_loss_terms
from efficient_mllm.train.optim import make_schedule
from efficient_mllm.train.step import _cast_floats, as_dtype, forward_logits

__all__ = [
    "FEATURE_MAP_FILTER",
    "LoRAResult",
    "TransferResult",
    "attention_transfer",
    "copy_weights",
    "layer_inputs",
    "linearized_config",
    "lora_finetune",
    "make_student",
    "trainable_summary",
    "transfer_losses",
]

log = logging.getLogger(__name__)

#: The linear variants' own parameters (everything under an ``Attention.attend`` module).
FEATURE_MAP_FILTER = nnx.All(nnx.Param, nnx.Not(LoRAParam), nnx.PathContains("attend"))
_MODEL_KEYS = ("tokens", "loss_mask", "lengths", "image")


def _language(model: nnx.Module) -> LanguageModel:
    lm = getattr(model, "language", model)
    if not isinstance(lm, LanguageModel):
        raise ValueError(
            f"model={type(model).__name__}: expected a LanguageModel or an MLLM (a model with a "
            "`language` LanguageModel)"
        )
    return lm


def _check_layers(layers: Any, depth: int) -> tuple[int, ...]:
    if isinstance(layers, str):
        layers = [int(s) for s in layers.split(",") if s.strip()]
    idx = tuple(layers)
    bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, (int, np.integer))
           or not 0 <= i < depth]
    if not idx or bad or len(set(idx)) != len(idx):
        raise ValueError(f"layers={layers!r}: expected distinct layer indices in [0, {depth})")
    return tuple(sorted(int(i) for i in idx))


def linearized_config(cfg: Any, variant: str, layers: Sequence[int] | str | None = None) -> Any:
    """``cfg`` (an ``MLLMConfig`` or ``LanguageConfig``) with the attention of ``layers``
    (default all decoder layers) replaced by the ``variant`` spec string."""
    if not isinstance(variant, str):
        raise ValueError(f"variant={variant!r}: expected a registry.ATTENTION spec string")
    name, _ = registry.parse_spec(variant)
    registry.ATTENTION.get(name)  # unknown names raise, listing the registered ones
    lang = getattr(cfg, "language", cfg)
    if not hasattr(lang, "layer_specs"):
        raise ValueError(f"cfg={type(cfg).__name__}: expected an MLLMConfig or LanguageConfig")
    idx = range(lang.depth) if layers is None else _check_layers(layers, lang.depth)
    specs = list(lang.layer_specs())
    for i in idx:
        specs[i] = variant
    new_lang = lang.replace(layer_attention=tuple(specs))
    return new_lang if lang is cfg else cfg.replace(language=new_lang)


def copy_weights(src: nnx.Module, dst: nnx.Module) -> list[str]:
    """Copies every variable of ``src`` into ``dst`` (same path, shape and dtype required) in
    place; returns the paths of ``dst``'s variables that ``src`` lacks (left as initialised)."""
    s = {p: v for p, v in nnx.to_flat_state(nnx.state(src))}
    d = {p: v for p, v in nnx.to_flat_state(nnx.state(dst))}
    fmt = lambda p: "/".join(map(str, p))
    missing = sorted(fmt(p) for p in s if p not in d)
    if missing:
        raise ValueError(
            f"dst lacks {len(missing)} variable(s) of src, e.g. {missing[:3]}; expected a "
            "student built from the teacher's config (linearized_config)"
        )
    for p, v in s.items():
        a, b = v[...], d[p][...]
        if jnp.shape(a) != jnp.shape(b) or jnp.asarray(a).dtype != jnp.asarray(b).dtype:
            raise ValueError(
                f"variable {fmt(p)}: src {jnp.shape(a)} {jnp.asarray(a).dtype} vs dst "
                f"{jnp.shape(b)} {jnp.asarray(b).dtype}; expected equal shapes and dtypes"
            )
        d[p][...] = a
    return sorted(fmt(p) for p in d if p not in s)


def make_student(
    teacher: nnx.Module,
    variant: str,
    *,
    layers: Sequence[int] | str | None = None,
    seed: int = 0,
) -> nnx.Module:
    """A copy of ``teacher`` (an ``MLLM`` or ``LanguageModel``) whose ``layers`` (default all
    decoder layers) use the attention ``variant``; all teacher weights are copied, the variant's
    parameters keep their initialisation (seeded by ``seed``)."""
    cfg = linearized_config(teacher.cfg, variant, layers)
    student = type(teacher)(cfg, rngs=nnx.Rngs(seed))
    new = copy_weights(teacher, student)
    log.info("student %s: %d new variable(s): %s", variant, len(new), ", ".join(new[:8]))
    return student


# -- teacher-forced layer inputs ------------------------------------------------------------


def _forward(model: nnx.Module, batch: Mapping[str, Any], layer_hook=None):
    if isinstance(model, LanguageModel):
        return model(batch["tokens"], lengths=batch.get("lengths"), layer_hook=layer_hook)
    if getattr(model, "in_llm_compressor", None) is not None:
        raise ValueError(
            "the model has an in_llm compressor: its decoder drops tokens between layers, "
            "which attention transfer does not support; linearise the model without it"
        )
    return model(batch["tokens"], batch.get("image"), lengths=batch.get("lengths"),
                 layer_hook=layer_hook)


def layer_inputs(model: nnx.Module, batch: Mapping[str, Any]) -> list[tuple[jax.Array, Any]]:
    """``[(hidden [B, L, D], LayerState), ...]``: the input of every decoder block of ``model``
    in a teacher-forced forward pass over ``batch`` (recorded by a ``layer_hook``)."""
    captured: list = []

    def hook(i, hidden, state):
        captured.append((hidden, state))
        return hidden, state

    _forward(model, batch, hook)
    return captured


def _block_mask(state) -> Any:
    """The mask ``LanguageModel`` gives a block without a cache: causal & padding & extra."""
    spec = masks_lib.causal()
    if state.lengths is not None:
        spec = spec & masks_lib.padding(state.lengths)
    if state.mask is not None:
        spec = spec & state.mask
    return spec


def transfer_losses(
    teacher: nnx.Module, student_lm: LanguageModel, batch: Mapping[str, Any],
    layers: Sequence[int], *, return_power: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """float32 ``[len(layers)]``: per layer, ``mean_valid ||attn_s(x) - attn_t(x)||^2 / D`` with
    ``x = attn_norm(h)`` and ``h`` the teacher's (gradient-stopped) input of that block. With
    ``return_power`` also the teacher outputs' ``mean_valid ||attn_t(x)||^2 / D`` (to report the
    error relative to the output's energy)."""
    captured = layer_inputs(teacher, batch)
    lm_t = _language(teacher)
    mse, power = [], []
    for i in layers:
        h, st = captured[i]
        h = jax.lax.stop_gradient(h)
        x = lm_t.blocks[i].attn_norm(h)
        spec = _block_mask(st)
        y_t = lm_t.blocks[i].attn(x, positions=st.positions, mask=spec)[0]
        y_s = student_lm.blocks[i].attn(x, positions=st.positions, mask=spec)[0]
        b, t, d = y_t.shape
        w = (jnp.ones((b, t), jnp.float32) if st.lengths is None
             else (jnp.arange(t)[None, :] < st.lengths[:, None]).astype(jnp.float32))
        denom = jnp.maximum(jnp.sum(w), 1.0) * d
        y_t = jax.lax.stop_gradient(y_t).astype(jnp.float32)
        err = jnp.square(y_s.astype(jnp.float32) - y_t)
        mse.append(jnp.sum(err * w[..., None]) / denom)
        power.append(jnp.sum(jnp.square(y_t) * w[..., None]) / denom)
    mse = jnp.stack(mse)
    return (mse, jnp.stack(power)) if return_power else mse


# -- shared helpers --------------------------------------------------------------------------


def _stream(batches: Iterable[Mapping[str, Any]], steps: int) -> Iterator[dict]:
    """``steps`` model batches (tokens, loss_mask, lengths, image) as jax arrays; a list or
    tuple is cycled, any other iterable must yield ``steps`` batches."""
    it = itertools.cycle(batches) if isinstance(batches, (list, tuple)) else iter(batches)
    for n in range(steps):
        try:
            b = next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {n} of {steps} steps; expected an endless "
                             "iterator, a list (cycled) or at least `steps` batches") from None
        if "tokens" not in b:
            raise ValueError(f"batch keys {sorted(b)}: expected at least 'tokens'")
        yield {k: jnp.asarray(b[k]) for k in _MODEL_KEYS if k in b}


def _optimizer(lr: float, steps: int, warmup_steps: int, weight_decay: float, clip_norm: float):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected an int >= 1")
    schedule = make_schedule(lr=lr, steps=steps, warmup_steps=warmup_steps, min_lr_ratio=0.1)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay))
    return optax.chain(*parts)


def _cast(tree: Any, dtype: Any) -> Any:
    return tree if dtype is None else _cast_floats(tree, dtype)


def _count(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _write_back(module: nnx.Module, filt: Any, pure: dict) -> None:
    state = nnx.state(module, filt)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)


class _Progress:
    """tqdm bar (when ``progress``) and a log line every ``log_every`` steps (and the last)."""

    def __init__(self, name: str, steps: int, progress: bool, log_every: int):
        self.name, self.steps, self.log_every = name, steps, max(1, int(log_every))
        self.bar = None
        if progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=name, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: Mapping[str, jax.Array]) -> None:
        """``values`` are device scalars, read (a device sync) only on logging steps."""
        if step % self.log_every == 0 or step == self.steps:
            host = {k: float(v) for k, v in values.items()}
            log.info("%s step %d: %s", self.name, step,
                     ", ".join(f"{k}={v:.5g}" for k, v in host.items()))
            if self.bar is not None:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in host.items()})
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- stage 1: attention transfer --------------------------------------------------------------


@dataclasses.dataclass
class TransferResult:
    """``losses [steps]`` (sum over layers), ``layer_losses [steps, len(layers)]`` (MSE),
    ``layer_power [steps, len(layers)]`` (mean square of the teacher's outputs: MSE / power is
    the relative error), the trained ``layers``, the number of ``trainable`` parameters and the
    wall ``seconds``."""

    losses: np.ndarray
    layer_losses: np.ndarray
    layer_power: np.ndarray
    layers: tuple[int, ...]
    trainable: int
    seconds: float


def _changed_layers(teacher_lm: LanguageModel, student_lm: LanguageModel) -> tuple[int, ...]:
    t, s = teacher_lm.cfg.layer_specs(), student_lm.cfg.layer_specs()
    if len(t) != len(s):
        raise ValueError(f"teacher has {len(t)} layers, student {len(s)}: expected the same depth")
    return tuple(i for i in range(len(t)) if t[i] != s[i])


def attention_transfer(
    teacher: nnx.Module,
    student: nnx.Module,
    batches: Iterable[Mapping[str, Any]],
    steps: int,
    lr: float = 1e-2,
    *,
    layers: Sequence[int] | None = None,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    clip_norm: float = 1.0,
    compute_dtype: str | None = None,
    progress: bool = False,
    log_every: int = 50,
) -> TransferResult:
    """Stage 1 of LoLCATs: trains the student's linear-attention parameters
    (:data:`FEATURE_MAP_FILTER`) so that each linearised layer's attention output matches the
    teacher's on the teacher's layer inputs (see :func:`transfer_losses`). ``student`` is
    updated in place; everything else in it stays exactly as copied from the teacher.

    ``layers``: default every layer whose attention spec differs from the teacher's.
    ``batches``: data-pipeline dicts (``tokens``, ``lengths``, ``image``; batch > 1 fine).
    """
    lm_t, lm_s = _language(teacher), _language(student)
    layers = _changed_layers(lm_t, lm_s) if layers is None else _check_layers(layers, len(lm_s.blocks))
    if not layers:
        raise ValueError("student: no layer's attention differs from the teacher's; build it "
                         "with make_student(teacher, variant)")
    cdt = None if compute_dtype is None else as_dtype(compute_dtype, "compute_dtype")
    tx = _optimizer(lr, steps, warmup_steps, weight_decay, clip_norm)
    tgraph, tstate = nnx.split(teacher)
    sgraph, train, rest = nnx.split(lm_s, FEATURE_MAP_FILTER, ...)
    train, rest, tstate = (nnx.to_pure_dict(x) for x in (train, rest, tstate))
    n_train = _count(train)
    if n_train == 0:
        log.warning("attention_transfer: the student's variant has no trainable parameters; "
                    "only the losses are measured")

    def loss_fn(train, rest, tstate, batch):
        t_model = nnx.merge(tgraph, _cast(tstate, cdt))
        s_lm = nnx.merge(sgraph, _cast(train, cdt), _cast(rest, cdt))
        per, power = transfer_losses(t_model, s_lm, batch, layers, return_power=True)
        return jnp.sum(per), (per, power)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(train, opt_state, rest, tstate, batch):
        (loss, (per, power)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            train, rest, tstate, batch
        )
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss, per, power

    opt_state = tx.init(train)
    losses, per_layer, powers = [], [], []
    bar = _Progress("attention transfer", steps, progress, log_every)
    t0 = time.perf_counter()
    try:
        for n, batch in enumerate(_stream(batches, steps), 1):
            train, opt_state, loss, per, power = step(train, opt_state, rest, tstate, batch)
            losses.append(loss)
            per_layer.append(per)
            powers.append(power)
            bar.update(n, {"mse": loss})
    finally:
        bar.close()
    losses, per_layer, powers = (np.asarray(jax.device_get(x)) for x in (losses, per_layer, powers))
    _write_back(lm_s, FEATURE_MAP_FILTER, train)
    return TransferResult(losses, per_layer, powers, layers, n_train, time.perf_counter() - t0)


# -- stage 2: LoRA fine-tuning -----------------------------------------------------------------


@dataclasses.dataclass
class LoRAResult:
    """``losses [steps]`` (answer-token NLL) and ``accuracy [steps]`` (answer-token argmax
    accuracy) per step, the adapted module ``paths``, the number of ``trainable`` parameters,
    whether the adapters were ``merged``, and the wall ``seconds``."""

    losses: np.ndarray
    accuracy: np.ndarray
    paths: list[str]
    trainable: int
    merged: bool
    seconds: float


def _logits(model: nnx.Module, batch: Mapping[str, Any], cdt: Any) -> jax.Array:
    if isinstance(model, LanguageModel):
        return model(batch["tokens"], lengths=batch.get("lengths")).logits.astype(jnp.float32)
    return forward_logits(model, batch, cdt)


def lora_finetune(
    student: nnx.Module,
    batches: Iterable[Mapping[str, Any]],
    steps: int,
    lr: float = 1e-3,
    rank: int = 8,
    *,
    alpha: float = 16.0,
    targets: Sequence[str] | str = ATTENTION_TARGETS,
    layers: Sequence[int] | None = None,
    train_feature_maps: bool = False,
    merge: bool = True,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    clip_norm: float = 1.0,
    compute_dtype: str | None = None,
    seed: int = 0,
    progress: bool = False,
    log_every: int = 50,
) -> LoRAResult:
    """Stage 2 of LoLCATs: LoRA adapters (``rank``, ``alpha``) on ``targets`` (default q/k/v/o)
    of the decoder ``layers`` (default all), trained with the answer-token next-token loss
    (``train.loss.answer_loss_terms``: ``batch["loss_mask"]`` selects the targets) while every
    other weight stays fixed; with ``train_feature_maps`` the linear variants' parameters train
    too. With ``merge`` the adapters are folded into the weights afterwards (a plain model
    again). ``student`` is changed in place."""
    cdt = None if compute_dtype is None else as_dtype(compute_dtype, "compute_dtype")
    tx = _optimizer(lr, steps, warmup_steps, weight_decay, clip_norm)
    paths = apply_lora(student, targets, rank=rank, alpha=alpha, layers=layers,
                       rngs=nnx.Rngs(seed))
    filt = nnx.Any(LoRAParam, FEATURE_MAP_FILTER) if train_feature_maps else LoRAParam
    graph, train, rest = nnx.split(student, filt, ...)
    train, rest = nnx.to_pure_dict(train), nnx.to_pure_dict(rest)

    def loss_fn(train, rest, batch):
        if "loss_mask" not in batch:
            raise ValueError(f"batch keys {sorted(batch)}: lora_finetune needs 'loss_mask'")
        model = nnx.merge(graph, _cast(train, cdt), _cast(rest, cdt))
        terms = answer_loss_terms(_logits(model, batch, cdt), batch["tokens"], batch["loss_mask"])
        n = jnp.maximum(terms["count"], 1.0)
        return terms["loss_sum"] / n, terms["correct"] / n

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(train, opt_state, rest, batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(train, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss, acc

    opt_state = tx.init(train)
    losses, accs = [], []
    bar = _Progress("LoRA fine-tune", steps, progress, log_every)
    t0 = time.perf_counter()
    try:
        for n, batch in enumerate(_stream(batches, steps), 1):
            train, opt_state, loss, acc = step(train, opt_state, rest, batch)
            losses.append(loss)
            accs.append(acc)
            bar.update(n, {"loss": loss, "acc": acc})
    finally:
        bar.close()
    n_train = _count(train)
    _write_back(student, filt, train)
    if merge:
        merge_lora(student)
    return LoRAResult(np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(accs)),
                      paths, n_train, merge, time.perf_counter() - t0)


def trainable_summary(result: TransferResult | LoRAResult) -> dict[str, Any]:
    """JSON-friendly summary of a stage: steps, trainable parameters, seconds, and the loss
    averaged over the first and the last 10% of the steps (per-batch losses are noisy); for
    attention transfer the same per layer, also relative to the teacher outputs' power."""
    n = int(len(result.losses))
    d = {"steps": n, "trainable_params": int(result.trainable), "seconds": float(result.seconds)}
    if not n:
        return d
    k = max(1, n // 10)
    d.update(first_loss=float(np.mean(result.losses[:k])),
             last_loss=float(np.mean(result.losses[-k:])), averaged_steps=k)
    if isinstance(result, LoRAResult):
        d.update(first_accuracy=float(np.mean(result.accuracy[:k])),
                 last_accuracy=float(np.mean(result.accuracy[-k:])))
    if isinstance(result, TransferResult) and result.layer_losses.size:
        first, last = result.layer_losses[:k].mean(0), result.layer_losses[-k:].mean(0)
        p_first, p_last = result.layer_power[:k].mean(0), result.layer_power[-k:].mean(0)
        d["layers"] = list(result.layers)
        d["first_layer_mse"] = [float(x) for x in first]
        d["last_layer_mse"] = [float(x) for x in last]
        d["first_layer_relative_mse"] = [float(x) for x in first / np.maximum(p_first, 1e-12)]
        d["last_layer_relative_mse"] = [float(x) for x in last / np.maximum(p_last, 1e-12)]
    return d
