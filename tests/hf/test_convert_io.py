"""Loader / exporter mechanics: error messages, sharded safetensors, placement on a mesh, dtype
handling, the converted (orbax) directory and the ``experiments.convert`` command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file, save_file

from efficient_mllm.hf import get_family, load_pretrained, save_pretrained, supported_model_types
from efficient_mllm.hf.converted import convert_to_orbax, export_converted, load_converted
from efficient_mllm.hf.safetensors_io import CheckpointReader, write_safetensors
from efficient_mllm.train import sharding as sh
from efficient_mllm.train.mesh import make_mesh

from ._parity import save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = dict(
    vocab_size=90,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    return save_hf(model, tmp_path_factory.mktemp("llama") / "hf")


def _copy(src, dst, edit=None, edit_config=None):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if edit_config:
        edit_config(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_unknown_model_type_lists_supported(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "x", edit_config=lambda c: c.update(model_type="gpt_neo"))
    with pytest.raises(ValueError, match="gpt_neo.*supported model types.*llama.*llava.*qwen2"):
        load_pretrained(bad)
    assert {"llama", "qwen2", "llava", "clip_vision_model", "siglip_vision_model"} <= set(
        supported_model_types()
    )
    with pytest.raises(ValueError, match="not supported"):
        get_family("bert")


def test_missing_unexpected_and_misshaped_tensors(hf_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    missing = _copy(hf_dir, tmp_path / "m", edit=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj"):
        load_pretrained(missing)
    extra = "model.layers.0.self_attn.extra.weight"
    unexpected = _copy(
        hf_dir, tmp_path / "u", edit=lambda t: t.update({extra: np.zeros((2, 2), np.float32)})
    )
    with pytest.raises(
        ValueError, match=r"unexpected tensor\(s\) \['model\.layers\.0\.self_attn\.extra"
    ):
        load_pretrained(unexpected)
    # config says 40 MLP units, the tensors hold 48: the error names tensor and both shapes.
    shaped = _copy(hf_dir, tmp_path / "s", edit_config=lambda c: c.update(intermediate_size=40))
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight.*"
        r"\(48, 32\)|\(32, 48\)",
    ):
        load_pretrained(shaped)
    try:
        load_pretrained(shaped)
    except ValueError as e:
        assert "(40, 32)" in str(e) or "(32, 40)" in str(e)  # the expected shape too


def test_sharded_checkpoint_and_reader(hf_dir, tmp_path):
    ref = load_pretrained(hf_dir)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    files = write_safetensors(tmp_path / "sh", sorted(tensors.items()), max_shard_bytes=20_000)
    assert len(files) > 2 and os.path.isfile(tmp_path / "sh" / "model.safetensors.index.json")
    with (
        open(os.path.join(hf_dir, "config.json")) as f,
        open(tmp_path / "sh" / "config.json", "w") as g,
    ):
        g.write(f.read())
    with CheckpointReader(tmp_path / "sh") as r:
        assert r.names() == sorted(tensors)
        name = "model.embed_tokens.weight"
        assert r.shape(name) == (90, 32) and r.dtype(name) == "float32"
        np.testing.assert_array_equal(r.get(name), tensors[name])
    got = load_pretrained(tmp_path / "sh")
    a, b = _params(ref.model), _params(got.model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_placement_on_a_mesh(hf_dir):
    assert len(jax.devices()) >= 8
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    got = load_pretrained(hf_dir, mesh=mesh)
    ref = load_pretrained(hf_dir)
    params = nnx.state(got.model, nnx.Param)
    want = sh.state_shardings(params, mesh, sh.DEFAULT_RULES)
    q = got.model.blocks[0].attn.q.kernel.get_value()
    assert q.sharding == want["blocks"][0]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # [embed, heads, hd]
    emb = got.model.embed.embedding.get_value()
    assert len({s.device for s in emb.addressable_shards}) == 8
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 90, (2, 7)), jnp.int32)
    np.testing.assert_allclose(
        np.asarray(got.model(ids).logits), np.asarray(ref.model(ids).logits), atol=1e-5
    )


def test_bf16_roundtrip_is_bit_exact(hf_dir, tmp_path):
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).to(torch.bfloat16)
    src = save_hf(hf, tmp_path / "bf16")
    pre = load_pretrained(src)
    assert pre.model.embed.embedding.get_value().dtype == jnp.bfloat16
    save_pretrained(pre.model, pre.config, tmp_path / "out", original_hf_config=pre.hf_config)
    a = load_file(os.path.join(src, "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(
            a[k].view(np.uint16), b[k].view(np.uint16)
        )
    # Export cast on request.
    save_pretrained(pre.model, pre.config, tmp_path / "f32", family="llama", dtype="float32")
    c = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert all(v.dtype == np.float32 for v in c.values())
    with open(tmp_path / "f32" / "config.json") as f:
        assert json.load(f)["dtype"] == "float32"


def test_converted_orbax_dir_and_cli(hf_dir, tmp_path):
    pre = convert_to_orbax(hf_dir, tmp_path / "conv")
    again = load_converted(tmp_path / "conv")
    assert again.config == pre.config
    a, b = _params(pre.model), _params(again.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    sharded = load_converted(tmp_path / "conv", mesh=mesh)
    assert sharded.model.blocks[
        0
    ].mlp.up.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    export_converted(tmp_path / "conv", tmp_path / "exp")
    x, y = (
        load_file(os.path.join(hf_dir, "model.safetensors")),
        load_file(str(tmp_path / "exp" / "model.safetensors")),
    )
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    # The command line (import direction; export is the function above).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.convert",
            "--hf_dir",
            str(hf_dir),
            "--out",
            str(tmp_path / "cli"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "converted llama" in res.stdout
    assert load_converted(tmp_path / "cli").config == pre.config
