"""Fine-tuning a converted checkpoint (``config.init_from``, ``train/finetune.py``): a tiny random
LLaVA is converted, trained 3 steps by ``train_and_evaluate`` with the checkpoint's tokenizer,
exported, and reloaded in transformers, whose logits must equal our trained model's (fp32,
<= 1e-4). Also: a compressor override on the loaded weights, and the errors."""

import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from efficient_mllm.hf.converted import convert_to_orbax, load_converted
from efficient_mllm.train.config import load_config
from efficient_mllm.train.loop import Trainer, restore_for_eval, train_and_evaluate

from ._parity import FP32_TOL, jit_logits, tiny_llava_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECIALS = dict(
    bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", image_token="<image>"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    hf_dir = tiny_llava_dir(root / "hf")
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
        json.dump(SPECIALS, f)
    with open(os.path.join(hf_dir, "preprocessor_config.json"), "w") as f:  # CLIP statistics
        json.dump({"image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276]}, f)
    convert_to_orbax(hf_dir, root / "conv")
    return str(root / "conv"), root


def _config(conv: str, data_dir: str, **model):
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.py"))
    cfg.unlock()
    cfg.init_from = conv
    cfg.data.data_dir = data_dir
    cfg.data.knobs.num_train = 16
    cfg.data.knobs.num_validation = 8
    cfg.train.update(steps=3, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1)
    cfg.eval.update(batch_size=8, every=0, final=("teacher_forced",), final_max_batches=1)
    cfg.checkpoint.every = 0
    cfg.output.update(progress=False, tensorboard=False)
    for k, v in model.items():
        cfg.model[k] = v
    cfg.lock()
    return cfg


def _flat(params) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_finetune_export_matches_transformers(converted):
    conv, root = converted
    cfg = _config(conv, str(root / "data"))
    run = root / "run"
    summary = train_and_evaluate(cfg, str(run))
    assert summary["steps"] == 3 and summary["hf_export"] == str(run / "hf_export")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["split"] == "train"]
    assert len(losses) == 3 and all(isinstance(x, float) and math.isfinite(x) for x in losses)

    trained = restore_for_eval(cfg, str(run))
    start = load_converted(conv)
    p0 = _flat(nnx.to_pure_dict(nnx.state(start.model, nnx.Param)))
    p1 = _flat(trained.state.params)
    assert sorted(p0) == sorted(p1)
    assert all(np.isfinite(v).all() for v in p1.values())
    # CLIP's last layer and final norm are unused (vision_feature_layer=-2): no gradient there
    unused = {k for k in p0 if k[:3] == ("vision", "blocks", 1) or k[:2] == ("vision", "norm")}
    unchanged = [k for k in p0 if np.array_equal(p0[k], p1[k])]
    assert set(unchanged) <= unused and len(unchanged) < len(unused), unchanged

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(summary["hf_export"]).eval()
    hf_start = transformers.LlavaForConditionalGeneration.from_pretrained(root / "hf").eval()
    assert os.path.isfile(run / "hf_export" / "tokenizer.json")
    model = trained.model()
    n = model.num_image_slots()
    img, vocab = start.config.image_token_id, start.config.language.vocab_size
    assert img < 5  # the ids drawn below never hit it
    rng = np.random.default_rng(0)
    a, b = rng.integers(5, vocab, (2, 3)), rng.integers(5, vocab, (2, 6))
    ours_ids = np.concatenate([a, np.full((2, 1), img), b], 1)
    hf_ids = np.concatenate([a, np.full((2, n), img), b], 1)
    px = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(hf_ids), pixel_values=torch.tensor(px)).logits.numpy()
        ref0 = hf_start(input_ids=torch.tensor(hf_ids), pixel_values=torch.tensor(px)).logits
    ours = np.asarray(
        jit_logits(model, jnp.asarray(ours_ids, jnp.int32), jnp.asarray(px.transpose(0, 2, 3, 1)))
    )
    rows = np.r_[0:3, 3 + n - 1, 3 + n : 3 + n + 6]  # the placeholder reads the last image row
    assert np.abs(ours - ref[:, rows]).max() <= FP32_TOL
    assert np.abs(ref0.numpy() - ref).max() > 1e-3  # the export is the fine-tuned model


def test_compressor_override_keeps_checkpoint_weights(converted):
    conv, root = converted
    cfg = _config(conv, str(root / "data"), compressor="random(keep=2)")
    t = Trainer(cfg, str(root / "run_compressed"), write_outputs=False)
    model = t.model()
    assert model.compressor is not None
    start = load_converted(conv)
    p0 = _flat(nnx.to_pure_dict(nnx.state(start.model, nnx.Param)))
    p1 = _flat(t.state.params)
    assert sorted(p0) == sorted(p1) and all(np.array_equal(p0[k], p1[k]) for k in p0)
    batch = t.device_batch(next(t.train_iter))
    out = jax.jit(lambda m, b: m(b["tokens"], b["image"], lengths=b["lengths"]))(model, batch)
    assert np.all(np.asarray(out.aux["num_image_tokens"]) == 2)
    assert np.isfinite(np.asarray(out.logits)).all()


def test_init_from_errors(converted, tmp_path):
    conv, root = converted
    with pytest.raises(ValueError, match="init_from = .*not a directory"):
        Trainer(_config(str(tmp_path / "nope"), str(root / "data")), str(tmp_path / "r"))
    with pytest.raises(ValueError, match="data.image_size = 32: expected 0 or the vision tower"):
        cfg = _config(conv, str(root / "data"))
        cfg.unlock()
        cfg.data.image_size = 32
        Trainer(cfg, str(tmp_path / "r"))
    from efficient_mllm.hf.converted import converted_config
    from efficient_mllm.train import mesh as mesh_lib, sharding as shd
    from efficient_mllm.train.optim import make_optimizer
    from efficient_mllm.train.step import init_train_state

    family, mcfg, _, _ = converted_config(conv)
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "seq": 1})
    rules = shd.make_rules(None, mesh_lib.MESH_AXES)
    tx, _ = make_optimizer(_config(conv, "").train)
    model_fn = lambda rngs: family.build(mcfg, rngs)  # noqa: E731
    bad = {"projector": {"fc1": {"bias": np.zeros(3)}}}
    with pytest.raises(ValueError, match=r"params\['projector/fc1/bias'\] shape=\(3,\): expected"):
        init_train_state(model_fn, tx, mesh, rules, params=bad)
    with pytest.raises(ValueError, match="leaf.*the model does not have"):
        init_train_state(model_fn, tx, mesh, rules, params={"nope": np.zeros(3)})
