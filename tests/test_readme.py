"""The README's Python snippets run as written (so the quickstart cannot rot)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3, "README lost its quickstart snippets"
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "(2, 6, 256)" in out  # logits shape of the quickstart forward pass
    assert namespace["gen"].tokens.shape == (2, 8)
    assert namespace["o"].shape == (2, 128, 8, 64) and namespace["lse"].shape == (2, 8, 128)
