"""DivPrune and ToDRE: contract, plain numpy references of their greedy rules, duplicates,
padding, MLLM end to end, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm import registry

from .conftest import contract, make_inputs, run_end_to_end


def build(spec):
    return registry.COMPRESSORS.build(spec)


def _cos_dist(x):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 1.0 - unit @ unit.T


def divprune_numpy(x, k):
    """DivPrune's greedy MMDP: the first token maximises its distance to its nearest other
    token (the second-smallest entry of its distance column); then argmax of the min distance
    to the selected set."""
    dist = _cos_dist(x.astype(np.float64))
    first = int(np.argmax(np.sort(dist, axis=0)[1]))
    chosen = [first]
    for _ in range(k - 1):
        score = dist[chosen].min(axis=0)
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
    return sorted(chosen)


def todre_numpy(x, k, v, text, n_text, placeholder, w):
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    use = [t for t in range(n_text) if t != placeholder]
    rel = unit(v) @ unit(text[use].mean(0)) if use else np.zeros(len(v))
    dist = _cos_dist(x.astype(np.float64))
    far = 1.0 - unit(x) @ unit(x.mean(0))
    chosen = [int(np.argmax(far + w * rel))]
    while len(chosen) < k:
        score = dist[chosen].min(axis=0) + w * rel
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
    return sorted(chosen)


@pytest.mark.parametrize("keep, k, metric", [(5, 5, "tokens"), (0.5, 8, "features")])
def test_divprune_matches_numpy(keep, k, metric):
    inp = make_inputs(0)
    rows = (0, 1, 2, 3) if metric == "tokens" else ()  # batch invariance checked once
    out = contract(build(f"divprune(keep={keep}, metric='{metric}')"), inp, k, row_invariant=rows)
    for r in range(4):
        ref = divprune_numpy(inp[metric][r], k)
        np.testing.assert_array_equal(out["keep_idx"][r], ref)
        np.testing.assert_array_equal(out["tokens"][r], inp["tokens"][r, ref])


def test_divprune_skips_duplicates():
    # 12 copies of one direction and 4 orthogonal directions: keep=5 takes the 4 distinct ones
    # and one copy.
    x = np.zeros((1, 16, 8), np.float32)
    x[0, :12, 0] = np.linspace(1.0, 2.0, 12)
    for j, i in enumerate(range(12, 16)):
        x[0, i, j + 1] = 1.0
    idx = np.asarray(jax.jit(build("divprune(keep=5)"))(jnp.asarray(x)).keep_idx)[0]
    assert set(idx[1:]) == {12, 13, 14, 15} and idx[0] < 12


@pytest.mark.parametrize("w, metric", [(0.5, "tokens"), (0.0, "tokens"), (2.0, "features")])
def test_todre_matches_numpy(w, metric):
    inp = make_inputs(1)
    inp["text_lengths"][0] = 0  # a row without text: no relevance, no NaN
    spec = f"todre(keep=6, relevance_weight={w}, metric='{metric}')"
    out = contract(build(spec), inp, 6, row_invariant=(0, 1, 2, 3) if w == 0.5 else ())
    for r in range(4):
        ref = todre_numpy(
            inp[metric][r],
            6,
            inp["tokens"][r],
            inp["text_embeds"][r],
            int(inp["text_lengths"][r]),
            int(inp["placeholder"][r]),
            w,
        )
        np.testing.assert_array_equal(out["keep_idx"][r], ref)


def test_todre_relevance_changes_the_choice():
    inp = make_inputs(2)
    # Make token 5 the text itself: with a large weight it must be kept.
    inp["text_embeds"][:] = inp["tokens"][:, 5:6]
    inp["text_lengths"][:] = 6
    plain = contract(build("todre(keep=3, relevance_weight=0)"), inp, 3, row_invariant=())
    guided = contract(build("todre(keep=3, relevance_weight=10.0)"), inp, 3, row_invariant=())
    assert (guided["keep_idx"] == 5).any(axis=1).all()
    assert not np.array_equal(plain["keep_idx"], guided["keep_idx"])


def test_degenerate_inputs_stay_finite():
    # All-zero tokens (cosine of zero vectors) and an empty prompt: no NaN, distinct indices.
    inp = make_inputs(5)
    inp["tokens"][:] = 0.0
    inp["text_embeds"][:] = 0.0
    inp["text_lengths"][:] = 0
    for spec in ("divprune(keep=5)", "todre(keep=5)"):
        out = contract(build(spec), inp, 5, row_invariant=())
        assert np.asarray(out["valid"]).all()


@pytest.mark.parametrize("spec", ["divprune(keep=5)", "todre(keep=5)"])
def test_end_to_end(spec):
    run_end_to_end(spec, 5)


def test_errors_name_argument_and_value():
    inp = make_inputs(0)
    x = jnp.asarray(inp["tokens"])
    with pytest.raises(ValueError, match=r"keep=17"):
        build("divprune(keep=17)")(x)
    with pytest.raises(ValueError, match=r"keep=0"):
        build("todre(keep=0)")
    with pytest.raises(ValueError, match=r"metric='keys'"):
        build("divprune(keep=3, metric='keys')")
    with pytest.raises(ValueError, match=r"divprune\(metric='features'\) needs features"):
        build("divprune(keep=3, metric='features')")(x)
    with pytest.raises(ValueError, match=r"features shape=\(4, 15, 8\)"):
        build("divprune(keep=3, metric='features')")(x, features=jnp.zeros((4, 15, 8)))
    with pytest.raises(ValueError, match=r"relevance_weight=-1"):
        build("todre(keep=3, relevance_weight=-1)")
    with pytest.raises(ValueError, match=r"todre\(relevance_weight > 0\) needs text_embeds"):
        build("todre(keep=3)")(x)
    with pytest.raises(ValueError, match=r"text_embeds shape=\(4, 6, 7\)"):
        build("todre(keep=3)")(x, text_embeds=jnp.zeros((4, 6, 7)))
    out = jax.eval_shape(build("todre(keep=3, relevance_weight=0)"), x)  # no text needed
    assert out.tokens.shape == (4, 3, 32)
