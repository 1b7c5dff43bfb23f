"""Mask specs: dense masks vs per-pair numpy predicates, block maps vs tile reductions, algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_mllm.ops import masks

TEXT, IMAGE, ANSWER, PAD = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------
# Independent reference: one Python predicate per mask kind, evaluated pair by pair.
# ------------------------------------------------------------------------------------------------


def _row(a, b):
    return a[0] if a.shape[0] == 1 else a[b]


def ref_allowed(kind, p, b, h, qa, row, k):
    """Reference predicate; qa is the absolute query position, row the local query row."""
    if kind == "causal":
        return k <= qa
    if kind == "window":
        return qa - p["left"] <= k <= qa + p["right"]
    if kind == "segments":
        return _row(p["q"], b)[row] == _row(p["kv"], b)[k]
    if kind == "padding":
        ok = k < _row(p["kv_lengths"], b)
        if p["q_lengths"] is not None:
            ok = ok and row < _row(p["q_lengths"], b)
        return ok
    if kind == "prefix":
        return k <= qa or k < _row(p["prefix"], b)
    if kind == "modality":
        t = _row(p["types"], b)
        if k <= qa:
            return True
        return t[qa] == IMAGE and t[k] == TEXT and not (t[qa + 1 : k + 1] == ANSWER).any()
    if kind == "frame":
        f = _row(p["frames"], b)
        return k <= qa or (f[qa] == f[k] and f[qa] >= 0)
    if kind == "block_sparse":
        idx, num = _row(p["idx"], b), _row(p["num"], b)
        hi = h if idx.shape[0] > 1 else 0
        hn = h if num.shape[0] > 1 else 0
        qb = qa // p["bq"]
        if qb >= idx.shape[1]:
            return False
        return (k // p["bk"]) in list(idx[hi, qb, : num[hn, qb]])
    if kind == "array":
        m = _row(p["mask"], b)
        m = m[h if m.shape[0] > 1 else 0]
        return bool(m[row if m.shape[0] > 1 else 0, k if m.shape[1] > 1 else 0])
    raise AssertionError(kind)


def ref_eval(tree, b, h, qa, row, k):
    op = tree[0]
    if op == "and":
        return all(ref_eval(t, b, h, qa, row, k) for t in tree[1])
    if op == "or":
        return any(ref_eval(t, b, h, qa, row, k) for t in tree[1])
    if op == "not":
        return not ref_eval(tree[1], b, h, qa, row, k)
    return bool(ref_allowed(op, tree[1], b, h, qa, row, k))


def ref_dense(tree, batch, heads, q_len, kv_len, offsets):
    out = np.zeros((batch, heads, q_len, kv_len), bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                for k in range(kv_len):
                    out[b, h, i, k] = ref_eval(tree, b, h, offsets[b] + i, i, k)
    return out


def ref_block_map(dense, bq, bk):
    b, h, tq, tk = dense.shape
    nq, nk = -(-tq // bq), -(-tk // bk)
    out = np.zeros((b, h, nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            full = tile.all(axis=(2, 3))
            some = tile.any(axis=(2, 3))
            out[:, :, i, j] = np.where(full, 2, np.where(some, 1, 0))
    return out


# ------------------------------------------------------------------------------------------------
# Random specs paired with their reference trees.
# ------------------------------------------------------------------------------------------------


def random_leaf(rng, kind, batch, q_len, kv_len, total, heads):
    """(spec, reference tree). `total` covers absolute positions q_offset + q_len and kv_len."""
    bb = int(rng.choice([1, batch]))
    if kind == "causal":
        return masks.causal(), ("causal", {})
    if kind == "window":
        left, right = int(rng.integers(0, 6)), int(rng.integers(0, 3))
        return masks.sliding_window(left, right), ("window", {"left": left, "right": right})
    if kind == "segments":
        q = np.sort(rng.integers(0, 3, (bb, q_len)), axis=1).astype(np.int32)
        kv = np.sort(rng.integers(0, 3, (bb, kv_len)), axis=1).astype(np.int32)
        return masks.segment_ids(q, kv), ("segments", {"q": q, "kv": kv})
    if kind == "padding":
        kvl = rng.integers(0, kv_len + 1, (bb,)).astype(np.int32)
        ql = rng.integers(0, q_len + 1, (bb,)).astype(np.int32) if rng.random() < 0.5 else None
        return masks.padding(kvl, ql), ("padding", {"kv_lengths": kvl, "q_lengths": ql})
    if kind == "prefix":
        pl = rng.integers(0, total + 1, (bb,)).astype(np.int32)
        return masks.prefix_lm(pl), ("prefix", {"prefix": pl})
    if kind == "modality":
        t = rng.choice([TEXT, IMAGE, ANSWER, PAD], size=(bb, total), p=[0.35, 0.35, 0.2, 0.1])
        t = t.astype(np.int32)
        return masks.modality_mutual(t), ("modality", {"types": t})
    if kind == "frame":
        f = np.sort(rng.integers(-1, 4, (bb, total)), axis=1).astype(np.int32)
        return masks.frame_block_causal(f), ("frame", {"frames": f})
    if kind == "block_sparse":
        bq, bk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        nqb, nkb = -(-total // bq) + int(rng.integers(0, 2)), -(-kv_len // bk)
        hh = int(rng.choice([1, heads]))
        mk = int(rng.integers(1, 4))
        idx = rng.integers(-1, nkb + 1, (bb, hh, nqb, mk)).astype(np.int32)
        num = rng.integers(0, mk + 1, (bb, hh, nqb)).astype(np.int32)
        spec = masks.block_sparse(bq, bk, idx, num)
        return spec, ("block_sparse", {"idx": idx, "num": num, "bq": bq, "bk": bk})
    if kind == "array":
        shape = (bb, int(rng.choice([1, heads])), int(rng.choice([1, q_len])), kv_len)
        m = rng.random(shape) < 0.7
        return masks.from_array(jnp.asarray(m)), ("array", {"mask": m})
    raise AssertionError(kind)


KINDS = [
    "causal",
    "window",
    "segments",
    "padding",
    "prefix",
    "modality",
    "frame",
    "block_sparse",
    "array",
]


def random_spec(rng, batch, q_len, kv_len, total, heads, depth=0):
    r = rng.random()
    if depth < 2 and r < 0.45:
        n = int(rng.integers(2, 4))
        parts = [random_spec(rng, batch, q_len, kv_len, total, heads, depth + 1) for _ in range(n)]
        spec = parts[0][0]
        for s, _ in parts[1:]:
            spec = spec & s if r < 0.3 else spec | s
        return spec, ("and" if r < 0.3 else "or", [t for _, t in parts])
    if depth > 0 and r > 0.9:
        s, t = random_spec(rng, batch, q_len, kv_len, total, heads, depth + 1)
        return ~s, ("not", t)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    return random_leaf(rng, kind, batch, q_len, kv_len, total, heads)


def _offsets(rng, batch, kind):
    if kind == "none":
        return None, np.zeros(batch, np.int64)
    if kind == "int":
        o = int(rng.integers(0, 6))
        return o, np.full(batch, o)
    o = rng.integers(0, 6, (batch,)).astype(np.int32)
    return jnp.asarray(o), o.astype(np.int64)


@settings(deadline=None, max_examples=20)
@given(
    batch=st.integers(1, 3),
    q_len=st.integers(1, 13),
    kv_len=st.integers(1, 17),
    off_kind=st.sampled_from(["none", "int", "array"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_and_block_map_match_reference(batch, q_len, kv_len, off_kind, seed):
    rng = np.random.default_rng(seed)
    heads = 2
    q_offset, offs = _offsets(rng, batch, off_kind)
    total = max(kv_len, q_len + 5)
    spec, tree = random_spec(rng, batch, q_len, kv_len, total, heads)
    dense = np.asarray(spec.dense(batch, q_len, kv_len, q_offset))
    assert dense.dtype == bool and dense.ndim == 4
    assert dense.shape[0] in (1, batch) and dense.shape[2:] == (q_len, kv_len)
    assert dense.shape[1] == (spec.num_heads or 1)
    h = dense.shape[1]
    want = ref_dense(tree, batch, h, q_len, kv_len, offs)
    np.testing.assert_array_equal(np.broadcast_to(dense, want.shape), want, err_msg=repr(spec))

    bq, bk = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    bm = np.asarray(spec.block_map(batch, q_len, kv_len, bq, bk, q_offset))
    assert bm.dtype == np.int8
    if spec.num_heads is None:
        bm = bm[:, None]
    np.testing.assert_array_equal(
        np.broadcast_to(bm, (batch,) + bm.shape[1:]),
        ref_block_map(want, bq, bk),
        err_msg=repr(spec),
    )


@pytest.mark.parametrize("chunk", [1, 7])
def test_block_map_chunked_path_and_interval_path(monkeypatch, chunk):
    """The lax.map (chunked) generic path and the interval fast path agree with the reference."""
    rng = np.random.default_rng(chunk)
    batch, q_len, kv_len = 2, 23, 30
    types = rng.choice([TEXT, IMAGE, ANSWER], (batch, 40)).astype(np.int32)
    kvl = np.array([30, 11], np.int32)
    offs = np.array([3, 0])
    cases = [
        (
            masks.causal() & masks.padding(kvl),
            ("and", [("causal", {}), ("padding", {"kv_lengths": kvl, "q_lengths": None})]),
        ),
        (
            masks.sliding_window(4, 2) & masks.prefix_lm(np.array([6, 2])),
            (
                "and",
                [("window", {"left": 4, "right": 2}), ("prefix", {"prefix": np.array([6, 2])})],
            ),
        ),
        (
            masks.modality_mutual(types) | masks.sliding_window(1, 1),
            ("or", [("modality", {"types": types}), ("window", {"left": 1, "right": 1})]),
        ),
    ]
    monkeypatch.setattr(masks, "_BLOCK_MAP_CHUNK_ELEMS", chunk * 5 * 30)
    for spec, tree in cases:
        want = ref_block_map(ref_dense(tree, batch, 1, q_len, kv_len, offs), 5, 4)
        got = np.asarray(spec.block_map(batch, q_len, kv_len, 5, 4, jnp.asarray(offs)))
        np.testing.assert_array_equal(
            np.broadcast_to(got[:, None], want.shape), want, err_msg=repr(spec)
        )


def test_causal_block_map_values():
    bm = np.asarray(masks.causal().block_map(1, 6, 6, 3, 3))
    np.testing.assert_array_equal(
        bm[0], [[masks.PARTIAL, masks.EMPTY], [masks.FULL, masks.PARTIAL]]
    )


def test_algebra():
    rng = np.random.default_rng(0)
    b, tq, tk = 2, 9, 11
    seg = np.sort(rng.integers(0, 3, (b, tk)), axis=1)
    specs = [
        masks.causal(),
        masks.sliding_window(2, 1),
        masks.padding(np.array([7, 11]), np.array([9, 4])),
        masks.segment_ids(seg[:, :tq], seg),
    ]
    d = [np.broadcast_to(np.asarray(s.dense(b, tq, tk, 2)), (b, 1, tq, tk)) for s in specs]
    a, c, p, s = specs
    dense = lambda x: np.broadcast_to(np.asarray(x.dense(b, tq, tk, 2)), (b, 1, tq, tk))
    np.testing.assert_array_equal(dense(a & c), d[0] & d[1])
    np.testing.assert_array_equal(dense(a | c), d[0] | d[1])
    np.testing.assert_array_equal(dense(~a), ~d[0])
    np.testing.assert_array_equal(dense(~~a), d[0])
    np.testing.assert_array_equal(dense((a | c) & (p | s)), (d[0] | d[1]) & (d[2] | d[3]))
    np.testing.assert_array_equal(dense(a & (c & p)), dense((a & c) & p))
    np.testing.assert_array_equal(dense(a | (c | p)), dense((a | c) | p))
    np.testing.assert_array_equal(dense(a & (c | p)), dense((a & c) | (a & p)))  # distributive
    np.testing.assert_array_equal(dense(~(a & c)), dense(~a | ~c))  # De Morgan
    # A boolean array combines with specs on either side; None is the identity.
    arr = jnp.asarray(rng.random((b, 1, tq, tk)) < 0.5)
    np.testing.assert_array_equal(dense(a & arr), d[0] & np.asarray(arr))
    np.testing.assert_array_equal(dense(arr | a), d[0] | np.asarray(arr))
    assert (a & None) is a and (None | a) is a
    assert len((a & c & p).leaves()) == 3


def test_specs_are_pytrees_and_jit_arguments():
    seg = jnp.array([[0, 0, 1, 1, 1]])
    packed = masks.causal() & masks.segment_ids(seg, seg) & masks.sliding_window(3)
    leaves, treedef = jax.tree_util.tree_flatten(packed)
    assert len(leaves) == 2  # the two segment arrays; ints are static
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_array_equal(rebuilt.dense(1, 5, 5), packed.dense(1, 5, 5))
    spec = masks.causal() & masks.padding(jnp.array([4])) & masks.sliding_window(3)

    @jax.jit
    def f(s, off):
        return s.dense(1, 3, 5, off), s.block_map(1, 3, 5, 2, 2, off)

    d, bm = f(spec, jnp.array([2], jnp.int32))
    np.testing.assert_array_equal(d, spec.dense(1, 3, 5, 2))
    np.testing.assert_array_equal(bm, spec.block_map(1, 3, 5, 2, 2, 2))
    bs = masks.block_sparse(
        2, 2, jnp.zeros((1, 3, 3, 1), jnp.int32), jnp.ones((1, 3, 3), jnp.int32)
    )
    assert jax.jit(lambda s: s.dense(1, 5, 5))(bs).shape == (1, 3, 5, 5)
    assert bs.num_heads == 3 and bs.block_map(1, 5, 5, 2, 2).shape == (1, 3, 3, 3)


def test_modality_mutual_semantics():
    # prompt: [img img txt txt] answer: [ans ans] then a second turn [txt ans]
    t = np.array([[TEXT, IMAGE, IMAGE, TEXT, TEXT, ANSWER, ANSWER, TEXT, ANSWER]], np.int32)
    d = np.asarray(masks.modality_mutual(t).dense(1, 9, 9))[0, 0]
    assert d[1, 3] and d[1, 4] and d[2, 4]  # image sees later prompt text
    assert not d[1, 5] and not d[2, 6]  # never a later answer
    assert not d[1, 7]  # nor text of a later turn (it has seen answer tokens after the image)
    assert not d[0, 1] and not d[3, 4]  # text stays causal
    np.testing.assert_array_equal(np.tril(d), np.tril(np.ones_like(d)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="left"):
        masks.sliding_window(-1)
    with pytest.raises(ValueError, match="right"):
        masks.sliding_window(2, 1.5)
    with pytest.raises(ValueError, match="token_types.*rank"):
        masks.modality_mutual(np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="kv_lengths.*integer"):
        masks.padding(np.zeros((2,), np.float32))
    with pytest.raises(ValueError, match="q_segments has length 4, expected q_len=5"):
        masks.segment_ids(np.zeros((1, 4), np.int32), np.zeros((1, 6), np.int32)).dense(1, 5, 6)
    with pytest.raises(ValueError, match="batch size 3, expected 1 or batch=2"):
        masks.padding(np.array([1, 2, 3])).dense(2, 4, 4)
    with pytest.raises(ValueError, match="frame_ids has length 4, expected at least 7"):
        masks.frame_block_causal(np.zeros((1, 4), np.int32)).dense(1, 4, 4, q_offset=3)
    with pytest.raises(ValueError, match="block_indices covers 2 query blocks"):
        masks.block_sparse(2, 2, np.zeros((1, 2, 1), np.int32)).dense(1, 6, 6)
    with pytest.raises(ValueError, match="num_blocks shape"):
        masks.block_sparse(2, 2, np.zeros((1, 2, 1), np.int32), np.zeros((1, 3), np.int32))
    with pytest.raises(ValueError, match="block_q"):
        masks.causal().block_map(1, 4, 4, 0, 2)
    with pytest.raises(ValueError, match="q_offset"):
        masks.causal().dense(2, 4, 4, q_offset=np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="dtype bool"):
        masks.from_array(np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        masks.from_array(np.zeros((1, 1, 3, 4), bool)).dense(1, 5, 4)
    with pytest.raises(ValueError, match="different head counts"):
        m2 = masks.from_array(np.zeros((1, 2, 4, 4), bool))
        m3 = masks.from_array(np.zeros((1, 3, 4, 4), bool))
        (m2 & m3).dense(1, 4, 4)
