"""FlashVLM: contract, independent numpy reference, text guidance, MLLM end to end, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_mllm.compress  # noqa: F401  (registers the compressors)
from efficient_mllm import registry

B, N, D, DV, T = 4, 16, 32, 8, 6


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, N, D)).astype(np.float32)
    f = rng.normal(size=(B, N, DV)).astype(np.float32)
    a = rng.gamma(0.5, size=(B, N)).astype(np.float32)
    a = a / a.sum(axis=1, keepdims=True)
    text = rng.normal(size=(B, T, D)).astype(np.float32)
    # each row's text points towards one image token, plus noise
    for r in range(B):
        text[r, 2] = x[r, 3 + 2 * r] + 0.3 * text[r, 2]
    lengths = np.array([6, 5, 4, 6], np.int32)
    placeholder = np.array([1, 1, 0, 6], np.int32)  # row 3: no placeholder
    return x, f, a, text, lengths, placeholder


@functools.cache
def _jitted(spec):
    fn = registry.COMPRESSORS.build(spec)
    return jax.jit(lambda x, kw: fn(x, **kw))


def _run(spec, x, f, a, text=None, lengths=None, placeholder=None):
    kw = {"features": f, "cls_attention": a}
    if text is not None:
        kw.update(text_embeds=text, text_lengths=lengths, placeholder=placeholder)
    kw = {k: jnp.asarray(v) for k, v in kw.items()}
    return _jitted(spec)(jnp.asarray(x), kw)


# -- numpy reference, step by step as the paper / reference code describe it --------------------


def _normalize(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)


def _minmax(v):
    return (v - v.min()) / (v.max() - v.min() + 1e-6)


def _np_flashvlm(
    x, f, a, text, k, eta=0.5, tt=0.05, temp=0.01, gamma=2.5, top_p=0.005, sup=0.1, step=8
):
    n = len(a)
    if text is not None and len(text):
        s = _normalize(x) @ _normalize(text).T  # [N, T]
        w = np.exp((s - s.max(axis=1, keepdims=True)) / tt)
        w /= w.sum(axis=1, keepdims=True)
        rel = (s * w).sum(axis=1)
        e = np.exp((rel - rel.max()) / temp)
        p = _minmax((e / e.sum()) ** gamma)
        thr = np.quantile(p, 1 - top_p)
        p = _minmax(np.where(p >= thr, p, sup * p))
    else:
        p = np.zeros(n)
    sal = np.clip(_minmax(a), 1e-6, None)
    p = np.clip(p, 1e-6, None)
    score = _minmax(np.exp((1 - eta) * np.log(sal) + eta * np.log(p)))
    order = list(np.argsort(-score, kind="stable"))
    n_imp = int(k * 0.5)
    n_div = k - n_imp
    important, residual = order[:n_imp], order[n_imp:]
    fn = _normalize(f)
    while len(residual) > n_div:
        r = min(step, len(residual) - n_div)
        even, odd = residual[0::2], residual[1::2]
        best = (fn[even] @ fn[odd].T).max(axis=1)
        survivors = np.argsort(-best, kind="stable")[r:]
        residual = [even[i] for i in survivors] + odd
    return np.sort(np.array(important + residual))


def _text_of_row(text, lengths, placeholder, r):
    keep = [t for t in range(text.shape[1]) if t < lengths[r] and t != placeholder[r]]
    return text[r, keep]


@pytest.mark.parametrize(
    "spec,kw",
    [
        ("flashvlm(keep=6)", {}),
        (
            "flashvlm(keep=7, eta=0.7, temperature=0.1, gamma=1.0, top_p=0.25, diversity_step=2)",
            {"eta": 0.7, "temp": 0.1, "gamma": 1.0, "top_p": 0.25, "step": 2},
        ),
    ],
)
def test_flashvlm_reference(spec, kw):
    x, f, a, text, lengths, ph = _inputs(1)
    k = int(spec.split("keep=")[1].split(",")[0].rstrip(")"))
    out = _run(spec, x, f, a, text, lengths, ph)
    assert np.asarray(out.valid).all()
    for r in range(B):
        want = _np_flashvlm(x[r], f[r], a[r], _text_of_row(text, lengths, ph, r), k, **kw)
        np.testing.assert_array_equal(np.asarray(out.keep_idx[r]), want, err_msg=f"row {r}")
        np.testing.assert_array_equal(np.asarray(out.tokens[r]), x[r, want])
    # without text, the saliency alone ranks
    out = _run(spec, x, f, a)
    for r in range(B):
        want = _np_flashvlm(x[r], f[r], a[r], None, k, **kw)
        np.testing.assert_array_equal(np.asarray(out.keep_idx[r]), want)


def test_flashvlm_contract_and_text_guidance():
    x, f, a, text, lengths, ph = _inputs(2)
    spec = "flashvlm(keep=6)"
    out = _run(spec, x, f, a, text, lengths, ph)
    assert out.tokens.shape == (B, 6, D) and out.keep_idx.shape == (B, 6)
    idx = np.asarray(out.keep_idx)
    assert (np.diff(idx, axis=1) > 0).all() and ((idx >= 0) & (idx < N)).all()
    # batch invariance: a row alone equals the same row in the batch
    one = _run(spec, x[1:2], f[1:2], a[1:2], text[1:2], lengths[1:2], ph[1:2])
    np.testing.assert_array_equal(np.asarray(one.keep_idx[0]), idx[1])
    # text guidance: give the targeted token the lowest saliency; the text still selects it
    a2 = a.copy()
    for r in range(B):
        a2[r, 3 + 2 * r] = 0.0
    hit = np.asarray(_run(spec, x, f, a2, text, lengths, ph).keep_idx)
    miss = np.asarray(_run(spec, x, f, a2).keep_idx)
    for r in range(B):
        assert 3 + 2 * r in hit[r] and 3 + 2 * r not in miss[r]
    # the placeholder and padding positions are not text: moving the cue there removes it
    ph2, len2 = ph.copy(), lengths.copy()
    ph2[0], len2[1] = 2, 2  # row 0: cue at the placeholder; row 1: cue in the padding
    moved = np.asarray(_run(spec, x, f, a2, text, len2, ph2).keep_idx)
    assert 3 not in moved[0] and 5 not in moved[1]


def test_mllm_end_to_end(run_mllm):
    model, out, _ = run_mllm("flashvlm(keep=6)", 6)
    assert model.num_image_slots() == 6 and np.asarray(out.aux["image_valid"]).all()


def test_contract_fixture(check_contract, compress_inputs):
    check_contract(registry.COMPRESSORS.build("flashvlm(keep=6)"), compress_inputs(3), 6)


def test_errors():
    x, f, a, *_ = _inputs(0)
    fn = registry.COMPRESSORS.build("flashvlm(keep=4)")
    with pytest.raises(ValueError, match="cls_attention"):
        jax.eval_shape(fn, x, features=f)
    with pytest.raises(ValueError, match="features"):
        jax.eval_shape(fn, x, cls_attention=a)
    with pytest.raises(ValueError, match="keep=17"):
        jax.eval_shape(
            registry.COMPRESSORS.build("flashvlm(keep=17)"), x, features=f, cls_attention=a
        )
    with pytest.raises(ValueError, match="text_embeds shape"):
        jax.eval_shape(fn, x, features=f, cls_attention=a, text_embeds=np.zeros((B, 3, D + 1)))
    kw = {"features": jnp.asarray(f), "cls_attention": jnp.asarray(a), "cls": None}
    with pytest.raises(ValueError, match="use_cls=False"):
        jax.eval_shape(fn, x, **kw)
    fb = registry.COMPRESSORS.build("flashvlm(keep=4, fallback='mean_query')")
    assert jax.eval_shape(fb, x, **kw).tokens.shape == (B, 4, D)
    for bad in (
        "eta=1.5",
        "important=-0.1",
        "temperature=0",
        "diversity_step=0",
        "metric='keys'",
        "fallback='cls'",
    ):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            registry.COMPRESSORS.build(f"flashvlm(keep=4, {bad})")
