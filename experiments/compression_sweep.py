"""Visual-token compression sweep: methods x budgets on one trained baseline MLLM.

    python -m experiments.compression_sweep --config configs/compression_sweep.py \
        --checkpoint runs/sweep_shapes_base --workdir runs/compression_sweep_shapes
    python -m experiments.compression_sweep --config configs/compression_sweep.py:quick \
        --checkpoint runs/sweep_shapes_base --config.sweep.only=random,fastv \
        --config.sweep.benchmark_out=benchmarks/compression_sweep_shapes

For every (method, budget) of ``config.sweep`` the model is rebuilt with
``compressor=<spec>`` and given the baseline's parameters (training-free methods; a method
whose compressor has parameters must be listed under ``sweep.learned`` with its own checkpoint,
else its row says it was skipped; a learned model takes its parameters from its checkpoint and
its inference state, e.g. MQT's budget, from the spec), put in eval mode (``model.eval()``),
then measured on the first ``sweep.eval_examples``
examples of ``config.eval.split``: exact-match accuracy by greedy generation, visual tokens at
the LLM input and layer-averaged, analytic prefill FLOPs, KV-cache bytes (checked against a
real cache), and the median jitted prefill / decode-step latency
(``efficient_mllm.evaluate.efficiency``). Everything runs on one device (the first).

Writes to ``--workdir`` (default ``runs/<config.name>``): ``config.json``,
``compression_sweep.json``, ``compression_sweep.md`` (the table) and the Pareto plots
``pareto_flops.png`` (accuracy vs prefill GFLOPs) and ``pareto_latency.png`` (accuracy vs
prefill ms); ``sweep.benchmark_out`` also writes ``<path>.md`` / ``<path>.json`` and the plots
as ``<path>_pareto_*.png``.
``experiments/compression_study.py`` runs the same jobs (``plan_jobs`` / ``run_job`` /
``finish_sweep``) in several processes after training the baseline and the learned models.
``--checkpoint=''`` evaluates a randomly initialised model (a smoke test: its accuracy means
nothing).
"""

from __future__ import annotations

import dataclasses
import fractions
import gc
import json
import logging
import math
import os
import platform
import shutil
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "Job",
    "budget_fields",
    "format_spec",
    "parse_methods",
    "plan_jobs",
    "learned_models",
    "model_dir_name",
    "pareto_front",
    "run_sweep",
    "SweepContext",
    "prepare_sweep",
    "run_job",
    "finish_sweep",
    "write_markdown",
    "write_benchmark",
    "plot_pareto",
]

OUTPUT_STEM = "compression_sweep"


# -- planning ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One row of the sweep. ``frac`` None: the learned method's fixed budget (or baseline 1)."""

    label: str
    frac: float | None
    spec: str | None
    kind: str  # "baseline" | "training_free" | "learned"
    checkpoint: str = ""
    note: str = ""
    train_spec: str = ""  # learned: the compressor spec its checkpoint was trained with

    def key(self) -> str:
        """A stable file-name-safe id of this row (method, budget, spec, checkpoint)."""
        import hashlib

        h = hashlib.sha1(repr((self.label, self.frac, self.spec, self.checkpoint)).encode())
        return f"{_slug(self.label)}-{_slug(_frac_label(self.frac))}-{h.hexdigest()[:10]}"


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-." else "_" for c in str(text))
    return "_".join(p for p in out.split("_") if p) or "x"


def model_dir_name(label: str, train_spec: str) -> str:
    """Directory name of a learned model: its label and its training spec, file-name safe."""
    return f"{_slug(label)}-{_slug(train_spec)}"


def budget_fields(frac: float, n: int) -> dict[str, Any]:
    """Template fields for a budget ``frac`` of ``n`` visual tokens (see
    ``configs/compression_sweep.py``): ``keep``, ``frac``, ``dominant``, ``contextual``,
    ``kernel`` (the smallest pooling window, ceil mode, leaving at most ``keep`` tokens of a
    square ``sqrt(n)`` grid), ``side`` (the largest square ``side x side <= keep``)."""
    if not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ValueError(f"budget={frac!r}: expected a fraction in (0, 1]")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: expected the number of visual tokens (a positive int)")
    keep = max(1, min(n, int(round(frac * n))))
    contextual = int(round(keep * 10 / 64)) if keep >= 2 else 0
    side = math.isqrt(n)
    if side * side != n:
        side = math.ceil(math.sqrt(n))
    kernel = 1
    while math.ceil(side / kernel) ** 2 > keep:
        kernel += 1
    return {
        "keep": keep,
        "frac": float(frac),
        "dominant": keep - contextual,
        "contextual": contextual,
        "kernel": kernel,
        "side": max(1, math.isqrt(keep)),
    }


def format_spec(template: str, frac: float, n: int) -> str:
    """Fills a spec template's ``{keep}`` / ``{frac}`` / ... fields for budget ``frac``."""
    try:
        return template.format(**budget_fields(frac, n))
    except (KeyError, IndexError) as e:
        raise ValueError(
            f"method template {template!r}: unknown field {e}; expected keep, frac, dominant, "
            "contextual, kernel, side"
        ) from None


def _is_template(template: str) -> bool:
    return "{" in template


def parse_methods(entries: Sequence[str]) -> list[tuple[str, str]]:
    """``"label: spec-template"`` strings (label optional) -> ``[(label, template)]``."""
    from efficient_mllm import registry

    out = []
    for e in entries:
        if not isinstance(e, str) or not e.strip():
            raise ValueError(f"sweep method entry {e!r}: expected 'label: spec template'")
        label, sep, template = e.partition(": ")
        if not sep:
            template = e
            label = ""
        template = template.strip()
        name = registry.parse_spec(format_spec(template, 0.5, 64) if _is_template(template)
                                   else template)[0]
        out.append((label.strip() or name, template))
    labels = [lab for lab, _ in out]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"sweep methods: duplicate labels {dup}; give each a distinct 'label: '")
    return out


def plan_jobs(sweep: Mapping[str, Any], n: int, *, learned_dir: str | None = None) -> list[Job]:
    """The baseline, then every training-free method at every budget < 1, then the learned
    methods. A budget whose filled spec equals an earlier budget's (e.g. the same pooling
    window) becomes a note, not a rerun.

    Learned methods: ``sweep.learned_train`` (optional, one template per learned entry, ''
    = the entry's own spec) is the spec its model is *trained* with at each budget (e.g.
    ``mqt(max_queries=128)``: one model for every budget; ``attn_pool(pool={kernel})``: one
    model per distinct window). Its checkpoint is ``<learned_dir>/<model_dir_name(label,
    train spec)>`` when ``learned_dir`` is given (the study), else the entry of
    ``sweep.learned_checkpoints`` (same order; a template is filled per budget like the specs;
    '' or no entry: the rows are skipped with a note)."""
    budgets = [float(b) for b in sweep["budgets"]]
    for b in budgets:
        budget_fields(b, n)  # validates
    only = {s.strip() for s in str(sweep.get("only", "") or "").split(",") if s.strip()}
    jobs = [Job("baseline", 1.0, None, "baseline")]
    methods = parse_methods(sweep.get("methods", ()))
    learned = parse_methods(sweep.get("learned", ()))
    ckpts = list(sweep.get("learned_checkpoints", ()) or ())
    if ckpts and len(ckpts) != len(learned):
        raise ValueError(
            f"sweep.learned_checkpoints has {len(ckpts)} entries: expected one per learned "
            f"method ({len(learned)}), '' where there is none"
        )
    trains = list(sweep.get("learned_train", ()) or ())
    if trains and len(trains) != len(learned):
        raise ValueError(
            f"sweep.learned_train has {len(trains)} entries: expected one per learned method "
            f"({len(learned)}), '' where the method trains with its own spec"
        )
    known = {lab for lab, _ in methods + learned}
    if only - known:
        raise ValueError(f"sweep.only={sorted(only)}: unknown labels {sorted(only - known)}; "
                         f"expected some of {sorted(known)}")
    fracs = [b for b in budgets if b < 1.0]

    def expand(label: str, template: str, kind: str, ck: str = "", train: str = "") -> None:
        if kind == "learned" and learned_dir is None and not ck:
            jobs.append(Job(label, None, template, kind,
                            note="skipped: learned method, no checkpoint trained with it given "
                                 "(sweep.learned_checkpoints)"))
            return
        seen: dict[tuple, float] = {}
        for f in fracs if _is_template(template) else [None]:
            spec = template if f is None else format_spec(template, f, n)
            tspec = spec
            if kind == "learned":
                tspec = train or template
                tspec = tspec if f is None or not _is_template(tspec) else format_spec(tspec, f, n)
                registry.parse_spec(tspec)  # validates
            if kind == "learned" and learned_dir is not None:
                ckf = os.path.join(learned_dir, model_dir_name(label, tspec))
            else:
                ckf = ck if f is None or not _is_template(ck) else format_spec(ck, f, n)
            if (spec, ckf) in seen:
                jobs.append(Job(label, f, spec, kind, checkpoint=ckf, train_spec=tspec,
                                note=f"same spec as budget {_frac_label(seen[spec, ckf])}: "
                                     "not rerun"))
                continue
            seen[spec, ckf] = f
            jobs.append(Job(label, f, spec, kind, checkpoint=ckf,
                            train_spec=tspec if kind == "learned" else ""))

    from efficient_mllm import registry

    for label, template in methods:
        if not only or label in only:
            expand(label, template, "training_free")
    for i, (label, template) in enumerate(learned):
        if not only or label in only:
            train = str(trains[i]).strip() if trains else ""
            if ": " in train:  # an optional "label: " prefix, as in sweep.learned
                train = train.partition(": ")[2].strip()
            expand(label, template, "learned", ckpts[i] if ckpts else "", train)
    return jobs


def learned_models(jobs: Sequence[Job]) -> list[tuple[str, str, str]]:
    """The distinct learned models the jobs need, in job order: ``(checkpoint, train_spec,
    label)``; raises if one checkpoint is asked to hold two different training specs."""
    out: dict[str, tuple[str, str, str]] = {}
    for j in jobs:
        if j.kind != "learned" or not j.checkpoint or j.note.startswith("skipped"):
            continue
        prev = out.get(j.checkpoint)
        if prev is not None and prev[1] != j.train_spec:
            raise ValueError(f"checkpoint {j.checkpoint!r} is asked for two training specs: "
                             f"{prev[1]!r} and {j.train_spec!r}")
        out.setdefault(j.checkpoint, (j.checkpoint, j.train_spec, j.label))
    return list(out.values())


def _frac_label(frac: float | None) -> str:
    if frac is None:
        return "fixed"
    if frac >= 1.0:
        return "all"
    return str(fractions.Fraction(frac).limit_denominator(100))


# -- models ------------------------------------------------------------------------------------


def _to_device(tree: Any) -> Any:
    import jax
    import jax.numpy as jnp

    def move(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # e.g. a compressor's RNG
            return jax.random.wrap_key_data(jnp.asarray(np.asarray(jax.random.key_data(x))),
                                            impl=jax.random.key_impl(x))
        return jnp.asarray(np.asarray(jax.device_get(x)))

    return jax.tree.map(move, tree)


def _restore(config: Any, checkpoint: str, components: Any, mcfg: Any, step: int | None):
    """``(params, rest)`` (pure dicts on the default device) of ``checkpoint`` for a model of
    config ``mcfg``, via the training loop's ``restore_for_eval``."""
    from flax import nnx

    from efficient_mllm.nn.mllm import MLLM
    from efficient_mllm.train.loop import restore_for_eval

    def model_fn(rngs: nnx.Rngs):
        return MLLM(mcfg, rngs=rngs)

    comps = dataclasses.replace(components, model_fn=model_fn)
    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    cfg.model.compressor = mcfg.compressor if isinstance(mcfg.compressor, str) else None
    if "sweep" in cfg:
        del cfg["sweep"]
    cfg.lock()
    trainer = restore_for_eval(cfg, checkpoint, step=step, components=comps)
    params, rest = _to_device(trainer.state.params), _to_device(trainer.state.rest)
    trainer.ckpt.close()
    return params, rest


def _build(mcfg: Any, params: Any, rest: Any | None, seed: int, *, check: bool):
    """An ``MLLM(mcfg)`` holding ``params`` (and ``rest`` when its structure matches)."""
    import jax
    from flax import nnx

    from efficient_mllm.nn.mllm import MLLM
    from efficient_mllm.train.step import merge_model, split_model

    model = MLLM(mcfg, rngs=nnx.Rngs(seed))
    graphdef, own_params, own_rest = split_model(model)
    if check and jax.tree.structure(own_params) != jax.tree.structure(params):
        mine = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(own_params)}
        base = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
        extra = sorted(mine - base)[:4]
        raise ValueError(
            f"compressor {mcfg.compressor!r} has parameters the baseline does not ({extra}...): "
            "list it under sweep.learned with a checkpoint trained with it"
        )
    if rest is None or jax.tree.structure(own_rest) != jax.tree.structure(rest):
        rest = own_rest
    return merge_model(graphdef, params, rest)


# -- measuring one model -----------------------------------------------------------------------


def _measure(
    model: Any, batches: list, sweep: Mapping[str, Any], components: Any, *, latency: bool = True
) -> tuple[dict, Any]:
    """``(row fields, timer)``: accuracy and accounting of ``model`` on ``batches``; the
    latency fields too when ``latency``, else ``timer(warmup, repeats) -> latency fields`` (the
    study compiles with ``timer(1, 1)`` and times later, alone on the device)."""
    from efficient_mllm.evaluate import efficiency as eff
    from efficient_mllm.evaluate.evaluators import ExactMatch, run_evaluators

    tok = components.tokenizer
    pad = int(getattr(tok, "pad_id", 0) or 0)
    t0 = time.perf_counter()
    acct = eff.account_batches(model, batches, pad_id=pad)
    account_s = time.perf_counter() - t0
    max_new = int(sweep.get("max_new_tokens", 0) or 0) or None
    t0 = time.perf_counter()
    res = run_evaluators(model, batches, [ExactMatch(max_new)],
                         question_types=components.question_types, tokenizer=tok)
    eval_s = time.perf_counter() - t0
    b0 = batches[0]
    toks, plen = eff.prompt_batch(b0, pad)
    lb = max(1, min(int(sweep.get("latency_batch", 1)), len(toks)))
    toks = toks[:, : int(plen[:lb].max())]  # the latency rows' own prompt width
    images = b0.get("image")
    mode = str(sweep.get("kv_capacity", "fitted"))
    if mode not in ("fitted", "uniform"):
        raise ValueError(f"sweep.kv_capacity={mode!r}: expected 'fitted' or 'uniform'")
    cap = None
    if mode == "fitted":  # the first lb rows of batches[0] are the first account rows
        cap = eff.fitted_capacity(acct["rows"]["tokens_per_layer"][:lb], extra=1)
    images = None if images is None else np.asarray(images)[:lb]

    def timer(warmup: int | None = None, repeats: int | None = None) -> dict:
        t0 = time.perf_counter()
        lat = eff.measure_latency(
            model, toks[:lb], images, plen[:lb],
            warmup=int(sweep.get("latency_warmup", 1)) if warmup is None else warmup,
            repeats=int(sweep.get("latency_repeats", 5)) if repeats is None else repeats,
            capacity=cap,
        )
        return dict(
            latency_time_s=time.perf_counter() - t0,
            prefill_ms=lat["prefill_ms"],
            decode_ms_per_token=lat["decode_ms_per_token"],
            latency_batch=lat["batch"],
            kv_capacity=lat["kv_capacity"],
        )

    row = {k: v for k, v in acct.items() if k != "rows"}
    row.update(
        accuracy=float(res["accuracy"]),
        accuracy_per_type={k.split("/", 1)[1]: v for k, v in res.items()
                           if k.startswith("accuracy/")},
        eval_examples=int(res.get("examples", 0)),
        eval_time_s=eval_s,
        account_time_s=account_s,
    )
    if latency:
        row.update(timer())
        return row, None
    return row, timer


# -- outputs -----------------------------------------------------------------------------------


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points (no other point is at most as costly and more
    accurate, or cheaper and at least as accurate), in increasing cost."""
    pts = [(float(c), float(a), i) for i, (c, a) in enumerate(zip(costs, accuracies, strict=True))
           if math.isfinite(float(c)) and math.isfinite(float(a))]
    pts.sort(key=lambda p: (p[0], -p[1]))
    front, best = [], -math.inf
    for _c, a, i in pts:
        if a > best:
            front.append(i)
            best = a
    return front


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _stderr(row: Mapping[str, Any]) -> float:
    p, n = row.get("accuracy"), row.get("eval_examples", 0)
    if p is None or not n:
        return float("nan")
    return math.sqrt(p * (1 - p) / n)


def write_markdown(
    path: str,
    result: Mapping[str, Any],
    plots: tuple[str, str] = ("pareto_flops.png", "pareto_latency.png"),
) -> str:
    """The sweep table (and its context) as markdown; ``plots``: the two PNGs' paths relative
    to the markdown file (accuracy vs FLOPs, vs latency)."""
    meta = result["meta"]
    base = result.get("baseline") or {}
    lines = [
        f"# Visual-token compression sweep: {meta['dataset']}",
        "",
        f"- checkpoint: `{meta['checkpoint'] or 'none (random init: accuracy meaningless)'}`"
        + (f" (step {meta['step']})" if meta.get("step") is not None else ""),
        f"- model: {meta['model_summary']}",
        f"- visual tokens per image (uncompressed): {meta['num_visual_tokens']}",
        f"- eval: {meta['eval_examples']} `{meta['eval_split']}` examples, exact match by greedy "
        "generation",
        f"- latency: batch {meta['latency_batch']}, median of {meta['latency_repeats']} after "
        f"{meta['latency_warmup']} warm-up, jitted, on {meta['device']}; KV cache "
        + ("fitted per layer to the compressed prompt + 1 decode slot"
           if meta["kv_capacity"] == "fitted" else "of the uncompressed prompt + 1 in every layer"),
        f"- baseline accuracy: {_fmt(base.get('accuracy'), '.4f')} (binomial standard error "
        f"{_fmt(_stderr(base), '.4f')} on {base.get('eval_examples', 0)} examples: accuracy "
        "differences of a few points between rows are within noise)",
        f"- date: {meta['date']}, wall time {meta['wall_time_s']:.0f} s",
        "",
        "| method | budget | spec | tokens at input | layer-avg tokens | prefill GFLOPs | "
        "KV KiB | prefill ms | decode ms/token | accuracy | % of baseline | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        ok = r["status"] == "ok"
        lines.append(
            "| " + " | ".join([
                r["method"],
                r["budget_label"],
                f"`{r['spec']}`" if r.get("spec") else "-",
                _fmt(r.get("visual_tokens"), ".1f") if ok else "-",
                _fmt(r.get("layer_avg_visual_tokens"), ".1f") if ok else "-",
                _fmt(r.get("prefill_gflops"), ".4f") if ok else "-",
                _fmt(r["kv_bytes"] / 1024, ".1f") if ok else "-",
                _fmt(r.get("prefill_ms"), ".2f") if ok else "-",
                _fmt(r.get("decode_ms_per_token"), ".2f") if ok else "-",
                _fmt(r.get("accuracy"), ".4f") if ok else "-",
                _fmt(r.get("pct_baseline"), ".1f") if ok else "-",
                (r.get("note") or "").replace("|", "/"),
            ]) + " |"
        )
    models = meta.get("trained_models") or []
    if models:
        rec = meta.get("recipe") or {}
        lines += [
            "",
            "## Trained models",
            "",
            "Every model is trained from scratch with the same recipe ("
            + ", ".join(f"{k} {v}" for k, v in rec.items()) + "); only the compressor differs.",
            "",
            "| model | compressor (training spec) | state | steps | train s | s/step | "
            "final train loss | teacher-forced acc | note |",
            "|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for m in models:
            lines.append("| " + " | ".join([
                m["model"], f"`{m.get('spec') or 'none'}`", m.get("state", ""),
                str(m.get("steps") or "-"), _fmt(m.get("train_time_s"), ".0f"),
                _fmt(m.get("step_time_s"), ".4f"), _fmt(m.get("final_train_loss"), ".4f"),
                _fmt(m.get("tf_accuracy"), ".4f"), (m.get("note") or "").replace("|", "/"),
            ]) + " |")
    if meta.get("command"):
        lines += ["", f"Command: `{meta['command']}`"]
    lines += [
        "",
        "Columns: *tokens at input* = valid visual tokens spliced into the decoder; *layer-avg "
        "tokens* = mean over decoder layers of the visual tokens each layer processed (in-LLM "
        "methods drop tokens inside the decoder); *prefill GFLOPs* = analytic matrix-product "
        "FLOPs per example (ViT + projector + decoder with causal attention + LM head at the "
        "last token); *KV KiB* = KV-cache bytes of the prompt per example (checked against the "
        "real cache: `kv_match` in the JSON); latencies are wall-clock medians for one jitted "
        "prefill of the prompt batch and one decode step after it.",
        "",
        f"![accuracy vs prefill FLOPs]({plots[0]}) ![accuracy vs prefill latency]({plots[1]})",
        "",
    ]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return path


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str, x_key: str, x_label: str) -> str:
    """Accuracy vs ``x_key`` per method (lines over budgets), the baseline as a star and the
    Pareto front over all points dashed; PNG via matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r.get(x_key) is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = [m for m in dict.fromkeys(r["method"] for r in ok) if m != "baseline"]
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        pts = sorted((r[x_key], r["accuracy"]) for r in ok if r["method"] == m)
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=4, lw=1, color=cmap(i % 20), label=m)
    for r in ok:
        if r["method"] == "baseline":
            ax.plot([r[x_key]], [r["accuracy"]], marker="*", ms=14, color="k", ls="none",
                    label="baseline (all tokens)")
    front = pareto_front([r[x_key] for r in ok], [r["accuracy"] for r in ok])
    if front:
        ax.plot([ok[i][x_key] for i in front], [ok[i]["accuracy"] for i in front], ls="--",
                color="0.4", lw=1, drawstyle="steps-post", label="Pareto front")
    ax.set_xlabel(x_label)
    ax.set_ylabel("exact-match accuracy")
    ax.grid(alpha=0.3)
    if ok:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the sweep ---------------------------------------------------------------------------------


def _model_summary(mcfg: Any) -> str:
    lang, vis = mcfg.language, mcfg.vision
    if not hasattr(mcfg, "pixel_shuffle"):  # Qwen2-VL / Qwen2.5-VL / InternVL (hf_eval)
        return (
            f"{type(mcfg).__name__}: vision {type(vis).__name__} (width {vis.width}, depth "
            f"{vis.depth}) -> decoder width {lang.width}, depth {lang.depth}, heads "
            f"{lang.heads}/{lang.kv_heads} kv, mlp {lang.mlp_dim}, vocab {lang.vocab_size}, "
            f"{lang.dtype}"
        )
    return (
        f"ViT {vis.image_size[0]}px/patch {vis.patch_size} (width {vis.width}, depth "
        f"{vis.depth}, cls={vis.use_cls}) -> mlp2x_gelu (pixel shuffle {mcfg.pixel_shuffle}) -> "
        f"decoder width {lang.width}, depth {lang.depth}, heads {lang.heads}/{lang.kv_heads} kv, "
        f"mlp {lang.mlp_dim}, vocab {lang.vocab_size}, {lang.dtype}"
    )


@dataclasses.dataclass
class SweepContext:
    """What every row of a sweep shares: the components, the baseline model config, its
    parameters (pure dicts on the default device) and the evaluation batches."""

    config: Any
    comps: Any
    base_mcfg: Any
    n: int
    seed: int
    checkpoint: str
    step: int | None
    params: Any
    rest: Any
    batches: list
    count: int


def base_model_config(comps: Any) -> Any:
    """The (uncompressed) ``MLLMConfig`` of the components' model, checked for a sweep."""
    from flax import nnx

    mcfg = nnx.eval_shape(lambda: comps.model_fn(nnx.Rngs(0))).cfg
    if mcfg.vision is None:
        raise ValueError("config.model has no vision encoder: a compression sweep needs one")
    if mcfg.compressor is not None:
        raise ValueError(f"config.model.compressor={mcfg.compressor!r}: the baseline must "
                         "be uncompressed (None)")
    return mcfg


def prepare_sweep(
    config: Any, checkpoint: str | None, *, step: int | None = None, components: Any = None
) -> SweepContext:
    """Builds the components, restores the baseline (``checkpoint`` '' or None: random init,
    a smoke test) and reads the first ``sweep.eval_examples`` evaluation examples."""
    from efficient_mllm.train.loop import build_components
    from efficient_mllm.train.step import split_model

    if "sweep" not in config:
        raise ValueError("config has no 'sweep' block: use configs/compression_sweep.py without "
                         "the 'train' argument")
    sweep = config.sweep
    comps = components if components is not None else build_components(config)
    base_mcfg = base_model_config(comps)
    gh, gw = base_mcfg.grid
    seed = int(config.get("seed", 0))
    checkpoint = checkpoint or ""
    if checkpoint:
        params, rest = _restore(config, checkpoint, comps, base_mcfg, step)
    else:
        log.warning("no checkpoint: sweeping a randomly initialised model (accuracy meaningless)")
        _, params, rest = split_model(_init_model(base_mcfg, seed))
        params, rest = _to_device(params), _to_device(rest)
    n_eval = int(sweep.get("eval_examples", 0) or 0)
    batches = []
    count = 0
    for b in comps.eval_batches():
        batches.append(b)
        count += int(np.sum(b.get("valid", np.ones(len(b["tokens"]), bool))))
        if n_eval and count >= n_eval:
            break
    if not batches:
        raise ValueError(f"eval split {config.eval.get('split', 'validation')!r} has no examples")
    return SweepContext(config, comps, base_mcfg, gh * gw, seed, checkpoint, step, params, rest,
                        batches, count)


def device_summary() -> str:
    import jax

    dev = jax.devices()[0]
    return (f"{dev.platform} ({dev.device_kind}), jax {jax.__version__}, "
            f"{platform.machine()} {os.cpu_count()} cpus")


def run_job(ctx: SweepContext, job: Job, *, latency: bool = True) -> tuple[dict, Any]:
    """``(row, timer)`` of one job: the model is rebuilt with ``compressor=job.spec`` and the
    baseline's parameters (training-free) or its own checkpoint (learned: parameters from the
    checkpoint, inference state such as MQT's budget from the spec), put in eval mode
    (``model.eval()``) and measured. ``latency=False`` leaves the latency fields out and
    returns ``timer(warmup, repeats)`` to add them later (None when the row did not run). A
    failing method gives a row with ``status='error'`` instead of raising."""
    n = ctx.n
    row = {
        "method": job.label,
        "budget": job.frac,
        "budget_label": _frac_label(job.frac),
        "budget_tokens": None if job.frac is None else budget_fields(job.frac, n)["keep"],
        "spec": job.spec,
        "kind": job.kind,
        "note": job.note,
        "status": "skipped" if job.note else "ok",
    }
    if job.kind == "learned":
        row["train_spec"] = job.train_spec
        row["checkpoint"] = job.checkpoint
    if job.note:
        return row, None
    timer = None
    t0 = time.perf_counter()
    try:
        mcfg = ctx.base_mcfg.replace(compressor=job.spec)
        if job.kind == "learned":
            p, _ = _restore(ctx.config, job.checkpoint, ctx.comps, mcfg, None)
            model = _build(mcfg, p, None, ctx.seed, check=False)  # state from the spec
        else:
            model = _build(mcfg, ctx.params, ctx.rest, ctx.seed, check=True)
        model.eval()  # learned compressors: inference mode (MQT's fixed budget, no dropout)
        if job.kind != "baseline":
            row["stage"] = "in_llm" if model.in_llm_compressor is not None else "pre_llm"
        fields, timer = _measure(model, ctx.batches, ctx.config.sweep, ctx.comps,
                                 latency=latency)
        row.update(fields)
        row["frac_tokens_input"] = row["visual_tokens"] / n
        if job.frac is None:
            row["budget_label"] = f"fixed ({row['visual_tokens']:.0f})"
    except Exception as e:  # one failing method must not end the sweep
        log.warning("%s %s failed:\n%s", job.label, job.spec, traceback.format_exc())
        row["status"] = "error"
        row["note"] = f"error: {type(e).__name__}: {e}"[:300]
        timer = None
    row["wall_s"] = time.perf_counter() - t0
    return row, timer


def finish_sweep(
    config: Any,
    rows: list[dict],
    workdir: str,
    *,
    base_mcfg: Any,
    checkpoint: str,
    step: int | None,
    eval_examples: int,
    device: str,
    wall_time_s: float,
    extra_meta: Mapping[str, Any] | None = None,
    num_visual_tokens: int | None = None,
) -> dict[str, Any]:
    """Relative accuracy (against the baseline row), Pareto flags, the table, the JSON and the
    plots in ``workdir`` (and ``sweep.benchmark_out``). Returns the result with ``paths``.
    ``num_visual_tokens``: uncompressed visual tokens per example (default the grid's)."""
    from efficient_mllm.evaluate.efficiency import relative_accuracy

    sweep = config.sweep
    if num_visual_tokens is None:
        gh, gw = base_mcfg.grid
        num_visual_tokens = gh * gw
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    base_acc = base["accuracy"] if base and base.get("status") == "ok" else float("nan")
    for r in rows:
        if r["status"] == "ok":
            r["pct_baseline"] = relative_accuracy(r["accuracy"], base_acc)
    meta = {
        "dataset": config.data.name,
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
        "step": step,
        "num_visual_tokens": int(num_visual_tokens),
        "model": json.loads(json.dumps(base_mcfg.to_dict(), default=str)),
        "model_summary": _model_summary(base_mcfg),
        "eval_split": config.eval.get("split", "validation"),
        "eval_examples": eval_examples,
        "latency_batch": int(sweep.get("latency_batch", 1)),
        "latency_warmup": int(sweep.get("latency_warmup", 1)),
        "latency_repeats": int(sweep.get("latency_repeats", 5)),
        "kv_capacity": str(sweep.get("kv_capacity", "fitted")),
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "budgets": [float(b) for b in sweep.budgets],
        "wall_time_s": wall_time_s,
    }
    meta.update(extra_meta or {})
    ok_rows = [r for r in rows if r["status"] == "ok"]
    for key in ("prefill_gflops", "prefill_ms"):
        have = [r for r in ok_rows if r.get(key) is not None]  # latency may be missing
        front = pareto_front([r[key] for r in have], [r["accuracy"] for r in have])
        for r in ok_rows:
            r[f"pareto_{key}"] = False
        for i, r in enumerate(have):
            r[f"pareto_{key}"] = i in front
    result = {"meta": meta, "device": device, "baseline": base, "rows": rows}
    os.makedirs(workdir, exist_ok=True)
    paths = {
        "json": os.path.join(workdir, f"{OUTPUT_STEM}.json"),
        "markdown": os.path.join(workdir, f"{OUTPUT_STEM}.md"),
        "pareto_flops": os.path.join(workdir, "pareto_flops.png"),
        "pareto_latency": os.path.join(workdir, "pareto_latency.png"),
    }
    plot_pareto(rows, paths["pareto_flops"], "prefill_gflops", "prefill GFLOPs per example")
    plot_pareto(rows, paths["pareto_latency"], "prefill_ms",
                f"prefill latency, ms (batch {meta['latency_batch']})")
    write_markdown(paths["markdown"], result)
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2, default=_json_default)
    out = str(sweep.get("benchmark_out", "") or "")
    if out:
        paths.update(write_benchmark(out, result, paths["pareto_flops"], paths["pareto_latency"]))
    result["paths"] = paths
    return result


def run_sweep(
    config: Any,
    checkpoint: str | None,
    workdir: str,
    *,
    step: int | None = None,
    components: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the sweep described by ``config.sweep`` (one job after the other, on the first
    device) and writes the outputs to ``workdir``. Returns the result dict (as written to
    ``compression_sweep.json``) with ``paths``."""
    import jax

    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    ctx = prepare_sweep(config, checkpoint, step=step, components=components)
    jobs = plan_jobs(config.sweep, ctx.n)
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="sweep", unit="run", dynamic_ncols=True)
    try:
        for job in jobs:
            if bar is not None:
                bar.set_postfix_str(f"{job.label} @ {_frac_label(job.frac)}")
            row, _ = run_job(ctx, job)
            if not job.note:
                # Each model is a new graphdef: drop its compiled programs (prefill, decode,
                # generate) before the next, or host memory grows with every run.
                jax.clear_caches()
                gc.collect()
            rows.append(row)
            if bar is not None:
                bar.update(1)
                if row["status"] == "ok":
                    bar.write(f"{job.label:>14s} {row['budget_label']:>6s}: tokens "
                              f"{row['visual_tokens']:6.1f} (layer-avg "
                              f"{row['layer_avg_visual_tokens']:6.1f}), "
                              f"{row['prefill_gflops']:.4f} GFLOPs, acc {row['accuracy']:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return finish_sweep(config, rows, workdir, base_mcfg=ctx.base_mcfg, checkpoint=ctx.checkpoint,
                        step=step, eval_examples=ctx.count, device=device_summary(),
                        wall_time_s=time.perf_counter() - t_start)


def write_benchmark(out: str, result: Mapping[str, Any], flops_png: str, latency_png: str) -> dict:
    """``<out>.md``, ``<out>.json`` and the plots as ``<out>_pareto_flops.png`` /
    ``<out>_pareto_latency.png`` (e.g. ``out = "benchmarks/compression_sweep_shapes"``)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    pngs = (out + "_pareto_flops.png", out + "_pareto_latency.png")
    for src, dst in zip((flops_png, latency_png), pngs, strict=True):
        shutil.copyfile(src, dst)
    write_markdown(out + ".md", result, plots=tuple(os.path.basename(p) for p in pngs))
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2, default=_json_default)
    return {"benchmark_markdown": out + ".md", "benchmark_json": out + ".json",
            "benchmark_pngs": pngs}


def _init_model(mcfg: Any, seed: int):
    """A randomly initialised ``MLLM(mcfg)`` (the no-checkpoint smoke-test path)."""
    from flax import nnx

    from efficient_mllm.nn.mllm import MLLM

    return MLLM(mcfg, rngs=nnx.Rngs(seed))


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# -- command line ------------------------------------------------------------------------------


def main(argv):
    from absl import app, flags
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", cfg.name)
    res = run_sweep(cfg, _CHECKPOINT.value, workdir, step=_STEP.value)
    print(f"table: {res['paths']['markdown']}")
    base = res["baseline"] or {}
    print(f"baseline accuracy {base.get('accuracy', float('nan')):.4f}; "
          f"{sum(r['status'] == 'ok' for r in res['rows'])} runs, "
          f"{sum(r['status'] == 'skipped' for r in res['rows'])} skipped, "
          f"{sum(r['status'] == 'error' for r in res['rows'])} errors")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/compression_sweep.py[:args]",
                                              lock_config=True)
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                      "Baseline run directory ('' = random init, a smoke test).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<name>).")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.mark_flags_as_required(["config", "checkpoint"])
    app.run(main)
