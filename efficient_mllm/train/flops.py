"""Model FLOPs of a function, counted from its jaxpr: ``2 * M * N * K`` per matrix product.

Counting on the jaxpr rather than with XLA's cost analysis gives the same number on every
backend and mesh (it is the *global* work of the program as written, before partitioning or
fusion), multiplies ``scan`` bodies by their length and counts a ``cond`` by its costliest
branch. Element-wise work is ignored (the usual convention for model FLOPs utilisation);
attention run by an opaque kernel (a cuDNN custom call, a Pallas kernel) is not seen either.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable

import jax
from jax.extend import core as jex_core

__all__ = ["jaxpr_flops", "function_flops"]


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lc)
    batch = math.prod(lhs.shape[d] for d in lb)
    m = math.prod(s for d, s in enumerate(lhs.shape) if d not in lc and d not in lb)
    n = math.prod(s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb)
    return 2.0 * batch * m * n * contract


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    # kernel: spatial dims and input features per group
    k_spatial = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
    in_per_group = rhs.shape[dn.rhs_spec[1]]
    return 2.0 * math.prod(out.shape) * k_spatial * in_per_group


def _sub_jaxprs(params: dict):
    for v in params.values():
        if isinstance(v, jex_core.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jex_core.Jaxpr):
            yield v
        elif isinstance(v, (tuple, list)):
            for x in v:
                if isinstance(x, jex_core.ClosedJaxpr):
                    yield x.jaxpr
                elif isinstance(x, jex_core.Jaxpr):
                    yield x


def jaxpr_flops(jaxpr: Any) -> float:
    """Matrix-product FLOPs of a (closed) jaxpr, recursing into sub-jaxprs."""
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
        else:
            total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
    return total


def function_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
    """Matrix-product FLOPs of ``fn(*args, **kwargs)`` (arguments may be ``ShapeDtypeStruct``)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
