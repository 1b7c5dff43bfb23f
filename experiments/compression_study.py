"""The whole visual-token compression study in one command: train the uncompressed baseline and
every learned-compressor model with the same recipe, then sweep methods x budgets on them.

    python -m experiments.compression_study --config configs/compression_sweep.py:study \
        --workdir runs/study_shapes --benchmark_out benchmarks/compression_sweep_shapes
    python -m experiments.compression_study --config configs/compression_sweep.py:study,digit_grid \
        --workdir runs/study_digits --benchmark_out benchmarks/compression_sweep_digits
    # tiny end-to-end check on a CPU (3 methods incl. mqt and fastv, 2 budgets, 3 train steps)
    python -m experiments.compression_study --config configs/compression_sweep.py:smoke \
        --workdir /tmp/study_smoke

Steps (``config.study`` sets the parallelism and the time limit):

1. **Data**: the dataset is prepared once, in this process.
2. **Models**: ``<workdir>/models/baseline`` (``compressor=None``) and one model per distinct
   training spec of the learned methods (``sweep.learned`` / ``sweep.learned_train``, see
   ``compression_sweep.plan_jobs``), each trained by ``train_and_evaluate`` with the config's
   ``train`` / ``data`` / ``model`` blocks, i.e. the same steps, batch, learning-rate schedule,
   data and seed; only ``model.compressor`` differs. ``study.train_parallel`` models train at
   once in separate processes sharing the device (small models: the step time is bound by
   the host, not the GPU); 0 or 1 trains them here, one after the other.
3. **Sweep**: ``study.sweep_workers`` processes take the jobs of ``plan_jobs`` from a shared
   list (one claim file per job) and measure accuracy, tokens, FLOPs and KV bytes of each
   (``compression_sweep.run_job``), compiling the latency programs as they go. When all have
   finished, each in turn times its models' latency holding an exclusive lock, so that no
   other process runs on the device during a timing.
4. **Tables**: ``<workdir>/sweep/compression_sweep.{md,json}``, ``pareto_flops.png``,
   ``pareto_latency.png`` (and ``--benchmark_out``: ``<path>.md/.json/_pareto_*.png``), plus
   ``<workdir>/readme_table.md``: the README summary (% of baseline accuracy per method and
   budget) with the command that reproduces it.

Resumable: a finished model (``final_metrics.json``) is not retrained, an interrupted one
resumes from its last checkpoint, and a row already written (``sweep/rows/<key>.json``) is not
re-measured (a row is written as soon as it is measured, and again with its latency: a row of
an invocation stopped before its latency phase keeps its accuracy / FLOPs / KV fields and says
"latency not timed"). ``study.deadline_s`` (> 0) is a soft wall-clock limit: no training starts later
than ``sweep_reserve_s`` before it (running ones are stopped at half that, to resume next
time), sweep workers take no job later than ``finalize_reserve_s`` before it, and the tables
are written with what is done (missing rows say so); running the same command again continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import compression_sweep as cs

log = logging.getLogger(__name__)

__all__ = ["run_study", "readme_table", "train_config"]

BASELINE = "baseline"


# -- configs -----------------------------------------------------------------------------------


def train_config(config: Any, compressor: str | None, name: str) -> Any:
    """The training config of one model of the study: ``config`` without its ``sweep`` /
    ``study`` blocks, with ``model.compressor`` and ``name`` set."""
    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    for k in ("sweep", "study"):
        if k in cfg:
            del cfg[k]
    cfg.model.compressor = compressor
    cfg.name = name
    cfg.lock()
    return cfg


def _study_opts(config: Any) -> dict[str, float]:
    st = config.get("study") or {}
    return {
        "train_parallel": int(st.get("train_parallel", 0)),
        "sweep_workers": int(st.get("sweep_workers", 0)),
        "deadline_s": float(st.get("deadline_s", 0.0) or 0.0),
        "sweep_reserve_s": float(st.get("sweep_reserve_s", 150.0)),
        "finalize_reserve_s": float(st.get("finalize_reserve_s", 25.0)),
    }


# -- child processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def _redirect(log_path: str | None):
    """stdout / stderr (file descriptors too, for XLA's C++ logs) to ``log_path``."""
    if not log_path:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _mark_flags_parsed() -> None:
    from absl import flags as absl_flags

    if not absl_flags.FLAGS.is_parsed():  # library code reads absl flags; no argv here
        absl_flags.FLAGS.mark_as_parsed()


def _train_one(cfg: Any, model_dir: str, log_path: str | None) -> None:
    """Trains one model (resuming from its checkpoints) and writes ``final_metrics.json``."""
    from efficient_mllm.train.loop import train_and_evaluate

    with _redirect(log_path):
        _mark_flags_parsed()
        logging.basicConfig(level=logging.WARNING)
        t0 = time.perf_counter()
        summary = train_and_evaluate(cfg, model_dir)
        print(f"trained {cfg.name}: {summary['steps']} steps in {time.perf_counter() - t0:.1f} s;"
              f" final {json.dumps(summary['final'], default=str)[:400]}", flush=True)


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=cs._json_default)
    os.replace(tmp, path)


def _row_done(path: str) -> bool:
    """A row written by an earlier invocation, and not an error (errors are retried)."""
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("status") != "error"
    except (OSError, ValueError):
        return False


def _sweep_worker(
    config: Any,
    sweep_dir: str,
    baseline_dir: str,
    worker: int,
    stop_at: float,
    wait_for_go: bool,
    log_path: str | None,
) -> None:
    """Claims and measures jobs of ``sweep_dir/jobs.json`` until none is left (or ``stop_at``,
    a ``time.time()``), then waits for ``sweep_dir/go`` and times its rows' latency under the
    exclusive lock. Every row is written to ``rows/<key>.json``."""
    with _redirect(log_path):
        _mark_flags_parsed()
        logging.basicConfig(level=logging.WARNING)
        rows_dir = os.path.join(sweep_dir, "rows")
        claims = os.path.join(sweep_dir, "claims")
        with open(os.path.join(sweep_dir, "jobs.json")) as f:
            jobs = [cs.Job(**j) for j in json.load(f)]
        ctx = cs.prepare_sweep(config, baseline_dir)
        device = cs.device_summary()
        pending: list[tuple[cs.Job, dict, Any]] = []
        for job in jobs:
            key = job.key()
            if _row_done(os.path.join(rows_dir, key + ".json")):
                continue
            if time.time() > stop_at:
                print(f"worker {worker}: deadline, no new job", flush=True)
                break
            try:
                os.close(os.open(os.path.join(claims, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            row, timer = cs.run_job(ctx, job, latency=False)
            row["device"] = device
            row["worker"] = worker
            if timer is not None:
                try:
                    timer(1, 1)  # compile the latency programs now, in parallel with the others
                except Exception as e:
                    row.update(status="error",
                               note=f"error: latency: {type(e).__name__}: {e}"[:300])
                    timer = None
            print(f"worker {worker}: {job.label} {row['budget_label']} {row['status']} "
                  f"acc={row.get('accuracy')} in {row.get('wall_s', 0):.1f} s", flush=True)
            # written now, so an interrupted invocation keeps it; rewritten once latency is timed
            _write_json(os.path.join(rows_dir, key + ".json"), row if timer is None else {
                **row, "note": (row.get("note") or "") + "latency not timed (interrupted)"})
            if timer is not None:
                pending.append((job, row, timer))
        _write_json(os.path.join(sweep_dir, f"phase1_{worker}.json"), {"pending": len(pending)})
        while wait_for_go and not os.path.exists(os.path.join(sweep_dir, "go")):
            time.sleep(0.2)
        with open(os.path.join(sweep_dir, "latency.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # alone on the device while timing
            try:
                for job, row, timer in pending:
                    try:
                        row.update(timer())
                    except Exception as e:
                        row.update(status="error",
                                   note=f"error: latency: {type(e).__name__}: {e}"[:300])
                    _write_json(os.path.join(rows_dir, job.key() + ".json"), row)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        print(f"worker {worker}: done ({len(pending)} timed)", flush=True)


# -- the study ---------------------------------------------------------------------------------


def _spawn(target, args) -> multiprocessing.Process:
    p = multiprocessing.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def _train_models(
    config: Any, models: Sequence[tuple[str, str | None, str]], workdir: str, opts: Mapping,
    deadline: float,
) -> dict[str, dict]:
    """Trains the models not finished yet; returns ``{name: status dict}``."""
    logs = os.path.join(workdir, "logs")
    status: dict[str, dict] = {}
    queue = []
    for name, spec, model_dir in models:
        if os.path.exists(os.path.join(model_dir, "final_metrics.json")):
            status[name] = {"state": "done", "spec": spec, "dir": model_dir, "wall_s": 0.0,
                            "note": "trained by an earlier invocation"}
        else:
            queue.append((name, spec, model_dir))
    start_by = deadline - opts["sweep_reserve_s"]
    kill_at = deadline - 0.5 * opts["sweep_reserve_s"]
    parallel = opts["train_parallel"]
    running: dict[str, tuple[Any, float, str | None, str]] = {}
    while queue or running:
        while queue and (parallel <= 1 and not running or len(running) < parallel):
            if time.time() > start_by:
                for name, spec, model_dir in queue:
                    status[name] = {"state": "not started", "spec": spec, "dir": model_dir,
                                    "note": "deadline: rerun the study to train it"}
                queue = []
                break
            name, spec, model_dir = queue.pop(0)
            os.makedirs(model_dir, exist_ok=True)
            cfg = train_config(config, spec, f"{config.name}-{name}")
            log_path = os.path.join(logs, f"train-{name}.log")
            t0 = time.time()
            print(f"[study] training {name} ({spec or 'uncompressed'})", flush=True)
            if parallel <= 1:
                try:
                    _train_one(cfg, model_dir, None)
                    state = "done"
                except Exception:
                    traceback.print_exc()
                    state = "failed"
                status[name] = {"state": state, "spec": spec, "dir": model_dir,
                                "wall_s": time.time() - t0}
            else:
                running[name] = (_spawn(_train_one, (cfg, model_dir, log_path)), t0, spec,
                                 model_dir)
        for name, (proc, t0, spec, model_dir) in list(running.items()):
            if proc.is_alive() and time.time() > kill_at:
                proc.terminate()
                proc.join(10)
                status[name] = {"state": "stopped", "spec": spec, "dir": model_dir,
                                "wall_s": time.time() - t0,
                                "note": "deadline: stopped, resumes from its last checkpoint"}
                del running[name]
            elif not proc.is_alive():
                proc.join()
                ok = proc.exitcode == 0 and os.path.exists(
                    os.path.join(model_dir, "final_metrics.json"))
                status[name] = {"state": "done" if ok else "failed", "spec": spec,
                                "dir": model_dir, "wall_s": time.time() - t0,
                                "note": "" if ok else f"exit code {proc.exitcode}: see "
                                                      f"logs/train-{name}.log"}
                print(f"[study] {name}: {status[name]['state']} in "
                      f"{status[name]['wall_s']:.0f} s", flush=True)
                del running[name]
        if running:
            time.sleep(0.5)
    for st in status.values():
        fm = os.path.join(st["dir"], "final_metrics.json")
        if st["state"] == "done" and os.path.exists(fm):
            with open(fm) as f:
                d = json.load(f)
            perf, final = d.get("perf", {}), d.get("final", {})
            st.update(steps=perf.get("steps"), train_time_s=perf.get("train_time_s"),
                      step_time_s=perf.get("step_time_s"),
                      final_train_loss=perf.get("final_train_loss"),
                      tf_accuracy=final.get("tf_accuracy", final.get("accuracy")))
    return status


def _run_sweep_workers(config: Any, sweep_dir: str, baseline_dir: str, opts: Mapping,
                       deadline: float, logs: str) -> None:
    for sub in ("rows", "claims"):
        os.makedirs(os.path.join(sweep_dir, sub), exist_ok=True)
    shutil.rmtree(os.path.join(sweep_dir, "claims"))  # claims of an interrupted invocation
    os.makedirs(os.path.join(sweep_dir, "claims"))
    for f in os.listdir(sweep_dir):
        if f == "go" or f.startswith("phase1_"):
            os.remove(os.path.join(sweep_dir, f))
    stop_at = deadline - opts["finalize_reserve_s"]
    workers = opts["sweep_workers"]
    if workers <= 1:
        _sweep_worker(config, sweep_dir, baseline_dir, 0, stop_at, False, None)
        return
    procs = [
        _spawn(_sweep_worker, (config, sweep_dir, baseline_dir, w, stop_at, True,
                               os.path.join(logs, f"sweep-worker-{w}.log")))
        for w in range(workers)
    ]
    go = os.path.join(sweep_dir, "go")
    while any(p.is_alive() for p in procs):
        if not os.path.exists(go):
            ready = [not p.is_alive() or os.path.exists(os.path.join(sweep_dir, f"phase1_{w}.json"))
                     for w, p in enumerate(procs)]
            if all(ready):
                open(go, "w").close()
                print("[study] all sweep workers measured; timing latency one at a time",
                      flush=True)
        time.sleep(0.2)
    for w, p in enumerate(procs):
        p.join()
        if p.exitcode:
            print(f"[study] sweep worker {w} exited with {p.exitcode}: see "
                  f"logs/sweep-worker-{w}.log", flush=True)


def _missing_row(job: cs.Job, n: int, note: str) -> dict:
    return {
        "method": job.label, "budget": job.frac, "budget_label": cs._frac_label(job.frac),
        "budget_tokens": None if job.frac is None else cs.budget_fields(job.frac, n)["keep"],
        "spec": job.spec, "kind": job.kind, "note": note, "status": "skipped",
    }


def readme_table(result: Mapping[str, Any], command: str) -> str:
    """Markdown for the README: % of baseline accuracy per method (rows) and budget (columns,
    visual tokens kept), in-LLM methods marked, plus the baseline and the command."""
    meta, rows = result["meta"], result["rows"]
    n = meta["num_visual_tokens"]
    fracs = [f for f in meta["budgets"] if f < 1.0]
    base = result.get("baseline") or {}
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "baseline"]
    cells: dict[tuple[str, float | None], dict] = {}
    for r in rows:
        if r["status"] == "ok" and r["method"] != "baseline":
            cells[r["method"], r["budget"]] = r
    head = " | ".join(f"{cs.budget_fields(f, n)['keep']} ({cs._frac_label(f)})" for f in fracs)
    lines = [
        f"**{meta['dataset']}** ({meta['model_summary']}; {n} visual tokens; "
        f"{meta['eval_examples']} validation questions; {meta['device']}): baseline exact match "
        f"**{100 * base.get('accuracy', float('nan')):.1f}%**, prefill "
        f"{base.get('prefill_gflops', float('nan')):.3f} GFLOPs, "
        f"{base.get('prefill_ms', float('nan')):.2f} ms. Cells: % of baseline accuracy "
        "(layer-averaged visual tokens where they differ from the budget).",
        "",
        f"| method | {head} |",
        "|---|" + "---:|" * len(fracs),
    ]
    for m in methods:
        kind = next((r.get("stage") or r["kind"] for r in rows if r["method"] == m
                     and r["status"] == "ok"), "")
        tag = {"in_llm": " (in-LLM)"}.get(kind, "")
        if any(r["method"] == m and r["kind"] == "learned" for r in rows):
            tag += " (learned)"
        out = []
        for f in fracs:
            r = cells.get((m, f))
            if r is None:
                same = next((x for x in rows if x["method"] == m and x["budget"] == f), None)
                out.append("=" if same and "same spec" in (same.get("note") or "") else "-")
                continue
            txt = f"{r['pct_baseline']:.1f}"
            if abs(r["layer_avg_visual_tokens"] - cs.budget_fields(f, n)["keep"]) >= 1:
                txt += f" ({r['layer_avg_visual_tokens']:.0f})"
            out.append(txt)
        lines.append(f"| {m}{tag} | " + " | ".join(out) + " |")
    lines += ["", "`=`: same spec as the budget before it (not rerun); `-`: not run. "
              f"Reproduce with `{command}`.", ""]
    return "\n".join(lines)


def run_study(config: Any, workdir: str, *, benchmark_out: str = "",
              command: str = "") -> dict[str, Any]:
    """Runs the study of ``config`` (see the module docstring) in ``workdir``; returns the sweep
    result (``compression_sweep.finish_sweep``) with ``training`` and ``paths``."""
    from efficient_mllm.data.datasets import build_dataset
    from efficient_mllm.nn.mllm import MLLMConfig
    from efficient_mllm.train.loop import _cfg_dict, resolve_model_config

    if "sweep" not in config or "study" not in config:
        raise ValueError("config has no 'sweep' / 'study' block: use "
                         "configs/compression_sweep.py:study (or :smoke)")
    t_start = time.time()
    opts = _study_opts(config)
    deadline = t_start + opts["deadline_s"] if opts["deadline_s"] > 0 else math.inf
    workdir = os.path.abspath(workdir)
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # processes share the GPU

    # 1. data, once (children find it prepared)
    dc = config.data
    t0 = time.time()
    ds = build_dataset(dc.name, dc.get("data_dir") or None, **_cfg_dict(dc.get("knobs")))
    base_mcfg = MLLMConfig.from_dict(resolve_model_config(_cfg_dict(config.model), ds))
    gh, gw = base_mcfg.grid
    n = gh * gw
    print(f"[study] {ds.name}: {len(ds['train'])} train examples, {n} visual tokens "
          f"(data ready in {time.time() - t0:.0f} s)", flush=True)

    # 2. models
    models_dir = os.path.join(workdir, "models")
    jobs = cs.plan_jobs(config.sweep, n, learned_dir=models_dir)
    baseline_dir = os.path.join(models_dir, BASELINE)
    models = [(BASELINE, None, baseline_dir)] + [
        (os.path.basename(ck), spec, ck) for ck, spec, _ in cs.learned_models(jobs)
    ]
    training = _train_models(config, models, workdir, opts, deadline)
    trained = {st["dir"] for st in training.values() if st["state"] == "done"}

    # 3. sweep
    sweep_dir = os.path.join(workdir, "sweep")
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "jobs.json"), "w") as f:
        json.dump([dataclasses.asdict(j) for j in jobs], f, indent=1)
    runnable = [j for j in jobs if not j.note and (j.kind != "learned" or j.checkpoint in trained)
                and not _row_done(os.path.join(sweep_dir, "rows", j.key() + ".json"))]
    # claim order: the baseline, the learned rows (what only this study measures), the rest
    runnable.sort(key=lambda j: {"baseline": 0, "learned": 1}.get(j.kind, 2))
    if baseline_dir in trained and runnable and time.time() < deadline - opts["finalize_reserve_s"]:
        with open(os.path.join(sweep_dir, "jobs.json"), "w") as f:
            json.dump([dataclasses.asdict(j) for j in runnable], f, indent=1)
        _run_sweep_workers(config, sweep_dir, baseline_dir, opts, deadline, logs)
    elif baseline_dir not in trained:
        print("[study] the baseline is not trained: no sweep (rerun to resume)", flush=True)

    # 4. tables
    rows = []
    for job in jobs:
        path = os.path.join(sweep_dir, "rows", job.key() + ".json")
        if job.note:
            rows.append(_missing_row(job, n, job.note))
        elif os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
        elif job.kind == "learned" and job.checkpoint not in trained:
            rows.append(_missing_row(job, n, "model not trained (deadline or failure): rerun "
                                             "the study to resume"))
        else:
            rows.append(_missing_row(job, n, "not measured (deadline or a failed worker: see "
                                             "logs/sweep-worker-*.log): rerun the study to resume"))
    ok = [r for r in rows if r["status"] == "ok"]
    device = ok[0].get("device", "") if ok else ""
    base_row = next((r for r in rows if r["kind"] == "baseline"), {})
    training_meta = [
        {"model": name, **{k: v for k, v in st.items() if k != "dir"}}
        for name, st in training.items()
    ]
    if benchmark_out:
        config = config.copy_and_resolve_references()
        config.unlock()
        config.sweep.benchmark_out = benchmark_out
        config.lock()
    result = cs.finish_sweep(
        config, rows, sweep_dir, base_mcfg=base_mcfg, checkpoint=baseline_dir, step=None,
        eval_examples=int(base_row.get("eval_examples", 0) or 0), device=device,
        wall_time_s=time.time() - t_start,
        extra_meta={"trained_models": training_meta,
                    "recipe": {k: config.train.get(k) for k in
                               ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio",
                                "weight_decay", "compute_dtype")},
                    "command": command},
    )
    table = readme_table(result, command or "python -m experiments.compression_study ...")
    path = os.path.join(workdir, "readme_table.md")
    with open(path, "w") as f:
        f.write(table)
    result["paths"]["readme_table"] = path
    result["training"] = training
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"[study] {n_ok}/{len(rows)} rows measured, {len(trained)}/{len(models)} models "
          f"trained, {time.time() - t_start:.0f} s; table: {result['paths']['markdown']}",
          flush=True)
    return result


# -- command line ------------------------------------------------------------------------------


def main(argv):
    from absl import app, flags
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", cfg.name)
    command = "python -m experiments.compression_study " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--config.study."))
    run_study(cfg, workdir, benchmark_out=_BENCH.value or "", command=command)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/compression_sweep.py:study[,digit_grid] (or :smoke)",
        lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<name>).")
    _BENCH = flags.DEFINE_string("benchmark_out", None,
                                 "Also write <path>.md/.json/_pareto_*.png (e.g. "
                                 "benchmarks/compression_sweep_shapes).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
