"""Writers for ``experiments.mqar_study``: the JSON record, the markdown table and the
accuracy-vs-recurrent-state plot (Zoology Fig. 2 / BASED Fig. 1 style)."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from typing import Any

log = logging.getLogger("mqar_study")

__all__ = ["markdown", "plot", "write_outputs"]

_MARKERS = "osD^vP*Xh<>p"


def _fmt_state(x: int | None) -> str:
    if x is None:
        return "?"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return str(x)


def _table(runs: list[dict], pairs: list[int], with_seq: bool) -> list[str]:
    """Rows (variant, dim[, seq len]): state, accuracy % per pairs value, training seconds."""
    head = "| variant | dim |" + (" seq len |" if with_seq else "") + " state | "
    lines = [head + " | ".join(f"{p} pairs" for p in pairs) + " | train s |",
             "|---|---:|" + ("---:|" if with_seq else "") + "---:|" + "---:|" * len(pairs)
             + "---:|"]
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in runs:
        cells[(r["variant"], r["dim"], r["seq_len"])][r["num_kv_pairs"]] = r
    for (variant, dim, t), by_pairs in cells.items():
        accs = []
        for p in pairs:
            r = by_pairs.get(p)
            accs.append("" if r is None else f"{100 * r['accuracy']:.1f}" if r["status"] == "ok"
                        else r["status"])
        any_run = next(iter(by_pairs.values()))
        times = [r["train_time_s"] for r in by_pairs.values() if r["status"] == "ok"]
        lines.append(f"| {variant} | {dim} |" + (f" {t} |" if with_seq else "")
                     + f" {_fmt_state(any_run['state_floats'])} | " + " | ".join(accs)
                     + f" | {times[0] if times else ''} |")
    return lines


def markdown(result: dict) -> str:
    """A header (device, versions, recipe), a summary table at the main seq len (256, else the
    longest: one row per (variant, dim)) and the full table (one row per (variant, dim, seq
    len)): recurrent state floats (sum over layers) and test accuracy per ``num_kv_pairs``."""
    cfg = result["config"]
    runs = result["runs"]
    pairs = sorted({r["num_kv_pairs"] for r in runs})
    seqs = sorted({r["seq_len"] for r in runs})
    main_t = 256 if 256 in seqs else max(seqs, default=0)
    sched = result.get("schedule", {})
    rows_per_step = sched.get("rows_per_step", {})
    lines = [
        "# MQAR: recall accuracy vs recurrent state size",
        "",
        f"Device: {result['device']}; jax {result['versions']['jax']}, flax "
        f"{result['versions']['flax']}; wall time {result['wall_s']} s.",
        f"Recipe: {cfg['depth']}-layer decoders (short conv {cfg.get('short_conv', 0)} + learned "
        f"positions + RoPE), vocab {cfg['vocab_size']}; one model per (variant, dim) trained on "
        f"every (seq len, pairs) cell at once for {sched.get('steps', '?')} steps, each with "
        + (", ".join(f"{n} rows of length {t}" for t, n in rows_per_step.items()) or "?")
        + f" (fresh examples); AdamW, lr {' / '.join(map(str, cfg['lrs']))}, warm-up "
        f"{cfg['warmup_steps']} + cosine. Accuracy (%) = query values recalled on "
        f"{cfg['num_eval']} held-out rows per cell"
        + (" (best lr on as many validation rows)." if len(cfg["lrs"]) > 1 else "."),
        "State = recurrent floats per sequence, summed over layers (softmax: its KV cache).",
        "",
        f"## Sequence length {main_t}",
        "",
        *_table([r for r in runs if r["seq_len"] == main_t], pairs, with_seq=False),
        "",
        "## All cells",
        "",
        *_table(runs, pairs, with_seq=True),
    ]
    skipped = sorted({(r["variant"], r["dim"], r.get("reason", "")) for r in runs
                      if r["status"] != "ok"})
    if skipped:
        lines += ["", "Not run:"] + [f"- {v} (dim {d}): {why}" for v, d, why in skipped]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Accuracy (test, best lr) vs recurrent state floats (log x): one row per seq len, one
    column per ``num_kv_pairs``, one colour and marker per variant, points of one variant
    (different dims) joined in state order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["runs"] if r["status"] == "ok" and r["state_floats"]]
    if not ok:
        return
    seqs = sorted({r["seq_len"] for r in ok})
    pairs = sorted({r["num_kv_pairs"] for r in ok})
    variants = list(dict.fromkeys(r["variant"] for r in result["runs"]))
    cmap = plt.get_cmap("tab20" if len(variants) > 10 else "tab10")
    style = {v: (cmap(i % cmap.N), _MARKERS[i % len(_MARKERS)]) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(len(seqs), len(pairs), figsize=(3.4 * len(pairs), 2.9 * len(seqs)),
                             squeeze=False, sharex=True, sharey=True)
    for i, t in enumerate(seqs):
        for j, p in enumerate(pairs):
            ax = axes[i][j]
            if not any(r["seq_len"] == t and r["num_kv_pairs"] == p for r in ok):
                ax.set_visible(False)  # this many pairs does not fit this length
                continue
            for v in variants:
                pts = sorted((r["state_floats"], r["accuracy"]) for r in ok
                             if r["variant"] == v and r["seq_len"] == t and r["num_kv_pairs"] == p)
                if pts:
                    c, m = style[v]
                    ax.plot(*zip(*pts), marker=m, color=c, label=v, lw=1, ms=5)
            ax.set_xscale("log")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.set_title(f"T={t}, {p} kv pairs", fontsize=9)
            if i == len(seqs) - 1:
                ax.set_xlabel("recurrent state (floats)")
            if j == 0:
                ax.set_ylabel("MQAR accuracy")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(handles) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], prefix: str) -> None:
    """``prefix.json``, ``prefix.md`` and (when matplotlib is there) ``prefix.png``."""
    d = os.path.dirname(prefix)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = f"{prefix}.json.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, f"{prefix}.json")
    with open(f"{prefix}.md", "w") as f:
        f.write(markdown(result))
    try:
        plot(result, f"{prefix}.png")
    except ImportError as e:  # pragma: no cover - matplotlib missing
        log.warning("no plot: %s", e)
