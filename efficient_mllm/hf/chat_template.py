"""Chat templates of Hugging Face checkpoints: find them on disk and render them with jinja2.

Rendering follows ``tokenizer.apply_chat_template`` (transformers 5.x): a sandboxed jinja2
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, the
``{% generation %}`` block tag (its character spans are returned for assistant-token masks), and
the globals templates use (``raise_exception``, ``strftime_now``, ``namespace``, ``dict``) plus a
``tojson`` filter that does not HTML-escape. The template sees the named special tokens
(``bos_token``, ``eos_token``, ... and model-specific ones such as ``image_token``), then the
caller's keyword arguments. Messages are rebuilt from plain JSON types first; any other value
(an image, an array) becomes a ``"<TypeName>"`` placeholder, so templates only see that it exists.

Left out: ``continue_final_message``, tools given as Python functions (JSON schemas work),
``sanitize_control_tokens`` and the ``additional_chat_templates/`` folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["SPECIAL_TOKEN_NAMES", "load_chat_template", "render_chat_template", "special_tokens"]

# Named special tokens of every tokenizer, in the order transformers lists them.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_text(value):
    """A special token from a config: a string or an AddedToken dict ``{"content": ...}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token: expected a string or {{'content': str}}, got {value!r}")


def special_tokens(tokenizer_config: Mapping) -> dict[str, str]:
    """Named special tokens of a ``tokenizer_config.json`` dict: the standard ones that are set,
    then model-specific ones (other ``*_token`` keys with a string value, e.g. ``image_token``,
    and ``extra_special_tokens`` when given as a dict), as transformers 5 reads them."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        tok = _token_text(tokenizer_config.get(name))
        if tok is not None:
            out[name] = tok
    for name, tok in tokenizer_config.items():
        if name.endswith("_token") and name not in out and isinstance(tok, str):
            out[name] = tok
    extra = tokenizer_config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        for name, tok in extra.items():
            out[name] = _token_text(tok)
    return out


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_chat_template(path: str | os.PathLike, name: str = "default") -> str | None:
    """The chat template saved in a checkpoint folder, or ``None`` when it has none.

    Looks, in order, at ``chat_template.jinja``, ``chat_template.json`` (``{"chat_template": ...}``)
    and the ``chat_template`` entry of ``tokenizer_config.json`` (a string, or a list of
    ``{"name", "template"}`` from which ``name`` is taken).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a folder")
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    candidates = []
    json_file = os.path.join(path, "chat_template.json")
    if os.path.isfile(json_file):
        candidates.append((json_file, _read_json(json_file).get("chat_template")))
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        candidates.append((config_file, _read_json(config_file).get("chat_template")))
    for file, template in candidates:
        if template is None:
            continue
        if isinstance(template, str):
            return template
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            if name not in named:
                raise ValueError(
                    f"name: no chat template {name!r} in {file}; it has {sorted(map(str, named))}"
                )
            return named[name]
        raise ValueError(f"{file}: chat_template must be a string or a list, got {template!r}")
    return None


def _plain(value):
    """``value`` rebuilt from JSON types; anything else becomes ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


_ENV = None


def _environment():
    """The jinja2 environment (built once)."""
    global _ENV
    if _ENV is not None:
        return _ENV
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body and records its span."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_record", [])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _record(self, caller):
            text = caller()
            state = getattr(self.environment, "_span_state", None)
            if state is not None:
                blocks, spans = state
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore names (no reach into Python internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"namespace attributes may not start with '_', got {key!r}"
                )

    class DictMaker:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["dict"] = DictMaker()
    env.globals["namespace"] = Namespace
    _ENV = env
    return env


_COMPILED: dict[str, object] = {}


def _compile(template: str):
    if template not in _COMPILED:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        _COMPILED[template] = _environment().from_string(template)
    return _COMPILED[template]


def render_chat_template(
    template: str,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    tools: Sequence[Mapping] | None = None,
    documents: Sequence[Mapping] | None = None,
    return_generation_spans: bool = False,
    **kwargs,
):
    """Renders one conversation like ``tokenizer.apply_chat_template(..., tokenize=False)``.

    ``messages``: ``[{"role": ..., "content": str | [{"type": "text" | "image", ...}]}]``; keys
    whose value is ``None`` are dropped. ``special_tokens``: the names the template sees (see
    :func:`special_tokens`); ``kwargs`` override them. With ``return_generation_spans`` it returns
    ``(text, [(start, end), ...])``, the character spans of ``{% generation %}`` blocks.
    """
    if not isinstance(template, str) or not template:
        raise ValueError(f"template: expected a non-empty jinja string, got {template!r}")
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(
            f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r}"
        )
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}]: expected a dict, got {type(m).__name__}")
        chat.append(_plain({k: v for k, v in m.items() if v is not None}))
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ValueError("tools: expected a list of JSON-schema dicts")
    variables = {**dict(special_tokens or {}), **kwargs}
    variables = _plain(variables)
    compiled = _compile(template)
    context = dict(
        messages=chat,
        tools=_plain(list(tools)) if tools is not None else None,
        documents=_plain(list(documents)) if documents is not None else None,
        add_generation_prompt=bool(add_generation_prompt),
        **variables,
    )
    if not return_generation_spans:
        return compiled.render(**context)
    env = compiled.environment
    blocks, spans = [], []
    env._span_state = (blocks, spans)
    try:
        for block in compiled.generate(**context):
            blocks.append(block)
    finally:
        env._span_state = None
    return "".join(blocks), spans
