"""GPU check + benchmark of the Mosaic GPU flash-attention forward (pallas_kernels/flash_attention/mosaic_gpu.py).

    python -m experiments.check_flash_mosaic --section check [--out DIR]
    python -m experiments.check_flash_mosaic --section bench [--out DIR] [--budget SECONDS] [--quick]

``check``: bf16 (and one fp16) cases -- dense, causal, sliding window, segments, prefix-LM,
padding with fully masked rows, random block-sparse maps, softcap, GQA 1/4, ragged lengths,
three tile configurations -- against an XLA fp32 reference: out / lse errors next to XLA's own
bf16 error, -inf placement, and gradients through the custom_vjp (Mosaic forward, Triton
backward). Writes ``check_flash_mosaic.json``. ``bench``: forward TFLOP/s of cuDNN, the Triton
kernel and this kernel (``experiments.bench_attention.bench_mosaic`` / ``bench_mosaic_sparse``),
writes ``bench_flash_mosaic.json`` after every row (a timeout keeps what was measured). Every
case runs in try/except, so one failure does not stop the sweep.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np


def _meta():
    dev = jax.devices()[0]
    return dict(device=str(dev.device_kind), platform=jax.default_backend(), jax=jax.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"))


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _cases():
    from efficient_mllm.ops import masks as M

    seg = lambda b, t: M.segment_ids(jnp.repeat(jnp.arange(4), -(-t // 4))[None, :t].repeat(b, 0)) & M.causal()
    # name, b, t, nq, nkv, d, mask(b, t), (block_q, block_k, stages), softcap, dtype
    return [
        ("dense_gqa4", 2, 1000, 8, 2, 64, lambda b, t: None, (128, 128, 2), None, jnp.bfloat16),
        ("causal_d128_gqa4", 2, 1000, 8, 2, 128, lambda b, t: M.causal(), (128, 128, 2), None, jnp.bfloat16),
        ("causal_d128_bk64_st3", 1, 2048, 4, 4, 128, lambda b, t: M.causal(), (128, 64, 3), None, jnp.bfloat16),
        ("causal_d64_bq256", 1, 2048, 4, 4, 64, lambda b, t: M.causal(), (256, 128, 2), None, jnp.bfloat16),
        ("window300_d64", 1, 2048, 4, 4, 64, lambda b, t: M.sliding_window(300), (128, 128, 2), None, jnp.bfloat16),
        ("segments_causal_d64_mqa", 1, 1024, 4, 1, 64, seg, (128, 128, 2), None, jnp.bfloat16),
        ("prefix_lm_d128", 2, 1024, 4, 2, 128, lambda b, t: M.prefix_lm(jnp.asarray([300, 900])), (128, 128, 2), None,
         jnp.bfloat16),
        ("padding_fully_masked_rows", 2, 777, 4, 2, 64,
         lambda b, t: M.causal() & M.padding(jnp.asarray([500, 777]), jnp.asarray([400, 700])), (128, 128, 2), None,
         jnp.bfloat16),
        ("block_sparse_random_d128", 2, 1024, 4, 2, 128, "sparse", (128, 128, 2), None, jnp.bfloat16),
        ("softcap20_causal_d128", 1, 1024, 4, 2, 128, lambda b, t: M.causal(), (128, 128, 2), 20.0, jnp.bfloat16),
        ("fp16_causal_d128", 1, 1024, 4, 2, 128, lambda b, t: M.causal(), (128, 128, 2), None, jnp.float16),
    ]


def _kernel_kwargs(mask, b, t, nq, bq, bk):
    """Kernel arguments and an equivalent reference mask (a MaskSpec or a dense bool array)."""
    from efficient_mllm.ops import kernel_masks
    from pallas_kernels import common

    if mask is None:
        return {}, None
    if isinstance(mask, str):  # random block map: EMPTY / PARTIAL / FULL, no predicate
        nb = (common.cdiv(t, bq), common.cdiv(t, bk))
        bm = np.random.default_rng(3).integers(0, 3, (b, nq) + nb)
        bm[..., 0] = common.FULL  # every row sees something
        dense = np.repeat(np.repeat(bm != common.EMPTY, bq, axis=2), bk, axis=3)[:, :, :t, :t]
        return dict(block_map=jnp.asarray(bm, jnp.int8)), jnp.asarray(dense)
    km = kernel_masks.kernel_mask(mask, b, t, t, bq, bk)
    return dict(block_map=km.block_map, mask_fn=km.mask_fn, row_features=km.row_features,
                col_features=km.col_features), mask


def _loss(fn, w, u, q, k, v):
    o, lse = fn(q, k, v)
    o = o.astype(jnp.float32)
    return jnp.sum(o * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * u), (o, lse)


def check(log, on_row=None):
    from efficient_mllm.ops import attention as A
    from pallas_kernels.flash_attention import mosaic_gpu

    rows = []
    rel = lambda a, r: float(jnp.linalg.norm(a - r) / (jnp.linalg.norm(r) + 1e-30))
    for ci, (name, b, t, nq, nkv, d, mk, (bq, bk, st), softcap, dtype) in enumerate(_cases()):
        row = dict(case=name, shape=[b, t, nq, nkv, d], tiles=[bq, bk, st], softcap=softcap, dtype=jnp.dtype(dtype).name)
        t0 = time.time()
        try:
            ks = jax.random.split(jax.random.PRNGKey(ci), 5)
            q = jax.random.normal(ks[0], (b, t, nq, d), dtype)
            k = jax.random.normal(ks[1], (b, t, nkv, d), dtype)
            v = jax.random.normal(ks[2], (b, t, nkv, d), dtype)
            w = jax.random.normal(ks[3], (b, t, nq, d), jnp.float32)
            u = jax.random.normal(ks[4], (b, nq, t), jnp.float32)
            kw, ref_mask = _kernel_kwargs(mk if isinstance(mk, str) else mk(b, t), b, t, nq, bq, bk)

            kern = functools.partial(mosaic_gpu.flash_attention_forward, block_q=bq, block_k=bk, num_stages=st,
                                     softcap=softcap, **kw)
            ref = functools.partial(A.dot_product_attention, mask=ref_mask, softcap=softcap, impl="xla",
                                    return_lse=True)
            vg = lambda fn, w=w, u=u: jax.jit(jax.value_and_grad(functools.partial(_loss, fn, w, u), (0, 1, 2),
                                                                 has_aux=True))
            (_, (o, lse)), g = vg(kern)(q, k, v)
            (_, (xo, _)), xg = vg(ref)(q, k, v)  # XLA on the bf16 inputs: the error to beat
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            (_, (ro, rl)), rg = vg(ref)(*f32)
            fin = jnp.isfinite(rl)
            row.update(
                out_rel_err=rel(o, ro), out_rel_err_xla_lowp=rel(xo, ro),
                lse_max_abs_err=float(jnp.max(jnp.where(fin, jnp.abs(lse - rl), 0.0))),
                neginf_match=bool(jnp.array_equal(jnp.isneginf(lse), jnp.isneginf(rl))),
                fully_masked_rows=int(jnp.sum(~fin)),
                masked_rows_out_zero=bool(jnp.all(jnp.where(jnp.transpose(~fin, (0, 2, 1))[..., None], o == 0, True))),
                grad_rel_err=[rel(a.astype(jnp.float32), r) for a, r in zip(g, rg)],
                grad_rel_err_xla_lowp=[rel(a.astype(jnp.float32), r) for a, r in zip(xg, rg)],
                grads_finite=bool(all(jnp.all(jnp.isfinite(x)) for x in g)),
            )
            ok = (row["out_rel_err"] <= 2 * row["out_rel_err_xla_lowp"] + 2e-3 and row["lse_max_abs_err"] < 2e-2
                  and row["neginf_match"] and row["masked_rows_out_zero"] and row["grads_finite"]
                  and all(a <= 2 * x + 1e-2 for a, x in zip(row["grad_rel_err"], row["grad_rel_err_xla_lowp"])))
            row["pass"] = bool(ok)
        except Exception as e:  # noqa: BLE001
            row["pass"] = False
            row["error"] = f"{type(e).__name__}: {str(e)[:1200]}"
            traceback.print_exc()
        row["seconds"] = time.time() - t0
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        if "error" in row:
            log(f"check {name}: ERROR {row['error'][:400]}")
        else:
            log(f"check {name}: {'PASS' if row['pass'] else 'FAIL'} out {row['out_rel_err']:.2e} "
                f"(xla lowp {row['out_rel_err_xla_lowp']:.2e}) lse {row['lse_max_abs_err']:.1e} "
                f"-inf ok {row['neginf_match']} grads {[f'{x:.1e}' for x in row['grad_rel_err']]} "
                f"(xla {[f'{x:.1e}' for x in row['grad_rel_err_xla_lowp']]}) {row['seconds']:.0f}s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--section", choices=("check", "bench", "all"), default="all")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the bench section")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = lambda s: print(s, flush=True)
    meta = _meta()
    log(f"{meta}")
    if args.section in ("check", "all"):
        path = os.path.join(args.out, "check_flash_mosaic.json")
        rows = check(log, on_row=lambda rows: _dump(path, dict(meta=meta, checks=rows)))
        _dump(path, dict(meta=meta, checks=rows))
        log(f"check: {sum(r['pass'] for r in rows)}/{len(rows)} pass; wrote {path}")
    if args.section in ("bench", "all"):
        from experiments import bench_attention as B

        path = os.path.join(args.out, "bench_flash_mosaic.json")
        results: list = []
        deadline = time.time() + args.budget

        def blog(s):
            log(s)
            _dump(path, dict(meta=meta, results=results))

        for name, fn in (("dense", lambda: B.bench_mosaic(blog, args.quick, results, deadline=deadline)),
                         ("sparse", lambda: B.bench_mosaic_sparse(blog, args.quick, results, deadline=deadline))):
            t0 = time.time()
            try:
                fn()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                results.append(dict(kind=f"mosaic_{name}", error=traceback.format_exc()[-1500:]))
            log(f"[{name}] {time.time() - t0:.0f}s")
        _dump(path, dict(meta=meta, results=results))
        log(f"wrote {path}\n\n" + B.mosaic_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
