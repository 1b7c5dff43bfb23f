"""grain pipeline: batch format, loss-mask alignment, resume, sharding, overlong rows."""

import numpy as np
import pytest

from efficient_mllm.data import (
    HOST_FIELDS,
    HFTokenizer,
    make_loader,
    split_host_fields,
    synthetic_tokenizer,
)

ARRAY_FIELDS = {
    "tokens": np.int32,
    "loss_mask": np.float32,
    "lengths": np.int32,
    "prompt_lengths": np.int32,
    "question_type": np.int32,
    "index": np.int32,
}


def _loader(ds, split="train", **kw):
    args = dict(
        batch_size=8,
        seq_len=ds.max_length + 3,
        shuffle=True,
        seed=0,
        num_epochs=1,
        shard_index=0,
        shard_count=1,
    )
    args.update(kw)
    return make_loader(ds[split], ds.tokenizer, **args)


@pytest.mark.parametrize("fixture", ["shapes_ds", "digits_ds"])
def test_vqa_batch_format_and_loss_mask_alignment(request, fixture):
    ds = request.getfixturevalue(fixture)
    tok = ds.tokenizer
    T = ds.max_length + 3
    batches = list(_loader(ds, image_size=40))
    assert len(batches) == len(ds["train"]) // 8
    for b in batches:
        assert set(b) == set(ARRAY_FIELDS) | {"image", "answer_text"}
        for k, dt in ARRAY_FIELDS.items():
            assert b[k].dtype == dt, k
        assert b["tokens"].shape == b["loss_mask"].shape == (8, T)
        assert b["image"].shape == (8, 40, 40, 3) and b["image"].dtype == np.float32
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        assert b["answer_text"].shape == (8,) and b["answer_text"].dtype.kind == "U"
        for r in range(8):
            n, p = b["lengths"][r], b["prompt_lengths"][r]
            row, mask = b["tokens"][r], b["loss_mask"][r]
            assert row[0] == tok.bos_id and row[1] == tok.image_token_id
            assert (row == tok.image_token_id).sum() == 1
            assert row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
            assert tok.unk_id not in row[:n]
            assert row[p - 1] == tok.encode("?")[0]
            assert (mask[:p] == 0).all() and (mask[p:n] == 1).all() and (mask[n:] == 0).all()
            assert tok.decode(row[mask == 1]) == b["answer_text"][r]
            rec = ds["train"][int(b["index"][r])]
            assert rec["answer"].decode() == b["answer_text"][r]
            assert int(rec["question_type"]) == b["question_type"][r]
            assert tok.decode(row[:p]) == rec["question"].decode() + " ?"
        assert (b["lengths"] <= ds.max_length).all()


def test_image_normalisation_matches_source(shapes_ds):
    b = next(iter(_loader(shapes_ds, shuffle=False)))
    raw = shapes_ds["train"][int(b["index"][0])]["image"]
    np.testing.assert_allclose(b["image"][0], (raw / 255.0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    arrays, host = split_host_fields(b)
    assert set(host) == set(HOST_FIELDS) and "answer_text" not in arrays and "tokens" in arrays


def test_iterator_state_resumes_exact_batches(shapes_ds):
    loader = _loader(shapes_ds, num_epochs=None, batch_size=4)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(_loader(shapes_ds, num_epochs=None, batch_size=4))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_shards_are_disjoint_and_cover(shapes_ds):
    n = len(shapes_ds["train"])
    seen = []
    for shard in range(3):
        idx = np.concatenate(
            [b["index"] for b in _loader(shapes_ds, batch_size=1, shard_index=shard, shard_count=3)]
        )
        assert len(idx) == n // 3 and len(set(idx.tolist())) == len(idx)
        seen.append(set(idx.tolist()))
    assert not seen[0] & seen[1] and not seen[0] & seen[2] and not seen[1] & seen[2]
    assert len(set().union(*seen)) == 3 * (n // 3)


def test_default_shard_is_this_process(shapes_ds):
    loader = make_loader(shapes_ds["train"], shapes_ds.tokenizer, batch_size=8, seq_len=32)
    assert sum(b["tokens"].shape[0] for b in loader) == len(shapes_ds["train"])


def test_epochs_shuffle_and_remainder(shapes_ds):
    n = len(shapes_ds["validation"])  # 40
    two = [b["index"] for b in _loader(shapes_ds, "validation", batch_size=8, num_epochs=2)]
    flat = np.concatenate(two)
    assert len(flat) == 2 * n and sorted(flat[:n]) == list(range(n))
    assert not np.array_equal(flat[:n], np.arange(n)) and not np.array_equal(flat[:n], flat[n:])
    ordered = np.concatenate(
        [b["index"] for b in _loader(shapes_ds, "validation", batch_size=8, shuffle=False)]
    )
    assert np.array_equal(ordered, np.arange(n))
    sizes = [
        len(b["index"])
        for b in _loader(shapes_ds, "validation", batch_size=16, drop_remainder=False)
    ]
    assert sizes == [16, 16, 8]
    assert [len(b["index"]) for b in _loader(shapes_ds, "validation", batch_size=16)] == [16, 16]


def test_overlong_sequence_raises(shapes_ds):
    loader = _loader(shapes_ds, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        next(iter(loader))


def test_mqar_batches(mqar_ds):
    b = next(
        iter(
            make_loader(
                mqar_ds["train"], None, batch_size=4, seq_len=64, shard_index=0, shard_count=1
            )
        )
    )
    assert "image" not in b and b["tokens"].shape == (4, 64) and b["tokens"].dtype == np.int32
    for r in range(4):
        rec = mqar_ds["train"][int(b["index"][r])]
        assert b["lengths"][r] == 48 and (b["tokens"][r, 48:] == 0).all()
        np.testing.assert_array_equal(b["tokens"][r, :48], rec["tokens"])
        np.testing.assert_array_equal(b["loss_mask"][r, :48], rec["targets"])
        assert b["prompt_lengths"][r] == np.flatnonzero(rec["targets"])[0]
        assert " ".join(map(str, b["tokens"][r][b["loss_mask"][r] == 1])) == b["answer_text"][r]


def test_hf_tokenizer_in_pipeline(shapes_ds):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    words = synthetic_tokenizer().vocab[5:]
    hf = tokenizers.Tokenizer(
        models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]")
    )
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = HFTokenizer(hf, unk_token="[UNK]")
    assert tok.pad_id != 0  # padding must use the tokenizer's pad id
    b = next(
        iter(
            make_loader(
                shapes_ds["train"], tok, batch_size=4, seq_len=20, shard_index=0, shard_count=1
            )
        )
    )
    for r in range(4):
        n = b["lengths"][r]
        assert (b["tokens"][r, n:] == tok.pad_id).all() and b["tokens"][r, 1] == tok.image_token_id
        assert tok.decode(b["tokens"][r][b["loss_mask"][r] == 1]) == b["answer_text"][r]


@pytest.mark.parametrize(
    "kw, arg",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=-1), "seq_len"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(shard_index=3, shard_count=2), "shard_index"),
        (dict(shard_index=0, shard_count=None), "shard_index"),
        (dict(image_size=(1, 2, 3)), "image_size"),
    ],
)
def test_bad_loader_arguments(shapes_ds, kw, arg):
    args = dict(batch_size=2, seq_len=32, shard_index=0, shard_count=1)
    args.update(kw)
    with pytest.raises(ValueError, match=arg):
        make_loader(shapes_ds["train"], shapes_ds.tokenizer, **args)
