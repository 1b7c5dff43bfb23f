"""experiments/bench_linear_attention.py on CPU: the whole script at tiny shapes (``--smoke``)
with the XLA reference in the kernel's place (every section, the sweep included) and with the
Pallas kernel in interpret mode (forward and forward+backward rows), checking the JSON schema,
that every time / rate is positive and finite, the ratios and crossover summary, and that fla is
never imported off the GPU; plus the FLOP formula, the crossover interpolation and
the argument errors."""

import json
import math
import sys

import numpy as np
import pytest

from experiments import bench_linear_attention as bla


def _run(tmp_path, *extra):
    res = bla.main(["--smoke", "--out", str(tmp_path), "--T", "40", "--decode-B", "2", *extra])
    (path,) = tmp_path.glob("bench_linear_attention_*_smoke.json")
    with open(path) as f:
        assert json.load(f)["meta"] == json.loads(json.dumps(res["meta"], default=str))
    return res


def _pos(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_smoke_reference_every_section(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    res = _run(tmp_path, "--impl", "reference", "--sweep")
    meta = res["meta"]
    for key in ("device", "jax", "jaxlib", "torch", "triton", "fla", "Ts", "flops", "scale"):
        assert key in meta
    assert meta["impl"] == "reference" and meta["softmax_impl"] == "xla"
    assert set(res["sections_s"]) == {"sweep", "check", "chunked", "decode", "xla_ref"}
    assert "section_errors" not in res
    # sweep: the default config plus chunk_size variants, a best per pass
    sw = res["sweep"]
    assert sw["T"] == 40 and set(sw["best"]) == {"fwd", "fwd+bwd"}
    assert all(_pos(r["median_s"]) for r in sw["rows"])
    # checks: the reference against itself, up to bf16 output rounding
    c = res["checks"]
    for decay in bla.DECAYS:
        row = c[f"vs_xla_ref_{decay}"]
        assert row["finite"] and row["out_rel_err"] < 1e-2
        assert len(row["grad_rel_err_qkvg"]) == 4 and max(row["grad_rel_err_qkvg"]) < 1e-2
    assert c["step_vs_xla_ref"]["out_rel_err"] < 1e-2
    assert c["vs_fla"].startswith("skipped")
    # one row per (decay, pass) for ours, fla (skipped off the GPU) and xla_ref
    ours = [r for r in res["chunked"] if r["impl"] == "ours"]
    assert {(r["decay"], r["pass_"]) for r in ours} == {
        (d, p) for d in bla.DECAYS for p in bla.PASSES
    }
    for r in ours + res["xla_ref"]:
        for k in ("first_call_s", "median_s", "min_s", "back_to_back_s", "tflops"):
            assert _pos(r[k]), (k, r)
        assert r["reps"] >= 3 and r["T"] == 40 and r["B"] == 3
        if r["pass_"] == "fwd":
            assert _pos(r["gbps"]) and r["min_bytes"] > 0
    fla = [r for r in res["chunked"] if r["impl"] == "fla"]
    assert len(fla) == 4 and all(r["skipped"].startswith("skipped") for r in fla)
    assert [(r["pass_"], _pos(r["tflops"])) for r in res["softmax"]] == [
        ("fwd", True),
        ("fwd+bwd", True),
    ]
    # ratios and crossover
    for key in (f"T40/{d}/{p}" for d in bla.DECAYS for p in bla.PASSES):
        rt = res["ratios"][key]
        assert _pos(rt["ours_over_xla_speed"]) and _pos(rt["ours_over_xla_ref_speed_b2b"])
        assert "ours_over_fla_speed" not in rt
    cr = res["crossover"]["const/fwd"]
    assert cr["points"][0]["T"] == 40 and _pos(cr["points"][0]["ours_over_softmax_speed"])
    # decode: linear (ours, xla_ref) and softmax (pallas kernel, XLA) rows
    dec = {r["impl"]: r for r in res["decode"]}
    assert set(dec) == {"ours", "xla_ref", "pallas_decode", "xla_decode"}
    for r in dec.values():
        for k in ("tokens_per_s", "step_s", "call_median_s", "call_tokens_per_s", "gbps"):
            assert _pos(r[k]), (k, r)
        assert r["B"] == 2 and r["bytes_per_step"] > 0 and r["step_from"] == "scan"
    assert _pos(res["decode_ratios"]["B2/ours_over_pallas_decode_tokens_per_s"])
    assert "fla" not in sys.modules


def test_smoke_interpret_kernel(tmp_path, monkeypatch):
    pytest.importorskip("pallas_kernels.linear_attention.gpu")
    out = tmp_path / "out_env"
    monkeypatch.setenv("OUT", str(out))
    res = _run(tmp_path, "--sections", "chunked", "--kernel-kw", "num_warps=4")
    assert res["meta"]["impl"] == "interpret" and res["meta"]["kernel_error"] is None
    ours = [r for r in res["chunked"] if r["impl"] == "ours"]
    assert len(ours) == 4 and all(_pos(r["median_s"]) and _pos(r["tflops"]) for r in ours)
    assert all(r["kernel_kw"]["num_warps"] == 4 for r in ours)
    assert len(list(out.glob("bench_linear_attention_*_smoke.json"))) == 1  # copy to $OUT
    assert "fla" not in sys.modules


def test_flop_formula_matches_a_direct_count():
    b, t, h, f, dv, c = 2, 256, 3, 32, 16, 64
    per_chunk = 2 * c * c * f + 2 * c * c * dv + 2 * c * f * dv + 2 * c * f * dv
    assert bla.linear_flops(b, t, h, f, dv, False) == b * h * (t // c) * per_chunk
    assert bla.linear_flops(b, t, h, f, dv, True) == 3 * b * h * (t // c) * per_chunk
    assert bla.softmax_flops(1, 8, 2, 4, False) == 4 * 2 * 64 * 4 / 2
    assert bla.linear_fwd_bytes(1, 10, 2, 8, 4, True) == 10 * 2 * (24 * 2 + 4)


def test_crossover_interpolates_in_log_space():
    cr = bla.crossover([(2048, 0.5), (8192, 2.0), (32768, 8.0)])
    assert cr["first_T_linear_faster"] == 8192
    np.testing.assert_allclose(cr["T_estimate"], 4096.0, rtol=1e-9)  # geometric midpoint
    assert bla.crossover([(2048, 0.1), (8192, 0.5)])["first_T_linear_faster"] is None
    assert "every measured T" in bla.crossover([(2048, 1.5)])["note"]


def test_arguments():
    assert bla.parse_kw(["num_warps=8", "state_dtype=bfloat16", "block_f=None"]) == {
        "num_warps": 8,
        "state_dtype": "bfloat16",
        "block_f": None,
    }
    assert bla.parse_values(["block_v=32, 64"]) == {"block_v": [32, 64]}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        bla.parse_kw(["num_warps"])
    with pytest.raises(ValueError, match="not keywords of the kernel"):
        bla.main(["--smoke", "--impl", "reference", "--kernel-kw", "block_q=64", "--sections", ""])
    with pytest.raises(SystemExit, match="needs a GPU"):
        bla.main(["--impl", "reference"])
    with pytest.raises(SystemExit):
        bla.main(["--smoke", "--sections", "nonsense"])
