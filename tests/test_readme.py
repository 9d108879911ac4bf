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


FIXTURE = README.parent / "tests" / "fixtures" / "hf" / "olmoe"


def _shell_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined, comments
    dropped, split as the shell would."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def test_readme_cli_commands_name_real_configs_and_fields():
    from dynmoe_jax import main
    from dynmoe_jax.config import field_paths

    checked = 0
    for argv in _shell_commands():
        if argv[:3] != ["python", "-m", "dynmoe_jax.main"]:
            continue
        args = [a for a in argv[3:] if a != "[--config.FIELD=VALUE" and a != "...]"]
        config_file = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
        fields = field_paths(main.load_config_file(str(README.parent / config_file)))
        for arg in args:
            if arg.startswith("--config."):
                assert arg[len("--config.") :].split("=")[0] in fields, arg
        checked += 1
    assert checked >= 6  # the training commands and the three from a pretrained checkpoint


def test_readme_experiment_commands_parse():
    import importlib

    checked = 0
    for argv in _shell_commands():
        if argv[:2] == ["python", "-m"] and argv[2].startswith("experiments."):
            module = importlib.import_module(argv[2])
            module.parse_args(argv[3:])  # argparse exits on an unknown flag
            checked += 1
    assert checked >= 2


def test_bring_your_own_moe_snippet_runs_on_a_fixture(capsys):
    block = next(b for b in _python_blocks() if "from_hf" in b)
    line = 'folder = "OLMoE-1B-7B-0924"'
    assert line in block
    namespace: dict = {}
    code = block.replace(line, f"folder = {str(FIXTURE)!r}")
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    tokens = namespace["tokens"]
    assert namespace["logits"].shape == (1, tokens.shape[1], 128)
    experts = namespace["layers"]["experts_per_token"]
    assert experts.shape == (2,) and all(1.0 <= float(e) <= 8.0 for e in experts)
    assert capsys.readouterr().out.startswith(f"(1, {tokens.shape[1]}, 128) ")
