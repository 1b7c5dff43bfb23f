"""Evaluators, registered by name in ``registry.EVALUATORS``.

An evaluator accumulates over batches (the data pipeline's dicts: ``tokens``, ``loss_mask``,
``lengths``, ``question_type``, ``prompt_lengths``, optional ``image``) and reports a flat dict
of floats, overall and per question type (``accuracy/<type>``):

- ``exact_match(max_new_tokens=None)``: greedy generation with ``kvcache.generate`` from the
  prompt, stopping at ``<eos>``; an example is correct when the generated answer equals the
  reference (decoded strings when a tokenizer is given, otherwise token ids up to ``<eos>``).
- ``teacher_forced()``: one forward pass; an example is correct when the argmax at every target
  position (answer tokens and ``<eos>``) is the reference token. Also token accuracy.
- ``perplexity(tokens="answer")``: ``exp`` of the mean NLL over the answer targets, or over every
  next-token prediction of the valid text (``tokens="all"``).

    >>> ev = registry.EVALUATORS.build("exact_match(max_new_tokens=4)")
    >>> results = run_evaluators(model, batches, [ev], question_types=("color", "shape"),
    ...                          tokenizer=tok)
"""

from __future__ import annotations

import abc
import functools
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import registry

__all__ = [
    "Evaluator",
    "ExactMatch",
    "TeacherForced",
    "Perplexity",
    "summarize_correct",
    "extract_answers",
    "strip_at_stop",
    "run_evaluators",
    "build_evaluators",
    "forward_rows",
    "host",
    "valid_rows",
]


def host(x: Any) -> np.ndarray:
    """A numpy copy of ``x``; arrays spread over several processes are gathered first."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def valid_rows(batch: Mapping[str, Any]) -> np.ndarray:
    """Bool ``[B]``: ``batch["valid"]`` if present (padding rows of a last batch are False)."""
    n = np.shape(batch["tokens"])[0]
    if "valid" not in batch:
        return np.ones(n, bool)
    return host(batch["valid"]).astype(bool).reshape(n)


def _check_batch(batch: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; expected keys {list(keys)}, got {sorted(batch)}")


def summarize_correct(
    correct: np.ndarray,
    question_type: np.ndarray,
    question_types: Sequence[str] | None = None,
    *,
    prefix: str = "accuracy",
) -> dict[str, float]:
    """``{prefix: mean, prefix/<type>: mean per type, count/<type>: n}`` for a bool array."""
    correct = np.asarray(correct, bool).reshape(-1)
    qt = np.asarray(question_type).reshape(-1)
    if qt.shape != correct.shape:
        raise ValueError(
            f"question_type has shape {qt.shape}; expected {correct.shape} (one per example)"
        )
    out = {prefix: float(correct.mean()) if correct.size else float("nan"), "examples": float(correct.size)}
    for t in sorted(set(qt.tolist())):
        if question_types is not None and not 0 <= t < len(question_types):
            raise ValueError(
                f"question_type {t} is outside question_types (length {len(question_types)})"
            )
        name = question_types[t] if question_types is not None else str(t)
        sel = qt == t
        out[f"{prefix}/{name}"] = float(correct[sel].mean())
        out[f"count/{name}"] = float(sel.sum())
    return out


def strip_at_stop(ids: Sequence[int], stop_tokens: Sequence[int]) -> list[int]:
    """``ids`` up to (not including) the first stop token."""
    out = []
    for i in ids:
        if int(i) in stop_tokens:
            break
        out.append(int(i))
    return out


def extract_answers(batch: Mapping[str, Any]) -> list[list[int]]:
    """Reference target ids per row: ``tokens[prompt_length:length]`` (answer and ``<eos>``)."""
    _check_batch(batch, ("tokens", "lengths", "prompt_lengths"))
    tokens = host(batch["tokens"])
    out = []
    for row, p, n in zip(tokens, host(batch["prompt_lengths"]), host(batch["lengths"]), strict=True):
        if not 0 < p < n <= tokens.shape[1]:
            raise ValueError(
                f"prompt_lengths {int(p)} / lengths {int(n)}; expected 0 < prompt_length < length "
                f"<= {tokens.shape[1]}"
            )
        out.append([int(t) for t in row[p:n]])
    return out


class Evaluator(abc.ABC):
    """Accumulating evaluator: ``reset()``, ``update(model, batch, **ctx)``, ``result(...)``."""

    name = "evaluator"

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def update(self, model: nnx.Module, batch: Mapping[str, Any], **ctx: Any) -> None: ...

    @abc.abstractmethod
    def result(self, question_types: Sequence[str] | None = None) -> dict[str, float]: ...


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward_rows(graphdef, state, batch):
    """Per-row sums over answer targets (``nll_sum``, ``count``, ``hits``, ``all_correct``) and
    over every valid next-token prediction (``nll_all``, ``count_all``)."""
    model = nnx.merge(graphdef, state)
    out = model(batch["tokens"], batch.get("image"), lengths=batch["lengths"])
    logits = getattr(out, "logits", out)[:, :-1].astype(jnp.float32)
    targets = batch["tokens"][:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hit = jnp.argmax(logits, axis=-1) == targets
    w = batch["loss_mask"][:, 1:].astype(jnp.float32)
    pos = jnp.arange(targets.shape[1])[None, :]
    valid = (pos + 1 < batch["lengths"][:, None]).astype(jnp.float32)
    return {
        "nll_sum": jnp.sum(nll * w, axis=1),
        "count": jnp.sum(w, axis=1),
        "hits": jnp.sum(hit * w, axis=1),
        "all_correct": jnp.all(hit | (w == 0), axis=1),
        "nll_all": jnp.sum(nll * valid, axis=1),
        "count_all": jnp.sum(valid, axis=1),
    }


def forward_rows(model: nnx.Module, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per-row teacher-forced statistics of a batch (numpy or global jax arrays), as numpy."""
    _check_batch(batch, ("tokens", "loss_mask", "lengths"))
    graphdef, state = nnx.split(model)
    b = {k: jnp.asarray(batch[k]) for k in ("tokens", "loss_mask", "lengths", "image") if k in batch}
    return {k: host(v) for k, v in _forward_rows(graphdef, state, b).items()}


class TeacherForced(Evaluator):
    """Answer accuracy under teacher forcing (every target right) and token accuracy."""

    name = "teacher_forced"

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._correct, self._types, self._hits, self._count = [], [], 0.0, 0.0

    def update(self, model, batch, **ctx) -> None:
        _check_batch(batch, ("question_type",))
        r = ctx.get("rows") or forward_rows(model, batch)
        v = valid_rows(batch)
        self._correct.append(np.asarray(r["all_correct"])[v])
        self._types.append(host(batch["question_type"])[v])
        self._hits += float(np.sum(np.asarray(r["hits"])[v]))
        self._count += float(np.sum(np.asarray(r["count"])[v]))

    def result(self, question_types=None) -> dict[str, float]:
        if not self._correct:
            return {}
        out = summarize_correct(
            np.concatenate(self._correct), np.concatenate(self._types), question_types,
            prefix="tf_accuracy",
        )
        out = {k: v for k, v in out.items() if k != "examples" and not k.startswith("count/")}
        out["token_accuracy"] = self._hits / max(self._count, 1.0)
        return out


class Perplexity(Evaluator):
    """``exp(mean NLL)`` over answer targets (``tokens="answer"``) or all valid text ("all")."""

    name = "perplexity"

    def __init__(self, tokens: str = "answer"):
        if tokens not in ("answer", "all"):
            raise ValueError(f"tokens = {tokens!r}; expected 'answer' or 'all'")
        self.tokens = tokens
        self.reset()

    def reset(self) -> None:
        self._nll, self._count = 0.0, 0.0

    def update(self, model, batch, **ctx) -> None:
        r = ctx.get("rows") or forward_rows(model, batch)
        v = valid_rows(batch)
        nll, cnt = ("nll_sum", "count") if self.tokens == "answer" else ("nll_all", "count_all")
        self._nll += float(np.sum(np.asarray(r[nll])[v]))
        self._count += float(np.sum(np.asarray(r[cnt])[v]))

    def result(self, question_types=None) -> dict[str, float]:
        if self._count == 0:
            return {}
        nll = self._nll / self._count
        suffix = "" if self.tokens == "answer" else "_all"
        return {f"nll{suffix}": nll, f"perplexity{suffix}": float(np.exp(min(nll, 700.0)))}


def _default_generate(model, tokens, **kwargs):
    from efficient_mllm.kvcache.generate import generate

    return generate(model, tokens, **kwargs)


def _normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


class ExactMatch(Evaluator):
    """Greedy generation compared to the reference answer, overall and per question type.

    The prompt of row ``i`` is ``tokens[i, :prompt_lengths[i]]``; generation stops at ``<eos>``.
    With a tokenizer, the decoded generation is compared to the reference text (``answer_text``
    when the batch has it, normalised by a round trip through the tokenizer; otherwise the
    decoded reference ids), case- and whitespace-insensitively; without one, token ids up to
    ``<eos>`` are compared. ``max_new_tokens`` defaults to the longest reference in the batch
    (answer and ``<eos>``). ``generate_fn(model, prompt, images=, lengths=, max_new_tokens=,
    temperature=, stop_tokens=, pad_id=)`` defaults to ``kvcache.generate.generate``.
    """

    name = "exact_match"

    def __init__(
        self,
        max_new_tokens: int | None = None,
        *,
        eos_id: int | None = None,
        pad_id: int | None = None,
        keep_predictions: int = 32,
        generate_fn: Callable[..., Any] | None = None,
    ):
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens = {max_new_tokens!r}; expected a positive int or None")
        self.max_new_tokens = max_new_tokens
        self.eos_id, self.pad_id = eos_id, pad_id
        self.keep_predictions = keep_predictions
        self.generate_fn = generate_fn or _default_generate
        self.reset()

    def reset(self) -> None:
        self._correct, self._types, self.predictions = [], [], []

    def update(self, model, batch, *, tokenizer=None, **ctx) -> None:
        _check_batch(batch, ("tokens", "lengths", "prompt_lengths", "question_type"))
        eos = self.eos_id if self.eos_id is not None else getattr(tokenizer, "eos_id", None)
        pad = self.pad_id if self.pad_id is not None else getattr(tokenizer, "pad_id", 0)
        if eos is None:
            raise ValueError("exact_match needs eos_id (argument or tokenizer.eos_id); got neither")
        refs = extract_answers(batch)
        prompt_lengths = host(batch["prompt_lengths"]).astype(np.int32)
        width = int(prompt_lengths.max())
        plen = jnp.asarray(batch["prompt_lengths"], jnp.int32)
        tokens = jnp.asarray(batch["tokens"])[:, :width]
        tokens = jnp.where(jnp.arange(width)[None, :] < plen[:, None], tokens, pad).astype(jnp.int32)
        max_new = self.max_new_tokens or max(len(r) for r in refs)
        images = batch.get("image")
        out = self.generate_fn(
            model,
            tokens,
            images=None if images is None else jnp.asarray(images),
            lengths=plen,
            max_new_tokens=int(max_new),
            temperature=0.0,
            stop_tokens=(int(eos),),
            pad_id=int(pad),
        )
        gen, gen_len = host(out.tokens), host(out.lengths)
        qtypes = host(batch["question_type"])
        texts = batch.get("answer_text")
        v = valid_rows(batch)
        correct = []
        for i, ref in enumerate(refs):
            if not v[i]:
                continue
            pred_ids = strip_at_stop(gen[i, : gen_len[i]], (int(eos),))
            ref_ids = strip_at_stop(ref, (int(eos),))
            if tokenizer is not None:
                pred = _normalize(tokenizer.decode(pred_ids))
                want = (tokenizer.decode(tokenizer.encode(str(texts[i]))) if texts is not None
                        else tokenizer.decode(ref_ids))
                want = _normalize(want)
            else:
                pred, want = pred_ids, ref_ids
            ok = pred == want
            correct.append(ok)
            if len(self.predictions) < self.keep_predictions:
                self.predictions.append(
                    {"prediction": pred, "reference": want, "correct": bool(ok),
                     "question_type": int(qtypes[i])}
                )
        self._correct.append(np.asarray(correct, bool))
        self._types.append(qtypes[v])

    def result(self, question_types=None) -> dict[str, float]:
        if not self._correct:
            return {}
        return summarize_correct(
            np.concatenate(self._correct), np.concatenate(self._types), question_types
        )


@registry.EVALUATORS.register("exact_match", description="greedy generation, exact answer match (per type)")
def exact_match(max_new_tokens: int | None = None, keep_predictions: int = 32) -> ExactMatch:
    return ExactMatch(max_new_tokens, keep_predictions=keep_predictions)


@registry.EVALUATORS.register("teacher_forced", description="teacher-forced answer and token accuracy")
def teacher_forced() -> TeacherForced:
    return TeacherForced()


@registry.EVALUATORS.register("perplexity", description="perplexity of answer (or all) tokens")
def perplexity(tokens: str = "answer") -> Perplexity:
    return Perplexity(tokens)


def build_evaluators(specs: Iterable[str | Evaluator]) -> list[Evaluator]:
    """Evaluators from registry spec strings (or already-built evaluators)."""
    out = []
    for s in specs:
        out.append(s if isinstance(s, Evaluator) else registry.EVALUATORS.build(s))
    return out


def run_evaluators(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Any]],
    evaluators: Sequence[Evaluator | str],
    *,
    question_types: Sequence[str] | None = None,
    tokenizer: Any = None,
    max_batches: int | None = None,
    prepare: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """Feeds every batch to every evaluator (one shared forward pass for the teacher-forced
    ones) and merges their results. ``prepare`` maps a host batch to device arrays (e.g. global
    sharded arrays on a mesh); ``max_batches`` (None or 0: all) limits the pass."""
    evs = build_evaluators(evaluators)
    for ev in evs:
        ev.reset()
    needs_rows = any(isinstance(ev, (TeacherForced, Perplexity)) for ev in evs)
    n = 0
    for batch in batches:
        if max_batches and n >= max_batches:
            break
        if prepare is not None:
            batch = prepare(batch)
        rows = forward_rows(model, batch) if needs_rows else None
        for ev in evs:
            ev.update(model, batch, tokenizer=tokenizer, rows=rows)
        n += 1
    if n == 0:
        raise ValueError("batches: no batch to evaluate; expected at least one")
    out: dict[str, float] = {}
    for ev in evs:
        out.update(ev.result(question_types))
    return out
