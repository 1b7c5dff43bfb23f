"""grain input pipeline: records -> padded, tokenized, normalised batches.

A batch is a dict of numpy arrays (``B`` = batch size, ``T`` = ``seq_len``):

- ``image`` float32 ``[B, H, W, 3]``, ``(x / 255 - 0.5) / 0.5``; absent for text-only data.
- ``tokens`` int32 ``[B, T]``: ``<bos> <image> question ? answer <eos>``, right-padded with the
  tokenizer's ``pad_id`` (pre-tokenized ``mqar`` rows are taken as they are, pad 0).
- ``loss_mask`` float32 ``[B, T]``: 1 where the token is a target (answer tokens and ``<eos>``;
  for ``mqar`` the values after the query keys); ``logits[:, t]`` predicts ``tokens[:, t + 1]``.
- ``lengths`` int32 ``[B]``: valid tokens per row.
- ``prompt_lengths`` int32 ``[B]``: tokens before the first target (the prompt to prefill).
- ``question_type`` int32 ``[B]``: index into the dataset's question-type names.
- ``index`` int32 ``[B]``: the record's index in its source.
- ``answer_text`` numpy unicode ``[B]``: the reference answer. A host-side field: not for jit,
  drop it with :func:`split_host_fields`.

A row longer than ``seq_len`` raises ``ValueError``; nothing is truncated.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from efficient_mllm.data.tokenizer import encode_vqa

__all__ = [
    "HOST_FIELDS",
    "EncodeRecord",
    "encode_record",
    "make_loader",
    "normalize_image",
    "split_host_fields",
]

HOST_FIELDS = ("answer_text",)


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return _text(x.item())
    if not isinstance(x, str):
        raise ValueError(f"record: expected a text field (str or bytes), got {type(x).__name__}")
    return x


def _image_hw(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int, (height, width) or None, got {image_size!r}")
    if min(hw) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return hw


def normalize_image(
    image: np.ndarray, image_size: int | tuple[int, int] | None = None
) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``(x / 255 - 0.5) / 0.5``, resized (bilinear) if asked."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    hw = _image_hw(image_size)
    if hw is not None and image.shape[:2] != hw:
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))
    return (image.astype(np.float32) / 255.0 - 0.5) / 0.5


def encode_record(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    seq_len: int,
    image_size: int | tuple[int, int] | None = None,
    index: int = -1,
) -> dict[str, np.ndarray]:
    """One record (VQA or pre-tokenized) -> one unbatched row of the batch format above."""
    if "tokens" in record:
        ids = np.asarray(record["tokens"], np.int32).reshape(-1)
        targets = np.asarray(record["targets"]).reshape(-1).astype(bool)
        if targets.shape != ids.shape or not targets.any():
            raise ValueError(
                f"record: targets must mark at least one of the {ids.size} tokens, "
                f"got shape {targets.shape} with {int(targets.sum())} marked"
            )
        pad = 0 if tokenizer is None else tokenizer.pad_id
        prompt_len = int(np.argmax(targets))
        question = "<token ids>"
    else:
        if tokenizer is None:
            raise ValueError("tokenizer: a VQA record needs a tokenizer, got None")
        question, answer = _text(record["question"]), _text(record["answer"])
        ids_list, prompt_len = encode_vqa(tokenizer, question, answer, multimodal="image" in record)
        ids = np.asarray(ids_list, np.int32)
        targets = np.zeros(ids.size, bool)
        targets[prompt_len:] = True
        pad = tokenizer.pad_id
    n = int(ids.size)
    if n > seq_len:
        raise ValueError(
            f"seq_len: record {index} has {n} tokens ({question!r}), more than "
            f"seq_len={seq_len}; expected seq_len >= {n} (no truncation is done)"
        )
    tokens = np.full(seq_len, pad, np.int32)
    tokens[:n] = ids
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[:n] = targets
    out = {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "lengths": np.int32(n),
        "prompt_lengths": np.int32(prompt_len),
        "question_type": np.int32(record.get("question_type", 0)),
        "index": np.int32(index),
        "answer_text": np.str_(_text(record["answer"])),
    }
    if "image" in record:
        out["image"] = normalize_image(record["image"], image_size)
    return out


def split_host_fields(
    batch: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(arrays for the device, host-only fields such as answer_text)``."""
    return (
        {k: v for k, v in batch.items() if k not in HOST_FIELDS},
        {k: v for k, v in batch.items() if k in HOST_FIELDS},
    )


class _Indexed:
    """Wraps a random-access source so each record carries its index."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return int(index), self.source[int(index)]

    def __repr__(self) -> str:
        return f"Indexed({self.source!r})"


class EncodeRecord(grain.transforms.Map):
    """grain ``Map`` transform applying :func:`encode_record` to ``(index, record)``."""

    def __init__(
        self, tokenizer: Any, *, seq_len: int, image_size: int | tuple[int, int] | None = None
    ):
        self.tokenizer, self.seq_len, self.image_size = tokenizer, seq_len, image_size

    def map(self, element: tuple[int, Any]) -> dict[str, np.ndarray]:
        index, record = element
        return encode_record(
            record, self.tokenizer, seq_len=self.seq_len, image_size=self.image_size, index=index
        )


def make_loader(
    source: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    seq_len: int,
    image_size: int | tuple[int, int] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    read_options: Any = None,
):
    """A ``grain.DataLoader`` yielding batches of ``source`` (see the module docstring).

    ``source``: random access (``len``, ``[i]``), e.g. ``build_dataset(...)["train"]``.
    ``tokenizer``: ``WordTokenizer`` / ``HFTokenizer``; ``None`` only for pre-tokenized records.
    ``image_size``: resize images to this (int or ``(H, W)``); ``None`` keeps them as stored.
    ``num_epochs``: ``None`` repeats forever. ``shard_index`` / ``shard_count``: this process's
    shard (default ``jax.process_index()`` / ``jax.process_count()``); shards are disjoint and
    equal-sized (up to ``shard_count - 1`` records are dropped), so hosts stay in step.
    ``batch_size`` is per process. ``drop_remainder``: drop the last partial batch (keeps shapes
    static). ``worker_count > 0`` decodes in child processes (needs parsed absl flags and a
    ``__main__`` guard); the batch order depends on ``worker_count``.
    Resume with ``it = iter(loader); state = it.get_state(); ...; it.set_state(state)`` (same
    arguments, same ``worker_count``).
    """
    try:
        n = len(source)
    except TypeError:
        raise ValueError(
            f"source must be random access (len and [i]), got {type(source).__name__}"
        ) from None
    if n <= 0:
        raise ValueError(f"source must hold at least one record, got {n}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_epochs is not None and (
        isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1
    ):
        raise ValueError(
            f"num_epochs must be a positive int or None (repeat forever), got {num_epochs!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    _image_hw(image_size)
    if (shard_index is None) != (shard_count is None):
        raise ValueError(
            f"shard_index and shard_count must be given together, got "
            f"shard_index={shard_index!r}, shard_count={shard_count!r}"
        )
    if shard_index is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not (
        isinstance(shard_count, int)
        and shard_count >= 1
        and isinstance(shard_index, int)
        and 0 <= shard_index < shard_count
    ):
        raise ValueError(
            f"shard_index must be in [0, shard_count) with shard_count >= 1, got "
            f"shard_index={shard_index!r}, shard_count={shard_count!r}"
        )
    if n < shard_count:
        raise ValueError(
            f"shard_count: {shard_count} shards of a source of {n} records leave some "
            "shards empty; expected shard_count <= len(source)"
        )
    shard_options = grain.sharding.ShardOptions(
        shard_index=shard_index, shard_count=shard_count, drop_remainder=True
    )
    sampler = grain.samplers.IndexSampler(
        num_records=n,
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=int(seed),
    )
    op = EncodeRecord(tokenizer, seq_len=int(seq_len), image_size=image_size)
    return grain.DataLoader(
        data_source=_Indexed(source),
        sampler=sampler,
        operations=[
            op,
            grain.transforms.Batch(batch_size=int(batch_size), drop_remainder=drop_remainder),
        ],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
        read_options=read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=16),
    )
