"""A tokenizer loaded from a checkpoint folder's ``tokenizer.json`` / ``tokenizer_config.json``
with HF's special-token and BOS/EOS rules and its chat template (see
:mod:`efficient_mllm.hf.processors`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from efficient_mllm.data.tokenizer import HFTokenizer
from efficient_mllm.hf.chat_template import _read_json, load_chat_template, render_chat_template
from efficient_mllm.hf.chat_template import special_tokens as _config_special_tokens

# --------------------------------------------------------------------------- tokenizer


class PretrainedTokenizer(HFTokenizer):
    """A checkpoint's tokenizer as transformers loads it (``TokenizersBackend``).

    From the folder: ``tokenizer.json`` (the ``tokenizers`` pipeline), ``tokenizer_config.json``
    (named special tokens, model-specific ones from an ``extra_special_tokens`` dict such as
    ``image_token``, ``added_tokens_decoder``, ``padding_side``; ``special_tokens_map.json`` fills
    in missing names) and the chat template. Special tokens missing from the vocabulary are
    added as special tokens. BOS/EOS come from ``tokenizer.json``'s post-processor: as in
    transformers 5, a folder's ``add_bos_token`` / ``add_eos_token`` are ignored when
    ``tokenizer.json`` exists. The constructor flags (for a tokenizer built in code) replace the
    post-processor by ``[bos] $A [eos]``. Truncation and padding stored in ``tokenizer.json`` are
    switched off: padding is done by :meth:`__call__`.

    It keeps :class:`~efficient_mllm.data.tokenizer.HFTokenizer`'s interface (``encode``,
    ``decode``, ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``,
    ``image_token_id``); ids of tokens the checkpoint does not define are ``None``.
    Left out: the per-class rebuilding of the pipeline that transformers does for
    ``LlamaTokenizer`` & co. (the checkpoint's ``tokenizer.json`` is used as saved).
    """

    def __init__(
        self,
        tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        extra_special_tokens: Sequence[str] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "right",
        chat_template: str | None = None,
    ):
        import tokenizers

        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise ValueError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        self._tok = tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        named = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        wanted = list(dict.fromkeys([*named.values(), *extra_special_tokens]))
        missing = [t for t in wanted if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(
                [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
            )
        self.named_special_tokens = named
        self.extra_special_tokens = tuple(extra_special_tokens)
        self.padding_side = padding_side
        self.chat_template = chat_template
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        # HFTokenizer's interface
        self.special_tokens = {
            "pad": named.get("pad_token"),
            "bos": named.get("bos_token"),
            "eos": named.get("eos_token"),
            "unk": named.get("unk_token"),
            "image": named.get("image_token"),
        }
        ids = {k: self.token_to_id(t) for k, t in self.special_tokens.items()}
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.unk_id, self.image_token_id = ids["unk"], ids["image"]
        self._special_ids = {
            self.token_to_id(t) for t in (*named.values(), *self.extra_special_tokens)
        } - {None}

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        from tokenizers import processors

        bos, eos = (
            self.named_special_tokens.get("bos_token"),
            self.named_special_tokens.get("eos_token"),
        )
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
        pair = (
            single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        )
        specials = [(t, self.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PretrainedTokenizer:
        """Loads ``tokenizer.json`` + ``tokenizer_config.json`` (+ chat template) of a folder."""
        import tokenizers

        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ValueError(f"path: no tokenizer.json in {path!r}")
        config = {}
        map_file = os.path.join(path, "special_tokens_map.json")
        if os.path.isfile(map_file):
            config.update(_read_json(map_file))
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            config.update({k: v for k, v in _read_json(cfg_file).items() if v is not None})
        tok = tokenizers.Tokenizer.from_file(tok_file)
        decoder = config.get("added_tokens_decoder") or {}
        to_add = []
        for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = entry["content"] if isinstance(entry, Mapping) else str(entry)
            if tok.token_to_id(content) is None:
                spec = dict(entry) if isinstance(entry, Mapping) else {"content": content}
                to_add.append(
                    tokenizers.AddedToken(
                        content,
                        single_word=spec.get("single_word", False),
                        lstrip=spec.get("lstrip", False),
                        rstrip=spec.get("rstrip", False),
                        normalized=spec.get("normalized", not spec.get("special", False)),
                        special=spec.get("special", False),
                    )
                )
        if to_add:
            tok.add_tokens(to_add)
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra = list(extra.values()) if isinstance(extra, Mapping) else list(extra)
        extra = [e["content"] if isinstance(e, Mapping) else e for e in extra]
        return cls(
            tok,
            special_tokens=_config_special_tokens(config),
            extra_special_tokens=extra,
            padding_side=config.get("padding_side", "right"),
            chat_template=load_chat_template(path),
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes ``tokenizer.json``, ``tokenizer_config.json`` (and ``chat_template.jinja``) in
        the layout transformers 5 saves and :meth:`from_pretrained` (or ``AutoTokenizer``) reads."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "TokenizersBackend", "padding_side": self.padding_side}
        config.update(self.named_special_tokens)
        config["extra_special_tokens"] = list(self.extra_special_tokens)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        if self.chat_template is not None:
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)

    def save(self, path) -> None:
        raise ValueError(
            f"path: a PretrainedTokenizer is saved as a folder; use save_pretrained({str(path)!r})"
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> PretrainedTokenizer:
        """Same as :meth:`from_pretrained` (a folder)."""
        return cls.from_pretrained(path)

    def __getattr__(self, name):
        # bos_token, image_token, ... and their *_id, like transformers' tokenizers.
        named = self.__dict__.get("named_special_tokens", {})
        if name in named:
            return named[name]
        if name.endswith("_id") and name[:-3] in named:
            return self.token_to_id(named[name[:-3]])
        raise AttributeError(name)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Text of ``ids``; ``skip_special`` drops every special token (HF's
        ``skip_special_tokens``). ``clean_up_tokenization_spaces`` is not applied."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        padding_side: str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "np",
    ) -> dict:
        """``{"input_ids", "attention_mask"}`` of a text or a batch (always batched output).

        ``padding``: ``False`` | ``True``/``"longest"`` | ``"max_length"`` (to ``max_length``);
        nothing is truncated. ``return_tensors="np"`` gives int64 arrays (equal lengths needed),
        ``None`` lists of lists."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text: expected a string or a non-empty list of strings")
        encs = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        ids = [list(e.ids) for e in encs]
        return self._pad(ids, padding, padding_side, max_length, return_tensors)

    def _pad(self, ids, padding, padding_side, max_length, return_tensors) -> dict:
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {side!r}")
        longest = max(len(i) for i in ids)
        if padding in (False, None, "do_not_pad"):
            target = None
        elif padding in (True, "longest"):
            target = longest
        elif padding == "max_length":
            if max_length is None or max_length < longest:
                raise ValueError(
                    f"max_length: padding='max_length' needs max_length >= the longest sequence "
                    f"({longest}), got {max_length}"
                )
            target = max_length
        else:
            raise ValueError(
                f"padding: expected False, True, 'longest' or 'max_length', got {padding!r}"
            )
        masks = [[1] * len(i) for i in ids]
        if target is not None and any(len(i) < target for i in ids):
            if self.pad_id is None:
                raise ValueError("padding: the tokenizer has no pad_token to pad with")
            for k, seq in enumerate(ids):
                n = target - len(seq)
                if side == "right":
                    ids[k], masks[k] = seq + [self.pad_id] * n, masks[k] + [0] * n
                else:
                    ids[k], masks[k] = [self.pad_id] * n + seq, [0] * n + masks[k]
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": masks}
        if return_tensors != "np":
            raise ValueError(f"return_tensors: expected 'np' or None, got {return_tensors!r}")
        if len({len(i) for i in ids}) > 1:
            raise ValueError(
                "text: sequences have different lengths; pass padding=True or return_tensors=None"
            )
        return {
            "input_ids": np.asarray(ids, np.int64),
            "attention_mask": np.asarray(masks, np.int64),
        }

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs,
    ):
        """``tokenizer.apply_chat_template``: the rendered string, or (``tokenize``) its ids,
        encoded without adding special tokens."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("chat_template: this tokenizer has no chat template; pass one")
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.named_special_tokens,
            **kwargs,
        )
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return f"PretrainedTokenizer(vocab_size={self.vocab_size})"
