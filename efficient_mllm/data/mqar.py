"""``mqar``: multi-query associative recall (Zoology / Based, Arora et al. 2023), text only.

A row of ``seq_len`` token ids: ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``, then a
query section where ``num_queries`` of the keys reappear, each followed by its value. Query slots
(even offsets of the query section) are drawn without replacement with probability proportional
to ``(j + 1) ** (power_a - 1)``, so short gaps are more likely, as in Zoology. The remaining query
section positions hold random tokens (``random_non_queries=True``) or the filler id 1.

Vocabulary: 0 = pad, 1 = filler, keys ``[2, 2 + K)``, values ``[2 + K, vocab_size)`` with
``K = (vocab_size - 2) // 2``. Keys and values of a row are distinct. The targets (loss positions)
are the value tokens right after each query key; the model predicts token ``t`` from ``< t``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from efficient_mllm.data import common

__all__ = ["FILLER_ID", "PAD_ID", "QUESTION_TYPES", "MQARConfig", "generate_example"]

QUESTION_TYPES = ("recall",)
PAD_ID, FILLER_ID = 0, 1


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """Knobs of ``mqar``; ``num_queries=None`` queries every key."""

    vocab_size: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 8
    num_queries: int | None = None
    power_a: float = 0.01
    random_non_queries: bool = True
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 200
    seed: int = 0

    def __post_init__(self):
        common.check_int("vocab_size", self.vocab_size, 6, 2**31 - 1)
        common.check_int("seq_len", self.seq_len, 4, 2**20)
        common.check_int("num_kv_pairs", self.num_kv_pairs, 1)
        if self.num_queries is None:
            object.__setattr__(self, "num_queries", self.num_kv_pairs)
        common.check_int("num_queries", self.num_queries, 1, self.num_kv_pairs)
        common.check_float("power_a", self.power_a, 1e-6, 1.0)
        if not isinstance(self.random_non_queries, bool):
            raise ValueError(f"random_non_queries must be a bool, got {self.random_non_queries!r}")
        for name in ("num_train", "num_validation", "num_test"):
            common.check_int(name, getattr(self, name), 0, 10**8)
        common.check_int("seed", self.seed, 0, 2**32 - 1)
        if (
            self.num_kv_pairs > self.num_keys
            or self.num_kv_pairs > self.vocab_size - 2 - self.num_keys
        ):
            raise ValueError(
                f"num_kv_pairs: {self.num_kv_pairs} exceeds the {self.num_keys} distinct "
                f"keys that vocab_size={self.vocab_size} allows; expected <= {self.num_keys}"
            )
        slots = (self.seq_len - 2 * self.num_kv_pairs) // 2
        if self.num_queries > slots:
            raise ValueError(
                f"seq_len: {self.seq_len} leaves {max(slots, 0)} query slots after "
                f"{self.num_kv_pairs} pairs; expected seq_len >= "
                f"{2 * (self.num_kv_pairs + self.num_queries)}"
            )

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - 2) // 2

    def num_examples(self, split: str) -> int:
        return getattr(
            self, {"train": "num_train", "validation": "num_validation", "test": "num_test"}[split]
        )


def generate_example(cfg: MQARConfig, split: str, index: int) -> dict[str, Any]:
    """Record ``index`` of ``split``: ``tokens`` int32 ``[seq_len]``, ``targets`` uint8
    ``[seq_len]``, ``answer`` (the queried values, space-separated), ``question_type`` 0 and
    ``scene`` (keys, values, query positions)."""
    common.check_int("index", index, 0)
    rng = common.example_rng(cfg.seed, split, index)
    n, q, K = cfg.num_kv_pairs, cfg.num_queries, cfg.num_keys
    keys = 2 + rng.choice(K, size=n, replace=False)
    values = 2 + K + rng.choice(cfg.vocab_size - 2 - K, size=n, replace=False)
    start = 2 * n
    slots = (cfg.seq_len - start) // 2
    p = (np.arange(1, slots + 1, dtype=np.float64)) ** (cfg.power_a - 1.0)
    chosen = np.sort(rng.choice(slots, size=q, replace=False, p=p / p.sum()))
    which = rng.choice(n, size=q, replace=False)
    if cfg.random_non_queries:
        tokens = rng.integers(2, cfg.vocab_size, size=cfg.seq_len).astype(np.int32)
    else:
        tokens = np.full(cfg.seq_len, FILLER_ID, np.int32)
    tokens[0:start:2], tokens[1:start:2] = keys, values
    qpos = start + 2 * chosen
    tokens[qpos], tokens[qpos + 1] = keys[which], values[which]
    targets = np.zeros(cfg.seq_len, np.uint8)
    targets[qpos + 1] = 1
    return {
        "tokens": tokens,
        "targets": targets,
        "answer": " ".join(str(int(v)) for v in values[which]),
        "question_type": 0,
        "scene": {
            "keys": keys.tolist(),
            "values": values.tolist(),
            "query_positions": qpos.tolist(),
        },
    }
