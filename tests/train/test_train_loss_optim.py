"""Answer-only loss and the optimizer schedule."""

import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm.train import loss as loss_lib, optim


def test_answer_loss_only_counts_masked_targets():
    v = 5
    tokens = jnp.array([[1, 2, 3, 4]])
    mask = jnp.array([[0.0, 0.0, 1.0, 1.0]])  # targets: tokens[2]=3 and tokens[3]=4
    logits = np.zeros((1, 4, v), np.float32)
    logits[0, 1, 3] = 10.0  # predicts tokens[2] correctly
    logits[0, 2, 0] = 10.0  # predicts 0 instead of 4
    logits[0, 0, 0] = 50.0  # position 0 predicts a non-target: must not matter
    loss, aux = loss_lib.answer_loss(jnp.asarray(logits), tokens, mask)
    lp = lambda row, t: row[t] - np.log(np.exp(row).sum())  # noqa: E731
    want = -(lp(logits[0, 1], 3) + lp(logits[0, 2], 4)) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(aux["accuracy"]) == 0.5 and float(aux["count"]) == 2.0
    with pytest.raises(ValueError, match="logits"):
        loss_lib.answer_loss(jnp.zeros((1, 4)), tokens, mask)


def test_schedule_warmup_and_cosine():
    s = optim.make_schedule(lr=1.0, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), 0.1, rtol=1e-5)
    assert float(s(50)) < float(s(20))
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule(lr=1.0, steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="lr"):
        optim.make_schedule(lr=0.0, steps=10)


def test_weight_decay_skips_vectors():
    tx, _ = optim.make_optimizer(dict(lr=1.0, steps=10, warmup_steps=0, weight_decay=0.5))
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    state = tx.init(params)
    zeros = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
    updates, _ = tx.update(zeros, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.5)  # decayed: -lr * wd * w
    np.testing.assert_allclose(np.asarray(updates["b"]), 0.0)  # 1-D: not decayed


def test_optimizer_clips_gradients():
    # With b1 = b2 = 0 and eps = 1 an Adam update is -lr * g / (|g| + 1), so it shows the scale
    # of the gradient after clipping: 4 entries of 10 clipped to global norm 1 become 0.5 each.
    cfg = dict(lr=1.0, steps=10, warmup_steps=0, b1=0.0, b2=0.0, eps=1.0, weight_decay=0.0)
    params = {"w": jnp.zeros((2, 2))}
    g = {"w": jnp.full((2, 2), 10.0)}
    for clip, want in ((1.0, -0.5 / 1.5), (0.0, -10.0 / 11.0)):
        tx, _ = optim.make_optimizer(dict(cfg, clip_norm=clip))
        u, _ = tx.update(g, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-5)
    with pytest.raises(ValueError, match="clip_norm"):
        optim.make_optimizer(dict(cfg, clip_norm=-1.0))
