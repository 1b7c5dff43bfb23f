"""Benchmark: chunked linear attention (Pallas GPU kernel) vs fla-core, cuDNN softmax and XLA.

    python -m experiments.bench_linear_attention [--sweep] [--smoke] [--impl pallas|interpret|reference]

One process, one GPU, bf16 inputs, H = 16 heads, F = dv = 128, B*T = 32K tokens (B = 1 at T =
128K), T in {2K, 8K, 32K, 128K}, scale = F**-0.5. Sections, in priority order (a time budget
skips the rest and says so in the JSON):

* ``sweep`` (``--sweep``): a coordinate sweep of the kernel's keywords (read from its
  signature: chunk_size, tiles, warps, stages, state_dtype) at T = 8K, constant decay: the
  forward pass over the knobs without ``bwd`` in their name, then forward+backward over the
  ``*_bwd`` knobs from the forward's best (one knob at a time, keeping the best value); the best
  configuration of each pass is used in the sections below (``--kernel-kw`` fixes a knob);
* ``check``: the kernel (chosen configuration) against the XLA reference (fp32 math, T not a
  chunk multiple) forward and gradients, the decode step against the reference step, and the
  kernel against fla-core's ``chunk_simple_gla`` at T = 2K, forward and gradients;
* ``chunked``: per T, constant decay (``g [H]``, fla's ``g_gamma``) and per-token decay
  (``g [B, T, H]``), forward and forward+backward (the VJP of ``sum(o * do)`` w.r.t. q, k, v, g;
  fla's constant-decay backward gives no ``g_gamma`` gradient): our kernel, fla-core
  ``chunk_simple_gla`` (torch/Triton; its errors, e.g. the Hopper + Triton < 3.7.1 refusal of the
  gated backward, are recorded) and cuDNN causal softmax attention
  (``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)``);
* ``decode``: one token per sequence, B in {1, 8, 32}: our ``linear_attention_step`` (state
  ``[B, H, F, dv]`` float32, per-token decay) and the XLA reference step against softmax decode
  over a full 32K-token bf16 KV cache (16 kv heads): cuDNN with ``key_value_seq_lengths``, the
  repo's flash-decoding kernel ``pallas_kernels.decode_attention`` and its XLA reference. Timed
  both as one jitted call per step (``call_*``; the linear state donated, so the kernel updates
  it in place) and as 16 steps unrolled in one jitted ``lax.scan`` (state carried; the cache is
  read every step); tokens/s = B / seconds per step of the scan (``step_from``);
* ``xla_ref``: ``efficient_mllm.ops.linear_attention.linear_attention(form="chunked")`` at every
  shape, for scale (a shape is skipped, with the reason, when the previous T took > 2 s/call).

FLOP counts (TFLOP/s are model FLOPs over the median time):
  linear, chunked form with C = 64 (whatever chunk the kernel uses), per batch row and head:
  ``2*T*(C*F + C*dv + 2*F*dv)`` forward (QK^T and (A*D)V within chunks, q S and K^T V across
  chunks; the causal half of the chunk is counted), forward+backward 3x that;
  softmax: ``4*B*H*T^2*D`` halved for causal, forward+backward 3.5x (as bench_attention).
Forward minimum bytes (q, k, v read, o written, bf16; + g float32 when per token) give GB/s next
to the measured device copy bandwidth.

Timing: JAX calls are blocked on one by one (wall ``median_s``, includes ~10 us dispatch) and
also issued back to back (``back_to_back_s``, dispatch overlapped); torch calls the same way
(``torch.cuda.synchronize``) plus CUDA events (``event_median_s``). Median of ``--reps`` (20)
runs after ``--warmup`` (3) runs, inputs rotated over two buffer sets; calls slower than
``--max-time-per-config`` / reps use fewer reps (recorded as ``reps``). Speed ratios
(``ours_over_X_speed`` = X time / our time, > 1 means ours is faster) use the wall medians; the
``_b2b`` variants use the back-to-back times.

Writes ``bench_linear_attention_<device>.json`` to ``--out`` (a directory, default
``benchmarks/``) after every section, and a copy to ``$OUT`` when set. ``--smoke`` runs tiny
shapes on CPU (kernel in interpret mode, or ``--impl reference`` for the XLA reference in its
place, softmax through XLA, no fla) to check the script itself. Importable without
ml_collections / grain / torch.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm.ops import linear_attention as LA
from efficient_mllm.ops.decode_attention import decode_attention_xla

TOTAL_TOKENS = 32 * 1024
FLOP_CHUNK = 64
SECTIONS = ("sweep", "check", "chunked", "decode", "xla_ref")
PASSES = ("fwd", "fwd+bwd")
DECAYS = ("const", "per_token")
# Keywords of chunked_linear_attention that are not tile knobs.
NOT_KNOBS = {"q", "k", "v", "g", "scale", "initial_state", "return_final_state", "interpret"}
# Sweep order (most influential first); knobs not listed follow in signature order.
KNOB_ORDER = (
    "chunk_size",
    "block_v",
    "block_f",
    "num_warps",
    "num_stages",
    "state_dtype",
    "block_v_state",
    "block_f_state",
    "num_warps_state",
    "num_stages_state",
    "block_f_bwd",
    "block_v_bwd",
    "num_warps_bwd",
    "num_stages_bwd",
)


# ----------------------------------------------------------------------------- helpers


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _err(e: BaseException, n=400) -> str:
    return f"{type(e).__name__}: {str(e)[:n]}"


def _parse_value(s: str):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


def _plain(x):
    """A keyword default as a JSON-friendly value (dtypes by name)."""
    if isinstance(x, (bool, int, float, str)):
        return x
    try:
        return jnp.dtype(x).name
    except TypeError:
        return x


def parse_kw(items) -> dict:
    """``["a=1", "b=None"]`` -> ``{"a": 1, "b": None}``."""
    out = {}
    for it in items or ():
        if "=" not in it:
            raise ValueError(f"--kernel-kw {it!r}: expected NAME=VALUE")
        name, val = it.split("=", 1)
        out[name.strip()] = _parse_value(val.strip())
    return out


def parse_values(items) -> dict:
    """``["block_t=32,64"]`` -> ``{"block_t": [32, 64]}``."""
    out = {}
    for it in items or ():
        if "=" not in it:
            raise ValueError(f"--sweep-values {it!r}: expected NAME=V1,V2,...")
        name, vals = it.split("=", 1)
        out[name.strip()] = [_parse_value(x.strip()) for x in vals.split(",") if x.strip()]
    return out


def linear_flops(b, t, h, f, dv, bwd, c=FLOP_CHUNK):
    fl = 2.0 * b * h * t * (c * f + c * dv + 2.0 * f * dv)
    return fl * (3.0 if bwd else 1.0)


def softmax_flops(b, t, h, d, bwd):
    return 4.0 * b * h * t * t * d * 0.5 * (3.5 if bwd else 1.0)


def linear_fwd_bytes(b, t, h, f, dv, per_token):
    return b * t * h * ((2 * f + 2 * dv) * 2 + (4 if per_token else 0))


class Budget:
    """Wall-clock budget: ``over()`` once ``seconds`` have passed since construction."""

    def __init__(self, seconds):
        self.start, self.seconds = time.time(), seconds

    def elapsed(self):
        return time.time() - self.start

    def over(self):
        return self.elapsed() > self.seconds

    def reason(self):
        return f"skipped: past the time budget ({self.seconds:.0f} s)"


def time_jax(fn, args_list, reps=20, warmup=3, max_s=5.0, min_reps=3) -> dict:
    """Wall times of ``fn(*args)`` (each blocked on), rotating ``args_list``.

    First call (compile + run) timed separately; ``reps`` drops to ``max_s / per-call`` (at least
    ``min_reps``) for slow calls. Returns first_call_s, median_s, min_s, back_to_back_s, reps.
    """
    n = len(args_list)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args_list[0]))
    first = per = time.perf_counter() - t0
    for i in range(1, warmup + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args_list[i % n]))
        per = time.perf_counter() - t0
    reps = max(min_reps, min(reps, int(max_s / max(per, 1e-9))))
    ts = []
    for i in range(reps):
        a = args_list[i % n]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    out = None
    t0 = time.perf_counter()
    for i in range(reps):
        out = fn(*args_list[i % n])
    jax.block_until_ready(out)
    b2b = (time.perf_counter() - t0) / reps
    return dict(
        first_call_s=first,
        median_s=statistics.median(ts),
        min_s=min(ts),
        back_to_back_s=b2b,
        reps=reps,
    )


def time_torch(torch, fn, args_list, reps=20, warmup=3) -> dict:
    """As :func:`time_jax` for torch on CUDA (synchronize), plus CUDA-event medians."""
    n = len(args_list)
    sync = torch.cuda.synchronize
    sync()
    t0 = time.perf_counter()
    fn(*args_list[0])
    sync()
    first = time.perf_counter() - t0
    for i in range(1, warmup + 1):
        fn(*args_list[i % n])
    sync()
    ts, ev = [], []
    for i in range(reps):
        a = args_list[i % n]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        fn(*a)
        e.record()
        sync()
        ts.append(time.perf_counter() - t0)
        ev.append(s.elapsed_time(e) / 1e3)
    t0 = time.perf_counter()
    for i in range(reps):
        fn(*args_list[i % n])
    sync()
    b2b = (time.perf_counter() - t0) / reps
    return dict(
        first_call_s=first,
        median_s=statistics.median(ts),
        min_s=min(ts),
        event_median_s=statistics.median(ev),
        back_to_back_s=b2b,
        reps=reps,
    )


def copy_bandwidth(nbytes, reps, warmup) -> dict:
    """Device copy bandwidth of ``x + 1`` over ``nbytes`` (bytes read + written / median time)."""
    n = nbytes // 4
    bufs = [(jnp.arange(n, dtype=jnp.uint32) + i,) for i in range(2)]
    t = time_jax(jax.jit(lambda x: x + 1), bufs, reps, warmup)
    return dict(bytes=2 * n * 4, time_s=t["median_s"], gbps=2 * n * 4 / t["median_s"] / 1e9)


def rel_err(a, r) -> float:
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


# ----------------------------------------------------------------------------- implementations


def implementations(impl: str):
    """-> (chunked(q, k, v, g, *, scale, **kw), step(q, k, v, g, state, *, scale), knobs dict).

    ``pallas`` / ``interpret``: ``pallas_kernels.linear_attention.gpu``; ``reference``: the XLA
    reference in its place (to check this script before the kernel exists).
    """
    if impl == "reference":

        def chunked(q, k, v, g, *, scale, chunk_size=64):
            return LA.linear_attention(
                q, k, v, log_decay=g, scale=scale, form="chunked", chunk_size=chunk_size
            )

        return chunked, reference_step, {"chunk_size": 64}
    if impl not in ("pallas", "interpret"):
        raise ValueError(f"impl={impl!r}: expected 'pallas', 'interpret' or 'reference'")
    from pallas_kernels.linear_attention import gpu

    interp = impl == "interpret"
    chunked = functools.partial(gpu.chunked_linear_attention, interpret=interp)
    step = functools.partial(gpu.linear_attention_step, interpret=interp)
    sig = inspect.signature(gpu.chunked_linear_attention)
    knobs = {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in NOT_KNOBS and p.kind == p.KEYWORD_ONLY
    }
    return chunked, step, knobs


def xla_chunked(q, k, v, g, *, scale):
    return LA.linear_attention(q, k, v, log_decay=g, scale=scale, form="chunked", chunk_size=64)


def reference_step(q, k, v, g, state, *, scale):
    o, st = LA.linear_attention_step(
        q, k, v, LA.LinearAttentionState(state, None), log_decay=g, scale=scale
    )
    return o, st.kv


def with_vjp(fwd):
    """``fwd(*xs) -> o``  to  ``f(*xs, do) -> grads of sum(o * do) w.r.t. every x``."""

    def f(*args):
        *xs, do = args
        o, vjp = jax.vjp(fwd, *xs)
        return vjp(do.astype(o.dtype))

    return f


def linear_fn(chunked, scale, bwd, kw):
    def fwd(q, k, v, g):
        return chunked(q, k, v, g, scale=scale, **kw)

    return jax.jit(with_vjp(fwd) if bwd else fwd)


def softmax_fn(impl, bwd):
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    return jax.jit(with_vjp(fwd) if bwd else fwd)


def load_fla():
    """``(torch, chunk_simple_gla)``; imports fla without its model zoo if the full import fails."""
    import torch

    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # noqa: BLE001 -- fla/__init__ pulls fla.layers / fla.models (transformers)
        import importlib.util
        import types

        for m in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
            del sys.modules[m]
        spec = importlib.util.find_spec("fla")
        if spec is None:
            raise
        root = list(spec.submodule_search_locations)
        for name, path in (("fla", root), ("fla.ops", [os.path.join(root[0], "ops")])):
            mod = types.ModuleType(name)
            mod.__path__ = path
            mod.__version__ = _version("fla-core")
            sys.modules[name] = mod
        from fla.ops.simple_gla.chunk import chunk_simple_gla
    return torch, chunk_simple_gla


def fla_fn(torch, csg, scale, decay, bwd):
    """fla forward (no grad) or forward+backward (``torch.autograd.grad`` with ``do``)."""

    def call(q, k, v, g):
        if decay == "const":
            return csg(q, k, v, g_gamma=g, scale=scale)[0]
        return csg(q, k, v, g=g, scale=scale)[0]

    if not bwd:

        def fwd(q, k, v, g, do):
            with torch.no_grad():
                return call(q, k, v, g)

        return fwd

    def fwdbwd(q, k, v, g, do):
        o = call(q, k, v, g)
        wrt = (q, k, v) if decay == "const" else (q, k, v, g)
        return torch.autograd.grad(o, wrt, do)

    return fwdbwd


# ----------------------------------------------------------------------------- inputs


def const_decay(h):
    """RetNet-style per-head log-decays ``log(1 - 2^-5 ... 2^-9)``, float32 [H]."""
    return jnp.log1p(-(2.0 ** -jnp.linspace(5.0, 9.0, h))).astype(jnp.float32)


def make_inputs(b, t, h, f, dv, decay, seed, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, f), dtype)
    k = jax.random.normal(ks[1], (b, t, h, f), dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv), dtype)
    if decay == "const":
        g = const_decay(h)
    else:
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h), jnp.float32) + 4.0)
    do = jax.random.normal(ks[4], (b, t, h, dv), dtype)
    return q, k, v, g, do


def torch_inputs(torch, b, t, h, f, dv, decay, seed, bwd):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    q = torch.randn(b, t, h, f, dtype=torch.bfloat16, **kw)
    k = torch.randn(b, t, h, f, dtype=torch.bfloat16, **kw)
    v = torch.randn(b, t, h, dv, dtype=torch.bfloat16, **kw)
    do = torch.randn(b, t, h, dv, dtype=torch.bfloat16, **kw)
    if decay == "const":
        g = torch.from_numpy(np.array(const_decay(h))).cuda()
    else:
        g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, dtype=torch.float32, **kw) + 4.0)
    if bwd:
        for x in (q, k, v) + ((g,) if decay != "const" else ()):
            x.requires_grad_(True)
    return q, k, v, g, do


def to_torch(torch, x, dtype):
    return torch.from_numpy(np.array(x, np.float32)).cuda().to(dtype)


# ----------------------------------------------------------------------------- sections


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.on_gpu = jax.default_backend() == "gpu"
        self.budget = Budget(args.time_budget)
        if self.smoke:
            self.h, self.f, self.dv, self.total = 2, 32, 32, 128
            self.ts = [32, 96]
            self.decode_bs, self.ctx, self.steps = [1, 2], 128, 4
            self.reps, self.warmup = 2, 1
        else:
            self.h, self.f, self.dv, self.total = 16, 128, 128, TOTAL_TOKENS
            self.ts = [2048, 8192, 32768, 131072]
            self.decode_bs, self.ctx, self.steps = [1, 8, 32], 32768, 16
            self.reps, self.warmup = args.reps, args.warmup
        if args.T:
            self.ts = [int(x) for x in args.T.split(",")]
        if args.decode_B:
            self.decode_bs = [int(x) for x in args.decode_B.split(",")]
        self.scale = self.f**-0.5
        self.softmax_impl = "cudnn" if self.on_gpu else "xla"
        self.log = lambda m: print(m, flush=True)
        self.kernel_error = None
        try:
            self.chunked, self.step, self.knobs = implementations(args.impl)
        except ImportError as e:  # the baselines still run; our rows record the error
            self.kernel_error = _err(e, 1500)
            self.chunked = self.step = self._missing_kernel
            self.knobs = {"chunk_size": 64}
        self.base_kw = {
            **{k: v for k, v in self.knobs.items() if k == "chunk_size"},
            **parse_kw(args.kernel_kw),
        }
        unknown = set(self.base_kw) - set(self.knobs)
        if unknown:
            raise ValueError(
                f"--kernel-kw {sorted(unknown)}: not keywords of the kernel "
                f"(tile keywords: {sorted(self.knobs)})"
            )
        self.cfg = {p: dict(self.base_kw) for p in PASSES}
        self.fla = None
        self.res = dict(
            meta=self.meta(),
            checks={},
            chunked=[],
            softmax=[],
            decode=[],
            xla_ref=[],
            ratios={},
            crossover={},
            sections_s={},
        )

    def _missing_kernel(self, *args, **kwargs):
        raise RuntimeError(f"kernel unavailable: {self.kernel_error}")

    def meta(self):
        dev = jax.devices()[0]
        a = self.args
        return dict(
            device=str(getattr(dev, "device_kind", dev.platform)),
            platform=dev.platform,
            jax=jax.__version__,
            jaxlib=_version("jaxlib"),
            torch=_version("torch"),
            triton=_version("triton"),
            fla=_version("fla-core"),
            python=platform.python_version(),
            date=time.strftime("%Y-%m-%d %H:%M"),
            smoke=self.smoke,
            impl=a.impl,
            dtype="bfloat16",
            heads=self.h,
            F=self.f,
            dv=self.dv,
            tokens_per_batch=self.total,
            Ts=self.ts,
            scale=self.scale,
            softmax_impl=self.softmax_impl,
            kernel_error=self.kernel_error,
            decode=dict(B=self.decode_bs, context=self.ctx, kv_heads=self.h, scan_steps=self.steps),
            reps=self.reps,
            warmup=self.warmup,
            max_time_per_config_s=a.max_time_per_config,
            time_budget_s=a.time_budget,
            flops=dict(
                linear=f"2*B*H*T*(C*F + C*dv + 2*F*dv), C={FLOP_CHUNK}; fwd+bwd x3",
                softmax="4*B*H*T^2*D * 0.5 (causal); fwd+bwd x3.5",
            ),
            decay=dict(
                const="g[H] = log(1 - 2^-linspace(5, 9, H)) (fla g_gamma)",
                per_token="g[B,T,H] = log_sigmoid(N(0,1) + 4) (fla g)",
            ),
            note="fla const-decay fwd+bwd returns no g_gamma gradient; ours returns dg [H]",
        )

    # -- fla ------------------------------------------------------------------------------
    def fla_reason(self):
        """None when fla can run here, else why not (never imports torch/fla off the GPU)."""
        if self.args.no_fla:
            return "skipped: --no-fla"
        if not self.on_gpu:
            return "skipped: fla-core needs a CUDA GPU"
        if self.fla is None:
            try:
                self.fla = load_fla()
                torch = self.fla[0]
                self.res["meta"]["torch_device"] = torch.cuda.get_device_name(0)
            except Exception as e:  # noqa: BLE001
                self.fla = _err(e)
        return f"skipped: fla import failed: {self.fla}" if isinstance(self.fla, str) else None

    # -- check ----------------------------------------------------------------------------
    def check(self):
        h = 2 if self.smoke else 4
        b, t, f, dv = 2, (50 if self.smoke else 1000), self.f, self.dv
        out = {}
        for decay in DECAYS:
            q, k, v, g, do = make_inputs(b, t, h, f, dv, decay, seed=100)
            do = do.astype(jnp.float32)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            ref = jax.jit(with_vjp(lambda q, k, v, g: xla_chunked(q, k, v, g, scale=self.scale)))
            ref_o = jax.jit(lambda q, k, v, g: xla_chunked(q, k, v, g, scale=self.scale))(*f32, g)
            ref_g = ref(*f32, g, do)
            row = {}
            for p in PASSES:
                try:
                    kw = self.cfg[p]
                    if p == "fwd":
                        o = linear_fn(self.chunked, self.scale, False, kw)(q, k, v, g)
                        row["out_rel_err"] = rel_err(o.astype(jnp.float32), ref_o)
                        row["out_bf16_rounding_rel_err"] = rel_err(
                            ref_o.astype(jnp.bfloat16).astype(jnp.float32), ref_o
                        )
                        row["finite"] = bool(jnp.all(jnp.isfinite(o)))
                    else:
                        gr = linear_fn(self.chunked, self.scale, True, kw)(q, k, v, g, do)
                        row["grad_rel_err_qkvg"] = [
                            rel_err(a.astype(jnp.float32), r) for a, r in zip(gr, ref_g)
                        ]
                except Exception as e:  # noqa: BLE001
                    row[f"{p}_error"] = _err(e, 1500)
            out[f"vs_xla_ref_{decay}"] = dict(shape=[b, t, h, f, dv], **row)
            self.log(f"check vs xla ref ({decay}): {out[f'vs_xla_ref_{decay}']}")
        # decode step vs the reference step
        try:
            q, k, v, _, _ = make_inputs(b, 1, h, f, dv, "const", seed=7)
            q, k, v = q[:, 0], k[:, 0], v[:, 0]
            gs = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(8), (b, h)) + 4.0)
            s0 = 0.1 * jax.random.normal(jax.random.PRNGKey(9), (b, h, f, dv), jnp.float32)
            o, s = jax.jit(functools.partial(self.step, scale=self.scale))(q, k, v, gs, s0)
            ro, rs = jax.jit(functools.partial(reference_step, scale=self.scale))(q, k, v, gs, s0)
            out["step_vs_xla_ref"] = dict(
                out_rel_err=rel_err(o.astype(jnp.float32), ro), state_rel_err=rel_err(s, rs)
            )
        except Exception as e:  # noqa: BLE001
            out["step_vs_xla_ref"] = dict(error=_err(e, 1500))
        self.log(f"check step: {out['step_vs_xla_ref']}")
        out["vs_fla"] = self.check_fla()
        self.res["checks"] = out

    def check_fla(self):
        why = self.fla_reason()
        if why:
            return why
        torch, csg = self.fla
        b, t, h, f, dv = 1, 2048, self.h, self.f, self.dv
        out = {}
        for decay in DECAYS:
            q, k, v, g, do = make_inputs(b, t, h, f, dv, decay, seed=200)
            row = {}
            try:
                o = linear_fn(self.chunked, self.scale, False, self.cfg["fwd"])(q, k, v, g)
                tq, tk, tv = (to_torch(torch, x, torch.bfloat16) for x in (q, k, v))
                tg = to_torch(torch, g, torch.float32)
                with torch.no_grad():
                    fo = fla_fn(torch, csg, self.scale, decay, False)(tq, tk, tv, tg, None)
                row["out_rel_err_vs_fla"] = rel_err(o.astype(jnp.float32), fo.float().cpu().numpy())
                gr = linear_fn(self.chunked, self.scale, True, self.cfg["fwd+bwd"])(q, k, v, g, do)
                for x in (tq, tk, tv) + ((tg,) if decay != "const" else ()):
                    x.requires_grad_(True)
                fg = fla_fn(torch, csg, self.scale, decay, True)(
                    tq, tk, tv, tg, to_torch(torch, do, torch.bfloat16)
                )
                row["grad_rel_err_vs_fla"] = [
                    rel_err(a.astype(jnp.float32), x.float().cpu().numpy()) for a, x in zip(gr, fg)
                ]
            except Exception as e:  # noqa: BLE001
                row["error"] = _err(e, 600)
            out[decay] = row
            self.log(f"check vs fla ({decay}): {row}")
        return out

    # -- sweep ----------------------------------------------------------------------------
    def candidates(self, name, default):
        user = parse_values(self.args.sweep_values)
        if name in user:
            vals = user[name]
        else:
            n = name.lower()
            if n == "chunk_size":
                vals = [32, 64, 128]
            elif "warps" in n:
                vals = [4, 8]
            elif "stages" in n:
                vals = [1, 2, 3]
            elif "block" in n or "tile" in n:
                vals = [32, 64, 128]
            elif "dtype" in n:
                vals = ["float32", "bfloat16"]
            else:
                vals = []
        if self.smoke:
            vals = vals[:2]
        return [x for i, x in enumerate(vals) if x not in vals[:i]]

    def sweep(self):
        t = self.args.sweep_T or (8192 if not self.smoke else self.ts[-1])
        b = max(1, self.total // t)
        inputs = [make_inputs(b, t, self.h, self.f, self.dv, "const", seed=s) for s in (1, 2)]
        rows, best = [], {}
        knobs = dict(self.knobs)
        order = {n: i for i, n in enumerate(KNOB_ORDER)}
        # explicit defaults (None = the kernel's automatic choice stays implicit)
        defaults = {n: _plain(d) for n, d in knobs.items() if d is not None}
        start_time = time.time()
        for p in PASSES:
            bwd = p == "fwd+bwd"
            # the forward pass gets 55% of the sweep budget, the backward pass the rest
            sweep_budget = Budget(self.args.sweep_budget * (1.0 if bwd else 0.55))
            sweep_budget.start = start_time
            args = [x if bwd else x[:4] for x in inputs]
            names = [n for n in knobs if ("bwd" in n or "backward" in n) == bwd]
            if bwd and not names:
                names = list(knobs)  # no backward-only knobs: sweep them all again
            names.sort(key=lambda n: order.get(n, len(order)))
            start = (
                dict(best["fwd"]["kw"]) if bwd and "fwd" in best else {**defaults, **self.base_kw}
            )
            cur, cur_s = start, None
            seen = set()

            def run(kw, p=p, bwd=bwd, args=args, seen=seen, sweep_budget=sweep_budget):
                key = json.dumps(kw, sort_keys=True, default=str)
                if key in seen:
                    return None
                seen.add(key)
                row = dict(T=t, B=b, pass_=p, kw=kw)
                if sweep_budget.over() or self.budget.over():
                    row["skipped"] = "skipped: past the sweep budget"
                    rows.append(row)
                    return None
                try:
                    row.update(
                        time_jax(
                            linear_fn(self.chunked, self.scale, bwd, kw),
                            args,
                            self.reps,
                            self.warmup,
                            self.args.max_time_per_config,
                        )
                    )
                except Exception as e:  # noqa: BLE001
                    row["error"] = _err(e)
                rows.append(row)
                self.log(
                    f"sweep {p} {kw}: "
                    + (
                        f"{row['median_s'] * 1e3:.3f} ms"
                        if "median_s" in row
                        else row.get("error", row.get("skipped"))
                    )
                )
                return row.get("median_s")

            cur_s = run(cur)
            for name in names:
                for val in self.candidates(name, knobs[name]):
                    if name in cur and cur[name] == val:
                        continue
                    kw = {**cur, name: val}
                    s = run(kw)
                    if s is not None and (cur_s is None or s < cur_s):
                        cur, cur_s = kw, s
            if cur_s is not None:
                best[p] = dict(kw=cur, median_s=cur_s)
                self.cfg[p] = dict(cur)
        self.res["sweep"] = dict(
            T=t, B=b, decay="const", knobs=knobs, base_kw=self.base_kw, rows=rows, best=best
        )
        self.log(f"sweep best: {best}")

    # -- chunked --------------------------------------------------------------------------
    def time_row(self, section, row, fn, args, torch=None):
        if self.budget.over():
            row["skipped"] = self.budget.reason()
        else:
            try:
                if torch is not None:
                    row.update(
                        time_torch(
                            torch,
                            fn,
                            args,
                            max(self.reps, 20 if not self.smoke else 1),
                            self.warmup,
                        )
                    )
                else:
                    row.update(
                        time_jax(fn, args, self.reps, self.warmup, self.args.max_time_per_config)
                    )
            except Exception as e:  # noqa: BLE001
                row["error"] = _err(e, 600)
        self.res[section].append(row)
        self.log(_fmt(row))
        return row

    def linear_row(self, section, impl, t, b, decay, p, fn, args, torch=None, **extra):
        bwd = p == "fwd+bwd"
        row = dict(
            impl=impl, T=t, B=b, H=self.h, F=self.f, dv=self.dv, decay=decay, pass_=p, **extra
        )
        self.time_row(section, row, fn, args, torch)
        if "median_s" in row:
            fl = linear_flops(b, t, self.h, self.f, self.dv, bwd)
            row["tflops"] = fl / row["median_s"] / 1e12
            if not bwd:
                nb = linear_fwd_bytes(b, t, self.h, self.f, self.dv, decay == "per_token")
                row["min_bytes"], row["gbps"] = nb, nb / row["median_s"] / 1e9
        return row

    def chunked_section(self):
        fla_why = self.fla_reason()
        for t in self.ts:
            b = max(1, self.total // t)
            for decay in DECAYS:
                sets = [make_inputs(b, t, self.h, self.f, self.dv, decay, seed=s) for s in (1, 2)]
                for p in PASSES:
                    bwd = p == "fwd+bwd"
                    args = [x if bwd else x[:4] for x in sets]
                    kw = self.cfg[p]
                    self.linear_row(
                        "chunked",
                        "ours",
                        t,
                        b,
                        decay,
                        p,
                        linear_fn(self.chunked, self.scale, bwd, kw),
                        args,
                        kernel_kw=kw,
                    )
                if self.budget.over() or fla_why:
                    for p in PASSES:
                        self.res["chunked"].append(
                            dict(
                                impl="fla",
                                T=t,
                                B=b,
                                decay=decay,
                                pass_=p,
                                skipped=fla_why or self.budget.reason(),
                            )
                        )
                else:
                    self.fla_rows(t, b, decay)
                del sets
            # softmax (decay-independent)
            sets = [make_inputs(b, t, self.h, self.f, self.dv, "const", seed=s) for s in (1, 2)]
            for p in PASSES:
                bwd = p == "fwd+bwd"
                args = [(q, k, v, do) if bwd else (q, k, v) for q, k, v, _, do in sets]
                row = dict(
                    impl=self.softmax_impl, T=t, B=b, H=self.h, D=self.f, causal=True, pass_=p
                )
                self.time_row("softmax", row, softmax_fn(self.softmax_impl, bwd), args)
                if "median_s" in row:
                    row["tflops"] = (
                        softmax_flops(b, t, self.h, self.f, bwd) / row["median_s"] / 1e12
                    )
            del sets

    def fla_rows(self, t, b, decay):
        torch, csg = self.fla
        for p in PASSES:
            bwd = p == "fwd+bwd"
            try:
                args = [
                    torch_inputs(torch, b, t, self.h, self.f, self.dv, decay, s, bwd)
                    for s in (1, 2)
                ]
            except Exception as e:  # noqa: BLE001
                self.res["chunked"].append(
                    dict(impl="fla", T=t, B=b, decay=decay, pass_=p, error=_err(e))
                )
                continue
            row = self.linear_row(
                "chunked",
                "fla",
                t,
                b,
                decay,
                p,
                fla_fn(torch, csg, self.scale, decay, bwd),
                args,
                torch=torch,
            )
            if "error" in row:
                self.log(f"fla {decay} {p} T={t}: {row['error'][:200]}")
            del args
            torch.cuda.empty_cache()

    # -- decode ---------------------------------------------------------------------------
    def decode_section(self):
        from pallas_kernels.decode_attention import gpu as dgpu

        h, f, dv, n, s_ctx = self.h, self.f, self.dv, self.steps, self.ctx
        interp = not self.on_gpu
        softmax_impls = [
            (
                "pallas_decode",
                lambda q, k, v, ln: dgpu.decode_attention(q, k, v, ln, interpret=interp)[0],
            ),
            ("xla_decode", lambda q, k, v, ln: decode_attention_xla(q, k, v, ln)[0]),
        ]
        if self.on_gpu:
            softmax_impls.insert(
                0,
                (
                    "cudnn",
                    lambda q, k, v, ln: jax.nn.dot_product_attention(
                        q,
                        k,
                        v,
                        implementation="cudnn",
                        key_value_seq_lengths=ln,
                        query_seq_lengths=jnp.ones_like(ln),
                    ),
                ),
            )
        linear_impls = [("ours", self.step), ("xla_ref", reference_step)]
        for b in self.decode_bs:
            # linear: q, k, v [n, B, H, F] per step, g [n, B, H], state [B, H, F, dv]
            lin_sets = []
            for s in (1, 2):
                ks = jax.random.split(jax.random.PRNGKey(300 + s), 5)
                lin_sets.append(
                    (
                        jax.random.normal(ks[0], (n, b, h, f), jnp.bfloat16),
                        jax.random.normal(ks[1], (n, b, h, f), jnp.bfloat16),
                        jax.random.normal(ks[2], (n, b, h, dv), jnp.bfloat16),
                        jax.nn.log_sigmoid(jax.random.normal(ks[3], (n, b, h)) + 4.0),
                        0.1 * jax.random.normal(ks[4], (b, h, f, dv), jnp.float32),
                    )
                )
            state_bytes = 2 * b * h * f * dv * 4
            for name, step in linear_impls:
                step = functools.partial(step, scale=self.scale)
                donated = jax.jit(
                    lambda q, k, v, g, s, step=step: step(q[0], k[0], v[0], g[0], s),
                    donate_argnums=4,
                )
                holder = [jnp.array(lin_sets[0][4])]

                def one(q, k, v, g, s, donated=donated, holder=holder):
                    o, holder[0] = donated(q, k, v, g, holder[0])  # state updated in place
                    return o

                def scan(q, k, v, g, s, step=step):
                    def body(st, x):
                        o, st = step(*x, st)
                        return st, o

                    st, os_ = jax.lax.scan(body, s, (q, k, v, g), unroll=True)
                    return os_, st

                self.decode_rows(
                    name,
                    "linear",
                    b,
                    one,
                    jax.jit(scan),
                    lin_sets,
                    n,
                    state_bytes,
                    dict(state_shape=[b, h, f, dv], decay="per_token"),
                )
            del lin_sets
            # softmax over a full cache of s_ctx tokens
            if self.budget.over():
                for name, _ in softmax_impls:
                    self.res["decode"].append(
                        dict(
                            impl=name,
                            kind="softmax",
                            B=b,
                            context=s_ctx,
                            skipped=self.budget.reason(),
                        )
                    )
                continue
            sm_sets = []
            ln = jnp.full((b,), s_ctx, jnp.int32)
            for s in (1, 2):
                ks = jax.random.split(jax.random.PRNGKey(400 + s), 3)
                sm_sets.append(
                    (
                        jax.random.normal(ks[0], (n, b, 1, h, f), jnp.bfloat16),
                        jax.random.normal(ks[1], (b, s_ctx, h, f), jnp.bfloat16),
                        jax.random.normal(ks[2], (b, s_ctx, h, dv), jnp.bfloat16),
                        ln,
                    )
                )
            kv_bytes = b * s_ctx * h * (f + dv) * 2
            for name, fn in softmax_impls:

                def one(q, k, v, ln, fn=fn):
                    return fn(q[0], k, v, ln)

                def scan(q, k, v, ln, fn=fn):
                    return jax.lax.scan(lambda c, qi: (c, fn(qi, k, v, ln)), 0, q, unroll=True)[1]

                self.decode_rows(
                    name,
                    "softmax",
                    b,
                    jax.jit(one),
                    jax.jit(scan),
                    sm_sets,
                    n,
                    kv_bytes,
                    dict(context=s_ctx, kv_heads=h),
                )
            del sm_sets

    def decode_rows(self, name, kind, b, one, scan, sets, n, nbytes, extra):
        row = dict(impl=name, kind=kind, B=b, bytes_per_step=nbytes, scan_steps=n, **extra)
        if self.budget.over():
            row["skipped"] = self.budget.reason()
        else:
            mt = self.args.max_time_per_config
            try:
                t1 = time_jax(one, sets, self.reps, self.warmup, mt)
                row.update({f"call_{k}": x for k, x in t1.items()})
                row["call_tokens_per_s"] = b / t1["median_s"]
                row.update(step_s=t1["median_s"], step_from="call")
            except Exception as e:  # noqa: BLE001
                row["call_error"] = _err(e, 600)
            try:
                ts = time_jax(scan, sets, self.reps, self.warmup, mt)
                row.update({f"scan_{k}": x for k, x in ts.items()})
                row.update(step_s=ts["median_s"] / n, step_from="scan")
            except Exception as e:  # noqa: BLE001
                row["scan_error"] = _err(e, 600)
            if "step_s" in row:
                row["tokens_per_s"] = b / row["step_s"]
                row["gbps"] = nbytes / row["step_s"] / 1e9
            else:
                row["error"] = row.get("call_error", row.get("scan_error"))
        self.res["decode"].append(row)
        self.log(_fmt(row))

    # -- xla reference --------------------------------------------------------------------
    def xla_ref_section(self):
        slow = {}
        for t in self.ts:
            b = max(1, self.total // t)
            for decay in DECAYS:
                sets = [make_inputs(b, t, self.h, self.f, self.dv, decay, seed=s) for s in (1, 2)]
                for p in PASSES:
                    bwd = p == "fwd+bwd"
                    if (decay, p) in slow:
                        self.res["xla_ref"].append(
                            dict(
                                impl="xla_ref",
                                T=t,
                                B=b,
                                decay=decay,
                                pass_=p,
                                skipped=slow[(decay, p)],
                            )
                        )
                        continue
                    args = [x if bwd else x[:4] for x in sets]
                    fn = jax.jit(
                        with_vjp(functools.partial(xla_chunked, scale=self.scale))
                        if bwd
                        else functools.partial(xla_chunked, scale=self.scale)
                    )
                    row = self.linear_row("xla_ref", "xla_ref", t, b, decay, p, fn, args)
                    if row.get("median_s", 0) > 2.0 or row.get("first_call_s", 0) > 60:
                        slow[(decay, p)] = (
                            f"skipped: T={t} took {row['median_s']:.2f} s/call "
                            f"({row['first_call_s']:.0f} s first call)"
                        )
                    if "error" in row and "RESOURCE_EXHAUSTED" in row["error"]:
                        slow[(decay, p)] = f"skipped: out of memory at T={t}"
                del sets

    # -- summary --------------------------------------------------------------------------
    def summarize(self):
        res = self.res
        by = {}
        for sec in ("chunked", "xla_ref"):
            for r in res[sec]:
                if "median_s" in r:
                    by[(r["impl"], r["T"], r["decay"], r["pass_"])] = r
        sm = {(r["T"], r["pass_"]): r for r in res["softmax"] if "median_s" in r}
        ratios = {}
        for t in self.ts:
            for decay in DECAYS:
                for p in PASSES:
                    ours = by.get(("ours", t, decay, p))
                    if not ours:
                        continue
                    d = {}
                    for other, r in (
                        ("fla", by.get(("fla", t, decay, p))),
                        ("xla_ref", by.get(("xla_ref", t, decay, p))),
                        (self.softmax_impl, sm.get((t, p))),
                    ):
                        if r:
                            d[f"ours_over_{other}_speed"] = r["median_s"] / ours["median_s"]
                            d[f"ours_over_{other}_speed_b2b"] = (
                                r["back_to_back_s"] / ours["back_to_back_s"]
                            )
                    if d:
                        ratios[f"T{t}/{decay}/{p}"] = d
        res["ratios"] = ratios
        goal = {}
        for decay in DECAYS:
            for p in PASSES:
                vals = [
                    ratios.get(f"T{t}/{decay}/{p}", {}).get("ours_over_fla_speed")
                    for t in self.ts
                    if t >= 8192
                ]
                vals = [v for v in vals if v is not None]
                if vals:
                    goal[f"{decay}/{p}"] = dict(
                        min_ours_over_fla_speed_T_ge_8K=min(vals), met=min(vals) >= 1.0
                    )
        res["goal_ours_over_fla_ge_1_at_T_ge_8K"] = goal
        cross = {}
        for decay in DECAYS:
            for p in PASSES:
                pts = [
                    (t, ratios[f"T{t}/{decay}/{p}"].get(f"ours_over_{self.softmax_impl}_speed"))
                    for t in self.ts
                    if f"T{t}/{decay}/{p}" in ratios
                ]
                pts = [(t, r) for t, r in pts if r is not None]
                if pts:
                    cross[f"{decay}/{p}"] = crossover(pts)
        res["crossover"] = cross
        dec = {(r["impl"], r["B"]): r for r in res["decode"] if "tokens_per_s" in r}
        dr = {}
        for b in self.decode_bs:
            ours = dec.get(("ours", b))
            if not ours:
                continue
            for other in ("cudnn", "pallas_decode", "xla_decode", "xla_ref"):
                if (other, b) in dec:
                    o = dec[(other, b)]
                    dr[f"B{b}/ours_over_{other}_tokens_per_s"] = (
                        ours["tokens_per_s"] / o["tokens_per_s"]
                    )
                    if "call_tokens_per_s" in ours and "call_tokens_per_s" in o:
                        dr[f"B{b}/ours_over_{other}_tokens_per_s_per_call"] = (
                            ours["call_tokens_per_s"] / o["call_tokens_per_s"]
                        )
        res["decode_ratios"] = dr

    def save(self, paths):
        self.summarize()
        self.res["wall_s"] = self.budget.elapsed()
        for path in paths:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                json.dump(self.res, f, indent=1, default=str)

    def run(self, sections, paths):
        table = dict(
            check=self.check,
            sweep=self.sweep,
            chunked=self.chunked_section,
            decode=self.decode_section,
            xla_ref=self.xla_ref_section,
        )
        self.log(
            f"device {self.res['meta']['device']}  jax {jax.__version__}  impl {self.args.impl}"
        )
        try:
            self.res["copy_bandwidth"] = copy_bandwidth(
                (1 << 30) // (256 if self.smoke else 1), self.reps, self.warmup
            )
        except Exception as e:  # noqa: BLE001
            self.res["copy_bandwidth"] = dict(error=_err(e))
        for name in SECTIONS:
            if name not in sections:
                continue
            t0 = time.time()
            try:
                table[name]()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                self.res.setdefault("section_errors", {})[name] = traceback.format_exc()[-2000:]
            self.res["sections_s"][name] = time.time() - t0
            self.log(f"[{name}] {time.time() - t0:.0f} s (total {self.budget.elapsed():.0f} s)")
            self.save(paths)
        return self.res


def crossover(pts):
    """``[(T, softmax_time / linear_time)]`` -> first measured T where linear is faster and a
    log-log interpolation of the T where the ratio crosses 1."""
    first = next((t for t, r in pts if r >= 1.0), None)
    est, note = None, None
    if pts[0][1] >= 1.0:
        note = f"linear faster at every measured T (from T={pts[0][0]})"
    for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
        if r0 < 1.0 <= r1:
            w = -math.log(r0) / (math.log(r1) - math.log(r0))
            est = math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
            break
    if first is None:
        note = "softmax faster at every measured T"
    return dict(
        points=[dict(T=t, ours_over_softmax_speed=r) for t, r in pts],
        first_T_linear_faster=first,
        T_estimate=est,
        note=note,
    )


def _fmt(row):
    keys = [k for k in row if not isinstance(row[k], (list, dict))]
    return " ".join(
        f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys
    )


def print_tables(res):
    print(
        "\n| T | B | decay | pass | ours ms | fla ms | softmax ms | ours TF/s | ours/fla | ours/softmax |"
    )
    rows = {(r["impl"], r["T"], r.get("decay"), r["pass_"]): r for r in res["chunked"]}
    sm = {(r["T"], r["pass_"]): r for r in res["softmax"]}
    ms = lambda r: f"{r['median_s'] * 1e3:.3f}" if r and "median_s" in r else "-"  # noqa: E731
    for t in res["meta"]["Ts"]:
        for decay in DECAYS:
            for p in PASSES:
                o, fl = rows.get(("ours", t, decay, p)), rows.get(("fla", t, decay, p))
                if not o:
                    continue
                b = o["B"]
                rt = res["ratios"].get(f"T{t}/{decay}/{p}", {})
                rf = rt.get("ours_over_fla_speed")
                rs = rt.get(f"ours_over_{res['meta']['softmax_impl']}_speed")
                print(
                    f"| {t} | {b} | {decay} | {p} | {ms(o)} | {ms(fl)} | {ms(sm.get((t, p)))} | "
                    f"{o.get('tflops', float('nan')):.0f} | "
                    f"{'-' if rf is None else f'{rf:.2f}'} | {'-' if rs is None else f'{rs:.2f}'} |"
                )
    print("\n| decode impl | B | step us | from | tokens/s | call us |")
    for r in res["decode"]:
        if "step_s" in r:
            call = r.get("call_median_s")
            print(
                f"| {r['impl']} | {r['B']} | {r['step_s'] * 1e6:.1f} | {r['step_from']} | "
                f"{r['tokens_per_s']:.0f} | {'-' if call is None else f'{call * 1e6:.1f}'} |"
            )
    for k, v in res.get("crossover", {}).items():
        print(f"crossover {k}: first T {v['first_T_linear_faster']}, estimate {v['T_estimate']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument(
        "--impl",
        default=None,
        choices=("pallas", "interpret", "reference"),
        help="our kernel: pallas (GPU), interpret (CPU), or the XLA reference in its "
        "place; default pallas, interpret with --smoke",
    )
    p.add_argument("--sweep", action="store_true", help="sweep the kernel's tile knobs at T=8K")
    p.add_argument(
        "--kernel-kw",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="fixed keyword for chunked_linear_attention (repeatable)",
    )
    p.add_argument(
        "--sweep-values",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="candidate values of one knob for --sweep (repeatable)",
    )
    p.add_argument(
        "--sections",
        default=",".join(s for s in SECTIONS if s != "sweep"),
        help=f"comma list of {SECTIONS}",
    )
    p.add_argument("--T", default=None, help="comma list of sequence lengths (override)")
    p.add_argument("--decode-B", default=None, help="comma list of decode batch sizes (override)")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--max-time-per-config",
        type=float,
        default=4.0,
        help="seconds of timed runs per config before reps are cut (min 3)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=380.0,
        help="seconds; later measurements are skipped (and say so) past it",
    )
    p.add_argument(
        "--sweep-budget",
        type=float,
        default=110.0,
        help="seconds for --sweep (55%% forward, the rest forward+backward)",
    )
    p.add_argument("--sweep-T", type=int, default=None, help="sweep length (default 8192)")
    p.add_argument("--out", default="benchmarks", help="output directory")
    args = p.parse_args(argv)
    if args.impl is None:
        args.impl = "interpret" if args.smoke else "pallas"
    sections = set(filter(None, args.sections.split(",")))
    if args.sweep:
        sections.add("sweep")
    bad = sections - set(SECTIONS)
    if bad:
        p.error(f"--sections: unknown {sorted(bad)}; expected some of {SECTIONS}")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (fla) shares the GPU
    if not args.smoke and jax.default_backend() != "gpu":
        sys.exit(
            f"bench_linear_attention needs a GPU (backend {jax.default_backend()!r}); use --smoke"
        )
    bench = Bench(args)
    slug = re.sub(r"[^a-z0-9]+", "_", bench.res["meta"]["device"].lower()).strip("_")
    name = f"bench_linear_attention_{slug}{'_smoke' if args.smoke else ''}.json"
    paths = [os.path.join(args.out, name)]
    if os.environ.get("OUT") and os.path.abspath(os.environ["OUT"]) != os.path.abspath(args.out):
        paths.append(os.path.join(os.environ["OUT"], name))
    res = bench.run(sections, paths)
    print(f"\nwrote {', '.join(paths)} ({res['wall_s']:.0f} s)")
    print_tables(res)
    return res


if __name__ == "__main__":
    main()
