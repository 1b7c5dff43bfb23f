"""Load a local Hugging Face checkpoint into our NNX model, and export it back.

``load_pretrained(hf_dir)``: reads ``config.json``, picks the family by ``model_type``
(:mod:`efficient_mllm.hf.families`), builds the model *abstractly* (``nnx.eval_shape``: no
parameter memory), then streams the checkpoint tensor by tensor: each HF tensor is read from
the memory-mapped safetensors file, transformed (transpose / reshape), cast to the parameter
dtype and placed directly with its sharding (``jax.make_array_from_callback``: each device
receives only its shard). Peak host memory is about one tensor (plus its transformed copy).
Missing, unexpected and mis-shaped tensors raise ``ValueError`` naming the tensor(s) and both
shapes; a missing / unexpected set is reported before any tensor is read.

``save_pretrained(model, config, out_dir, family=...)``: writes ``config.json`` and
``model.safetensors`` (sharded past ``max_shard_bytes``) with the canonical HF names; a round
trip is bit exact and ``transformers`` loads the result.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from efficient_mllm.hf.families import Family, TensorMap, check_maps_cover, flat_paths, get_family
from efficient_mllm.hf.safetensors_io import CheckpointReader, read_hf_config, write_safetensors
from efficient_mllm.nn.config import DTYPES

__all__ = ["Pretrained", "checkpoint_dtype", "load_pretrained", "save_pretrained"]

log = logging.getLogger(__name__)


class Pretrained(NamedTuple):
    """``model`` (NNX module), our ``config``, the ``family`` and the original ``hf_config``."""

    model: Any
    config: Any
    family: Family
    hf_config: dict


def checkpoint_dtype(hf_config: dict) -> str:
    """The parameter dtype an HF config declares (``dtype`` / ``torch_dtype``; float32 if
    absent or not one of ours). Multimodal configs may declare it in ``text_config``."""
    for cfg in (hf_config, hf_config.get("text_config") or {}):
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and name in DTYPES:
            return name
    return "float32"


def _resolve_dtype(param_dtype: str | None, hf_config: dict) -> str:
    if param_dtype in (None, "auto"):
        return checkpoint_dtype(hf_config)
    if param_dtype not in DTYPES:
        raise ValueError(f"param_dtype={param_dtype!r}: expected 'auto' or one of {DTYPES}")
    return param_dtype


def abstract_model(family: Family, config: Any):
    """``(graphdef, abstract param state, {path: abstract variable})`` of ``family.build``."""
    model = nnx.eval_shape(lambda: family.build(config, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if flat_paths(rest):
        names = sorted(map(str, flat_paths(rest)))[:3]
        raise ValueError(
            f"{type(model).__name__} holds non-parameter state {names}; the HF loader only "
            "fills nnx.Param leaves"
        )
    return graphdef, params, flat_paths(params)


def _shardings(params, mesh, rules) -> dict:
    if mesh is None:
        device = jax.devices()[0]
        single = jax.sharding.SingleDeviceSharding(device)
        return {p: single for p in flat_paths(params)}
    from efficient_mllm.train import sharding as sh

    rules = sh.DEFAULT_RULES if rules is None else rules
    return {
        tuple(k): v
        for k, v in traverse_util.flatten_dict(sh.state_shardings(params, mesh, rules)).items()
    }


def _place(value: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _fmt(path) -> str:
    return "/".join(map(str, path))


def load_pretrained(
    hf_dir: str | os.PathLike,
    *,
    param_dtype: str | None = "auto",
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: dict | None = None,
    hf_config: dict | None = None,
) -> Pretrained:
    """Loads the HF checkpoint in ``hf_dir`` (see module doc).

    Args:
      param_dtype: parameter storage dtype; ``"auto"`` keeps the checkpoint's declared dtype,
        a name among ``float32 / bfloat16 / float16`` casts every tensor to it.
      dtype: compute dtype (default: ``param_dtype``).
      mesh: place parameters sharded on this mesh by the logical-axis rules of
        ``train/sharding.py`` (``rules``, default ``DEFAULT_RULES``); None: the first device.
      hf_config: use this config dict instead of ``hf_dir/config.json``.
    """
    hf_config = read_hf_config(hf_dir) if hf_config is None else hf_config
    family = get_family(hf_config.get("model_type"))
    pdtype = _resolve_dtype(param_dtype, hf_config)
    config = family.config_from_hf(hf_config, param_dtype=pdtype, dtype=dtype)
    graphdef, params, abstract = abstract_model(family, config)
    maps = family.tensor_maps(config)
    check_maps_cover(maps, list(abstract))
    shardings = _shardings(params, mesh, rules)

    with CheckpointReader(hf_dir) as reader:
        canonical: dict[str, str] = {}
        for name in reader.names():
            c = family.canonical_name(name, config)
            if c is None:
                continue
            if c in canonical:
                raise ValueError(
                    f"checkpoint tensors {canonical[c]!r} and {name!r} both map to {c!r}"
                )
            canonical[c] = name
        wanted = {n for tm in maps for n in tm.hf_names}
        missing = sorted(wanted - set(canonical))
        unexpected = sorted(set(canonical) - wanted)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(
                    f"missing tensor(s) {missing[:10]}" + (" ..." if len(missing) > 10 else "")
                )
            if unexpected:
                parts.append(
                    f"unexpected tensor(s) {[canonical[u] for u in unexpected[:10]]}"
                    + (" ..." if len(unexpected) > 10 else "")
                )
            raise ValueError(
                f"checkpoint {os.fspath(hf_dir)!r} does not match the {type(family).__name__} "
                f"model built from its config: {'; '.join(parts)}"
            )
        values: dict[tuple, jax.Array] = {}
        for tm in maps:
            arrays = [reader.get(canonical[n]) for n in tm.hf_names]
            ours = _to_ours(tm, arrays, [abstract[p] for p in tm.our_paths])
            for path, arr in zip(tm.our_paths, ours):
                want = abstract[path].get_value()
                values[path] = _place(
                    np.asarray(arr).astype(want.dtype, copy=False), shardings[path]
                )
            del arrays, ours
    state = traverse_util.unflatten_dict(values)
    nnx.replace_by_pure_dict(params, state)
    model = nnx.merge(graphdef, params)
    return Pretrained(model=model, config=config, family=family, hf_config=hf_config)


def _to_ours(tm: TensorMap, arrays: list[np.ndarray], variables: list) -> tuple[np.ndarray, ...]:
    shapes = [tuple(a.shape) for a in arrays]
    expected = [tuple(v.get_value().shape) for v in variables]
    paths = [_fmt(p) for p in tm.our_paths]
    try:
        out = tm.hf_to_ours(*arrays)
    except ValueError as e:
        raise ValueError(
            f"HF tensor(s) {list(tm.hf_names)} with shape(s) {shapes} do not fit our "
            f"parameter(s) {paths} of shape(s) {expected}: {e}"
        ) from None
    for name_path, arr, want in zip(paths, out, expected):
        if tuple(arr.shape) != want:
            raise ValueError(
                f"HF tensor(s) {list(tm.hf_names)} with shape(s) {shapes} give shape "
                f"{tuple(arr.shape)} for our parameter {name_path}: expected {want}"
            )
    return out


def export_tensors(
    model: Any, family: Family, config: Any, *, dtype: str | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, numpy array)`` for every canonical tensor of ``model``, one map at a time
    (device -> host per tensor). ``dtype`` casts on the way (default: the parameters' own)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected None or one of {DTYPES}")
    params = flat_paths(nnx.state(model, nnx.Param))
    maps = family.tensor_maps(config)
    check_maps_cover(maps, list(params))
    for tm in maps:
        ours = [np.asarray(jax.device_get(params[p].get_value())) for p in tm.our_paths]
        for name, arr in zip(tm.hf_names, tm.ours_to_hf(*ours)):
            arr = np.asarray(arr)
            if dtype is not None:
                arr = arr.astype(jnp.dtype(dtype))
            yield name, arr


def save_pretrained(
    model: Any,
    config: Any,
    out_dir: str | os.PathLike,
    *,
    family: Family | str | None = None,
    original_hf_config: dict | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    """Writes ``out_dir/config.json`` and the safetensors weights of ``model`` (see module doc).

    ``family``: a :class:`Family`, a ``model_type`` string, or None to take it from
    ``original_hf_config``. ``dtype``: cast the written tensors (default: parameter dtype).
    Returns ``out_dir``.
    """
    if family is None:
        if not original_hf_config:
            raise ValueError("family=None: pass a family / model_type or original_hf_config")
        family = original_hf_config.get("model_type")
    if isinstance(family, str):
        family = get_family(family)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    hf = family.config_to_hf(config, original_hf_config)
    if dtype is not None:
        hf["dtype"] = dtype
    write_safetensors(
        out_dir, export_tensors(model, family, config, dtype=dtype), max_shard_bytes=max_shard_bytes
    )
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return out_dir
