"""Run outputs: ``metrics.jsonl`` (one JSON object per line), optional TensorBoard events.

Only the writer of process 0 touches files (``enabled=False`` elsewhere). TensorBoard events are
written when a writer package (``tensorboardX``, or ``torch.utils.tensorboard`` with
``tensorboard``) is importable, and skipped quietly otherwise.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any
from collections.abc import Mapping

__all__ = ["MetricsWriter", "read_metrics", "to_float"]


def to_float(v: Any) -> float | None:
    """A Python float for scalars (``None`` for non-scalars)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` (empty list if missing)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _tensorboard_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter  # type: ignore
    except Exception:
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore
        except Exception:
            return None
    try:
        return SummaryWriter(logdir)
    except Exception:
        return None


class MetricsWriter:
    """Appends ``{"step", "split", **metrics}`` records; keeps them in ``history``.

    ``resume_step``: records of an earlier run with ``step > resume_step`` are dropped (they are
    about to be recomputed after resuming from that checkpoint).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, "metrics.jsonl")
        self.enabled = enabled
        self.history: list[dict] = []
        self._tb = None
        if not enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        old = read_metrics(self.path)
        if resume_step is None:
            old = []
        else:
            old = [r for r in old if r.get("step", 0) <= resume_step]
        self.history = old
        with open(self.path, "w") as f:
            for r in old:
                f.write(json.dumps(r) + "\n")
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(self.workdir, "tensorboard"))

    @property
    def has_tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
        rec: dict[str, Any] = {"step": int(step), "split": split}
        for k, v in metrics.items():
            f = to_float(v)
            if f is not None:
                rec[k] = f if math.isfinite(f) else str(f)
        if not self.enabled:
            return rec
        self.history.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "split") and isinstance(v, float):
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))
            self._tb.flush()
        return rec

    def series(self, key: str, split: str = "train") -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key`` in ``split`` records."""
        xs, ys = [], []
        for r in self.history:
            if r.get("split") == split and isinstance(r.get(key), float):
                xs.append(r["step"])
                ys.append(r[key])
        return xs, ys

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
