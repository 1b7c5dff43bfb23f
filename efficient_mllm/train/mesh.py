"""Device mesh from a config, and multi-host start-up.

The mesh always has the axes :data:`MESH_AXES` (``data``, ``fsdp``, ``tensor``, ``seq``); a size of
``-1`` absorbs the devices left over by the others, so ``{"data": -1}`` is pure data parallelism on
any machine and ``{"data": 2, "fsdp": -1, "tensor": 2}`` spreads the rest over FSDP.
"""

from __future__ import annotations

import logging
import math
from typing import Any
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh

from efficient_mllm import compat

__all__ = ["MESH_AXES", "mesh_shape", "make_mesh", "initialize_distributed"]

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "seq")


def _as_mapping(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise ValueError(f"mesh config must be a mapping of axis -> size, got {cfg!r}")
    return dict(cfg)


def mesh_shape(cfg: Any, num_devices: int) -> dict[str, int]:
    """Resolves axis sizes (one may be ``-1``) so that their product is ``num_devices``.

    Missing axes have size 1. Raises ``ValueError`` naming the axis for unknown axes, more than
    one ``-1``, non-positive sizes or sizes that do not divide ``num_devices``.
    """
    sizes = _as_mapping(cfg)
    unknown = [k for k in sizes if k not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown[0]!r}; expected axes from {MESH_AXES}")
    shape = {a: sizes.get(a, 1) for a in MESH_AXES}
    for a, s in shape.items():
        if isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1):
            raise ValueError(f"mesh.{a} = {s!r}; expected a positive int or -1")
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: axes {free} are all -1; at most one axis may be -1")
    fixed = math.prod(s for s in shape.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: fixed axes {({a: s for a, s in shape.items() if s != -1})} use {fixed} "
                f"devices, which does not divide the {num_devices} available"
            )
        shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh: axis sizes {shape} multiply to {fixed}; expected {num_devices} (the number "
            "of devices); set one axis to -1 to absorb the rest"
        )
    return shape


def make_mesh(cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A :class:`jax.sharding.Mesh` with Auto axes ``MESH_AXES`` sized from ``cfg``."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return compat.make_mesh(tuple(shape.values()), MESH_AXES, devices=devices)


def initialize_distributed(cfg: Any = None) -> bool:
    """Calls :func:`jax.distributed.initialize` when ``cfg.initialize`` is true.

    ``cfg`` may give ``coordinator_address``, ``num_processes`` and ``process_id``; empty or
    negative values are left for JAX to detect (Slurm, TPU pods, Kubernetes). Returns whether a
    multi-process runtime was initialised.
    """
    c = _as_mapping(cfg)
    if not c.get("initialize", False):
        return False
    kwargs = {}
    if c.get("coordinator_address"):
        kwargs["coordinator_address"] = c["coordinator_address"]
    for key in ("num_processes", "process_id"):
        if c.get(key) is not None and c[key] >= 0:
            kwargs[key] = c[key]
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:  # already initialised by the launcher
        if "already" not in str(e).lower():
            raise
    log.info("distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
