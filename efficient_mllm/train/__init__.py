"""efficient_mllm.train: mesh and logical-axis sharding rules, the pure jitted train step over
``nnx.split`` state, AdamW with warm-up + cosine decay, orbax checkpoints, metric and report
writers, and the training loop.

    >>> from efficient_mllm.train import load_config, train_and_evaluate
    >>> cfg = load_config("configs/quickstart.py", overrides={"train.steps": 200})
    >>> summary = train_and_evaluate(cfg, "runs/quickstart")
"""

from efficient_mllm.train.checkpoint import Checkpointer
from efficient_mllm.train.config import apply_overrides, base_config, dataset_knobs, load_config
from efficient_mllm.train.loop import (
    Components,
    Trainer,
    build_components,
    restore_for_eval,
    train_and_evaluate,
)
from efficient_mllm.train.loss import answer_loss, answer_loss_terms
from efficient_mllm.train.mesh import MESH_AXES, initialize_distributed, make_mesh, mesh_shape
from efficient_mllm.train.optim import make_optimizer, make_schedule
from efficient_mllm.train.sharding import DEFAULT_RULES, logical_to_spec, make_rules, shard_batch
from efficient_mllm.train.step import TrainState, init_train_state, jit_train_step, make_train_step

__all__ = [
    "Checkpointer",
    "apply_overrides",
    "base_config",
    "dataset_knobs",
    "load_config",
    "Components",
    "Trainer",
    "build_components",
    "restore_for_eval",
    "train_and_evaluate",
    "answer_loss",
    "answer_loss_terms",
    "MESH_AXES",
    "initialize_distributed",
    "make_mesh",
    "mesh_shape",
    "make_optimizer",
    "make_schedule",
    "DEFAULT_RULES",
    "logical_to_spec",
    "make_rules",
    "shard_batch",
    "TrainState",
    "init_train_state",
    "jit_train_step",
    "make_train_step",
]
