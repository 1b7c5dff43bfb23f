"""Word-level and Hugging Face tokenizers behind one interface; the VQA prompt format."""

import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from efficient_mllm.data import (
    SPECIAL_TOKENS,
    HFTokenizer,
    WordTokenizer,
    encode_vqa,
    format_question,
    load_tokenizer,
    synthetic_tokenizer,
)


def test_word_tokenizer_specials_and_round_trip(tmp_path):
    tok = WordTokenizer(["what", "color", "is", "the", "circle", "red", "?"])
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.image_token_id] == [0, 1, 2, 3, 4]
    assert tok.vocab[:5] == list(SPECIAL_TOKENS)
    ids = tok.encode("What color is the circle?")
    assert ids == [5, 6, 7, 8, 9, 11]
    assert tok.decode(ids) == "what color is the circle ?"
    assert tok.encode("a purple circle") == [tok.unk_id, tok.unk_id, 9]
    assert tok.decode([1, 4, 5, 2, 0, 0]) == "what"
    assert tok.decode([1, 4, 5, 2], skip_special=False) == "<bos> <image> what <eos>"
    assert tok.encode("<image> red") == [4, 10]
    tok.save(tmp_path / "w.json")
    again = load_tokenizer(tmp_path / "w.json")
    assert isinstance(again, WordTokenizer) and again == tok
    assert WordTokenizer.load(tmp_path / "w.json").encode("red circle") == tok.encode("red circle")


def test_word_tokenizer_from_texts_orders_by_count():
    tok = WordTokenizer.from_texts(["b a a", "c a b"], min_count=2)
    assert tok.vocab[5:] == ["a", "b"]
    assert WordTokenizer.from_texts(["b a a", "c a b"], max_size=1).vocab[5:] == ["a"]


@pytest.mark.parametrize("bad", ["two words", "", 3])
def test_word_tokenizer_rejects_bad_words(bad):
    with pytest.raises(ValueError, match="words"):
        WordTokenizer([bad])


def test_decode_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        WordTokenizer(["x"]).decode([99])


def test_load_rejects_non_tokenizer(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="path"):
        load_tokenizer(tmp_path / "x.json")
    with pytest.raises(ValueError, match="path"):
        load_tokenizer(tmp_path / "missing.json")


def _hf_tokenizer_file(path):
    vocab = {"[UNK]": 0, "what": 1, "color": 2, "is": 3, "the": 4, "circle": 5, "red": 6, "?": 7}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_hf_tokenizer_adds_missing_specials_and_saves(tmp_path):
    path = _hf_tokenizer_file(tmp_path / "tokenizer.json")
    tok = HFTokenizer.from_file(path, unk_token="[UNK]")
    assert tok.unk_id == 0
    assert {tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id} == {8, 9, 10, 11}
    assert tok.vocab_size == 12
    ids = tok.encode("what color is the circle ?")
    assert ids == [1, 2, 3, 4, 5, 7]
    assert (
        tok.decode([tok.bos_id, tok.image_token_id] + ids + [tok.eos_id, tok.pad_id])
        == "what color is the circle ?"
    )
    tok.save(tmp_path / "saved.json")
    again = load_tokenizer(tmp_path / "saved.json")
    assert isinstance(again, HFTokenizer)
    assert (again.pad_id, again.eos_id, again.unk_id, again.image_token_id) == (
        tok.pad_id,
        tok.eos_id,
        0,
        tok.image_token_id,
    )
    assert again.encode("red circle") == [6, 5]
    plain = load_tokenizer(path)  # a plain tokenizer.json, default special names
    assert isinstance(plain, HFTokenizer) and plain.encode("red") == [6]


def test_encode_vqa_prompt_format():
    tok = synthetic_tokenizer()
    ids, prompt_len = encode_vqa(tok, "what color is the circle", "red")
    words = tok.decode(ids, skip_special=False).split()
    assert words == [
        "<bos>",
        "<image>",
        "what",
        "color",
        "is",
        "the",
        "circle",
        "?",
        "red",
        "<eos>",
    ]
    assert prompt_len == 8 and tok.decode(ids[prompt_len:]) == "red"
    assert tok.unk_id not in ids
    text_only, n = encode_vqa(tok, "is there a red circle?", "yes", multimodal=False)
    assert tok.image_token_id not in text_only and n == 7
    assert format_question("why?? ") == "why ?"
    with pytest.raises(ValueError, match="answer"):
        encode_vqa(tok, "what", "  ")


@pytest.mark.parametrize(
    "module, cfg",
    [
        (
            "shapes",
            dict(
                image_size=64,
                min_objects=2,
                max_objects=7,
                min_object_size=0.15,
                max_object_size=0.2,
            ),
        ),
        ("digits", dict(image_size=128, rows=8, cols=8, fill=0.6)),
        ("digits", dict(image_size=128, rows=8, cols=8, fill=0.6, read_fraction=0.5)),
    ],
)
def test_synthetic_vocabulary_covers_every_question(module, cfg):
    from efficient_mllm.data import DigitGridConfig, ShapesVQAConfig, digit_grid_vqa, shapes_vqa

    mod, config = (
        (shapes_vqa, ShapesVQAConfig(**cfg))
        if module == "shapes"
        else (digit_grid_vqa, DigitGridConfig(**cfg))
    )
    tok = synthetic_tokenizer()
    longest = 0
    for i in range(300):
        ex = mod.generate_example(config, "train", i)
        ids, _ = encode_vqa(tok, ex["question"], ex["answer"])
        assert tok.unk_id not in ids, ex["question"]
        longest = max(longest, len(ids))
    assert longest <= mod.max_row_tokens(config)
    if getattr(config, "read_fraction", 0) == 0:
        assert mod.max_row_tokens(config) == 2 + mod.MAX_QUESTION_TOKENS + 2
    else:
        assert longest == mod.max_row_tokens(config)  # a full 8x8 read


def test_synthetic_vocabulary_appends_read_words_last():
    from efficient_mllm.data import digit_grid_vqa, shapes_vqa

    tok = synthetic_tokenizer()
    words = list(dict.fromkeys(shapes_vqa.vocabulary() + digit_grid_vqa.vocabulary()))
    assert tok.vocab == list(SPECIAL_TOKENS) + words
    # "read" and "grid" came last, so the ids of every earlier word are as before
    assert tok.vocab[-2:] == ["read", "grid"] and tok.vocab_size == 189
    assert "read" not in tok.vocab[:-2] and "grid" not in tok.vocab[:-2]
    assert tok.encode("read the grid ?")[0] == 187
