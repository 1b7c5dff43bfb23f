"""Train (and finally evaluate) a model described by a config file.

    python -m experiments.train --config configs/quickstart.py --workdir runs/quickstart \
        --config.train.steps=200

Writes ``<workdir>/`` (default ``runs/<config.name>``): ``config.json``, ``metrics.jsonl``,
``checkpoints/``, ``report.md``, ``loss.png``, ``accuracy.png``. Re-running with the same
workdir resumes from the latest checkpoint (``--config.checkpoint.resume=False`` starts over in
place only if the checkpoints are removed first). ``--config.init_from=<converted dir>`` fine-tunes
a converted Hugging Face checkpoint and exports it to ``<workdir>/hf_export``
(``efficient_mllm/train/finetune.py``).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config.name>).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    if not flags.FLAGS["verbosity"].present:  # keep library INFO logs (orbax, ...) quiet
        logging.set_verbosity(logging.WARNING)
    from efficient_mllm.train.loop import train_and_evaluate
    from efficient_mllm.train.report import headline

    cfg = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", cfg.name)
    summary = train_and_evaluate(cfg, workdir)
    if summary["report"]:
        print(f"report: {summary['report']}")
        print(f"validation: {headline(summary['final'])}")
    if summary.get("hf_export"):
        print(f"Hugging Face export: {summary['hf_export']}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
