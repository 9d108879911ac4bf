"""The README's "use the layer in your own model" snippet runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_layer_snippet_runs(capsys):
    blocks = _python_blocks()
    assert blocks, "README has no python snippet"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["y"].shape == (2, 16, 64)
    assert float(namespace["aux_loss"]) > 0
    printed = capsys.readouterr().out.split()
    assert printed[:3] == ["(2,", "16,", "64)"]
    assert 1.0 <= float(printed[3]) <= 8.0


def test_readme_commands_exist_in_makefile():
    makefile = (README.parent / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", README.read_text(), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
