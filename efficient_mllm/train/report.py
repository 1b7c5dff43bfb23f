"""``report.md``, PNG plots and device peak FLOPs (for model FLOPs utilisation)."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any
from collections.abc import Mapping, Sequence

__all__ = ["PEAK_FLOPS", "peak_flops", "plot_history", "write_report", "format_number", "headline"]

#: Dense bf16 peak FLOP/s per chip, matched as lower-case substrings of ``device.device_kind``
#: (first match wins, so the more specific names come first).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one chip, or ``None`` when unknown (CPUs)."""
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def headline(final: Mapping[str, Any]) -> str:
    """One line with the main validation numbers of a run."""
    parts = []
    for key, label in (("accuracy", "exact-match accuracy"), ("tf_accuracy", "teacher-forced accuracy"),
                       ("token_accuracy", "token accuracy"), ("perplexity", "answer perplexity")):
        if key in final:
            v = float(final[key])
            parts.append(f"{label} {100 * v:.1f}%" if "accuracy" in key else f"{label} {v:.3f}")
    return ", ".join(parts) if parts else "no evaluation metrics"


def format_number(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    x = float(x)
    if x != x:
        return "n/a"
    if abs(x) >= 1e5:
        return f"{x:.3e}"
    return f"{x:.{digits}g}"


def _series(history: Sequence[Mapping], key: str, split: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in history:
        if r.get("split") == split and isinstance(r.get(key), (int, float)):
            xs.append(r["step"])
            ys.append(float(r[key]))
    return xs, ys


def plot_history(history: Sequence[Mapping], out_dir: str | os.PathLike) -> list[str]:
    """``loss.png`` (train / validation loss) and ``accuracy.png`` (train token accuracy,
    validation accuracies) from metric records. Returns the written file names."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    panels = {
        "loss.png": ("loss", [("loss", "train", "train loss"), ("loss", "eval", "validation loss"),
                              ("nll", "eval", "validation answer NLL")]),
        "accuracy.png": ("accuracy", [("accuracy", "train", "train token accuracy"),
                                      ("token_accuracy", "eval", "validation token accuracy"),
                                      ("tf_accuracy", "eval", "validation answer acc. (teacher-forced)"),
                                      ("accuracy", "eval", "validation exact match")]),
    }
    for fname, (ylabel, lines) in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = 0
        for key, split, label in lines:
            xs, ys = _series(history, key, split)
            if xs:
                ax.plot(xs, ys, marker="o" if split == "eval" else None, ms=3, label=label)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ylabel == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def write_report(
    path: str | os.PathLike,
    *,
    name: str,
    config: Mapping[str, Any],
    final: Mapping[str, Any],
    perf: Mapping[str, Any],
    plots: Sequence[str] = (),
    question_types: Sequence[str] | None = None,
    predictions: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Writes a Markdown summary of a run and returns its text."""
    lines = [f"# Run `{name}`", ""]
    lines.append(f"Written {datetime.datetime.now().isoformat(timespec='seconds')}.")
    lines.append("")
    headline = [k for k in ("accuracy", "tf_accuracy", "token_accuracy", "perplexity", "nll") if k in final]
    if headline:
        lines += ["## Final validation metrics", "", "| metric | value |", "|---|---|"]
        for k in headline:
            lines.append(f"| {k} | {format_number(final[k])} |")
        if "examples" in final:
            lines.append(f"| examples | {int(final['examples'])} |")
        lines.append("")
    types = []
    if question_types is not None:
        types = [t for t in question_types if f"count/{t}" in final or f"accuracy/{t}" in final
                 or f"tf_accuracy/{t}" in final]
    else:
        types = sorted({k.split("/", 1)[1] for k in final if "/" in k and k.split("/")[0] in
                        ("accuracy", "tf_accuracy")})
    if types:
        lines += ["## Per question type", "",
                  "| type | examples | exact match | teacher-forced |", "|---|---|---|---|"]
        for t in types:
            lines.append(
                f"| {t} | {format_number(final.get(f'count/{t}'))} | "
                f"{format_number(final.get(f'accuracy/{t}'))} | "
                f"{format_number(final.get(f'tf_accuracy/{t}'))} |"
            )
        lines.append("")
    lines += ["## Training and throughput", "", "| quantity | value |", "|---|---|"]
    for k, label in (
        ("steps", "steps"),
        ("final_train_loss", "final train loss"),
        ("train_time_s", "train wall time (s)"),
        ("train_cpu_time_s", "train CPU time of this process, all threads (s)"),
        ("eval_time_s", "final evaluation wall time (s)"),
        ("tokens_per_s", "throughput (text tokens/s, after compilation)"),
        ("examples_per_s", "throughput (examples/s)"),
        ("step_time_s", "mean step time (s)"),
        ("flops_per_step", "model FLOPs per step (matrix products, forward + backward)"),
        ("mfu", "model FLOPs utilisation (vs bf16 dense peak)"),
        ("devices", "devices"),
        ("device_kind", "device kind"),
        ("mesh", "mesh"),
        ("processes", "processes"),
        ("num_params", "parameters"),
    ):
        if k in perf:
            v = perf[k]
            if k == "mfu" and isinstance(v, float):
                v = f"{100 * v:.2f}%"
            lines.append(f"| {label} | {format_number(v) if not isinstance(v, str) else v} |")
    lines.append("")
    if plots:
        lines += ["## Curves", ""]
        for p in plots:
            lines.append(f"![{os.path.splitext(p)[0]}]({p})")
        lines.append("")
    if predictions:
        lines += ["## Sample predictions", "", "| type | reference | prediction | ok |", "|---|---|---|---|"]
        for p in predictions[:16]:
            t = p.get("question_type")
            tname = question_types[t] if question_types is not None and isinstance(t, int) and 0 <= t < len(question_types) else t
            lines.append(f"| {tname} | {p.get('reference')} | {p.get('prediction')} | "
                         f"{'yes' if p.get('correct') else 'no'} |")
        lines.append("")
    lines += ["## Config", "", "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return text
