"""Config files load, are locked, resolve into valid model configs; overrides apply; typos in
override names raise errors that name the field."""

import os
import types

import pytest
from absl import flags
from ml_collections import config_flags

from efficient_mllm.data import synthetic_tokenizer
from efficient_mllm.nn.mllm import MLLMConfig
from efficient_mllm.train.config import apply_overrides, load_config
from efficient_mllm.train.loop import resolve_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = ["quickstart", "shapes_vqa_base", "digit_grid", "mqar", "lolcats"]


def _path(name):
    return os.path.join(ROOT, "configs", f"{name}.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_resolves(name):
    cfg = load_config(_path(name))
    assert cfg.name == name
    with pytest.raises(AttributeError):
        cfg.train.not_a_field = 1  # locked
    import importlib.util

    spec = importlib.util.spec_from_file_location("c", _path(name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "COMMAND" in mod.__doc__ and "EXPECTED" in mod.__doc__
    multimodal = cfg.model.get("vision") is not None
    tok = types.SimpleNamespace(image_token_id=4)
    vocab = synthetic_tokenizer().vocab_size  # 189 since "read" and "grid" joined
    ds = types.SimpleNamespace(name=cfg.data.name, vocab_size=vocab, multimodal=multimodal,
                               image_size=cfg.data.knobs.get("image_size"), tokenizer=tok)
    mcfg = MLLMConfig.from_dict(resolve_model_config(cfg.model.to_dict(), ds))
    assert mcfg.language.vocab_size == vocab
    assert (mcfg.vision is not None) == multimodal
    if multimodal:
        assert mcfg.image_token_id == 4
        assert mcfg.vision.image_size == (cfg.data.knobs.image_size,) * 2
    assert cfg.train.warmup_steps < cfg.train.steps
    assert cfg.train.batch_size % cfg.train.microbatches == 0


def test_overrides_apply_and_typos_name_the_field():
    cfg = load_config(_path("quickstart"), overrides={"train.steps": 20, "model.language.depth": 1,
                                                      "mesh.tensor": 2, "model.compressor": "x(k=1)"})
    assert cfg.train.steps == 20 and cfg.model.language.depth == 1 and cfg.mesh.tensor == 2
    assert cfg.model.compressor == "x(k=1)"
    with pytest.raises(ValueError, match=r"train\.stepz.*train\.steps"):
        apply_overrides(cfg, {"train.stepz": 3})
    with pytest.raises(ValueError, match=r"'trian'"):
        apply_overrides(cfg, {"trian.steps": 3})
    with pytest.raises(ValueError, match=r"train\.steps='many'"):
        apply_overrides(cfg, {"train.steps": "many"})


def _parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "cfg", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def test_command_line_overrides_and_typo():
    cfg = _parse(["prog", f"--config={_path('quickstart')}", "--config.train.steps=7",
                  "--config.train.lr=0.01", "--config.eval.final=('teacher_forced',)"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01
    assert tuple(cfg.eval.final) == ("teacher_forced",)
    # ml_collections names the bad field and suggests the right one
    with pytest.raises((flags.Error, AttributeError), match=r"stepz[\s\S]*steps"):
        _parse(["prog", f"--config={_path('quickstart')}", "--config.train.stepz=7"])


def test_mqar_config_takes_attention_by_name():
    cfg = load_config(_path("mqar"), arg="softmax(impl='xla')")
    assert cfg.model.language.attention == "softmax(impl='xla')"
    assert cfg.model.vision is None


def test_mqar_hybrid_stack_is_one_override():
    cfg = _parse(["prog", f"--config={_path('mqar')}",
                  "--config.model.language.layer_attention=('linear_swa(window=64)', 'softmax')"])
    from efficient_mllm.nn.language import LanguageConfig

    lang = dict(cfg.model.language, vocab_size=128)
    lc = LanguageConfig.from_dict(lang)
    assert lc.layer_specs() == ("linear_swa(window=64)", "softmax")
    assert lc.recurrent_layers == (0,)


def test_digits_recipe_probe_variants_change_only_their_knobs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe", _path("digits_recipe_probe"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "COMMAND" in mod.__doc__
    study = load_config(_path("compression_sweep"), "train,study,digit_grid")
    assert (study.data.knobs.read_fraction, study.train.lr, study.train.steps) == (0.5, 1e-3, 3000)
    for name, (read, lr, steps, mrope) in mod.VARIANTS.items():
        cfg = load_config(_path("digits_recipe_probe"), name)
        assert cfg.data.knobs.read_fraction == read and cfg.train.lr == lr
        assert cfg.train.steps == steps
        assert cfg.model.language.get("rope_type", "rope") == ("mrope" if mrope else "rope")
        # everything else is the study's digits training config
        a, b = cfg.to_dict(), study.to_dict()
        for d in (a, b):
            d.pop("name")
            d["data"]["knobs"].pop("read_fraction")
            d["train"].pop("lr")
            d["train"].pop("steps")
            d["model"]["language"].pop("rope_type", None)
            d["model"]["language"].pop("mrope_sections", None)
        assert a == b, name
    # the study's own recipe is one of the variants
    assert mod.VARIANTS["gread50_lr1e3_3k"] == (0.5, 1e-3, 3000, False)
    with pytest.raises(ValueError, match="variant 'nope'"):
        load_config(_path("digits_recipe_probe"), "nope")
