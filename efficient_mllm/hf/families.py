"""The protocol every Hugging Face model family implements, and the family registry.

A *family* knows, for one group of HF ``config.model_type`` values, how to

1. turn the HF ``config.json`` dict into our config (``config_from_hf``) and back
   (``config_to_hf``),
2. build our NNX module from that config (``build``; the loader calls it under
   ``nnx.eval_shape``, so it must be a pure function of ``config`` and ``rngs``), and
3. list how every HF tensor maps onto the leaves of ``nnx.state(module)`` (``tensor_maps``).

A :class:`TensorMap` ties HF safetensors name(s) to path(s) in our state:

* one-to-one (the common case): ``TensorMap(ours=("blocks", 0, "attn", "q", "kernel"),
  hf="model.layers.0.self_attn.q_proj.weight", to_ours=..., to_hf=...)``;
* one HF tensor to several of ours (fused qkv of InternViT / the Qwen2-VL ViT):
  ``ours=(path_q, path_k, path_v)`` (a tuple of paths), ``to_ours(w) -> (q, k, v)``,
  ``to_hf(q, k, v) -> w``;
* several HF tensors to one of ours: ``hf=("a.weight", "b.weight")``, ``to_ours(a, b) -> x``,
  ``to_hf(x) -> (a, b)``.

In general ``to_ours`` receives the HF arrays (numpy, in ``hf_names`` order) positionally and
returns one array (one path) or a tuple in ``our_paths`` order; ``to_hf`` is its exact inverse.
Both must be pure numpy reshapes / transposes / slices / concatenations (no arithmetic), so a
round trip is bit exact in any dtype. A path is a tuple of str / int keys as in
``nnx.to_flat_state(nnx.state(module))`` (list indices are ints).

HF names in ``tensor_maps`` are *canonical*: the names the installed ``transformers`` writes.
Checkpoints on disk may use older names (LLaVA's ``language_model.model.layers...``) or hold
buffers we do not need (``rotary_emb.inv_freq``); ``canonical_name`` maps a checkpoint name to
its canonical name, or to None to skip the tensor. The loader reports every checkpoint tensor
that is neither skipped nor mapped as *unexpected*, and every mapped name the checkpoint lacks
as *missing*.

To add a family: subclass :class:`Family`, set ``model_types``, implement the four methods
(and ``canonical_name`` when needed) and call :func:`register_family` at import time of its
module; ``efficient_mllm.hf`` imports the modules listed in ``_FAMILY_MODULES``.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Family",
    "Path",
    "TensorMap",
    "get_family",
    "identity",
    "register_family",
    "supported_model_types",
]

log = logging.getLogger(__name__)

Path = tuple[str | int, ...]

# Modules defining families, imported by the first ``get_family`` / ``supported_model_types``
# (one that fails to import is skipped; ``get_family`` reports its error).
_FAMILY_MODULES = (
    "efficient_mllm.hf.llama",
    "efficient_mllm.hf.vision",
    "efficient_mllm.hf.llava",
    "efficient_mllm.hf.qwen2_vl",
    "efficient_mllm.hf.internvl",
)


def identity(x: np.ndarray) -> np.ndarray:
    """The default transform."""
    return x


def _is_path(x: Any) -> bool:
    return isinstance(x, tuple) and bool(x) and all(isinstance(k, (str, int)) for k in x)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How HF tensor(s) ``hf`` become leaf (leaves) ``ours`` of our NNX state (module doc)."""

    ours: Path | tuple[Path, ...]
    hf: str | tuple[str, ...]
    to_ours: Callable[..., Any] = identity
    to_hf: Callable[..., Any] = identity

    def __post_init__(self):
        if not (
            _is_path(self.ours)
            or (isinstance(self.ours, tuple) and self.ours and all(_is_path(p) for p in self.ours))
        ):
            raise ValueError(
                f"TensorMap.ours={self.ours!r}: expected a path (tuple of str/int) or a tuple "
                "of paths"
            )
        names = (self.hf,) if isinstance(self.hf, str) else self.hf
        if not (isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)):
            raise ValueError(f"TensorMap.hf={self.hf!r}: expected a name or a tuple of names")

    @property
    def our_paths(self) -> tuple[Path, ...]:
        """``ours`` as a tuple of paths."""
        return (self.ours,) if _is_path(self.ours) else tuple(self.ours)

    @property
    def hf_names(self) -> tuple[str, ...]:
        """``hf`` as a tuple of names."""
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    def hf_to_ours(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """HF arrays (``hf_names`` order) -> our arrays (``our_paths`` order)."""
        out = self.to_ours(*arrays)
        return _as_tuple(out, len(self.our_paths), "to_ours", self)

    def ours_to_hf(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Our arrays (``our_paths`` order) -> HF arrays (``hf_names`` order)."""
        out = self.to_hf(*arrays)
        return _as_tuple(out, len(self.hf_names), "to_hf", self)


def _as_tuple(out: Any, n: int, what: str, tm: TensorMap) -> tuple[np.ndarray, ...]:
    if n == 1 and not isinstance(out, (tuple, list)):
        return (out,)
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise ValueError(
            f"{what} of the TensorMap for {tm.hf!r} returned {type(out).__name__}; "
            f"expected {n} arrays"
        )
    return tuple(out)


class Family(abc.ABC):
    """Base class of a model family (see the module docstring). Subclasses override the four
    methods; ``canonical_name`` defaults to keeping every name."""

    #: HF ``config.model_type`` values this family handles.
    model_types: tuple[str, ...] = ()

    @abc.abstractmethod
    def config_from_hf(
        self, hf_config: dict, *, param_dtype: str = "float32", dtype: str | None = None
    ) -> Any:
        """Our config (``LanguageConfig`` / ``VisionConfig`` / ``MLLMConfig`` / ...) from an HF
        ``config.json`` dict. ``param_dtype`` is the storage dtype of the parameters, ``dtype``
        the compute dtype (default: ``param_dtype``). Unsupported HF options raise
        ``ValueError`` naming the key and value."""

    @abc.abstractmethod
    def config_to_hf(self, config: Any, original_hf_config: dict | None = None) -> dict:
        """An HF ``config.json`` dict (with ``model_type`` and ``architectures``) for
        ``config``; keys of ``original_hf_config`` we do not model (token ids, ...) are kept."""

    @abc.abstractmethod
    def build(self, config: Any, rngs: Any) -> Any:
        """Our NNX module for ``config`` (called under ``nnx.eval_shape`` by the loader)."""

    @abc.abstractmethod
    def tensor_maps(self, config: Any) -> list[TensorMap]:
        """Every parameter of ``build(config)`` mapped to canonical HF names (module doc)."""

    def canonical_name(self, name: str, config: Any) -> str | None:
        """Checkpoint tensor name -> canonical HF name, or None to skip the tensor."""
        return name


_FAMILIES: dict[str, Family] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_loaded = False


def register_family(family: Family) -> Family:
    """Registers ``family`` under each of its ``model_types`` (a type already taken raises)."""
    types = getattr(family, "model_types", ())
    if not types or not all(isinstance(t, str) for t in types):
        raise ValueError(f"family={family!r}: expected non-empty model_types of strings")
    for t in types:
        if t in _FAMILIES and _FAMILIES[t] is not family:
            raise ValueError(f"model_type={t!r} is already registered by {_FAMILIES[t]!r}")
    for t in types:
        _FAMILIES[t] = family
    return family


def _load_modules() -> None:
    """Imports the family modules once. A module that fails to import (a missing optional
    dependency, a bug) does not take the other families down: its error is kept and shown when
    a ``model_type`` is not found."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _FAMILY_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001  (reported by get_family)
            if isinstance(e, ModuleNotFoundError) and e.name == mod:
                continue  # not written (yet)
            _IMPORT_ERRORS[mod] = f"{type(e).__name__}: {e}"
            log.warning("efficient_mllm.hf: family module %s failed to import: %s", mod, e)


def supported_model_types() -> list[str]:
    """Sorted ``model_type`` values with a registered family."""
    _load_modules()
    return sorted(_FAMILIES)


def get_family(model_type: str | dict) -> Family:
    """The family of ``model_type`` (or of an HF config dict's ``model_type``)."""
    if isinstance(model_type, dict):
        model_type = model_type.get("model_type")
    _load_modules()
    if model_type not in _FAMILIES:
        broken = (
            f" (family modules that failed to import: {_IMPORT_ERRORS})" if _IMPORT_ERRORS else ""
        )
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported model types: "
            f"{sorted(_FAMILIES)}{broken}"
        )
    return _FAMILIES[model_type]


def flat_paths(state: Any) -> dict[Path, Any]:
    """``{path: variable}`` of an NNX state (``nnx.to_flat_state``), paths as tuples."""
    from flax import nnx

    return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def check_maps_cover(maps: Sequence[TensorMap], paths: Sequence[Path]) -> None:
    """Raises ValueError when ``maps`` miss a state path, name an unknown one or map one twice
    (a family bug, caught before any tensor is read)."""
    seen: dict[Path, str] = {}
    names: set[str] = set()
    for tm in maps:
        for name in tm.hf_names:
            if name in names:
                raise ValueError(f"HF tensor {name!r} appears in two TensorMaps")
            names.add(name)
        for p in tm.our_paths:
            if p in seen:
                raise ValueError(f"state path {p} is mapped twice ({seen[p]!r} and {tm.hf!r})")
            seen[p] = tm.hf
    want = set(paths)
    extra = sorted(map(str, set(seen) - want))
    if extra:
        raise ValueError(f"TensorMaps name state paths the model lacks: {extra[:5]}")
    missing = sorted(map(str, want - set(seen)))
    if missing:
        raise ValueError(f"state paths without a TensorMap: {missing[:5]}")
