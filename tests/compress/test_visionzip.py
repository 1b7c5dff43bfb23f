"""VisionZip: contract, a plain numpy reference of dominant + contextual merging, special cases,
MLLM end to end, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm import registry

from .conftest import contract, make_inputs, run_end_to_end


def build(spec):
    return registry.COMPRESSORS.build(spec)


def visionzip_numpy(tokens, attn, keys, dominant, contextual):
    """One row. Returns (keep_idx, tokens) sorted by keep_idx."""
    n = len(tokens)
    dom = sorted(np.argsort(-attn, kind="stable")[:dominant].tolist())
    rest = [i for i in range(n) if i not in dom]
    out = {i: tokens[i] for i in dom}
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        groups = {t: [t] for t in targets}
        for i in rest:
            if i in targets:
                continue
            sims = [float(unit[i] @ unit[t]) for t in targets]
            groups[targets[int(np.argmax(sims))]].append(i)
        for t, members in groups.items():
            out[t] = np.mean([tokens[i] for i in members], axis=0)
    idx = sorted(out)
    return idx, np.stack([out[i] for i in idx])


@pytest.mark.parametrize(
    "dominant, contextual, metric",
    [(4, 3, "features"), (5, 2, "tokens"), (0.25, 5, "features"), (3, 13, "features")],
)
def test_visionzip_matches_numpy(dominant, contextual, metric):
    inp = make_inputs(0)
    d = dominant if isinstance(dominant, int) else 4
    spec = f"visionzip(dominant={dominant}, contextual={contextual}, metric='{metric}')"
    rows = (0, 1, 2, 3) if contextual == 3 else ()  # batch invariance checked once
    out = contract(build(spec), inp, d + contextual, row_invariant=rows)
    for r in range(4):
        idx, toks = visionzip_numpy(
            inp["tokens"][r], inp["cls_attention"][r], inp[metric][r], d, contextual
        )
        np.testing.assert_array_equal(out["keep_idx"][r], idx)
        np.testing.assert_allclose(out["tokens"][r], toks, rtol=1e-5, atol=1e-6)
    merged = 16 - d - contextual
    np.testing.assert_array_equal(np.asarray(out["stats"]["num_merged"]), [merged] * 4)


def test_special_cases():
    inp = make_inputs(3)
    # No contextual tokens: FasterVLM with keep = dominant.
    a = contract(build("visionzip(dominant=6)"), inp, 6, row_invariant=())
    b = contract(build("fastervlm(keep=6)"), inp, 6, row_invariant=())
    np.testing.assert_array_equal(a["keep_idx"], b["keep_idx"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    # Every remaining token a target: nothing merged, all 16 tokens returned in order.
    c = contract(build("visionzip(dominant=6, contextual=10)"), inp, 16, row_invariant=())
    np.testing.assert_array_equal(c["keep_idx"], np.tile(np.arange(16), (4, 1)))
    np.testing.assert_allclose(c["tokens"], inp["tokens"], rtol=1e-6)
    # Zero similarity features and uniform attention: finite, ties go to the lower index.
    inp["features"][:] = 0.0
    inp["cls_attention"][:] = 1.0 / 16
    z = contract(build("visionzip(dominant=2, contextual=2)"), inp, 4, row_invariant=())
    np.testing.assert_array_equal(z["keep_idx"], np.tile([0, 1, 2, 9], (4, 1)))


def test_end_to_end():
    _, out, _ = run_end_to_end("visionzip(dominant=4, contextual=3)", 7)
    assert np.asarray(out.aux["image_valid"]).all()


def test_errors_name_argument_and_value():
    inp = make_inputs(0)
    x, a, f = (jnp.asarray(inp[k]) for k in ("tokens", "cls_attention", "features"))
    with pytest.raises(ValueError, match=r"contextual=13: at most N - dominant = 16 - 4 = 12"):
        build("visionzip(dominant=4, contextual=13)")(x, cls_attention=a, features=f)
    with pytest.raises(ValueError, match=r"dominant=17"):
        build("visionzip(dominant=17)")(x, cls_attention=a, features=f)
    with pytest.raises(ValueError, match=r"dominant=0"):
        build("visionzip(dominant=0)")
    with pytest.raises(ValueError, match=r"contextual=-1"):
        build("visionzip(dominant=2, contextual=-1)")
    with pytest.raises(ValueError, match=r"metric='keys'"):
        build("visionzip(dominant=2, metric='keys')")
    with pytest.raises(ValueError, match=r"needs features"):
        build("visionzip(dominant=2, contextual=2)")(x, cls_attention=a)
    with pytest.raises(ValueError, match=r"visionzip needs cls_attention"):
        build("visionzip(dominant=2, contextual=2)")(x, features=f)
    with pytest.raises(ValueError, match=r"visionzip needs the vision encoder's \[CLS\]"):
        build("visionzip(dominant=2)")(x, cls_attention=a, cls=None)
    comp = build("visionzip(dominant=2, fallback='mean_query')")
    out = jax.eval_shape(lambda x, a: comp(x, cls_attention=a, cls=None), x, a)
    assert out.tokens.shape == (4, 2, 32)
