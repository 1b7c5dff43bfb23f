"""LoLCATs linearisation (train/linearize.py, experiments/linearize.py): the student copies the
teacher, attention transfer lowers the layer-output MSE and changes only the variant's
parameters, LoRA lowers the next-token loss and changes only the adapters (and, when asked, the
feature maps), merging keeps the outputs, bf16 works; errors; an end-to-end smoke run of the
experiment on a tiny quickstart checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm.nn.language import LanguageConfig, LanguageModel
from efficient_mllm.nn.lora import LoRAParam
from efficient_mllm.nn.mllm import MLLMConfig
from efficient_mllm.train.linearize import (
    attention_transfer,
    linearized_config,
    lora_finetune,
    make_student,
    transfer_losses,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWA = "linear_swa(feature_map='hedgehog', feature_dim=8, window=4)"


def _cfg(dtype="float32"):
    return LanguageConfig(vocab_size=40, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48,
                          dtype=dtype)


def _batch(seed, b=3, t=19):
    r = np.random.default_rng(seed)
    tokens = r.integers(1, 40, (b, t)).astype(np.int32)
    lengths = np.array([t, t - 6, 11][:b], np.int32)
    mask = ((np.arange(t)[None] >= 1) & (np.arange(t)[None] < lengths[:, None])).astype(np.float32)
    return {"tokens": tokens, "lengths": lengths, "loss_mask": mask}


def _flat(model, filt=nnx.Param):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, filt))}


def _loss(model, batch):
    from efficient_mllm.train.loss import answer_loss

    out = model(jnp.asarray(batch["tokens"]), lengths=jnp.asarray(batch["lengths"]))
    return float(answer_loss(out.logits, jnp.asarray(batch["tokens"]),
                             jnp.asarray(batch["loss_mask"]))[0])


def _is_feature(path):
    return "attend" in path


@pytest.mark.parametrize("variant", [SWA, "based(feature_dim=4)"])
def test_transfer_lowers_the_layer_mse_and_trains_only_the_feature_maps(variant):
    teacher = LanguageModel(_cfg(), rngs=nnx.Rngs(0))
    student = make_student(teacher, variant)
    assert student.cfg.layer_attention == (variant, variant)
    t_params, s_before = _flat(teacher), _flat(student)
    assert all(np.array_equal(s_before[p], v) for p, v in t_params.items())
    new = sorted(p for p in s_before if p not in t_params)
    assert new and all(_is_feature(p) for p in new)

    held = {k: jnp.asarray(v) for k, v in _batch(99).items()}
    mse0 = np.asarray(transfer_losses(teacher, student, held, (0, 1)))
    res = attention_transfer(teacher, student, [_batch(s) for s in range(3)], steps=25, lr=3e-2)
    assert res.layers == (0, 1) and res.losses.shape == (25,) and res.layer_losses.shape == (25, 2)
    assert res.trainable == sum(s_before[p].size for p in new)
    mse1 = np.asarray(transfer_losses(teacher, student, held, (0, 1)))
    assert np.all(mse1 < 0.9 * mse0), (mse0, mse1)
    assert res.losses[-3:].mean() < res.losses[:3].mean()
    s_after = _flat(student)
    for p, v in t_params.items():  # every teacher weight is exactly the teacher's
        np.testing.assert_array_equal(s_after[p], v, err_msg=str(p))
    assert any(not np.array_equal(s_after[p], s_before[p]) for p in new)
    assert _flat(teacher).keys() == t_params.keys()


def test_transfer_on_some_layers_only():
    teacher = LanguageModel(_cfg(), rngs=nnx.Rngs(0))
    cfg = linearized_config(teacher.cfg, "hedgehog(feature_dim=8)", layers=(1,))
    assert cfg.layer_attention == ("softmax", "hedgehog(feature_dim=8)")
    mcfg = MLLMConfig(language=teacher.cfg)
    assert linearized_config(mcfg, SWA, "0").language.layer_attention == (SWA, "softmax")
    student = make_student(teacher, "hedgehog(feature_dim=8)", layers=(1,))
    res = attention_transfer(teacher, student, [_batch(0)], steps=3, lr=1e-2)
    assert res.layers == (1,) and res.layer_losses.shape == (3, 1)


def test_lora_lowers_the_loss_and_changes_only_adapters_then_merges():
    teacher = LanguageModel(_cfg(), rngs=nnx.Rngs(0))
    student = make_student(teacher, SWA)
    batches = [_batch(s) for s in range(2)]
    loss0 = _loss(student, batches[0])
    before = _flat(student)
    res = lora_finetune(student, batches, steps=30, lr=1e-2, rank=4, merge=False)
    assert res.losses.shape == (30,) and len(res.paths) == 8 and not res.merged
    assert res.trainable == sum(v.size for v in _flat(student, LoRAParam).values())
    after = _flat(student)
    changed = {p for p in before if not np.array_equal(after[p], before[p])}
    assert not changed, changed  # base weights and feature maps untouched
    assert all(np.any(v) for p, v in after.items() if p[-1] == "lora_b")
    loss1 = _loss(student, batches[0])
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    logits = np.asarray(student(jnp.asarray(batches[1]["tokens"])).logits)
    from efficient_mllm.nn.lora import merge_lora

    assert merge_lora(student) == 8
    np.testing.assert_allclose(np.asarray(student(jnp.asarray(batches[1]["tokens"])).logits),
                               logits, atol=5e-5, rtol=1e-5)
    assert _flat(student).keys() == before.keys()


def test_lora_can_train_the_feature_maps_too():
    teacher = LanguageModel(_cfg(), rngs=nnx.Rngs(0))
    student = make_student(teacher, SWA)
    before = _flat(student)
    res = lora_finetune(student, [_batch(0)], steps=3, lr=1e-2, rank=2, targets="q,v",
                        train_feature_maps=True)
    assert res.merged and len(res.paths) == 4
    after = _flat(student)
    assert after.keys() == before.keys()  # merged: a plain model again
    changed = {p for p in before if not np.array_equal(after[p], before[p])}
    assert any(_is_feature(p) for p in changed)
    assert {p[-2] for p in changed if not _is_feature(p)} == {"q", "v"}


def test_bf16():
    teacher = LanguageModel(_cfg("bfloat16"), rngs=nnx.Rngs(0))
    student = make_student(teacher, SWA)
    res = attention_transfer(teacher, student, [_batch(0)], steps=8, lr=3e-2)
    assert np.all(np.isfinite(res.losses)) and res.losses[-1] < res.losses[0]
    lo = lora_finetune(student, [_batch(0)], steps=2, lr=1e-2, rank=2)
    assert np.all(np.isfinite(lo.losses))
    # fp32 weights, bf16 compute through compute_dtype (as train/step.py)
    t32 = LanguageModel(_cfg(), rngs=nnx.Rngs(0))
    s32 = make_student(t32, SWA)
    r = attention_transfer(t32, s32, [_batch(0)], steps=1, lr=1e-2, compute_dtype="bfloat16")
    assert np.all(np.isfinite(r.losses))
    assert s32.blocks[0].attn.attend.hh_weight[...].dtype == jnp.float32


def test_errors():
    teacher = LanguageModel(_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(Exception, match="no_such_variant"):
        make_student(teacher, "no_such_variant")
    with pytest.raises(ValueError, match=r"layers=\(2,\)"):
        make_student(teacher, SWA, layers=(2,))
    with pytest.raises(ValueError, match="no layer's attention differs"):
        attention_transfer(teacher, make_student(teacher, "softmax"), [_batch(0)], steps=1)
    student = make_student(teacher, SWA)
    with pytest.raises(ValueError, match=r"ran out after 1 of 2 steps"):
        attention_transfer(teacher, student, iter([_batch(0)]), steps=2)
    with pytest.raises(ValueError, match=r"steps=0"):
        attention_transfer(teacher, student, [_batch(0)], steps=0)
    with pytest.raises(ValueError, match="needs 'loss_mask'"):
        b = _batch(0)
        del b["loss_mask"]
        lora_finetune(student, [b], steps=1)
    other = LanguageModel(_cfg().replace(width=16, heads=2, kv_heads=2), rngs=nnx.Rngs(0))
    from efficient_mllm.train.linearize import copy_weights

    with pytest.raises(ValueError, match="expected equal shapes"):
        copy_weights(teacher, other)


def test_experiment_end_to_end(tmp_path):
    """A random-init tiny quickstart teacher saved at step 0, linearised for 3 + 3 steps,
    evaluated (generation + teacher forcing) three times; the saved student reloads."""
    from efficient_mllm.train.config import load_config
    from efficient_mllm.train.loop import Trainer
    from experiments.linearize import linearize_and_evaluate, load_student

    over = {
        "data.data_dir": str(tmp_path / "data"), "data.knobs.num_train": 32,
        "data.knobs.num_validation": 8, "train.batch_size": 8, "eval.batch_size": 8,
        "model.language.width": 32, "model.language.mlp_dim": 48,
        "model.vision.width": 32, "model.vision.mlp_dim": 48, "output.progress": False,
        "output.tensorboard": False, "linearize.batch_size": 4,
        "linearize.transfer.steps": 3, "linearize.transfer.warmup_steps": 1,
        "linearize.lora.steps": 3, "linearize.lora.warmup_steps": 1,
        "linearize.variant": "linear_swa(feature_map='hedgehog', feature_dim=8, window=4)",
        "linearize.evaluators": ("exact_match", "teacher_forced"), "linearize.eval_max_batches": 1,
    }
    cfg = load_config(os.path.join(ROOT, "configs", "lolcats.py"), overrides=over)
    assert cfg.name == "lolcats"
    run = tmp_path / "teacher"
    trainer = Trainer(cfg, run, devices=jax.devices()[:1])
    trainer.save()
    trainer.ckpt.close()
    out = tmp_path / "lin"
    summary, final = linearize_and_evaluate(cfg, str(run), str(out), progress=False,
                                            return_student=True)
    saved = json.load(open(out / "linearize.json"))
    assert saved["layers"] == [0, 1] and saved["teacher_step"] == 0
    for key in ("teacher", "init", "transfer", "lora"):
        assert 0.0 <= saved["metrics"][key]["accuracy"] <= 1.0
        assert "tf_accuracy" in saved["metrics"][key]
    assert len(saved["losses"]["transfer"]) == 3 and len(saved["losses"]["lora"]) == 3
    assert saved["stages"]["lora"]["adapted"][0] == "blocks.0.attn.q"
    rel = saved["stages"]["transfer"]["first_layer_relative_mse"]
    assert len(rel) == 2 and all(np.isfinite(rel))
    md = open(out / "linearize.md").read()
    assert "student after LoRA" in md and "exact match" in md
    assert (out / "linearize_losses.png").exists()
    student = load_student(summary["student_dir"])
    assert student.cfg.language.layer_attention == (over["linearize.variant"],) * 2
    assert not nnx.to_flat_state(nnx.state(student, LoRAParam))
    toks = jnp.asarray(np.random.default_rng(0).integers(5, 30, (2, 6)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(student.language(toks).logits),
                                  np.asarray(final.language(toks).logits))
