"""The run config schema (ml_collections), loading config files and applying overrides.

Every ``configs/<name>.py`` builds on :func:`base_config`, so all runs share the same fields:

- ``name``, ``seed``
- ``init_from``: a converted Hugging Face checkpoint directory (``python -m experiments.convert``)
  to fine-tune: its model, parameters and tokenizer replace ``model`` (except a non-empty
  ``model.compressor``) and random init; the trained model is exported back as HF safetensors
  (``train.finetune``). ``""`` = random init
- ``data``: ``name`` (``registry.DATASETS``), ``data_dir`` ('' = default cache), ``knobs``
  (dataset knobs), ``seq_len`` (0 = the dataset's longest row), ``image_size`` (0 = as stored),
  ``worker_count``
- ``model``: an ``MLLMConfig`` dict; ``language.vocab_size = 0``, ``image_token_id = -1`` and
  ``vision.image_size = 0`` are filled from the dataset
- ``mesh``: sizes of ``data``, ``fsdp``, ``tensor``, ``seq`` (-1 absorbs the remaining devices)
- ``sharding``: logical axis -> mesh axes (``"fsdp"``, ``"data,fsdp"``, ``""`` = replicated)
- ``train``: ``steps``, ``batch_size`` (global), ``microbatches``, ``lr``, ``warmup_steps``,
  ``min_lr_ratio``, ``weight_decay``, ``b1``, ``b2``, ``eps``, ``clip_norm``, ``compute_dtype``,
  ``param_dtype``, ``log_every``
- ``eval``: ``split``, ``batch_size``, ``every`` (0 = only at the end), ``during`` / ``final``
  (``registry.EVALUATORS`` specs), ``max_batches`` / ``final_max_batches`` (0 = all)
- ``checkpoint``: ``every`` (0 = only at the end), ``keep``, ``resume``, ``async_save``
- ``distributed``: ``initialize`` and optional ``coordinator_address``, ``num_processes``,
  ``process_id`` for ``jax.distributed.initialize``
- ``output``: ``tensorboard``, ``progress``
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any
from collections.abc import Mapping

import ml_collections

from efficient_mllm.train.sharding import DEFAULT_RULES

__all__ = ["base_config", "dataset_knobs", "apply_overrides", "load_config"]


def base_config() -> ml_collections.ConfigDict:
    """All fields with defaults (unlocked; config files fill ``data`` and ``model``)."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0
    c.init_from = ""
    c.data = ml_collections.ConfigDict(
        dict(name="shapes_vqa", data_dir="", knobs=ml_collections.ConfigDict(), seq_len=0,
             image_size=0, worker_count=0)
    )
    c.model = ml_collections.ConfigDict()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, seq=1))
    c.sharding = ml_collections.ConfigDict({k: ",".join(v) for k, v in DEFAULT_RULES.items()})
    c.train = ml_collections.ConfigDict(
        dict(steps=1000, batch_size=32, microbatches=1, lr=1e-3, warmup_steps=50,
             min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
             compute_dtype="float32", param_dtype="float32", log_every=10)
    )
    c.eval = ml_collections.ConfigDict(
        dict(split="validation", batch_size=64, every=0, during=("teacher_forced", "perplexity"),
             final=("exact_match", "teacher_forced", "perplexity"), max_batches=0,
             final_max_batches=0)
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=2, resume=True, async_save=False))
    c.distributed = ml_collections.ConfigDict(
        dict(initialize=False, coordinator_address="", num_processes=-1, process_id=-1)
    )
    c.output = ml_collections.ConfigDict(dict(tensorboard=True, progress=True))
    return c


def dataset_knobs(name: str, **knobs: Any) -> ml_collections.ConfigDict:
    """Every knob of synthetic dataset ``name`` (its defaults, updated with ``knobs``) as a
    ConfigDict, so that any knob can be overridden from the command line."""
    import dataclasses

    from efficient_mllm.data.datasets import config_for

    cfg = config_for(name, **knobs)
    d = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        d[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
    return ml_collections.ConfigDict(d)


def _fields(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(_fields(v, prefix + k + "."))
    return out


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Sets dotted fields (``{"train.steps": 20}``) in place and returns ``cfg``.

    A field that does not exist raises ``ValueError`` naming it and the closest existing fields;
    a value of the wrong type raises ``ValueError`` naming the field, the value and the type.
    """
    for key, value in overrides.items():
        parts = key.split(".")
        node = cfg
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                close = difflib.get_close_matches(key, _fields(cfg), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"config override {key!r}: no field {'.'.join(parts[: i + 1])!r}{hint}")
            if last:
                try:
                    setattr(node, p, value)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"config override {key}={value!r}: expected a value of the field's type "
                        f"({type(node[p]).__name__}): {e}"
                    ) from None
            else:
                node = node[p]
    return cfg


def load_config(path: str | os.PathLike, arg: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Imports ``path``, calls ``get_config(arg)`` and applies ``overrides``; stays locked."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config path {path!r} does not exist; expected a configs/<name>.py file")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(arg=None)")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg
