"""The one place where differences between supported jax / flax versions are bridged.

CI and development machines run jax 0.10.x on CPU; the GPU machines run jax 0.11.x. Anything
whose import path or signature moved between those versions goes here, nowhere else.
"""

from __future__ import annotations

import jax

JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())


def make_mesh(shape, axis_names, devices=None):
    """A mesh with *Auto* axis types (classic GSPMD propagation) on every supported version.

    jax >= 0.10 defaults ``jax.make_mesh`` to Explicit axes, under which ordinary matmuls over a
    sharded contracting dimension raise; the training code relies on sharding propagation.
    """
    from jax.sharding import AxisType

    kwargs = {"axis_types": (AxisType.Auto,) * len(axis_names)}
    if devices is not None:
        kwargs["devices"] = devices
    return jax.make_mesh(tuple(shape), tuple(axis_names), **kwargs)


def shard_map(f, *, mesh, in_specs, out_specs, check_vma=True):
    """``jax.shard_map`` (the ``jax.experimental.shard_map`` path is deprecated)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


def set_mesh(mesh):
    """Context manager making ``mesh`` the ambient mesh."""
    return jax.set_mesh(mesh)


def logical_param(value, names):
    """An ``nnx.Param`` annotated with logical axis ``names`` (one per dimension of ``value``).

    flax 0.12 renamed the ``sharding_names`` metadata to ``out_sharding`` and shards annotated
    variables eagerly at creation, which needs an ambient mesh whose axes carry those names.
    Modules here are built without a mesh (CPU tests, ``nnx.eval_shape``), so eager sharding is
    turned off per variable; ``nnx.get_partition_spec`` still returns the names, and
    ``train/sharding.py`` maps them to mesh axes.
    """
    from flax import nnx

    names = tuple(names)
    if len(names) != value.ndim:
        raise ValueError(
            f"names={names!r} must give one logical axis per dimension of a value of shape "
            f"{tuple(value.shape)}"
        )
    return nnx.Param(value, out_sharding=names, eager_sharding=False)
