"""The training loop: config -> mesh, data, model, sharded state -> steps, evals, checkpoints,
``runs/<name>/`` outputs.

    >>> from efficient_mllm.train.loop import train_and_evaluate
    >>> summary = train_and_evaluate(config, "runs/quickstart")

:class:`Trainer` exposes the pieces (``run(until=...)``, ``evaluate(...)``, ``save()``,
``model()``) for tests and notebooks; :class:`Components` lets a caller supply its own model
factory and data instead of the ones named in the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from efficient_mllm import compat
from efficient_mllm.train import mesh as mesh_lib
from efficient_mllm.train import sharding as shd
from efficient_mllm.train.checkpoint import Checkpointer
from efficient_mllm.train.flops import function_flops
from efficient_mllm.train.metrics import MetricsWriter
from efficient_mllm.train.optim import make_optimizer
from efficient_mllm.train.report import peak_flops, plot_history, write_report
from efficient_mllm.train.step import (
    as_dtype,
    init_train_state,
    jit_train_step,
    make_train_step,
    merge_model,
)

__all__ = [
    "Components",
    "build_components",
    "build_dataset_of",
    "data_components",
    "resolve_model_config",
    "Trainer",
    "train_and_evaluate",
    "restore_for_eval",
    "MODEL_KEYS",
]

log = logging.getLogger(__name__)

#: Batch entries the train step consumes (everything else stays on the host).
MODEL_KEYS = ("tokens", "loss_mask", "lengths", "image")


@dataclasses.dataclass
class Components:
    """What a run needs besides its config.

    ``model_fn(rngs) -> nnx.Module`` (called inside ``jax.jit`` / ``nnx.eval_shape``);
    ``train_loader``: ``iter()`` gives an endless iterator of this process's batches with
    ``get_state()`` / ``set_state()``; ``eval_batches()``: a fresh finite pass over the validation
    batches; ``question_types`` names ``question_type`` ids; ``tokenizer`` decodes answers.
    """

    model_fn: Callable[[nnx.Rngs], nnx.Module]
    train_loader: Any
    eval_batches: Callable[[], Iterable[Mapping[str, Any]]] | None = None
    question_types: Sequence[str] | None = None
    tokenizer: Any = None
    info: dict = dataclasses.field(default_factory=dict)
    #: Where the parameters start from instead of ``model_fn``'s initialisation: an object with
    #: ``params(mesh, rules) -> pure dict`` (placed on the mesh) and ``export(params, out_dir)``,
    #: e.g. ``train.finetune.ConvertedInit`` for ``config.init_from``; None = random init.
    init_from: Any = None


def _cfg_dict(c: Any) -> dict:
    if c is None:
        return {}
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def _pad_batch(batch: Mapping[str, Any], size: int) -> dict:
    """Pads a short last batch to ``size`` rows by repeating row 0; adds ``valid`` [B]."""
    n = len(batch["tokens"])
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if n < size:
            v = np.concatenate([v, np.repeat(v[:1], size - n, axis=0)], axis=0)
        out[k] = v
    out["valid"] = np.arange(size) < n
    return out


def resolve_model_config(model_cfg: Mapping[str, Any], ds: Any) -> dict:
    """Fills the dataset-dependent fields of an ``MLLMConfig`` dict left at 0 / -1:
    ``language.vocab_size`` (0 -> the tokenizer's), ``image_token_id`` (-1 -> the tokenizer's)
    and ``vision.image_size`` (0 -> the dataset's)."""
    d = json.loads(json.dumps(model_cfg))
    lang = d.get("language") or {}
    if lang.get("vocab_size", 0) in (0, None):
        lang["vocab_size"] = int(ds.vocab_size)
    elif lang["vocab_size"] < ds.vocab_size:
        raise ValueError(
            f"model.language.vocab_size = {lang['vocab_size']}; expected >= the dataset's "
            f"vocabulary size {ds.vocab_size} (or 0 to use it)"
        )
    vision = d.get("vision")
    if vision and not ds.multimodal:
        raise ValueError(
            f"model.vision is set but dataset {ds.name!r} is text-only; expected model.vision = None"
        )
    if vision:
        if vision.get("image_size", 0) in (0, None, [0, 0]):
            vision["image_size"] = int(ds.image_size)
        if d.get("image_token_id", -1) in (-1, None):
            d["image_token_id"] = int(ds.tokenizer.image_token_id)
    elif d.get("image_token_id", None) == -1:
        d["image_token_id"] = None
    return d


def build_components(config: Any) -> Components:
    """Dataset (``registry.DATASETS`` via ``data.build_dataset``), grain loaders and the MLLM
    named by ``config.data`` / ``config.model``; with ``config.init_from`` set, the model,
    parameters and tokenizer of that converted checkpoint (``train.finetune``)."""
    if config.get("init_from"):
        from efficient_mllm.train.finetune import converted_components

        return converted_components(config)
    from efficient_mllm.nn.mllm import MLLM, MLLMConfig

    dc = config.data
    ds = build_dataset_of(config)
    seq_len = int(dc.get("seq_len", 0) or ds.max_length)
    image_size = dc.get("image_size", 0) or None
    train_loader, eval_batches, info = data_components(
        config, ds, ds.tokenizer, seq_len=seq_len, image_size=image_size
    )
    mcfg = MLLMConfig.from_dict(resolve_model_config(_cfg_dict(config.model), ds))

    def model_fn(rngs: nnx.Rngs) -> nnx.Module:
        return MLLM(mcfg, rngs=rngs)

    info["vocab_size"] = ds.vocab_size
    return Components(model_fn, train_loader, eval_batches, ds.question_types, ds.tokenizer, info)


def build_dataset_of(config: Any) -> Any:
    """The dataset named by ``config.data`` (``name``, ``data_dir``, ``knobs``)."""
    from efficient_mllm.data.datasets import build_dataset

    dc = config.data
    return build_dataset(dc.name, dc.get("data_dir") or None, **_cfg_dict(dc.get("knobs")))


def data_components(
    config: Any,
    ds: Any,
    tokenizer: Any,
    *,
    seq_len: int,
    image_size: Any = None,
    transform: Callable[[dict], dict] | None = None,
) -> tuple[Any, Callable[[], Iterable[dict]], dict]:
    """``(train_loader, eval_batches, info)`` of dataset ``ds`` encoded with ``tokenizer``
    (batch sizes, seed, split and workers from ``config``); ``transform`` maps every batch
    (train and eval) on the host, e.g. to renormalise images."""
    from efficient_mllm.data.pipeline import make_loader

    dc, tc, ec = config.data, config.train, config.eval
    nproc = jax.process_count()
    for what, b in (("train.batch_size", tc.batch_size), ("eval.batch_size", ec.batch_size)):
        if b % nproc:
            raise ValueError(f"{what} = {b}; expected a multiple of the process count {nproc}")
    workers = int(dc.get("worker_count", 0))
    if workers > 0:  # grain worker processes read absl flags; outside absl.app mark them parsed
        from absl import flags as absl_flags

        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
    train_loader = make_loader(
        ds["train"], tokenizer, batch_size=tc.batch_size // nproc, seq_len=seq_len,
        image_size=image_size, shuffle=True, seed=int(config.seed), num_epochs=None,
        worker_count=workers,
    )
    if transform is not None:
        train_loader = _MappedLoader(train_loader, transform)
    split = ec.get("split", "validation")
    local_eval = ec.batch_size // nproc

    def eval_batches():
        loader = make_loader(
            ds[split], tokenizer, batch_size=local_eval, seq_len=seq_len, image_size=image_size,
            shuffle=False, num_epochs=1, drop_remainder=False, worker_count=0,
        )
        for b in loader:
            b = _pad_batch(b, local_eval)
            yield b if transform is None else transform(b)

    info = {"dataset": ds.name, "train_examples": len(ds["train"]), "eval_split": split,
            "eval_examples": len(ds[split]), "seq_len": seq_len,
            "vocab_size": getattr(tokenizer, "vocab_size", None)}
    return train_loader, eval_batches, info


class _MappedLoader:
    """A resumable loader whose batches go through ``fn`` (iterator state passes through)."""

    def __init__(self, loader: Any, fn: Callable[[dict], dict]):
        self.loader, self.fn = loader, fn

    def __iter__(self):
        return _MappedIterator(iter(self.loader), self.fn)


class _MappedIterator:
    def __init__(self, it: Any, fn: Callable[[dict], dict]):
        self.it, self.fn = it, fn

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.fn(next(self.it))

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state) -> None:
        self.it.set_state(state)


def _is_main() -> bool:
    return jax.process_index() == 0


class Trainer:
    """Holds the mesh, sharded train state, data iterator, checkpointer and metric writer.

    On construction the state is initialised directly into its sharded layout and, when
    ``config.checkpoint.resume`` is set and ``<workdir>/checkpoints`` holds a checkpoint, restored
    from the latest one (parameters, optimizer state, step and data-iterator state).
    """

    def __init__(
        self,
        config: Any,
        workdir: str | os.PathLike,
        *,
        components: Components | None = None,
        devices: Sequence[jax.Device] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        write_outputs: bool = True,
    ):
        self.config = config
        self.workdir = os.fspath(workdir)
        self.write_outputs = write_outputs
        mesh_lib.initialize_distributed(config.get("distributed"))
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.rules = shd.make_rules(config.get("sharding"), mesh_lib.MESH_AXES)
        self.components = components if components is not None else build_components(config)
        tc = config.train
        self.total_steps = int(tc.steps)
        self.tx, self.schedule = make_optimizer(tc)
        self.compute_dtype = as_dtype(tc.get("compute_dtype", "float32"), "train.compute_dtype")
        self.microbatches = int(tc.get("microbatches", 1))
        ck = config.get("checkpoint") or {}
        self.ckpt = Checkpointer(
            os.fspath(checkpoint_dir) if checkpoint_dir else os.path.join(self.workdir, "checkpoints"),
            max_to_keep=int(ck.get("keep", 3)) or None,
            save_every=int(ck.get("every", 0)),
            async_save=bool(ck.get("async_save", False)),
        )
        resume = bool(ck.get("resume", True)) and self.ckpt.latest_step() is not None
        init_params = None
        if self.components.init_from is not None and not resume:  # a resumed run has its own
            init_params = self.components.init_from.params(self.mesh, self.rules)
        self.graphdef, self.state, self.shardings = init_train_state(
            self.components.model_fn, self.tx, self.mesh, self.rules,
            seed=int(config.seed), param_dtype=tc.get("param_dtype", "float32"),
            params=init_params,
        )
        del init_params
        self.abstract_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )
        self.train_iter: Iterator = iter(self.components.train_loader)
        self.resumed_from = None
        if resume:
            self.restore()
            self.resumed_from = self.step
        out = config.get("output") or {}
        self.writer = MetricsWriter(
            self.workdir, enabled=_is_main() and write_outputs,
            tensorboard=bool(out.get("tensorboard", True)), resume_step=self.resumed_from,
        )
        if _is_main() and write_outputs:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True)
                        if hasattr(config, "to_json_best_effort") else json.dumps(config, indent=2))
        self._jit_step = None
        self._step_fn = make_train_step(
            self.graphdef, self.tx, schedule=self.schedule, compute_dtype=self.compute_dtype,
            microbatches=self.microbatches, batch_constraint=self._constrain_batch,
        )
        self.perf: dict[str, Any] = {}
        self.train_losses: list[tuple[int, float]] = []

    # ------------------------------------------------------------------ state

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract_state.params)))

    def model(self) -> nnx.Module:
        """The model with the current parameters (sharded as in training)."""
        return merge_model(self.graphdef, self.state.params, self.state.rest)

    def save(self, *, force: bool = True) -> bool:
        data_state = self.train_iter.get_state() if hasattr(self.train_iter, "get_state") else None
        return self.ckpt.save(self.step, self.state, data_state=data_state, force=force)

    def restore(self, step: int | None = None, *, data: bool = True) -> None:
        """Loads a checkpoint (default: latest) onto this trainer's mesh; ``data=False`` leaves
        the data iterator where it is."""
        state, data_state, _ = self.ckpt.restore(self.abstract_state, step, data=data)
        self.state = state
        if data_state is not None and hasattr(self.train_iter, "set_state"):
            self.train_iter.set_state(data_state)

    # ------------------------------------------------------------------ steps

    def _constrain_batch(self, batch):
        return {
            k: jax.lax.with_sharding_constraint(
                v, jax.sharding.NamedSharding(self.mesh, shd.batch_spec(v.ndim, self.mesh, self.rules))
            )
            for k, v in batch.items()
        }

    def device_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The model inputs of a host batch as global arrays sharded over the batch axes."""
        b = {k: np.asarray(batch[k]) for k in MODEL_KEYS if k in batch}
        return shd.shard_batch(b, self.mesh, self.rules)

    def _compiled_step(self, batch: Mapping[str, jax.Array]):
        """The train step compiled ahead of time for this batch layout (once per Trainer); also
        records its model FLOPs (matrix products counted on the jaxpr, whole global batch)."""
        if self._jit_step is None:
            jitted = jit_train_step(
                self._step_fn, self.shardings, self.mesh, self.rules,
                {k: v.ndim for k, v in batch.items()},
            )
            with compat.set_mesh(self.mesh):
                self._jit_step = jitted.lower(self.state, batch).compile()
                abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
                self.perf["flops_per_step"] = function_flops(
                    self._step_fn, self.abstract_state, abstract_batch
                )
        return self._jit_step

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """One optimizer step on a host batch; returns device metrics."""
        db = self.device_batch(batch)
        step = self._compiled_step(db)
        with compat.set_mesh(self.mesh):
            self.state, metrics = step(self.state, db)
        return metrics

    def run(self, until: int | None = None, *, progress: bool | None = None) -> list[dict]:
        """Trains from the current step to ``until`` (default ``config.train.steps``); logs every
        ``train.log_every`` steps, evaluates every ``eval.every``, checkpoints every
        ``checkpoint.every``. Returns the train metric records written."""
        tc, ec = self.config.train, self.config.eval
        until = self.total_steps if until is None else int(until)
        if until > self.total_steps:
            raise ValueError(f"until = {until}; expected <= train.steps = {self.total_steps}")
        log_every = max(1, int(tc.get("log_every", 10)))
        eval_every = int(ec.get("every", 0))
        out = self.config.get("output") or {}
        if progress is None:
            progress = bool(out.get("progress", True))
        start = self.step
        records: list[dict] = []
        pending: list[dict] = []
        tokens_since, t_since = 0.0, None
        timed_steps, timed_time, timed_tokens, timed_examples = 0, 0.0, 0.0, 0
        bar = None
        if progress and _is_main() and until > start:
            from tqdm.auto import tqdm

            bar = tqdm(total=until, initial=start, desc=self.config.get("name", "train"),
                       unit="step", dynamic_ncols=True)
        t_first, cpu_first = time.perf_counter(), time.process_time()
        try:
            for step in range(start + 1, until + 1):
                batch = next(self.train_iter)
                t0 = time.perf_counter()
                metrics = self.train_step(batch)
                pending.append(metrics)
                n_tok = float(np.sum(batch["lengths"])) * jax.process_count()
                n_ex = int(len(batch["tokens"])) * jax.process_count()
                if step == start + 1:
                    jax.block_until_ready(metrics)
                    self.perf["first_step_s"] = time.perf_counter() - t0  # with compilation
                    t_since = time.perf_counter()
                else:
                    tokens_since += n_tok
                    timed_examples += n_ex
                    timed_steps += 1
                if step % log_every == 0 or step == until:
                    host = jax.device_get(pending)
                    pending = []
                    now = time.perf_counter()
                    rec = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                    rec["lr"] = float(host[-1].get("lr", float("nan")))
                    if t_since is not None and tokens_since > 0:
                        dt = now - t_since
                        rec["tokens_per_s"] = tokens_since / dt
                        timed_time += dt
                        timed_tokens += tokens_since
                    tokens_since, t_since = 0.0, now
                    records.append(self.writer.write(step, rec, "train"))
                    self.train_losses.append((step, rec["loss"]))
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}",
                                        tok_s=f"{rec.get('tokens_per_s', 0):.0f}")
                if bar is not None:
                    bar.update(1)
                if eval_every and step % eval_every == 0 and step < self.total_steps:
                    t_eval = time.perf_counter()
                    res = self.evaluate(ec.get("during", ("teacher_forced",)),
                                        max_batches=int(ec.get("max_batches", 0)) or None)
                    self.writer.write(step, res, "eval")
                    if bar is not None:
                        bar.write(f"step {step}: " + ", ".join(
                            f"{k}={v:.4f}" for k, v in res.items() if "/" not in k))
                    if t_since is not None:
                        t_since += time.perf_counter() - t_eval  # exclude eval from throughput
                if self.ckpt.should_save(step):
                    t_ck = time.perf_counter()
                    self.save(force=True)
                    if t_since is not None:
                        t_since += time.perf_counter() - t_ck
        finally:
            if bar is not None:
                bar.close()
        self.ckpt.wait()
        wall = time.perf_counter() - t_first
        self.perf["train_time_s"] = self.perf.get("train_time_s", 0.0) + wall
        self.perf["train_cpu_time_s"] = (
            self.perf.get("train_cpu_time_s", 0.0) + time.process_time() - cpu_first
        )
        if timed_time > 0:
            self.perf["tokens_per_s"] = timed_tokens / timed_time
            self.perf["examples_per_s"] = timed_examples / timed_time
            self.perf["step_time_s"] = timed_time / max(timed_steps, 1)
        self._update_mfu()
        return records

    def _update_mfu(self) -> None:
        dev = jax.devices()[0]
        n = jax.device_count()
        self.perf.update(devices=n, device_kind=dev.device_kind, processes=jax.process_count(),
                         mesh=str(dict(self.mesh.shape)), num_params=self.num_params)
        peak = peak_flops(dev.device_kind)
        flops, st = self.perf.get("flops_per_step"), self.perf.get("step_time_s")
        if peak and flops and st:
            self.perf["mfu"] = flops / st / (peak * n)
        else:
            self.perf["mfu"] = "n/a"

    # ------------------------------------------------------------------ eval

    def _prepare_eval(self, batch: Mapping[str, Any]) -> dict:
        """Device arrays for every numeric field (global, batch-sharded); host text fields are
        kept on one process and dropped on several (rows are then global)."""
        host_keys = [k for k, v in batch.items() if np.asarray(v).dtype.kind in "USO"]
        arrays = {k: np.asarray(v) for k, v in batch.items() if k not in host_keys}
        out: dict[str, Any] = shd.shard_batch(arrays, self.mesh, self.rules)
        if jax.process_count() == 1:
            out.update({k: batch[k] for k in host_keys})
        return out

    def evaluate(self, specs: Sequence[str] | None = None, *, max_batches: int | None = None,
                 return_evaluators: bool = False):
        """Runs evaluators (registry spec strings) over the validation batches."""
        from efficient_mllm.evaluate.evaluators import build_evaluators, run_evaluators

        if self.components.eval_batches is None:
            raise ValueError("evaluate: the components have no eval_batches; expected a validation split")
        ec = self.config.eval
        specs = tuple(specs if specs is not None else ec.get("final", ("exact_match",)))
        evs = build_evaluators(specs)
        with compat.set_mesh(self.mesh):
            res = run_evaluators(
                self.model(), self.components.eval_batches(), evs,
                question_types=self.components.question_types, tokenizer=self.components.tokenizer,
                max_batches=max_batches, prepare=self._prepare_eval,
            )
        return (res, evs) if return_evaluators else res

    # ------------------------------------------------------------------ outputs

    def finish(self, final: Mapping[str, Any], predictions: Sequence[Mapping] = ()) -> str | None:
        """Writes ``report.md`` and the plots (process 0); returns the report path."""
        self.writer.close()
        if not (_is_main() and self.write_outputs):
            return None
        plots = plot_history(self.writer.history, self.workdir)
        perf = dict(self.perf)
        perf["steps"] = self.step
        if self.train_losses:
            perf["final_train_loss"] = self.train_losses[-1][1]
        path = os.path.join(self.workdir, "report.md")
        cfg = json.loads(self.config.to_json_best_effort()) if hasattr(self.config, "to_json_best_effort") else dict(self.config)
        write_report(path, name=self.config.get("name", os.path.basename(self.workdir)), config=cfg,
                     final=final, perf=perf, plots=plots,
                     question_types=self.components.question_types, predictions=predictions)
        with open(os.path.join(self.workdir, "final_metrics.json"), "w") as f:
            json.dump({"final": dict(final), "perf": {k: v for k, v in perf.items()}}, f, indent=2,
                      default=str)
        return path


def train_and_evaluate(
    config: Any, workdir: str | os.PathLike, *, components: Components | None = None
) -> dict[str, Any]:
    """Trains to ``config.train.steps`` (resuming if a checkpoint exists), saves a final
    checkpoint, runs the final evaluators and writes ``report.md``. Returns a summary dict with
    ``final`` (metrics), ``perf``, ``report`` (path) and ``workdir``. A run started from a
    converted checkpoint (``config.init_from``) also writes the trained model as Hugging Face
    safetensors to ``<workdir>/hf_export`` (``hf_export``: its path, None otherwise)."""
    trainer = Trainer(config, workdir, components=components)
    trainer.run()
    trainer.save(force=True)
    trainer.ckpt.wait()
    hf_export = None
    if trainer.components.init_from is not None and trainer.write_outputs:
        from efficient_mllm.train.finetune import export_hf

        hf_export = export_hf(trainer, os.path.join(trainer.workdir, "hf_export"))
    final: dict[str, Any] = {}
    predictions: list = []
    if trainer.components.eval_batches is not None:
        t0 = time.perf_counter()
        ec = config.eval
        final, evs = trainer.evaluate(ec.get("final", ("exact_match",)),
                                      max_batches=int(ec.get("final_max_batches", 0)) or None,
                                      return_evaluators=True)
        trainer.perf["eval_time_s"] = time.perf_counter() - t0
        trainer.writer.write(trainer.step, final, "eval")
        for ev in evs:
            predictions.extend(getattr(ev, "predictions", []))
    report = trainer.finish(final, predictions)
    trainer.ckpt.close()
    return {"final": final, "perf": dict(trainer.perf), "report": report,
            "workdir": trainer.workdir, "steps": trainer.step, "hf_export": hf_export}


def restore_for_eval(
    config: Any,
    checkpoint: str | os.PathLike,
    *,
    step: int | None = None,
    components: Components | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Trainer:
    """A read-only :class:`Trainer` holding the checkpoint's state on ``config.mesh``.

    ``checkpoint``: a run directory (holding ``checkpoints/``) or the checkpoints directory
    itself. The mesh may differ from the one the checkpoint was written on. Nothing is written.
    """
    path = os.fspath(checkpoint)
    ck_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(ck_dir):
        raise ValueError(f"checkpoint = {path!r}; expected a run directory or a checkpoints directory")
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    if hasattr(config, "unlock"):
        config.unlock()
        config.checkpoint.resume = False
        config.lock()
    t = Trainer(config, path, components=components, devices=devices, checkpoint_dir=ck_dir,
                write_outputs=False)
    if t.ckpt.latest_step() is None:
        raise ValueError(f"checkpoint = {path!r}: no checkpoint found in {ck_dir!r}")
    t.restore(step, data=False)
    return t
