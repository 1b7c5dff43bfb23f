"""Evaluators on hand-made cases: exact match per question type (with a scripted generator),
teacher-forced accuracy and perplexity (with a scripted oracle model)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.data.tokenizer import WordTokenizer
from efficient_mllm.evaluate import evaluators as ev

EOS, PAD = 2, 0


def _batch():
    # <bos>=1, prompt words 10.., answer tokens, <eos>=2, pad 0. Prompt lengths 3.
    tokens = np.array([
        [1, 10, 11, 20, 2, 0],      # type 0, answer [20]
        [1, 10, 12, 21, 22, 2],     # type 0, answer [21, 22]
        [1, 13, 11, 23, 2, 0],      # type 1, answer [23]
        [9, 13, 12, 24, 2, 0],      # type 1, answer [24]   (row 3 starts with the "bad" marker)
    ], np.int32)
    lengths = np.array([5, 6, 5, 5], np.int32)
    prompt = np.array([3, 3, 3, 3], np.int32)
    mask = np.zeros_like(tokens, np.float32)
    for i in range(4):
        mask[i, prompt[i]:lengths[i]] = 1
    return {"tokens": tokens, "lengths": lengths, "prompt_lengths": prompt, "loss_mask": mask,
            "question_type": np.array([0, 0, 1, 1], np.int32)}


def _scripted_generate(outputs):
    calls = []

    def gen(model, tokens, *, images, lengths, max_new_tokens, temperature, stop_tokens, pad_id):
        calls.append(dict(tokens=np.asarray(tokens), lengths=np.asarray(lengths),
                          max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, temperature=temperature))
        toks = np.full((len(outputs), max_new_tokens), pad_id, np.int32)
        lens = np.zeros(len(outputs), np.int32)
        for i, o in enumerate(outputs):
            o = o[:max_new_tokens]
            toks[i, :len(o)] = o
            lens[i] = len(o)
        return types.SimpleNamespace(tokens=jnp.asarray(toks), lengths=jnp.asarray(lens))

    return gen, calls


def test_exact_match_per_type_token_ids():
    outputs = [
        [20, 2],        # right
        [21, 2],        # stops too early: wrong
        [23, 2],        # right
        [24, 25],       # right answer but no <eos> and an extra token: wrong
    ]
    gen, calls = _scripted_generate(outputs)
    e = ev.ExactMatch(eos_id=EOS, pad_id=PAD, generate_fn=gen)
    e.update(None, _batch())
    r = e.result(("colour", "count"))
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["accuracy/colour"] == pytest.approx(0.5) and r["accuracy/count"] == pytest.approx(0.5)
    assert r["count/colour"] == 2 and r["examples"] == 4
    # the generator saw only the prompts, right-padded, greedy, stopping at <eos>
    c = calls[0]
    np.testing.assert_array_equal(c["tokens"], _batch()["tokens"][:, :3])
    np.testing.assert_array_equal(c["lengths"], [3, 3, 3, 3])
    assert c["max_new_tokens"] == 3 and c["stop_tokens"] == (EOS,) and c["temperature"] == 0.0


def test_exact_match_decoded_text_and_padding_rows():
    tok = WordTokenizer(["what", "is", "red", "blue", "2", "3"])
    red, blue, two, three = (tok.token_to_id(w) for w in ("red", "blue", "2", "3"))
    b = _batch()
    b["tokens"][:, 3] = [red, red, two, three]
    b["tokens"][1, 4] = blue
    b["answer_text"] = np.array(["Red", "red blue", "2", "3"])
    b["valid"] = np.array([True, True, True, False])  # row 3 pads the last batch
    gen, _ = _scripted_generate([[red, EOS], [red, blue, EOS], [three, EOS], [three, EOS]])
    e = ev.ExactMatch(generate_fn=gen)
    e.update(None, b, tokenizer=tok)
    r = e.result(("colour", "count"))
    assert r["examples"] == 3  # padding row ignored
    assert r["accuracy/colour"] == 1.0 and r["accuracy/count"] == 0.0
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert e.predictions[0] == {"prediction": "red", "reference": "red", "correct": True, "question_type": 0}


class _Oracle(nnx.Module):
    """Teacher-forced oracle: logits[:, t] = 10 * one_hot(tokens[:, t + 1]), except rows that
    start with token 9, whose predictions are shifted by one id (all wrong)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.w = nnx.Param(jnp.ones(()))

    def __call__(self, tokens, images=None, *, lengths=None):
        nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        bad = (tokens[:, :1] == 9)
        nxt = jnp.where(bad, (nxt + 1) % self.vocab, nxt)
        return types.SimpleNamespace(logits=10.0 * self.w[...] * jax.nn.one_hot(nxt, self.vocab))


def test_teacher_forced_and_perplexity():
    v = 32
    res = ev.run_evaluators(_Oracle(v), [_batch()], ["teacher_forced", "perplexity", "perplexity(tokens='all')"],
                            question_types=("colour", "count"))
    assert res["tf_accuracy"] == pytest.approx(0.75)
    assert res["tf_accuracy/colour"] == 1.0 and res["tf_accuracy/count"] == 0.5
    # 9 target tokens (answers + <eos>): 7 right (NLL a), row 3's 2 wrong (NLL b)
    a = np.log(np.exp(10) + (v - 1)) - 10
    b = np.log(np.exp(10) + (v - 1))
    assert res["token_accuracy"] == pytest.approx(7 / 9)
    assert res["nll"] == pytest.approx((7 * a + 2 * b) / 9, rel=1e-5)
    assert res["perplexity"] == pytest.approx(np.exp((7 * a + 2 * b) / 9), rel=1e-5)
    # all valid next-token predictions: rows 0..2 right (4+5+4), row 3 wrong (4)
    assert res["nll_all"] == pytest.approx((13 * a + 4 * b) / 17, rel=1e-5)


def test_registry_and_errors():
    assert {"exact_match", "teacher_forced", "perplexity"} <= set(registry.EVALUATORS.names())
    e = registry.EVALUATORS.build("exact_match(max_new_tokens=4)")
    assert isinstance(e, ev.ExactMatch) and e.max_new_tokens == 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        ev.ExactMatch(max_new_tokens=0)
    with pytest.raises(ValueError, match="tokens = 'some'"):
        registry.EVALUATORS.build("perplexity(tokens='some')")
    with pytest.raises(ValueError, match="eos_id"):
        ev.ExactMatch(generate_fn=_scripted_generate([[1]] * 4)[0]).update(None, _batch())
    with pytest.raises(ValueError, match="no batch"):
        ev.run_evaluators(_Oracle(32), [], ["teacher_forced"])
    bad = _batch()
    bad["prompt_lengths"] = np.array([3, 3, 3, 7], np.int32)
    with pytest.raises(ValueError, match="prompt_lengths 7"):
        ev.extract_answers(bad)
    with pytest.raises(ValueError, match="question_type 5"):
        ev.summarize_correct(np.array([True]), np.array([5]), ("a", "b"))
