"""Version shims for the Pallas kernels (jax 0.10.x here, 0.11.x on the GPU machines). Add, don't rewrite."""

from __future__ import annotations


def mosaic_gpu_interpret_params():
    """Parameters that run a Mosaic GPU (``plgpu.kernel``) kernel in the CPU interpreter.

    jax 0.10 keeps the class private (``InterpretGPUParams``); later versions may export it from
    ``jax.experimental.pallas.mosaic_gpu`` as ``InterpretParams``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cls = getattr(plgpu, "InterpretParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls()
