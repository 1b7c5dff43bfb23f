"""Train state and the pure, jitted train step over ``nnx.split`` state.

The model is split once into a static ``graphdef`` and pure dicts of parameters (``nnx.Param``)
and the rest of its state (RNG counters, ...). :class:`TrainState` holds those dicts, the optax
state and the step counter. The train step merges the model inside the traced function, so it is
an ordinary function of arrays, jitted with explicit in/out shardings and a donated state.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efficient_mllm.train import sharding as shd
from efficient_mllm.train.loss import answer_loss_terms

__all__ = [
    "TrainState",
    "DTYPES",
    "as_dtype",
    "abstract_model",
    "split_model",
    "merge_model",
    "init_train_state",
    "train_state_shardings",
    "make_train_step",
    "jit_train_step",
    "forward_logits",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: Any, what: str = "dtype") -> Any:
    """``"float32" | "bfloat16" | "float16"`` (or a numpy dtype) -> jnp dtype."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"{what} = {name!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[name]
    return jnp.dtype(name).type


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """``step`` int32 scalar, ``params`` / ``rest`` pure dicts, ``opt_state`` (optax)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rest: Any


ModelFn = Callable[[nnx.Rngs], nnx.Module]


def abstract_model(model_fn: ModelFn, seed: int = 0) -> nnx.Module:
    """The model with ``ShapeDtypeStruct`` leaves (nothing allocated)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: model_fn(nnx.Rngs(seed)))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    """``(graphdef, params, rest)`` with pure-dict states."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def merge_model(graphdef: nnx.GraphDef, params: Any, rest: Any) -> nnx.Module:
    """Inverse of :func:`split_model`."""
    return nnx.merge(graphdef, params, rest)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    def c(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(c, tree)


def _path_key(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def _opt_state_shardings(opt_state: Any, params: Any, param_sh: Any, mesh: Mesh) -> Any:
    """Each optimizer-state leaf takes the sharding of the parameter whose path is a suffix of its
    own path and whose shape matches (Adam moments); everything else is replicated."""
    by_path = {}
    leaves = jax.tree_util.tree_leaves_with_path(params)
    shardings = jax.tree_util.tree_leaves(param_sh)
    for (path, p), s in zip(leaves, shardings, strict=True):
        by_path[_path_key(path)] = (tuple(p.shape), s)
    rep = NamedSharding(mesh, P())

    def one(path, leaf):
        key = _path_key(path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_state)


def train_state_shardings(
    model_fn: ModelFn, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """``(graphdef, abstract_state, state_shardings)`` without allocating anything."""
    abstract = abstract_model(model_fn, seed)
    graphdef, aparams, arest = nnx.split(abstract, nnx.Param, ...)
    p_sh = shd.state_shardings(aparams, mesh, rules)
    r_sh = shd.state_shardings(arest, mesh, rules)
    params = nnx.to_pure_dict(aparams)
    opt = jax.eval_shape(tx.init, params)
    o_sh = _opt_state_shardings(opt, params, p_sh, mesh)
    rep = NamedSharding(mesh, P())
    shardings = TrainState(step=rep, params=p_sh, opt_state=o_sh, rest=r_sh)
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=opt,
        rest=nnx.to_pure_dict(arest),
    )
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    return graphdef, abstract_state, shardings


def init_train_state(
    model_fn: ModelFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: shd.Rules,
    *,
    seed: int = 0,
    param_dtype: Any = "float32",
    params: Any = None,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Initialises ``(graphdef, state, shardings)`` directly into its sharded layout.

    Floating parameters are stored in ``param_dtype``. ``params``: a pure dict (``split_model``
    layout) of parameters to start from, e.g. a pretrained checkpoint's; each of its leaves must
    exist in the model with the same shape (else ``ValueError``), model parameters it lacks keep
    their fresh initialisation (e.g. a learned compressor added to a pretrained model). The
    optimizer state is always fresh.
    """
    pdt = as_dtype(param_dtype, "param_dtype")
    graphdef, abstract_state, shardings = train_state_shardings(model_fn, tx, mesh, rules, seed)
    if params is not None:
        _check_init_params(params, abstract_state.params)
    # Parameters are stored in param_dtype: the abstract state must say so too.
    abstract_state = dataclasses.replace(
        abstract_state,
        params=jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, pdt if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=a.sharding),
            abstract_state.params,
        ),
    )

    def init(given):
        with nnx.use_eager_sharding(False):
            model = model_fn(nnx.Rngs(seed))
        _, params, rest = split_model(model)
        if given is not None:
            flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
            flat.update(traverse_util.flatten_dict(given))
            params = traverse_util.unflatten_dict(flat)
        params = _cast_floats(params, pdt)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rest=rest
        )

    state = jax.jit(init, out_shardings=shardings)(params)
    return graphdef, state, shardings


def _check_init_params(params: Any, abstract: Any) -> None:
    """Every leaf of ``params`` names a model parameter of the same shape (see
    :func:`init_train_state`); logs the parameters left at their fresh initialisation."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a pure dict of parameters, got {type(params).__name__}")
    given = traverse_util.flatten_dict(params)
    model = traverse_util.flatten_dict(abstract)
    fmt = lambda p: "/".join(map(str, p))  # noqa: E731
    unknown = sorted(fmt(p) for p in given if p not in model)
    if unknown:
        raise ValueError(
            f"params: {len(unknown)} leaf(s) the model does not have, e.g. {unknown[:3]}; expected "
            "paths of the model's parameters (nnx.to_pure_dict layout)"
        )
    for p, v in given.items():
        if tuple(np.shape(v)) != tuple(model[p].shape):
            raise ValueError(
                f"params[{fmt(p)!r}] shape={tuple(np.shape(v))}: expected the model's "
                f"{tuple(model[p].shape)}"
            )
    fresh = sorted(fmt(p) for p in model if p not in given)
    if fresh:
        logging.getLogger(__name__).warning(
            "init params: %d parameter(s) keep their fresh initialisation: %s",
            len(fresh), ", ".join(fresh[:8]) + (" ..." if len(fresh) > 8 else ""),
        )


def forward_logits(model: nnx.Module, batch: Mapping[str, jax.Array], compute_dtype: Any = None):
    """Calls ``model(tokens, images, lengths=...)`` and returns float32 logits."""
    images = batch.get("image")
    if images is not None and compute_dtype is not None:
        images = images.astype(compute_dtype)
    out = model(batch["tokens"], images, lengths=batch["lengths"])
    logits = getattr(out, "logits", out)
    return logits.astype(jnp.float32)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    compute_dtype: Any = "float32",
    microbatches: int = 1,
    batch_constraint: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """The pure ``step(state, batch) -> (state, metrics)``.

    The loss is the mean answer-token NLL over the *whole* batch: with ``microbatches > 1`` the
    batch is split into that many interleaved slices whose summed gradients are divided by the
    total target count, so accumulation gives the same update as one big batch. Parameters are
    cast to ``compute_dtype`` inside the differentiated function, so gradients and updates stay
    in the parameter dtype.
    """
    cdt = as_dtype(compute_dtype, "compute_dtype")
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches = {microbatches!r}; expected a positive int")

    def loss_sum(params, rest, batch):
        model = merge_model(graphdef, _cast_floats(params, cdt), rest)
        logits = forward_logits(model, batch, cdt)
        terms = answer_loss_terms(logits, batch["tokens"], batch["loss_mask"])
        _, _, new_rest = split_model(model)
        return terms["loss_sum"], (terms, new_rest)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state: TrainState, batch: Mapping[str, jax.Array]):
        batch = dict(batch)
        if microbatches == 1:
            (_, (terms, rest)), grads = grad_fn(state.params, state.rest, batch)
        else:
            b = batch["tokens"].shape[0]
            if b % microbatches:
                raise ValueError(
                    f"batch size {b} is not divisible by microbatches = {microbatches}"
                )

            def split(x):
                x = x.reshape(b // microbatches, microbatches, *x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            mbs = jax.tree.map(split, batch)

            def body(carry, mb):
                g_acc, t_acc, rest = carry
                if batch_constraint is not None:
                    mb = batch_constraint(mb)
                (_, (terms, rest)), g = grad_fn(state.params, rest, mb)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, t_acc, terms), rest), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            zeros_t = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "count")}
            (grads, terms, rest), _ = jax.lax.scan(body, (zeros_g, zeros_t, state.rest), mbs)
        n = jnp.maximum(terms["count"], 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": terms["loss_sum"] / n,
            "accuracy": terms["correct"] / n,
            "target_tokens": terms["count"],
            "tokens": jnp.sum(batch["lengths"]).astype(jnp.float32),
            "grad_norm": optax.tree.norm(grads),
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rest=rest)
        return new_state, metrics

    return step


def jit_train_step(
    step: Callable,
    state_shardings: TrainState,
    mesh: Mesh,
    rules: shd.Rules,
    batch_keys: Mapping[str, int],
    *,
    donate: bool = True,
):
    """``jax.jit`` with explicit shardings: state as ``state_shardings``, each batch entry
    (``batch_keys``: name -> ndim) over the batch axes, metrics replicated; state donated."""
    batch_sh = {k: NamedSharding(mesh, shd.batch_spec(nd, mesh, rules)) for k, nd in batch_keys.items()}
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,) if donate else (),
    )
