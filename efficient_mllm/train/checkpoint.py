"""Checkpoints with orbax ``CheckpointManager``: periodic saves, keep N, resume, reshard.

A checkpoint holds the sharded train state (any pytree of arrays), the data-iterator state of
every process (``get_state()`` of a grain iterator: bytes or JSON) and a JSON dict of metadata. Restoring takes an *abstract* state (``jax.ShapeDtypeStruct`` leaves with
shardings); giving shardings on another mesh reshards while loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree: Any) -> Any:
    def one(a):
        if not _is_key(a):
            return a
        d = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(a.shape, a.dtype))
        return jax.ShapeDtypeStruct(d.shape, d.dtype, sharding=getattr(a, "sharding", None))

    return jax.tree.map(one, tree)


def _data_to_keys(tree: Any, abstract: Any) -> Any:
    default = jax.random.key(0).dtype

    def one(x, a):
        if not _is_key(a):
            return x
        if a.dtype != default:
            raise ValueError(
                f"checkpoint: PRNG key leaf of dtype {a.dtype}; expected the default key type "
                f"{default} (set jax_default_prng_impl as when it was saved)"
            )
        return jax.random.wrap_key_data(x)

    return jax.tree.map(one, tree, abstract)


class _DataStateHandler(ocp.CheckpointHandler):
    """Orbax handler for data-iterator states: every process writes and reads its own
    ``process_<i>-of-<n>.json`` (per-host shards have per-host positions)."""

    @staticmethod
    def _path(directory) -> Any:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory, args: DataStateSave) -> None:
        s = args.state
        record = {"bytes": s.decode("utf-8")} if isinstance(s, bytes) else {"json": s}
        self._path(directory).write_text(json.dumps(record))

    def restore(self, directory, args: DataStateRestore | None = None) -> Any:
        path = self._path(directory)
        if not path.exists():
            raise ValueError(
                f"checkpoint: no data-iterator state {path}; it was saved by "
                f"a different number of processes than the {jax.process_count()} now running"
            )
        record = json.loads(path.read_text())
        return record["bytes"].encode("utf-8") if "bytes" in record else record["json"]

    def metadata(self, directory) -> None:
        return None

    def finalize(self, directory) -> None:
        return None

    def close(self) -> None:
        return None


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Saves every ``save_every`` steps (0: only when forced), keeps the last ``max_to_keep``.

    >>> ckpt = Checkpointer("runs/x/checkpoints", max_to_keep=2, save_every=100)
    >>> ckpt.save(step, state, data_state=it.get_state(), meta={"loss": 1.2})
    >>> state, data_state, meta = ckpt.restore(abstract_state)   # latest step
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_every: int = 0,
        async_save: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep = {max_to_keep!r}; expected >= 1 or None (keep all)")
        if save_every < 0:
            raise ValueError(f"save_every = {save_every!r}; expected >= 0")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Any = None,
        meta: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves if ``force`` or ``step`` is on the save interval; returns whether it saved."""
        if not (force or self.should_save(step)):
            return False
        if step in self._mngr.all_steps():
            return False
        items = {
            "state": ocp.args.StandardSave(_keys_to_data(state)),
            "extra": ocp.args.JsonSave({"step": int(step), "meta": meta or {}}),
        }
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
        return True

    def restore(
        self, abstract_state: Any, step: int | None = None, *, data: bool = True
    ) -> tuple[Any, Any, dict]:
        """``(state, data_state, meta)`` of ``step`` (default: latest) laid out as
        ``abstract_state`` (``ShapeDtypeStruct`` leaves carrying the target shardings).
        ``data=False`` skips the data-iterator state (``None`` is returned for it)."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f"checkpoint directory {self.directory!r} holds no checkpoint")
        elif step not in self._mngr.all_steps():
            raise ValueError(
                f"step = {step!r}; expected one of the saved steps {self.all_steps()} in {self.directory!r}"
            )
        target = _abstract_keys_to_data(abstract_state)
        items = {"state": ocp.args.StandardRestore(target), "extra": ocp.args.JsonRestore()}
        has_data = data and os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if has_data:
            items["data"] = DataStateRestore()
        r = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
        state = _data_to_keys(r.state, abstract_state)
        extra = r.extra or {}
        return state, (r.data if has_data else None), dict(extra.get("meta") or {})

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

