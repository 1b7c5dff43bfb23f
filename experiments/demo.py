"""``make demo``: build the quickstart data, train the tiny MLLM, evaluate it, write the report.

    python -m experiments.demo                       # configs/quickstart.py -> runs/quickstart
    python -m experiments.demo --config.train.steps=300 --workdir=runs/quick_short

Prints where the report is and the headline validation accuracy (exact match by greedy
generation, overall and per question type).
"""

from __future__ import annotations

import os
import shutil
import time

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "quickstart.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Output directory.")
_FRESH = flags.DEFINE_bool("fresh", True, "Remove an earlier run in --workdir first (else resume).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    if not flags.FLAGS["verbosity"].present:  # keep library INFO logs (orbax, ...) quiet
        logging.set_verbosity(logging.WARNING)
    import jax

    from efficient_mllm.train.loop import build_components, train_and_evaluate
    from efficient_mllm.train.report import headline

    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    t0 = time.perf_counter()
    if _FRESH.value and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    print(f"efficient_mllm demo: config {cfg.name}, {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), output {workdir}")
    print(f"[1/3] dataset {cfg.data.name}: generating or loading ...", flush=True)
    comps = build_components(cfg)
    info = comps.info
    print(f"      {info['train_examples']} train / {info['eval_examples']} {info['eval_split']} "
          f"examples, seq_len {info['seq_len']}, vocabulary {info['vocab_size']} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"[2/3] training {cfg.train.steps} steps of batch {cfg.train.batch_size} ...", flush=True)
    summary = train_and_evaluate(cfg, workdir, components=comps)
    perf, final = summary["perf"], summary["final"]
    print(f"[3/3] evaluated {int(final.get('examples', 0))} {info['eval_split']} examples "
          f"({perf.get('eval_time_s', 0):.0f}s)")
    wall = time.perf_counter() - t0
    print()
    print(f"report: {os.path.abspath(summary['report'])}")
    print(f"validation {headline(final)}")
    types = [t for t in (comps.question_types or ()) if f"accuracy/{t}" in final]
    if types:
        print("per type: " + ", ".join(f"{t} {100 * final[f'accuracy/{t}']:.1f}%" for t in types))
    tps = perf.get("tokens_per_s")
    print(f"throughput {tps:.0f} text tokens/s, model FLOPs utilisation {perf.get('mfu')}, "
          f"train {perf.get('train_time_s', 0):.0f}s, total wall time {wall:.0f}s"
          if tps else f"total wall time {wall:.0f}s")


if __name__ == "__main__":
    app.run(main)
