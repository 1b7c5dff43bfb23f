"""Evaluate a checkpoint with the evaluators named in the config (or ``--evaluators``).

    python -m experiments.evaluate --config configs/quickstart.py --checkpoint runs/quickstart
    python -m experiments.evaluate --config configs/quickstart.py --checkpoint runs/quickstart \
        --evaluators=exact_match,perplexity --config.mesh.data=1 --config.mesh.tensor=-1

``--checkpoint`` is a run directory or its ``checkpoints/`` directory; ``--step`` picks a saved
step (default: latest). The mesh comes from the config and may differ from the training mesh.
Prints the metrics and writes them as JSON to ``--output`` (default ``<checkpoint>/eval.json``).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory or checkpoints directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_EVALUATORS = flags.DEFINE_list("evaluators", None, "registry.EVALUATORS specs (default: config.eval.final).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "Evaluate at most this many batches (0: all).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the metrics JSON.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    if not flags.FLAGS["verbosity"].present:  # keep library INFO logs (orbax, ...) quiet
        logging.set_verbosity(logging.WARNING)
    import jax

    from efficient_mllm.train.loop import restore_for_eval

    cfg = _CONFIG.value
    trainer = restore_for_eval(cfg, _CHECKPOINT.value, step=_STEP.value)
    specs = _EVALUATORS.value or list(cfg.eval.final)
    res = trainer.evaluate(specs, max_batches=_MAX_BATCHES.value or None)
    out = {"checkpoint": os.path.abspath(_CHECKPOINT.value), "step": trainer.step,
           "mesh": dict(trainer.mesh.shape), "evaluators": specs, "metrics": res}
    if jax.process_index() == 0:
        for k, v in res.items():
            print(f"{k:32s} {v:.4f}")
        path = _OUTPUT.value or os.path.join(_CHECKPOINT.value, "eval.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "checkpoint"])
    app.run(main)
