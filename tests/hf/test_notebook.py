"""``experiments/notebooks/hf_quickstart.ipynb`` runs end to end on a tiny random LLaVA: its
code cells are executed in order in one namespace (IPython magics are not used by the
notebook), with the model directory passed through the environment variables of its first
code cell. Checks the notebook's own results: a conversion, an uncompressed answer, two
compressed answers and an export that ``transformers`` loads."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ._parity import tiny_llava_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "hf_quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    hf_dir = tiny_llava_dir(tmp_path / "hf")
    monkeypatch.setenv("HF_MODEL_DIR", hf_dir)
    monkeypatch.setenv("CONVERTED_DIR", str(tmp_path / "converted"))
    monkeypatch.setenv("EXPORT_DIR", str(tmp_path / "export"))
    monkeypatch.setenv("PARAM_DTYPE", "float32")
    monkeypatch.setenv("MAX_NEW_TOKENS", "3")
    monkeypatch.setenv("PROMPT", "<image> what color is the circle ?")
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert 'os.environ.get("HF_MODEL_DIR"' in "".join(cells[0]["source"])
    ns = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        assert not any(line.lstrip().startswith(("%", "!")) for line in src.splitlines()), i
        exec(compile(src, f"hf_quickstart.ipynb[code cell {i}]", "exec"), ns)
    assert len(ns["base_tokens"]) >= 1
    assert set(ns["results"]) == {"VisionZip", "FastV"}
    assert sorted(os.listdir(tmp_path / "export"))[:2] == ["config.json", "generation_config.json"]
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert reloaded.config.image_token_id == ns["cfg"].image_token_id
