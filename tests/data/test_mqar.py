"""mqar: every query's target is the value paired with that key earlier."""

import numpy as np
import pytest

from efficient_mllm.data import MQARConfig, mqar


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_values_retrievable(random_non_queries):
    cfg = MQARConfig(
        vocab_size=128,
        seq_len=96,
        num_kv_pairs=12,
        num_queries=9,
        random_non_queries=random_non_queries,
    )
    n_pairs = cfg.num_kv_pairs
    for i in range(50):
        ex = mqar.generate_example(cfg, "train", i)
        tok, tgt = ex["tokens"], ex["targets"]
        assert tok.shape == tgt.shape == (96,) and tok.dtype == np.int32
        assert tok.min() >= 1 and tok.max() < cfg.vocab_size
        keys, values = tok[0 : 2 * n_pairs : 2], tok[1 : 2 * n_pairs : 2]
        assert len(set(keys.tolist())) == n_pairs and len(set(values.tolist())) == n_pairs
        half = 2 + (cfg.vocab_size - 2) // 2
        assert keys.min() >= 2 and keys.max() < half and values.min() >= half
        kv = dict(zip(keys.tolist(), values.tolist()))
        pos = np.flatnonzero(tgt)
        assert len(pos) == 9 and pos.min() > 2 * n_pairs
        answers = []
        for p in pos:
            assert tok[p - 1] in kv, "a target follows a key"
            assert tok[p] == kv[int(tok[p - 1])], "the target is the value paired with the key"
            answers.append(str(tok[p]))
        assert ex["answer"] == " ".join(answers)
        queried = [int(tok[p - 1]) for p in pos]
        assert len(set(queried)) == len(queried)
        if not random_non_queries:
            rest = np.ones(96, bool)
            rest[: 2 * n_pairs] = False
            rest[pos] = rest[pos - 1] = False
            assert (tok[rest] == mqar.FILLER_ID).all()


def test_short_gaps_more_likely():
    cfg = MQARConfig(vocab_size=512, seq_len=256, num_kv_pairs=4, num_queries=1, power_a=0.01)
    offsets = [
        int(np.flatnonzero(mqar.generate_example(cfg, "train", i)["targets"])[0]) - 9
        for i in range(300)
    ]
    assert np.mean(np.array(offsets) < 60) > 0.5  # uniform over 124 slots would give ~0.24


def test_determinism_and_split_streams():
    cfg = MQARConfig()
    a = mqar.generate_example(cfg, "train", 3)["tokens"]
    assert np.array_equal(a, mqar.generate_example(cfg, "train", 3)["tokens"])
    assert not np.array_equal(a, mqar.generate_example(cfg, "test", 3)["tokens"])
    assert not np.array_equal(a, mqar.generate_example(MQARConfig(seed=1), "train", 3)["tokens"])


@pytest.mark.parametrize(
    "knobs, arg",
    [
        (dict(vocab_size=20, num_kv_pairs=12), "num_kv_pairs"),
        (dict(seq_len=20, num_kv_pairs=8), "seq_len"),
        (dict(num_queries=9, num_kv_pairs=8), "num_queries"),
        (dict(random_non_queries=1), "random_non_queries"),
    ],
)
def test_bad_knobs_raise(knobs, arg):
    with pytest.raises(ValueError, match=arg):
        MQARConfig(**knobs)
