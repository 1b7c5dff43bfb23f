"""Benchmark: block-sparse flash attention (Pallas, Triton lowering) vs cuDNN and XLA on one GPU.

    python -m experiments.bench_attention [--quick] [--out DIR]

bf16, B*T = 32K tokens, T in {2K, 8K, 32K}, head dims 64 (32 heads) and 128 (16 heads), causal
and non-causal, forward and forward+backward; then block-sparse layouts at densities
50/25/10/5 % at T = 16K and 32K against dense cuDNN. TFLOP/s use the standard count
``4 * B * N * T^2 * H`` (causal: half; forward+backward: 3.5x forward; block-sparse: times the
density). Medians of timed runs after warm-up, inputs rotated over two buffers. Also checks the
kernel against cuDNN / XLA on the GPU before timing. Writes ``bench_attention.json`` (device,
versions, shapes, medians, ratios) to ``--out`` (default ``$OUT`` or ``benchmarks/``) and prints
a table. Importable without ml_collections / grain. Sections ``mosaic`` / ``mosaic_sparse`` add
the Mosaic GPU forward (``impl="mosaic"``: ``mosaic_*`` columns next to cuDNN and the Triton
kernel, H 16, D 64 and 128); ``experiments/check_flash_mosaic.py`` runs them on their own.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm.ops import attention as A
from efficient_mllm.ops import masks as M
from pallas_kernels import common
from pallas_kernels.flash_attention import gpu


def timeit(fn, args_list, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn(*args)`` over ``reps`` runs, rotating argument sets."""
    for i in range(warmup):
        jax.block_until_ready(fn(*args_list[i % len(args_list)]))
    ts = []
    for i in range(reps):
        a = args_list[i % len(args_list)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def flops(b, n, t, h, causal, bwd, density=1.0):
    f = 4.0 * b * n * t * t * h * density
    if causal:
        f *= 0.5
    return f * (3.5 if bwd else 1.0)


def make_inputs(b, t, n, h, dtype=jnp.bfloat16, sets=2, seed=0):
    out = []
    for s in range(sets):
        ks = jax.random.split(jax.random.PRNGKey(seed + s), 3)
        out.append(tuple(jax.random.normal(kk, (b, t, n, h), dtype) for kk in ks))
    return out


def causal_kwargs(b, t, bq, bk):
    from efficient_mllm.ops import kernel_masks

    km = kernel_masks.kernel_mask(M.causal(), b, t, t, bq, bk)
    return dict(block_map=km.block_map, mask_fn=km.mask_fn, row_features=km.row_features,
                col_features=km.col_features, block_q=bq, block_k=bk)


def pallas_fn(causal, b, t, bq, bk, warps, stages, bwd):
    kw = causal_kwargs(b, t, bq, bk) if causal else dict(block_q=bq, block_k=bk)
    kw.update(num_warps=warps, num_stages=stages)

    def fwd(q, k, v):
        return gpu.flash_attention(q, k, v, **kw)[0]

    return jax.jit(_with_bwd(fwd) if bwd else fwd)


def cudnn_fn(causal, bwd):
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    return jax.jit(_with_bwd(fwd) if bwd else fwd)


def xla_fn(causal, bwd):
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    return jax.jit(_with_bwd(fwd) if bwd else fwd)


def _with_bwd(fwd):
    def f(q, k, v):
        o, vjp = jax.vjp(fwd, q, k, v)
        return vjp(o)  # cotangent = output: a fixed, data-dependent dO

    return f


def check_correctness(log):
    """Kernel vs XLA (fp32 math on bf16 inputs) on the GPU: fwd, lse, grads; several masks."""
    rows = []
    key = jax.random.PRNGKey(42)
    for name, mask, b, t, nq, nkv, d in [
        ("causal", M.causal(), 2, 1000, 8, 2, 128),
        ("window", M.sliding_window(300), 1, 2048, 4, 4, 64),
        ("segments", M.segment_ids(jnp.repeat(jnp.arange(4), 256)[None]) & M.causal(), 1, 1024, 4, 1, 64),
        ("prefix_lm", M.prefix_lm(jnp.asarray([300, 900])), 2, 1024, 4, 2, 128),
    ]:
        ks = jax.random.split(key, 4)
        q = jax.random.normal(ks[0], (b, t, nq, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, t, nkv, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, nkv, d), jnp.bfloat16)
        w = jax.random.normal(ks[3], (b, t, nq, d), jnp.float32)

        def loss(q, k, v, impl, mask=mask, w=w):
            o = A.dot_product_attention(q, k, v, mask=mask, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * w), o

        res = {}
        for impl in ("pallas", "xla"):
            (_, o), g = jax.jit(jax.value_and_grad(lambda q, k, v, impl=impl: loss(q, k, v, impl), argnums=(0, 1, 2), has_aux=True))(q, k, v)
            res[impl] = (o.astype(jnp.float32), [x.astype(jnp.float32) for x in g])
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_o = A.dot_product_attention(*f32, mask=mask, impl="xla")
        rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
        row = dict(mask=name, shape=[b, t, nq, nkv, d],
                   out_rel_err_pallas=rel(res["pallas"][0], ref_o), out_rel_err_xla_bf16=rel(res["xla"][0], ref_o),
                   grad_rel_err_vs_xla_bf16=[rel(a, r) for a, r in zip(res["pallas"][1], res["xla"][1])],
                   finite=bool(all(jnp.all(jnp.isfinite(x)) for x in res["pallas"][1])))
        rows.append(row)
        log(f"check {name}: out rel err {row['out_rel_err_pallas']:.2e} (xla bf16 {row['out_rel_err_xla_bf16']:.2e}), "
            f"grad rel err vs xla {[f'{e:.1e}' for e in row['grad_rel_err_vs_xla_bf16']]}")
    return rows


def bench_dense(log, quick, results):
    total = 32 * 1024
    ts = [2048, 8192] if quick else [2048, 8192, 32768]
    configs = [(128, 64, 4, 3), (128, 64, 8, 3)]  # forward tiles; backward: the kernel defaults
    for h, n in ((128, 16), (64, 32)):
        for t in ts:
            b = max(1, total // t)
            inputs = make_inputs(b, t, n, h)
            for causal in (True, False):
                for bwd in (False, True):
                    row = dict(kind="dense", T=t, B=b, heads=n, head_dim=h, causal=causal,
                               pass_="fwd+bwd" if bwd else "fwd")
                    fl = flops(b, n, t, h, causal, bwd)
                    try:
                        row["cudnn_s"] = timeit(cudnn_fn(causal, bwd), inputs)
                    except Exception as e:  # noqa: BLE001
                        row["cudnn_error"] = str(e)[:200]
                    if t <= (8192 if not bwd else 2048):  # XLA's T^2 map: 80 GB at 8K fwd+bwd
                        try:
                            row["xla_s"] = timeit(xla_fn(causal, bwd), inputs, reps=5)
                        except Exception as e:  # noqa: BLE001
                            row["xla_error"] = str(e)[:200]
                    best = None
                    for cfg in configs if not quick else configs[:1]:
                        bq, bk, warps, stages = cfg
                        try:
                            s = timeit(pallas_fn(causal, b, t, bq, bk, warps, stages, bwd), inputs)
                            row.setdefault("pallas_configs", []).append(dict(cfg=cfg, s=s))
                            if best is None or s < best[1]:
                                best = (cfg, s)
                        except Exception as e:  # noqa: BLE001
                            row.setdefault("pallas_errors", []).append(dict(cfg=cfg, error=str(e)[:300]))
                    if best:
                        row["pallas_s"], row["pallas_cfg"] = best[1], best[0]
                    for impl in ("cudnn", "xla", "pallas"):
                        if f"{impl}_s" in row:
                            row[f"{impl}_tflops"] = fl / row[f"{impl}_s"] / 1e12
                    if "pallas_s" in row and "cudnn_s" in row:
                        row["pallas_vs_cudnn"] = row["cudnn_s"] / row["pallas_s"]
                    results.append(row)
                    log(_fmt(row))


def random_layout(b, n, nb, density, seed):
    """Per-head random block layout with ``density`` of the tiles FULL (diagonal always kept)."""
    rng = np.random.default_rng(seed)
    keep = rng.random((b, n, nb, nb)) < density
    keep |= np.eye(nb, dtype=bool)[None, None]
    return jnp.asarray(np.where(keep, common.FULL, common.EMPTY), jnp.int8)


def bench_sparse(log, quick, results):
    total = 32 * 1024
    ts = [16384] if quick else [16384, 32768]
    h, n = 128, 16
    for t in ts:
        b = max(1, total // t)
        inputs = make_inputs(b, t, n, h)
        dense = timeit(cudnn_fn(False, False), inputs)
        dense_bwd = timeit(cudnn_fn(False, True), inputs)
        for bq, bk, warps, stages in ((128, 64, 4, 3),):
            for density in (0.5, 0.25, 0.1, 0.05):
                bm = random_layout(b, n, t // bk if bq == bk else t // bq, density, 0)
                if bq != bk:
                    bm = jnp.repeat(bm, bq // bk, axis=3)  # sparse pattern at (bq, bq), tiles (bq, bk)
                real = float(jnp.mean(bm != common.EMPTY))
                for bwd in (False, True):
                    kw = dict(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
                    fwd = lambda q, k, v, bm, kw=kw: gpu.flash_attention(q, k, v, block_map=bm, **kw)[0]
                    if bwd:
                        fn = jax.jit(lambda q, k, v, bm, fwd=fwd: jax.vjp(functools.partial(_last, fwd, bm), q, k, v)[1](fwd(q, k, v, bm)))
                    else:
                        fn = jax.jit(fwd)
                    row = dict(kind="block_sparse", T=t, B=b, heads=n, head_dim=h, density_target=density,
                               density=real, tiles=[bq, bk], pass_="fwd+bwd" if bwd else "fwd",
                               cudnn_dense_s=dense_bwd if bwd else dense)
                    try:
                        row["pallas_s"] = timeit(fn, [a + (bm,) for a in inputs])
                        row["pallas_tflops_effective"] = flops(b, n, t, h, False, bwd, real) / row["pallas_s"] / 1e12
                        row["speedup_vs_dense_cudnn"] = row["cudnn_dense_s"] / row["pallas_s"]
                        row["time_over_density_x_dense"] = row["pallas_s"] / (real * row["cudnn_dense_s"])
                    except Exception as e:  # noqa: BLE001
                        row["pallas_error"] = str(e)[:300]
                    results.append(row)
                    log(_fmt(row))


def bench_library_path(log, quick, results):
    """dot_product_attention(impl="pallas") at T = 32K, forward and forward+backward: compile time
    (mask -> plan inside jit) and run time next to impl="cudnn"; plus a mask cuDNN cannot express
    (segments + causal). On Hopper impl="pallas" runs the Mosaic GPU forward (``kernel`` field)."""
    from efficient_mllm.ops import pallas_attention as P

    t, n, h = 32768, 16, 128
    kernel = "mosaic_gpu fwd + triton bwd" if P._is_hopper() else "triton"
    inputs = make_inputs(1, t, n, h)
    seg = jnp.repeat(jnp.arange(8, dtype=jnp.int32), t // 8)[None]
    for name, mask, impls in (("causal", M.causal(), ("pallas", "cudnn")),
                              ("segments&causal", M.segment_ids(seg) & M.causal(), ("pallas",))):
        for impl in impls:
            for bwd in (False, True):
                def fwd(q, k, v, impl=impl, mask=mask):
                    return A.dot_product_attention(q, k, v, mask=mask, impl=impl)

                fn = jax.jit(_with_bwd(fwd) if bwd else fwd)
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*inputs[0]))
                first = time.perf_counter() - t0
                s = timeit(fn, inputs)
                row = dict(kind="library", mask=name, impl=impl, pass_="fwd+bwd" if bwd else "fwd",
                           kernel=kernel if impl == "pallas" else impl, T=t, heads=n, head_dim=h,
                           first_call_s=first, s=s, tflops=flops(1, n, t, h, True, bwd) / s / 1e12)
                results.append(row)
                log(_fmt(row))


# --- impl="mosaic": the Mosaic GPU forward (pallas_kernels/flash_attention/mosaic_gpu.py) ---------

MOSAIC_CONFIGS = ((128, 128, 2), (128, 128, 3), (128, 64, 3))  # (block_q, block_k, num_stages)


def mosaic_fn(causal, b, t, bq, bk, stages):
    from pallas_kernels.flash_attention import mosaic_gpu

    kw = causal_kwargs(b, t, bq, bk) if causal else dict(block_q=bq, block_k=bk)

    def fwd(q, k, v):
        return mosaic_gpu.flash_attention_forward(q, k, v, num_stages=stages, **kw)[0]

    return jax.jit(fwd)


def _best(row, prefix, fns, inputs, deadline):
    """Times each (cfg, make_fn) into ``row[prefix + '_configs']``; the fastest to ``prefix_s``."""
    for cfg, make in fns:
        if deadline is not None and time.time() > deadline:
            row.setdefault(f"{prefix}_errors", []).append(dict(cfg=cfg, error="skipped: time budget"))
            continue
        try:
            s = timeit(make(), inputs)
            row.setdefault(f"{prefix}_configs", []).append(dict(cfg=cfg, s=s))
            if f"{prefix}_s" not in row or s < row[f"{prefix}_s"]:
                row[f"{prefix}_s"], row[f"{prefix}_cfg"] = s, cfg
        except Exception as e:  # noqa: BLE001
            row.setdefault(f"{prefix}_errors", []).append(dict(cfg=cfg, error=str(e)[:300]))


def bench_mosaic(log, quick, results, configs=MOSAIC_CONFIGS, heads=16, deadline=None):
    """Forward only: cuDNN vs Triton-lowered Pallas vs the Mosaic GPU kernel, B*T = 32K, H heads."""
    total = 32 * 1024
    ts = [8192, 2048] if quick else [8192, 32768, 2048]  # most important first (time budget)
    for t in ts:
        for h in (128, 64):
            b = max(1, total // t)
            inputs = make_inputs(b, t, heads, h)
            for causal in (True, False):
                row = dict(kind="mosaic_dense", T=t, B=b, heads=heads, head_dim=h, causal=causal, pass_="fwd")
                if deadline is not None and time.time() > deadline:
                    row["error"] = "skipped: time budget"
                    results.append(row)
                    continue
                try:
                    row["cudnn_s"] = timeit(cudnn_fn(causal, False), inputs)
                except Exception as e:  # noqa: BLE001
                    row["cudnn_error"] = str(e)[:200]
                tri = functools.partial(pallas_fn, causal, b, t, 128, 64, 4, 3, False)
                _best(row, "pallas", [((128, 64, 4, 3), tri)], inputs, deadline)
                mos = [(c, functools.partial(mosaic_fn, causal, b, t, *c)) for c in configs]
                _best(row, "mosaic", mos, inputs, deadline)
                fl = flops(b, heads, t, h, causal, False)
                for impl in ("cudnn", "pallas", "mosaic"):
                    if f"{impl}_s" in row:
                        row[f"{impl}_tflops"] = fl / row[f"{impl}_s"] / 1e12
                for impl in ("pallas", "mosaic"):
                    if f"{impl}_s" in row and "cudnn_s" in row:
                        row[f"{impl}_vs_cudnn"] = row["cudnn_s"] / row[f"{impl}_s"]
                results.append(row)
                log(_fmt(row))


def bench_mosaic_sparse(log, quick, results, configs=MOSAIC_CONFIGS[:2], deadline=None):
    """Forward block-sparse (random 128x128 layouts, diagonal kept) vs dense cuDNN: Triton vs Mosaic."""
    from pallas_kernels.flash_attention import mosaic_gpu

    total, h, n, g = 32 * 1024, 128, 16, 128
    for t in ([16384] if quick else [16384, 32768]):
        b = max(1, total // t)
        inputs = make_inputs(b, t, n, h)
        try:
            dense = timeit(cudnn_fn(False, False), inputs)
        except Exception as e:  # noqa: BLE001
            dense = None
            log(f"cudnn dense T={t} failed: {str(e)[:200]}")
        for density in (0.5, 0.25, 0.1):
            base = random_layout(b, n, t // g, density, 0)  # at 128x128 granularity
            real = float(jnp.mean(base != common.EMPTY))
            row = dict(kind="mosaic_block_sparse", T=t, B=b, heads=n, head_dim=h, density_target=density,
                       density=real, pass_="fwd", cudnn_dense_s=dense)
            if deadline is not None and time.time() > deadline:
                row["error"] = "skipped: time budget"
                results.append(row)
                continue
            tri = jax.jit(lambda q, k, v, bm: gpu.flash_attention(q, k, v, block_map=bm, block_q=128, block_k=64)[0])
            bm64 = jnp.repeat(base, 2, axis=3)
            _best(row, "pallas", [((128, 64, 4, 3), lambda tri=tri: tri)], [a + (bm64,) for a in inputs], deadline)
            for bq, bk, st in configs:
                bm = base if bk == g else jnp.repeat(base, g // bk, axis=3)
                fn = lambda q, k, v, bm, bq=bq, bk=bk, st=st: mosaic_gpu.flash_attention_forward(
                    q, k, v, block_map=bm, block_q=bq, block_k=bk, num_stages=st)[0]
                _best(row, "mosaic", [((bq, bk, st), lambda fn=fn: jax.jit(fn))], [a + (bm,) for a in inputs], deadline)
            for impl in ("pallas", "mosaic"):
                if f"{impl}_s" in row:
                    row[f"{impl}_tflops_effective"] = flops(b, n, t, h, False, False, real) / row[f"{impl}_s"] / 1e12
                    if dense:
                        row[f"{impl}_time_over_density_x_dense"] = row[f"{impl}_s"] / (real * dense)
            results.append(row)
            log(_fmt(row))


def mosaic_table(results):
    """Markdown summary lines of the mosaic_* rows."""
    out = ["| T | D | causal | cudnn TF/s | triton TF/s | mosaic TF/s | mosaic/cudnn | mosaic cfg |",
           "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in results:
        if r.get("kind") == "mosaic_dense":
            out.append(f"| {r['T']} | {r['head_dim']} | {r['causal']} | {r.get('cudnn_tflops', nan):.0f} | "
                       f"{r.get('pallas_tflops', nan):.0f} | {r.get('mosaic_tflops', nan):.0f} | "
                       f"{r.get('mosaic_vs_cudnn', nan):.2f} | {r.get('mosaic_cfg')} |")
    out += ["", "| T | density | triton ms | mosaic ms | dense cudnn ms | mosaic t/(density*dense) |",
            "|---|---|---|---|---|---|"]
    for r in results:
        if r.get("kind") == "mosaic_block_sparse":
            ms = lambda k, r=r: r[k] * 1e3 if r.get(k) else nan
            out.append(f"| {r['T']} | {r['density']:.3f} | {ms('pallas_s'):.2f} | {ms('mosaic_s'):.2f} | "
                       f"{ms('cudnn_dense_s'):.2f} | {r.get('mosaic_time_over_density_x_dense', nan):.2f} |")
    return "\n".join(out)


def _last(fn, last, *args):
    """``fn(*args, last)``: binds a trailing argument for jax.vjp."""
    return fn(*args, last)


def _fmt(row):
    keys = [k for k in row if not isinstance(row[k], (list, dict))]
    return " ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    p.add_argument("--skip", default="", help="comma list of sections to skip: check,dense,sparse,"
                   "library,mosaic,mosaic_sparse")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    dev = jax.devices()[0]
    meta = dict(device=str(dev.device_kind), platform=jax.default_backend(), jax=jax.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"), dtype="bfloat16",
                tokens_per_batch=32 * 1024)
    results, checks = [], []
    log = lambda s: print(s, flush=True)
    sections = [("check", lambda: checks.extend(check_correctness(log))),
                ("dense", lambda: bench_dense(log, args.quick, results)),
                ("sparse", lambda: bench_sparse(log, args.quick, results)),
                ("library", lambda: bench_library_path(log, args.quick, results)),
                ("mosaic", lambda: bench_mosaic(log, args.quick, results)),
                ("mosaic_sparse", lambda: bench_mosaic_sparse(log, args.quick, results))]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_attention.json")
    for name, fn in sections:
        if name in skip:
            continue
        t0 = time.time()
        try:
            fn()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            results.append(dict(kind=name, error=traceback.format_exc()[-1500:]))
        log(f"[{name}] {time.time() - t0:.0f}s")
        with open(path, "w") as f:  # after every section: a timeout keeps what was measured
            json.dump(dict(meta=meta, checks=checks, results=results), f, indent=1)
    print(f"wrote {path}")
    print("\n| kind | T | D | causal | pass | cudnn TF/s | pallas TF/s | pallas/cudnn |")
    for r in results:
        if r.get("kind") == "dense":
            print(f"| dense | {r['T']} | {r['head_dim']} | {r['causal']} | {r['pass_']} | "
                  f"{r.get('cudnn_tflops', float('nan')):.0f} | {r.get('pallas_tflops', float('nan')):.0f} | "
                  f"{r.get('pallas_vs_cudnn', float('nan')):.2f} |")
    print("\n| T | tiles | density | pass | pallas ms | dense cudnn ms | t/(density*dense) |")
    for r in results:
        if r.get("kind") == "block_sparse" and "pallas_s" in r:
            print(f"| {r['T']} | {r['tiles']} | {r['density']:.3f} | {r['pass_']} | {r['pallas_s']*1e3:.2f} | "
                  f"{r['cudnn_dense_s']*1e3:.2f} | {r['time_over_density_x_dense']:.2f} |")
    if any(str(r.get("kind", "")).startswith("mosaic") for r in results):
        print("\n" + mosaic_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
