"""Convert a local Hugging Face checkpoint to an orbax checkpoint, or export one back.

    python -m experiments.convert --hf_dir /path/to/llava-1.5-7b-hf --out runs/llava15_7b
    python -m experiments.convert --hf_dir DIR --out OUT --param_dtype bfloat16 --mesh fsdp=-1
    python -m experiments.convert --export --ckpt runs/llava15_7b --out /tmp/llava_hf \
        [--dtype bfloat16]

Import streams the safetensors tensor by tensor onto the mesh (``--mesh`` axis sizes, e.g.
``fsdp=-1`` or ``data=1,tensor=-1``; default: the first device) and writes the converted
directory (``efficient_mllm/hf/converted.py``: our config, the HF config + tokenizer files,
orbax params). ``--export`` writes ``config.json`` + ``model.safetensors`` that
``transformers`` loads (``from_pretrained``). Supported ``model_type`` values:
``efficient_mllm.hf.supported_model_types()``.
"""

from __future__ import annotations

from absl import app, flags, logging

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF model directory (config.json + safetensors).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_EXPORT = flags.DEFINE_bool("export", False, "Export --ckpt (a converted dir) to HF safetensors.")
_CKPT = flags.DEFINE_string("ckpt", None, "Converted directory to export (with --export).")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype",
    "auto",
    ["auto", "float32", "bfloat16", "float16"],
    "Parameter dtype on import ('auto': the checkpoint's).",
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "Cast the exported tensors (default: the parameter dtype).",
)
_MESH = flags.DEFINE_string(
    "mesh", "", "Mesh axis sizes for import, e.g. 'fsdp=-1' (default: first device)."
)


def _mesh(spec: str):
    if not spec:
        return None
    from efficient_mllm.train.mesh import make_mesh

    sizes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if not value:
            raise app.UsageError(f"--mesh={spec!r}: expected axis=size pairs, e.g. 'fsdp=-1'")
        sizes[name.strip()] = int(value)
    return make_mesh(sizes)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from efficient_mllm.hf.converted import convert_to_orbax, export_converted

    if not _OUT.value:
        raise app.UsageError("--out is required")
    if _EXPORT.value:
        if not _CKPT.value:
            raise app.UsageError("--export needs --ckpt (a directory written by this command)")
        out = export_converted(_CKPT.value, _OUT.value, dtype=_DTYPE.value)
        print(f"exported {_CKPT.value} -> {out} (config.json + safetensors)")
        return
    if not _HF_DIR.value:
        raise app.UsageError("--hf_dir is required (or --export --ckpt DIR)")
    pre = convert_to_orbax(
        _HF_DIR.value, _OUT.value, param_dtype=_PARAM_DTYPE.value, mesh=_mesh(_MESH.value)
    )
    import jax
    from flax import nnx

    n = sum(x.size for x in jax.tree.leaves(nnx.state(pre.model, nnx.Param)))
    print(
        f"converted {pre.hf_config['model_type']} ({type(pre.model).__name__}, {n:,} params) "
        f"-> {_OUT.value}"
    )


if __name__ == "__main__":
    app.run(main)
