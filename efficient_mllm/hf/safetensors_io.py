"""Lazy reading of a local Hugging Face checkpoint directory and sharded safetensors writing.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or the shards
listed in ``model.safetensors.index.json`` (``weight_map: name -> file``). Tensors are read one
at a time with ``safetensors.safe_open`` (memory-mapped; nothing else is loaded), as numpy
arrays (bfloat16 through ``ml_dtypes``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

__all__ = ["CheckpointReader", "read_hf_config", "write_safetensors"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """``config.json`` of ``hf_dir`` as a dict."""
    path = os.path.join(os.fspath(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"hf_dir={os.fspath(hf_dir)!r}: no config.json (expected an HF model dir)")
    with open(path) as f:
        return json.load(f)


class CheckpointReader:
    """Name -> (file, shape, dtype) of every tensor in an HF checkpoint dir; ``get(name)`` reads
    one tensor. Use as a context manager (or call ``close``)."""

    def __init__(self, hf_dir: str | os.PathLike):
        from safetensors import safe_open

        self._safe_open = safe_open
        hf_dir = os.fspath(hf_dir)
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            files = [SINGLE]
        else:
            found = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not found:
                raise ValueError(f"hf_dir={hf_dir!r}: no {SINGLE}, {INDEX} or *.safetensors file")
            files = found
        self.dir = hf_dir
        self._handles: dict[str, object] = {}
        self.files: dict[str, str] = {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.isfile(path):
                raise ValueError(f"{INDEX} lists {fname!r} but {path!r} does not exist")
            handle = self._open(fname)
            for name in handle.keys():
                if name in self.files:
                    raise ValueError(
                        f"tensor {name!r} is stored in both {self.files[name]!r} and {fname!r}"
                    )
                self.files[name] = fname

    def _open(self, fname: str):
        if fname not in self._handles:
            path = os.path.join(self.dir, fname)
            self._handles[fname] = self._safe_open(path, framework="numpy").__enter__()
        return self._handles[fname]

    def names(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.files[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        code = self._open(self.files[name]).get_slice(name).get_dtype()
        return _DTYPES.get(code, code)

    def get(self, name: str) -> np.ndarray:
        """Reads tensor ``name`` (numpy)."""
        if name not in self.files:
            raise ValueError(f"tensor {name!r} is not in the checkpoint at {self.dir!r}")
        return self._open(self.files[name]).get_tensor(name)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes ``(name, array)`` pairs as ``model.safetensors`` or, past ``max_shard_bytes``,
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``; holds at
    most one shard in memory. Returns the file names written."""
    from safetensors.numpy import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):
        if stale.endswith(".safetensors") or stale == INDEX:
            os.remove(os.path.join(out_dir, stale))
    shards: list[dict] = []  # {file: temporary name, names: tensors in it}
    total = 0

    def flush(buf: dict[str, np.ndarray]) -> None:
        tmp = f"shard-{len(shards):05d}.tmp.safetensors"
        save_file(buf, os.path.join(out_dir, tmp), metadata={"format": "pt"})
        shards.append({"file": tmp, "names": list(buf)})

    buf: dict[str, np.ndarray] = {}
    size = 0
    seen: set[str] = set()
    for name, arr in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} is written twice")
        seen.add(name)
        arr = np.ascontiguousarray(arr)
        if buf and size + arr.nbytes > max_shard_bytes:
            flush(buf)
            buf, size = {}, 0
        buf[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if buf or not shards:
        flush(buf)
    if len(shards) == 1:
        os.replace(os.path.join(out_dir, shards[0]["file"]), os.path.join(out_dir, SINGLE))
        return [SINGLE]
    n = len(shards)
    weight_map = {}
    files = []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, shard["file"]), os.path.join(out_dir, fname))
        files.append(fname)
        weight_map.update({name: fname for name in shard["names"]})
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
