"""Converted checkpoints: an HF model as an orbax checkpoint the project's loops can read.

Layout of a converted directory::

    <out>/efficient_mllm.json   {"model_type", "param_dtype", "dtype", "config": our config dict}
    <out>/hf/                   the HF config.json plus the tokenizer / processor / chat-template
                                files copied from the source dir (no weights)
    <out>/params/               orbax StandardCheckpointer of ``nnx.to_pure_dict`` of the params

``load_converted(out)`` rebuilds the config with the family (``config_from_hf`` on the stored HF
config and dtypes), builds the model abstractly and restores the parameters straight into their
shardings (``mesh`` + logical rules, default: first device). ``export_converted`` writes HF
safetensors back (``export_pretrained`` does it for a model in memory, e.g. a fine-tuned one).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
from flax import nnx

from efficient_mllm.hf.convert import (
    Pretrained,
    _shardings,
    abstract_model,
    load_pretrained,
    save_pretrained,
)
from efficient_mllm.hf.families import get_family
from efficient_mllm.hf.safetensors_io import read_hf_config

__all__ = [
    "build_with_params",
    "convert_to_orbax",
    "converted_config",
    "export_converted",
    "export_pretrained",
    "load_converted",
    "save_converted",
]

META = "efficient_mllm.json"
# Files copied next to the HF config (whatever of them exists in the source dir).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def save_converted(
    pre: Pretrained, out_dir: str | os.PathLike, *, source_dir: str | None = None
) -> str:
    """Writes ``pre`` as a converted directory (see module doc); returns its path."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(os.path.join(out_dir, "hf"), exist_ok=True)
    with open(os.path.join(out_dir, "hf", "config.json"), "w") as f:
        json.dump(pre.hf_config, f, indent=2)
    if source_dir is not None:
        for name in SIDE_FILES:
            src = os.path.join(os.fspath(source_dir), name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, "hf", name))
    cfg = pre.config
    lang = getattr(cfg, "language", cfg)
    meta = {
        "model_type": pre.hf_config["model_type"],
        "param_dtype": lang.param_dtype,
        "dtype": lang.dtype,
        "config": json.loads(json.dumps(cfg.to_dict(), default=str)),
    }
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=2)
    params = nnx.to_pure_dict(nnx.state(pre.model, nnx.Param))
    path = os.path.join(out_dir, "params")
    if os.path.exists(path):
        shutil.rmtree(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
    return out_dir


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ValueError(
            f"path={path!r}: no {META}; expected a directory written by "
            "`python -m experiments.convert` (save_converted)"
        )
    with open(meta_path) as f:
        return json.load(f)


def converted_config(path: str | os.PathLike) -> tuple[Any, Any, dict, dict]:
    """``(family, our config, HF config dict, meta dict)`` of a converted directory, without
    reading the parameters."""
    path = os.path.abspath(os.fspath(path))
    meta = _read_meta(path)
    hf_config = read_hf_config(os.path.join(path, "hf"))
    family = get_family(meta["model_type"])
    config = family.config_from_hf(hf_config, param_dtype=meta["param_dtype"], dtype=meta["dtype"])
    return family, config, hf_config, meta


def load_converted(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: dict | None = None,
    config_overrides: dict | None = None,
) -> Pretrained:
    """The model of a converted directory, parameters restored into their shardings.
    ``config_overrides``: fields replaced on our config before building (e.g.
    ``{"compressor": "visionzip(dominant=54, contextual=10)"}`` for an MLLM whose compressor has
    no parameters)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    family, config, hf_config, _ = converted_config(path)
    graphdef, params, _ = abstract_model(family, config)
    shardings = _shardings(params, mesh, rules)
    pure = nnx.to_pure_dict(params)
    flat = {}
    for p, leaf in _flatten(pure):
        flat[p] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings[p])
    target = _unflatten(flat)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(path, "params"), target)
    nnx.replace_by_pure_dict(params, restored)
    model = nnx.merge(graphdef, params)
    if config_overrides:
        config = config.replace(**config_overrides)
        model = _rebuild(family, config, model)
    return Pretrained(model=model, config=config, family=family, hf_config=hf_config)


def build_with_params(family, config, params) -> Any:
    """``family.build(config)`` holding ``params`` (an ``nnx.State`` of ``nnx.Param``, e.g.
    ``nnx.state(model, nnx.Param)`` of a loaded model with another compressor): the parameters
    are never re-initialised; only non-parameter state (a compressor's RNG) is materialised, by
    a jitted build whose parameter outputs are dropped."""

    def build():
        return family.build(config, nnx.Rngs(0))

    graphdef, new_params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    mine = jax.tree.structure(nnx.to_pure_dict(new_params))
    theirs = jax.tree.structure(nnx.to_pure_dict(params))
    if mine != theirs:
        raise ValueError(
            f"the model of config {config!r} has a different parameter tree than the loaded "
            "one (e.g. a compressor with parameters): train it instead"
        )
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    return nnx.merge(graphdef, params, rest)


def _rebuild(family, config, model):
    return build_with_params(family, config, nnx.state(model, nnx.Param))


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, k))
    else:
        yield prefix, tree


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for p, v in flat.items():
        d = out
        for k in p[:-1]:
            d = d.setdefault(k, {})
        d[p[-1]] = v
    return out


def convert_to_orbax(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    param_dtype: str = "auto",
    mesh: Any = None,
) -> Pretrained:
    """``load_pretrained(hf_dir)`` then ``save_converted``; returns the loaded model."""
    pre = load_pretrained(hf_dir, param_dtype=param_dtype, mesh=mesh)
    save_converted(pre, out_dir, source_dir=os.fspath(hf_dir))
    return pre


def export_pretrained(
    pre: Pretrained,
    out_dir: str | os.PathLike,
    *,
    side_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
) -> str:
    """``pre.model`` -> HF ``config.json`` + safetensors in ``out_dir``, plus the tokenizer /
    processor files (``SIDE_FILES``) found in ``side_dir``; returns ``out_dir``."""
    save_pretrained(
        pre.model,
        pre.config,
        out_dir,
        family=pre.family,
        original_hf_config=pre.hf_config,
        dtype=dtype,
    )
    if side_dir is not None:
        for name in SIDE_FILES:
            src = os.path.join(os.fspath(side_dir), name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(os.fspath(out_dir), name))
    return os.fspath(out_dir)


def export_converted(
    path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None
) -> str:
    """A converted directory -> HF ``config.json`` + safetensors (+ the side files)."""
    pre = load_converted(path)
    return export_pretrained(pre, out_dir, side_dir=os.path.join(os.fspath(path), "hf"), dtype=dtype)
