"""Tokenizers behind one small interface, and the VQA prompt format.

Interface (both :class:`WordTokenizer` and :class:`HFTokenizer`): ``encode(text) -> list[int]``,
``decode(ids, skip_special=True) -> str``, ``vocab_size``, ``pad_id`` (always 0 for
:class:`WordTokenizer`), ``bos_id``, ``eos_id``, ``unk_id``, ``image_token_id``,
``save(path)`` and ``load(path)`` (JSON).

Prompt format of a VQA row: ``<bos> <image> question ?`` then the answer then ``<eos>``; the loss
covers the answer tokens and ``<eos>`` (:func:`encode_vqa`).
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterable

__all__ = [
    "SPECIAL_TOKENS",
    "HFTokenizer",
    "WordTokenizer",
    "encode_vqa",
    "format_question",
    "load_tokenizer",
]

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)

# A special token, a run of word characters, or one punctuation character.
_WORD_RE = re.compile(r"<[a-z]+>|[\w]+|[^\w\s]")


def _split_words(text: str, lowercase: bool) -> list[str]:
    if lowercase:
        text = text.lower()
    return _WORD_RE.findall(text)


class WordTokenizer:
    """Word-level tokenizer: ``<pad>=0, <bos>=1, <eos>=2, <unk>=3, <image>=4`` then the words.

    Text is lower-cased (by default) and split into words and single punctuation marks; words
    outside the vocabulary map to ``<unk>``.
    """

    def __init__(self, words: Iterable[str], *, lowercase: bool = True):
        vocab = list(SPECIAL_TOKENS)
        seen = set(vocab)
        for w in words:
            if not isinstance(w, str) or not w or any(c.isspace() for c in w):
                raise ValueError(
                    f"words: each word must be a non-empty string without spaces, got {w!r}"
                )
            w = w.lower() if lowercase else w
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        self.lowercase = bool(lowercase)
        self._vocab = vocab
        self._index = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        *,
        min_count: int = 1,
        max_size: int | None = None,
        lowercase: bool = True,
    ) -> WordTokenizer:
        """Builds a vocabulary from texts: words seen ``>= min_count`` times, most frequent first
        (ties alphabetical), at most ``max_size`` words besides the special tokens."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0 or None, got {max_size}")
        counts = collections.Counter()
        for t in texts:
            counts.update(w for w in _split_words(t, lowercase) if w not in SPECIAL_TOKENS)
        words = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        if max_size is not None:
            words = words[:max_size]
        return cls(words, lowercase=lowercase)

    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    pad_id = property(lambda self: 0)
    bos_id = property(lambda self: 1)
    eos_id = property(lambda self: 2)
    unk_id = property(lambda self: 3)
    image_token_id = property(lambda self: 4)

    def token_to_id(self, token: str) -> int:
        """Id of one word (``<unk>`` if unknown)."""
        if self.lowercase and token not in self._index:
            token = token.lower()
        return self._index.get(token, self.unk_id)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``'s words (no ``<bos>``/``<eos>`` added)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        unk = self.unk_id
        return [self._index.get(w, unk) for w in _split_words(text, self.lowercase)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Space-joined words; ``skip_special`` drops the special tokens except ``<unk>``."""
        out = []
        n = len(self._vocab)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"ids: token id {i} is outside the vocabulary [0, {n})")
            if skip_special and i in (0, 1, 2, 4):
                continue
            out.append(self._vocab[i])
        return " ".join(out)

    def to_json(self) -> dict:
        return {"type": "word", "lowercase": self.lowercase, "vocab": self._vocab}

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        with open(path) as f:
            obj = json.load(f)
        return cls._from_json(obj, path)

    @classmethod
    def _from_json(cls, obj: dict, path) -> WordTokenizer:
        if obj.get("type") != "word" or list(obj.get("vocab", [])[:5]) != list(SPECIAL_TOKENS):
            raise ValueError(
                f"path: {path} is not a saved WordTokenizer (expected type 'word' and "
                f"vocab starting with {list(SPECIAL_TOKENS)})"
            )
        return cls(obj["vocab"][5:], lowercase=obj.get("lowercase", True))

    def __eq__(self, other) -> bool:
        return isinstance(other, WordTokenizer) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind the same interface.

    The special tokens are looked up by their text; any that the tokenizer lacks is added as a
    special token (which grows ``vocab_size``). ``encode`` never adds the tokenizer's own
    post-processing specials (e.g. BERT's ``[CLS]``/``[SEP]``).
    """

    def __init__(
        self,
        tokenizer,
        *,
        pad_token: str = PAD,
        bos_token: str = BOS,
        eos_token: str = EOS,
        unk_token: str = UNK,
        image_token: str = IMAGE,
    ):
        import tokenizers

        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise ValueError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        self._tok = tokenizer
        self.special_tokens = {
            "pad": pad_token,
            "bos": bos_token,
            "eos": eos_token,
            "unk": unk_token,
            "image": image_token,
        }
        missing = [t for t in self.special_tokens.values() if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(list(dict.fromkeys(missing)))
        ids = {k: tokenizer.token_to_id(t) for k, t in self.special_tokens.items()}
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.unk_id, self.image_token_id = ids["unk"], ids["image"]
        self._special_ids = {self.pad_id, self.bos_id, self.eos_id, self.image_token_id}

    @classmethod
    def from_file(cls, path: str | os.PathLike, **special_tokens: str) -> HFTokenizer:
        """Loads a Hugging Face ``tokenizer.json`` (local file, no download)."""
        import tokenizers

        if not os.path.isfile(path):
            raise ValueError(f"path: no tokenizer file at {str(path)!r}")
        return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), **special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self):
        return self._tok

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=False).strip()

    def to_json(self) -> dict:
        return {
            "type": "hf",
            "special_tokens": dict(self.special_tokens),
            "tokenizer": json.loads(self._tok.to_str()),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``{"type": "hf", "special_tokens": ..., "tokenizer": <tokenizer.json>}``."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """Loads what :meth:`save` wrote, or a plain ``tokenizer.json`` (default special names)."""
        with open(path) as f:
            obj = json.load(f)
        return cls._from_json(obj, path)

    @classmethod
    def _from_json(cls, obj: dict, path) -> HFTokenizer:
        import tokenizers

        if obj.get("type") == "hf":
            names = {f"{k}_token": v for k, v in obj["special_tokens"].items()}
            return cls(tokenizers.Tokenizer.from_str(json.dumps(obj["tokenizer"])), **names)
        if "model" in obj:
            return cls(tokenizers.Tokenizer.from_str(json.dumps(obj)))
        raise ValueError(f"path: {path} is neither a saved HFTokenizer nor a tokenizer.json")

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike) -> WordTokenizer | HFTokenizer:
    """Loads a saved :class:`WordTokenizer` or :class:`HFTokenizer`, or a ``tokenizer.json``."""
    if not os.path.isfile(path):
        raise ValueError(f"path: no tokenizer file at {str(path)!r}")
    with open(path) as f:
        obj = json.load(f)
    if isinstance(obj, dict) and obj.get("type") == "word":
        return WordTokenizer._from_json(obj, path)
    if isinstance(obj, dict):
        return HFTokenizer._from_json(obj, path)
    raise ValueError(f"path: {path} does not hold a tokenizer (a JSON object was expected)")


def format_question(question: str) -> str:
    """``question`` with exactly one trailing `` ?``."""
    q = question.strip()
    while q.endswith("?"):
        q = q[:-1].rstrip()
    return f"{q} ?"


def encode_vqa(
    tokenizer, question: str, answer: str, *, multimodal: bool = True
) -> tuple[list[int], int]:
    """Token ids of ``<bos> [<image>] question ? answer <eos>`` and the prompt length (the
    index of the first answer token). Targets are the ids from the prompt length on."""
    prompt = [tokenizer.bos_id] + ([tokenizer.image_token_id] if multimodal else [])
    prompt += tokenizer.encode(format_question(question))
    ans = tokenizer.encode(" " + answer.strip())
    if not ans:
        raise ValueError(f"answer: {answer!r} encodes to no tokens; a non-empty answer is expected")
    return prompt + ans + [tokenizer.eos_id], len(prompt)
