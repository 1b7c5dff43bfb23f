"""Save, kill, resume: the resumed run continues the same loss trajectory (parameters, optimizer
state and data-iterator state restored); restoring onto a different mesh reshards."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import standin
from efficient_mllm.train.checkpoint import Checkpointer
from efficient_mllm.train.loop import Trainer, train_and_evaluate


def _losses(records):
    return {r["step"]: r["loss"] for r in records}


def test_resume_continues_the_same_trajectory(tmp_path):
    cfg = standin.standin_config(**{"train.steps": 8, "checkpoint.every": 3})
    full = Trainer(cfg, tmp_path / "full", components=standin.standin_components())
    want = _losses(full.run())

    # interrupted run: last checkpoint at step 3, then the process "dies" at step 5
    a = Trainer(cfg, tmp_path / "cut", components=standin.standin_components())
    first = _losses(a.run(until=5))
    assert a.ckpt.all_steps() == [3]
    del a
    b = Trainer(cfg, tmp_path / "cut", components=standin.standin_components())
    assert b.resumed_from == 3 and b.step == 3
    assert b.train_iter.get_state() == {"step": 3}  # data position restored, not 0 and not 5
    resumed = _losses(b.run())
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    for s in range(1, 6):
        assert first[s] == pytest.approx(want[s], rel=1e-6)
    for s in range(4, 9):
        assert resumed[s] == pytest.approx(want[s], rel=1e-6), s
    # metrics.jsonl after the resume holds each step once (steps after the checkpoint rewritten)
    lines = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    steps = [r["step"] for r in lines if r["split"] == "train"]
    assert steps == list(range(1, 9))


def test_restore_onto_a_different_mesh(tmp_path):
    cfg1 = standin.standin_config(**{"mesh.data": 8, "train.steps": 2, "train.warmup_steps": 1})
    t1 = Trainer(cfg1, tmp_path / "run", components=standin.standin_components())
    t1.run()
    t1.save()
    t1.ckpt.wait()
    want = jax.device_get(t1.state.params)
    want_mu = jax.device_get(t1.state.opt_state[1][0].mu)

    cfg2 = standin.standin_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.steps": 2, "train.warmup_steps": 1})
    t2 = Trainer(cfg2, tmp_path / "run", components=standin.standin_components())
    assert t2.step == 2
    up = t2.state.params["blocks"][0]["up"]
    assert up.sharding.spec == P("fsdp", "tensor") and dict(up.sharding.mesh.shape)["tensor"] == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), t2.state.params, want)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 t2.state.opt_state[1][0].mu, want_mu)

    # and onto a single device
    t3 = Trainer(standin.standin_config(**{"train.steps": 2, "train.warmup_steps": 1}), tmp_path / "run",
                 components=standin.standin_components(), devices=jax.devices()[:1])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), t3.state.params, want)


def test_checkpointer_keeps_n_and_validates(tmp_path):
    state = {"w": np.arange(4.0, dtype=np.float32), "k": jax.random.key(3)}
    with Checkpointer(tmp_path / "c", max_to_keep=2, save_every=2) as ck:
        saved = [s for s in range(1, 8) if ck.save(s, state, data_state=b'{"i": 1}')]
        assert saved == [2, 4, 6]
        assert ck.all_steps() == [4, 6]
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        r, ds, _ = ck.restore(abstract)
        np.testing.assert_array_equal(np.asarray(r["w"]), state["w"])
        assert (jax.random.key_data(r["k"]) == jax.random.key_data(state["k"])).all()
        assert ds == b'{"i": 1}'
        with pytest.raises(ValueError, match="step = 2"):
            ck.restore(abstract, step=2)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path / "d", max_to_keep=0)


def test_train_and_evaluate_writes_outputs(tmp_path):
    cfg = standin.standin_config(**{"train.steps": 6, "eval.every": 3})
    summary = train_and_evaluate(cfg, tmp_path / "r", components=standin.standin_components())
    d = tmp_path / "r"
    for f in ("config.json", "metrics.jsonl", "report.md", "loss.png", "accuracy.png", "final_metrics.json"):
        assert (d / f).exists(), f
    recs = [json.loads(x) for x in open(d / "metrics.jsonl")]
    assert {r["split"] for r in recs} == {"train", "eval"}
    assert "tf_accuracy" in summary["final"] and "perplexity" in summary["final"]
    assert summary["perf"]["mfu"] == "n/a"  # CPU: no known peak
    assert summary["perf"]["tokens_per_s"] > 0
    text = open(d / "report.md").read()
    assert "tf_accuracy" in text and "tokens/s" in text and "loss.png" in text
    assert os.path.isdir(d / "checkpoints" / "6")
