"""Attention probe kernels: softmax weights of a few query rows over all keys, no T x T map.

For ``Q`` chosen query rows (the CLS row, the last prompt tokens, ...) returns their softmax
attention over all ``T`` keys, per head ``[B, Nq, Q, T]`` or averaged over heads inside the kernel
``[B, Q, T]``, and the column sums over the valid query rows (``[B, Nq, T]`` / ``[B, T]``), all
float32. Two passes over K (log-sum-exp, then probabilities), GQA heads of one kv head together
so K is read once per kv head per pass. Reference: ``efficient_mllm.compress.probe.attention_probe``
(its ``key_index`` column selection is a gather on this result; its ``mask`` spec is expressed
here with ``mask_fn`` + features, see ``pallas_kernels.common``).

* :func:`attention_probe` -- dispatch by backend (``"gpu"``: Triton lowering, also what
  ``interpret=True`` runs on CPU; ``"tpu"``: Mosaic TPU).
"""

from __future__ import annotations

import jax

from pallas_kernels.attention_probe import gpu, tpu

__all__ = ["attention_probe", "gpu", "tpu"]


def attention_probe(q, k, *, backend: str | None = None, interpret=False, **kwargs):
    """``gpu.attention_probe`` or ``tpu.attention_probe`` (same arguments and results).

    ``backend``: ``"gpu"`` | ``"tpu"`` | None (the default JAX backend; on CPU the GPU kernel in
    interpret mode, which needs ``interpret=True``)."""
    if backend is None:
        platform = jax.default_backend()
        backend = "tpu" if platform == "tpu" else "gpu"
        if platform == "cpu" and not interpret:
            raise ValueError(
                "attention_probe on the cpu backend needs interpret=True (or backend='gpu'/'tpu' "
                "for lowering)"
            )
    if backend == "gpu":
        return gpu.attention_probe(q, k, interpret=bool(interpret), **kwargs)
    if backend == "tpu":
        return tpu.attention_probe(q, k, interpret=interpret, **kwargs)
    raise ValueError(f"backend={backend!r}: expected 'gpu', 'tpu' or None")
