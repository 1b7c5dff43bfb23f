"""Logical axis names -> mesh axes.

Parameters carry logical names (``nnx.Param(..., sharding_names=("embed", "mlp"))``); activations
use ``batch`` (and ``length`` for sequence parallelism). A rule maps a logical name to a tuple of
mesh axes. When a dimension is not divisible by the mesh axes its rule names, or a mesh axis is
already used by an earlier dimension of the same array, those axes are dropped for that
dimension (it is replicated along them), so one rule set works for every model size.
"""

from __future__ import annotations

import logging
import math
from typing import Any
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "DEFAULT_RULES",
    "make_rules",
    "logical_to_spec",
    "variable_names",
    "state_shardings",
    "batch_spec",
    "batch_shardings",
    "shard_batch",
    "replicated",
]

log = logging.getLogger(__name__)

Rules = dict[str, tuple[str, ...]]

#: Default logical -> mesh rules: data parallel + FSDP over the model width, tensor parallel over
#: MLP hidden, heads and vocabulary.
DEFAULT_RULES: Rules = {
    "batch": ("data", "fsdp"),
    "length": ("seq",),
    "embed": ("fsdp",),
    "vision_embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "head_dim": (),
    "patch": (),
}


def _parse_axes(logical: str, value: Any, mesh_axes: tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None or value == "":
        axes: tuple[str, ...] = ()
    elif isinstance(value, str):
        axes = tuple(a.strip() for a in value.split(",") if a.strip())
    elif isinstance(value, (tuple, list)):
        axes = tuple(value)
    else:
        raise ValueError(
            f"sharding rule {logical!r} = {value!r}; expected a mesh axis name, a comma-separated "
            "string of them, a tuple, or '' for replicated"
        )
    if mesh_axes is not None:
        for a in axes:
            if a not in mesh_axes:
                raise ValueError(
                    f"sharding rule {logical!r} = {value!r} names mesh axis {a!r}; "
                    f"expected one of {mesh_axes}"
                )
    return axes


def make_rules(overrides: Any = None, mesh_axes: tuple[str, ...] | None = None) -> Rules:
    """``DEFAULT_RULES`` updated with ``overrides`` (logical -> ``"fsdp"``, ``"data,fsdp"``, ``""``)."""
    rules = dict(DEFAULT_RULES)
    if overrides is not None:
        if hasattr(overrides, "to_dict"):
            overrides = overrides.to_dict()
        if not isinstance(overrides, Mapping):
            raise ValueError(f"sharding rules must be a mapping, got {overrides!r}")
        rules.update({k: _parse_axes(k, v, None) for k, v in overrides.items()})
    return {k: _parse_axes(k, v, mesh_axes) for k, v in rules.items()}


def logical_to_spec(
    names: tuple[str | None, ...] | None,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Rules,
    *,
    where: str = "array",
) -> P:
    """The PartitionSpec for an array of ``shape`` whose dimensions have logical ``names``.

    Mesh axes of size 1 are omitted, axes that do not divide the dimension or that an earlier
    dimension already uses are dropped. Unknown logical names raise ``ValueError``.
    """
    if names is None:
        return P()
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(
            f"{where}: logical axis names {names} have {len(names)} entries; expected one per "
            f"dimension of shape {shape}"
        )
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"{where}: logical axis name {name!r} has no sharding rule; expected one of "
                f"{sorted(rules)} (add it to config.sharding)"
            )
        axes = []
        for a in rules[name]:
            size = mesh.shape[a]
            if size == 1 or a in used:
                continue
            if dim % (math.prod(mesh.shape[x] for x in axes) * size):
                continue
            axes.append(a)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def variable_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on an NNX variable (``sharding_names`` / ``out_sharding``)."""
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """A pure dict (as :func:`nnx.to_pure_dict`) of ``NamedSharding`` for an (abstract) state."""

    def one(path, var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, P())
        value = var.get_value()
        where = "/".join(str(getattr(k, "key", k)) for k in path) or "variable"
        spec = logical_to_spec(variable_names(var), tuple(np.shape(value)), mesh, rules, where=where)
        return NamedSharding(mesh, spec)

    flat = {path: one(path, var) for path, var in nnx.to_flat_state(state)}
    return traverse_util.unflatten_dict(flat)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(ndim: int, mesh: Mesh, rules: Rules) -> P:
    """Leading (batch) dimension over the ``batch`` rule's mesh axes, the rest replicated."""
    axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    if not axes or ndim == 0:
        return P()
    return P(axes[0] if len(axes) == 1 else axes)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, batch_spec(np.ndim(v), mesh, rules)) for k, v in batch.items()}


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Assembles global arrays from this process's rows (``jax.make_array_from_process_local_data``).

    On one host the local batch is the global batch; on ``n`` hosts each passes ``B / n`` rows.
    The global batch size must be divisible by the product of the batch mesh axes.
    """
    out = {}
    shardings = batch_shardings(batch, mesh, rules)
    for k, v in batch.items():
        v = np.asarray(v)
        sh = shardings[k]
        n = math.prod(mesh.shape[a] for a in rules.get("batch", ()) if mesh.shape[a] > 1)
        global_rows = v.shape[0] * jax.process_count() if v.ndim else 0
        if v.ndim and global_rows % n:
            raise ValueError(
                f"batch[{k!r}] has {global_rows} rows in total; expected a multiple of {n} "
                f"(the data-parallel mesh size {dict(mesh.shape)})"
            )
        out[k] = jax.make_array_from_process_local_data(sh, v)
    return out
