"""experiments.mqar_study: the on-device MQAR sampler against the repo's generator, state
sizes, config checks, and a tiny end-to-end study (outputs' schema, accuracies, loss)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from efficient_mllm import registry
from efficient_mllm.data.mqar import MQARConfig, generate_example
from efficient_mllm.nn.language import LanguageConfig
from experiments import mqar_study as ms

V, T = 40, 48


def _check_rows(tokens, qpos, n, vocab):
    """Structure every MQAR row must have (as written in efficient_mllm/data/mqar.py)."""
    k = (vocab - 2) // 2
    for row, qp in zip(tokens, qpos):
        keys, values = row[0 : 2 * n : 2], row[1 : 2 * n : 2]
        assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
        assert ((keys >= 2) & (keys < 2 + k)).all() and ((values >= 2 + k) & (values < vocab)).all()
        assert (np.diff(qp) > 0).all() and qp[0] >= 2 * n and qp[-1] + 1 < len(row)
        assert ((qp - 2 * n) % 2 == 0).all()
        lookup = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(row[qp].tolist()) == sorted(keys.tolist())  # every key queried once
        assert [lookup[a] for a in row[qp].tolist()] == row[qp + 1].tolist()
        assert ((row >= 1) & (row < vocab)).all()


@pytest.mark.parametrize("n,random_non_queries", [(1, True), (5, True), (6, False)])
def test_sample_batch_structure(n, random_non_queries):
    tokens, qpos = jax.jit(
        lambda key: ms.sample_batch(key, 7, T, n, V, random_non_queries=random_non_queries)
    )(jax.random.key(n))
    tokens, qpos = np.asarray(tokens), np.asarray(qpos)
    assert tokens.shape == (7, T) and qpos.shape == (7, n)
    assert tokens.dtype == np.int32 and qpos.dtype == np.int32
    _check_rows(tokens, qpos, n, V)
    if not random_non_queries:
        rest = np.ones(T, bool)
        rest[: 2 * n] = False
        for row, qp in zip(tokens, qpos):
            mask = rest.copy()
            mask[qp], mask[qp + 1] = False, False
            assert (row[mask] == 1).all()


def test_sample_batch_matches_generate_example_distribution():
    """Query-slot frequencies (the power-law gaps) and key/value frequencies of the device
    sampler agree with the repo's numpy generator within sampling noise."""
    n, rows, power_a = 4, 1500, 0.3
    cfg = MQARConfig(vocab_size=V, seq_len=T, num_kv_pairs=n, power_a=power_a,
                     num_train=rows, num_validation=0, num_test=0)
    ref_tok, ref_q = ms.eval_arrays(cfg, "train", rows)
    _check_rows(ref_tok[:20], ref_q[:20], n, V)
    tok, q = ms.sample_batch(jax.random.key(0), rows, T, n, V, power_a=power_a)
    tok, q = np.asarray(tok), np.asarray(q)
    slots = (T - 2 * n) // 2
    f_ref = np.bincount(((ref_q - 2 * n) // 2).ravel(), minlength=slots) / ref_q.size
    f_dev = np.bincount(((q - 2 * n) // 2).ravel(), minlength=slots) / q.size
    assert 0.5 * np.abs(f_ref - f_dev).sum() < 0.05  # total variation; noise is about 0.02
    # the law is not uniform: early slots are favoured, in both
    assert f_ref[0] > 2 * f_ref[-1] and f_dev[0] > 2 * f_dev[-1]
    k_ref = np.bincount(ref_tok[:, 0 : 2 * n : 2].ravel(), minlength=V) / (rows * n)
    k_dev = np.bincount(tok[:, 0 : 2 * n : 2].ravel(), minlength=V) / (rows * n)
    assert 0.5 * np.abs(k_ref - k_dev).sum() < 0.08


def test_eval_arrays_match_generator():
    cfg = MQARConfig(vocab_size=V, seq_len=T, num_kv_pairs=3, num_validation=4, num_test=0)
    tok, qpos = ms.eval_arrays(cfg, "validation", 4)
    for i in range(4):
        ex = generate_example(cfg, "validation", i)
        np.testing.assert_array_equal(tok[i], ex["tokens"])
        assert " ".join(map(str, tok[i, qpos[i] + 1])) == ex["answer"]


@pytest.mark.parametrize("dim,head_dim,kv_heads,t", [(32, 8, None, 24), (48, 16, 1, 37)])
def test_state_floats_softmax(dim, head_dim, kv_heads, t):
    from flax import nnx

    from efficient_mllm.nn.language import LanguageModel

    cfg = LanguageConfig(vocab_size=V, width=dim, depth=3, heads=dim // head_dim,
                         kv_heads=kv_heads, mlp_dim=16, attention="softmax")
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    kvh = cfg.kv_heads
    assert ms.state_floats(model, t) == [2 * t * kvh * head_dim] * 3


def test_study_config_checks():
    with pytest.raises(ValueError, match="variants"):
        ms.StudyConfig(variants=("nope",))
    with pytest.raises(ValueError, match="vocab_size"):
        ms.StudyConfig(vocab_size=33, pairs=(8, 16))
    with pytest.raises(ValueError, match="warmup_steps"):
        ms.StudyConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="seq_lens"):
        ms.StudyConfig(seq_lens=(16, 256), pairs=(8, 16))
    with pytest.raises(ValueError, match="dims"):
        ms.StudyConfig(dims=(64, 64))
    with pytest.raises(ValueError, match="chunk"):
        ms.StudyConfig(budget_s=10.0, chunk=200, warmup_steps=100)
    with pytest.raises(ValueError, match="batch=2 rows"):  # 4096 // 2048 rows for 4 pairs values
        ms.StudyConfig(seq_lens=(2048,), batch_tokens=4096)
    c = ms.StudyConfig(seq_lens=(100, 256), pairs=(8, 16, 32))
    assert c.pairs_for(100) == (8, 16) and c.rows_for(256) == 4096 // 256


@pytest.mark.parametrize("fill", [1, "random"])
def test_hide_answers(fill):
    """Against a numpy loop: answers become labels, their input slots hold the fill, padded
    query slots (weight 0) change nothing."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, V, size=(3, T)).astype(np.int32)
    qpos = np.array([[8, 20, 30], [10, 12, 0], [40, 0, 0]], np.int32)
    weight = (np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]]) > 0).astype(np.float32)
    fills = rng.integers(2, V, size=qpos.shape).astype(np.int32) if fill == "random" else fill
    inputs, targets = ms.hide_answers(tokens, qpos, weight, fills)
    want_in, want_t = tokens.copy(), np.zeros(qpos.shape, np.int32)
    for b in range(3):
        for j in range(3):
            want_t[b, j] = tokens[b, qpos[b, j] + 1]
            if weight[b, j]:
                want_in[b, qpos[b, j] + 1] = fills if fill == 1 else fills[b, j]
    np.testing.assert_array_equal(np.asarray(inputs), want_in)
    np.testing.assert_array_equal(np.asarray(targets), want_t)
    assert np.asarray(inputs)[1, 1] == tokens[1, 1]  # the padded slot (qpos 0) left alone


@pytest.mark.parametrize("k,t", [(3, 7), (1, 5), (4, 2)])
def test_input_stage(k, t):
    """Causal depthwise conv + positions against a float64 loop; t < k covers taps that reach
    before the sequence start."""
    rng = np.random.default_rng(k)
    emb = rng.normal(size=(2, t, 5)).astype(np.float32)
    conv = rng.normal(size=(k, 5)).astype(np.float32)
    pos = rng.normal(size=(9, 5)).astype(np.float32)
    want = np.zeros((2, t, 5))
    for s in range(t):
        for j in range(k):
            if s - j >= 0:
                want[:, s] += conv[j].astype(np.float64) * emb[:, s - j]
        want[:, s] += pos[s]
    got = np.asarray(ms.input_stage(jax.numpy.asarray(emb), conv, pos))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ms.input_stage(emb, None, None)), emb)


def test_with_impl():
    assert ms.with_impl("softmax", "xla") == "softmax(impl='xla')"
    assert ms.with_impl("based(feature_dim=16)", "xla") == "based(feature_dim=16, impl='xla')"
    assert ms.with_impl("softmax(impl='cudnn')", "xla") == "softmax(impl='cudnn')"
    assert ms.with_impl("lightning", None) == "lightning"


def test_mixture_rows():
    assert ms.mixture_rows(64, 5) == [13, 13, 13, 13, 12]
    assert ms.mixture_rows(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="batch=3"):
        ms.mixture_rows(3, 4)


def test_lr_factor():
    f = lambda s, total: float(ms.lr_factor(s, total, 10, 0.1))  # noqa: E731
    assert f(0, 100) == pytest.approx(0.1) and f(9, 100) == pytest.approx(1.0)
    assert f(10, 100) == pytest.approx(1.0) and f(100, 100) == pytest.approx(0.1)
    assert f(55, 100) == pytest.approx(0.55)  # cosine midpoint: 0.1 + 0.9 / 2
    assert f(5, 100) == f(5, 3000)  # the warm-up does not depend on the step count


def _smoke_variants():
    """softmax, plus one linear variant and one hybrid once they are registered."""
    names = set(registry.ATTENTION.names())
    out = ["softmax"]
    if "linear" in names:
        out.append("linear")
        if "layer_attention" in {f.name for f in dataclasses.fields(LanguageConfig)}:
            out.append("linear+softmax")
    return tuple(out)


def test_study_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(ms.VARIANTS, "missing", ("no_such_attention(x=1)",))
    variants = _smoke_variants() + ("missing",)
    study = ms.StudyConfig(**{**ms.PRESETS["smoke"], "variants": variants, "steps": 40})
    prefix = str(tmp_path / "mqar")
    result = ms.run_study(study, prefix)

    for ext in ("json", "md", "png"):
        assert os.path.getsize(f"{prefix}.{ext}") > 0
    with open(f"{prefix}.json") as f:
        saved = json.load(f)
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    assert {"device", "versions", "config", "schedule", "runs", "wall_s"} <= set(saved)
    assert saved["config"]["variants"] == list(variants) and saved["schedule"]["steps"] == 40
    md = open(f"{prefix}.md").read()
    assert "| variant | dim | seq len | state |" in md and "no_such_attention" in md

    runs = saved["runs"]
    # T=16 fits 2 and 4 pairs (4 * pairs <= T), T=24 too; one record per variant and cell
    cells = {(16, 2), (16, 4), (24, 2), (24, 4)}
    assert sorted((r["variant"], r["seq_len"], r["num_kv_pairs"]) for r in runs) == sorted(
        (v, t, p) for v in variants for t, p in cells)
    (missing,) = {r["reason"] for r in runs if r["variant"] == "missing"}
    assert "not registered" in missing
    ok = [r for r in runs if r["status"] == "ok"]
    assert {r["variant"] for r in ok} == set(variants) - {"missing"}
    for r in ok:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
        assert r["best_lr"] in study.lrs and r["steps"] == 40 and r["train_time_s"] > 0
        assert r["train_examples"] == 40 * (24 + 16)
        assert len(r["lr_results"]) == len(study.lrs) and len(r["layer_specs"]) == study.depth
        assert r["state_floats"] == sum(r["state_floats_per_layer"]) > 0
        for lr in r["lr_results"]:  # from ln(#values) ~ ln(15): training lowers the loss
            assert len(lr["loss_curve"]) == 2
            assert lr["loss_curve"][-1] < lr["loss_curve"][0] - 0.1, lr
    # softmax: 2 layers x KV cache 2 * T * kv_heads * head_dim, kv_heads * head_dim = width 16
    assert all(r["state_floats"] == 2 * 2 * r["seq_len"] * 16
               for r in ok if r["variant"] == "softmax")


def test_study_budget_skips():
    study = ms.StudyConfig(**{**ms.PRESETS["smoke"], "budget_s": 1e-3, "reserve_s": 0.0})
    result = ms.run_study(study, None)
    assert result["runs"] and all(r["status"] == "skipped" for r in result["runs"])
    assert all(r["reason"].startswith("budget") for r in result["runs"])


def test_choose_chunks():
    g = [ms.Group("softmax", 8, ((16, 2),)) for _ in range(3)]
    for x, c in zip(g, (1.0, 2.0, 7.0)):
        x.chunk_s, x.eval_s = c, 0.5
    base = {**ms.PRESETS["smoke"], "chunk": 10, "warmup_steps": 10, "reserve_s": 5.0}
    base.pop("steps")
    base.pop("min_steps")
    # no budget: exactly ceil(steps / chunk) chunks, every group
    assert ms.choose_chunks(ms.StudyConfig(**base, steps=95, min_steps=20), g, 0.0) == (10, 3)
    # 100 s left, 1.5 s of it evaluating: 1 + floor(0.95 * 98.5 / 10) = 10 chunks
    study = ms.StudyConfig(**base, steps=1000, budget_s=105.0, min_steps=50)
    assert ms.choose_chunks(study, g, 0.0) == (10, 3)
    assert ms.choose_chunks(study, g, 50.0) == (5, 3)  # 1 + floor(0.95 * 48.5 / 10)
    # capped by steps
    assert ms.choose_chunks(ms.StudyConfig(**base, steps=40, budget_s=105.0, min_steps=20),
                            g, 0.0) == (4, 3)
    # 100 steps would be under min_steps=200: drop the last group, 1 + floor(0.95 * 99 / 3)
    study = ms.StudyConfig(**base, steps=1000, budget_s=105.0, min_steps=200)
    assert ms.choose_chunks(study, g, 0.0) == (32, 2)
