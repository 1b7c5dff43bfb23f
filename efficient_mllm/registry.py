"""Named registries built from strings such as ``"fastv(layer=2, keep=64)"``.

One registry per kind of pluggable component (attention variants, compressors, KV presses,
datasets, models, evaluators). A spec string is parsed with :mod:`ast` and only *literal*
arguments are accepted (numbers, strings, booleans, None, tuples/lists/dicts of literals), so a
spec can come from a config file, the command line or a notebook without ``eval``.

    >>> from efficient_mllm import registry
    >>> @registry.ATTENTION.register("my_attn", paper="...")
    ... def my_attn(scale=None): ...
    >>> registry.ATTENTION.build("my_attn(scale=0.5)")
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
from collections.abc import Callable
from typing import Any

__all__ = [
    "Entry",
    "Registry",
    "RegistryError",
    "parse_spec",
    "ATTENTION",
    "COMPRESSORS",
    "KV_PRESSES",
    "DATASETS",
    "MODELS",
    "EVALUATORS",
    "all_registries",
]


class RegistryError(ValueError):
    """Unknown name, malformed spec or bad arguments."""


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    paper: str = ""
    status: str = "implemented"
    description: str = ""


def _literal(node: ast.AST, spec: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise RegistryError(
            f"spec {spec!r}: argument {ast.unparse(node)!r} is not a literal "
            "(allowed: numbers, strings, True/False/None, tuples, lists, dicts)"
        ) from None


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parses ``"name"`` or ``"name(a=1, b='x')"`` into ``(name, kwargs)``.

    Positional arguments are rejected: every argument must be named, so a spec reads the same
    in a config and in the method's docstring.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RegistryError(f"spec must be a non-empty string, got {spec!r}")
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as e:
        raise RegistryError(f"spec {spec!r} is not of the form name(arg=value, ...): {e.msg}") from None
    node = tree.body
    if isinstance(node, ast.Name):
        return node.id, {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.args:
            raise RegistryError(
                f"spec {spec!r}: positional arguments are not allowed; write name(arg=value)"
            )
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise RegistryError(f"spec {spec!r}: **kwargs are not allowed")
            kwargs[kw.arg] = _literal(kw.value, spec)
        return node.func.id, kwargs
    raise RegistryError(f"spec {spec!r} is not of the form name or name(arg=value, ...)")


class Registry:
    """A mapping from names to factories, with string specs and helpful errors."""

    def __init__(self, kind: str, providers: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        # Modules whose import registers this kind's entries; imported on first lookup so that
        # ``registry.DATASETS.build("shapes_vqa")`` works without importing the package first.
        self._providers = list(providers)

    def _load_providers(self) -> None:
        import importlib

        while self._providers:
            importlib.import_module(self._providers.pop(0))

    def register(
        self, name: str, *, paper: str = "", status: str = "implemented", description: str = ""
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``factory`` under ``name``."""

        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name].factory is not factory:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
            self._entries[name] = Entry(name, factory, paper, status, doc)
            return factory

        return deco

    def names(self) -> list[str]:
        self._load_providers()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        self._load_providers()
        return name in self._entries

    def get(self, name: str) -> Entry:
        self._load_providers()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(self.names()) or '(none)'}"
            )
        return self._entries[name]

    def build(self, spec: str | dict | Callable[..., Any], **overrides: Any) -> Any:
        """Builds a component from a spec string, a ``{"name": ..., **kwargs}`` dict, or returns
        a callable unchanged. ``overrides`` are merged over the spec's arguments."""
        if callable(spec) and not isinstance(spec, str):
            return spec
        if isinstance(spec, dict):
            spec = dict(spec)
            if "name" not in spec:
                raise RegistryError(f"{self.kind} spec dict needs a 'name' key, got {spec!r}")
            name, kwargs = spec.pop("name"), spec
        else:
            name, kwargs = parse_spec(spec)
        entry = self.get(name)
        kwargs = {**kwargs, **overrides}
        sig = inspect.signature(entry.factory)
        params = sig.parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = [k for k in kwargs if k not in params]
            if unknown:
                allowed = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
                raise RegistryError(
                    f"{self.kind} {name!r} got unknown argument(s) {unknown}; "
                    f"it accepts: {', '.join(allowed) or '(no arguments)'}"
                )
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise RegistryError(f"{self.kind} {name!r}: {e}") from None
        return entry.factory(**kwargs)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


ATTENTION = Registry("attention", ("efficient_mllm.ops.attention", "efficient_mllm.nn.linear_attention"))
COMPRESSORS = Registry("compressor", ("efficient_mllm.compress",))
KV_PRESSES = Registry("kv_press")
DATASETS = Registry("dataset", ("efficient_mllm.data",))
MODELS = Registry("model")
EVALUATORS = Registry("evaluator", ("efficient_mllm.evaluate",))


def all_registries() -> dict[str, Registry]:
    return {r.kind: r for r in (ATTENTION, COMPRESSORS, KV_PRESSES, DATASETS, MODELS, EVALUATORS)}
