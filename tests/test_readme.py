"""The README and docs/ as a user meets them: the snippets run, the commands name real configs,
fields, flags, make targets and scripts, the paths exist, the figures they quote are the ones
experiments/RESULTS.md records, and the README stays short."""

import importlib
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "experiments" / "RESULTS.md"
# configuration.md is generated from the code's declarations and has a test of its own.
DOCS = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "configuration.md")
PAGES = [README, *DOCS, RESULTS]
README_LIMIT = 12_000  # characters

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
# Folder names the docs use for downloaded or generated checkpoints -> a fixture of that family.
FOLDERS = {
    "OLMoE-1B-7B-0924": FIXTURES / "olmoe",
    "Mixtral-8x7B-v0.1": FIXTURES / "mixtral",
    "bench_mixtral": FIXTURES / "mixtral",
}


def _blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def _commands(page: Path) -> list[list[str]]:
    """Every command of a page's bash blocks: continuation lines joined, comments, leading
    environment assignments and a trailing `&` dropped, split as the shell would."""
    commands = []
    for block in _blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#") or line.split()[0] in ("for", "done;"):
                continue
            argv = shlex.split(line)
            while argv and re.match(r"^[A-Z_]+=", argv[0]):
                argv = argv[1:]
            if ">" in argv:  # output redirection: not an argument
                argv = argv[: argv.index(">")]
            commands.append([a for a in argv if a != "&"])
    return commands


def _python_module(argv: list[str]) -> str | None:
    """The module of a `python -m MODULE ...` command (any python executable), else None."""
    if len(argv) > 2 and argv[0].endswith("python") and argv[1] == "-m":
        return argv[2]
    return None


def _as_main(argv: list[str]) -> list[str]:
    """`make train ARGS="..."` as the command it runs (the Makefile's), else argv unchanged."""
    if argv[:2] != ["make", "train"]:
        return argv
    extra = [shlex.split(a[len("ARGS=") :]) for a in argv[2:] if a.startswith("ARGS=")]
    default = ["--config=dynmoe_jax/configs/default.py", "--workdir=runs/default"]
    return ["python", "-m", "dynmoe_jax.main", *default, *(extra[0] if extra else [])]


def _all_commands() -> list[tuple[Path, list[str]]]:
    return [(page, _as_main(argv)) for page in PAGES for argv in _commands(page)]


def test_readme_is_at_most_12000_characters():
    size = len(README.read_text())
    assert 0 < size <= README_LIMIT, f"README.md has {size} characters (limit {README_LIMIT})"


def test_layer_snippet_runs(capsys):
    blocks = _blocks(README, "python")
    assert blocks, "README has no python snippet"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["y"].shape == (2, 16, 64)
    aux = namespace["aux"]
    expected = 1e-2 * float(aux["load_balance_loss"]) + 1e-4 * float(aux["dynamic_loss"])
    assert float(namespace["aux_loss"]) == pytest.approx(expected) and expected > 0
    printed = capsys.readouterr().out.split()
    assert printed[:3] == ["(2,", "16,", "64)"]
    # The printed mean is the per-token count the layer reports, within top-p's range.
    per_token = np.asarray(aux["token_experts"], np.float64)
    assert float(printed[3]) == pytest.approx(per_token.mean(), rel=1e-6)
    assert 1.0 <= float(printed[3]) <= 8.0


def _run_with_fixture(page: Path, marker: str) -> dict:
    """Runs the page's python block containing ``marker`` with its folder on a fixture."""
    block = next(b for b in _blocks(page, "python") if marker in b)
    line = next(f'folder = "{n}"' for n in FOLDERS if f'folder = "{n}"' in block)
    name = line.split('"')[1]
    namespace: dict = {}
    code = block.replace(line, f"folder = {str(FOLDERS[name])!r}")
    exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def test_bring_your_own_moe_snippet_runs_on_a_fixture(capsys):
    namespace = _run_with_fixture(README, "from_hf")
    tokens = namespace["tokens"]
    assert namespace["logits"].shape == (1, tokens.shape[1], 128)
    experts = namespace["layers"]["experts_per_token"]
    assert experts.shape == (2,) and all(1.0 <= float(e) <= 8.0 for e in experts)
    assert capsys.readouterr().out.startswith(f"(1, {tokens.shape[1]}, 128) ")


def test_decoding_snippet_runs_on_a_fixture_and_matches_recomputing_the_window(capsys):
    from dynmoe_jax.generate import generate_full_window

    page = ROOT / "docs" / "decoding.md"
    ns = _run_with_fixture(page, "generate(")
    out, prompts = ns["out"], ns["prompts"]
    assert [len(t) for t in out.tokens] == [16] * len(prompts)  # no stop token: full length
    assert all(1.0 <= e <= 8.0 for row in out.experts for e in row)
    assert out.tokens_per_s > 0
    # Greedy cached decoding of a batch equals recomputing the whole window, prompt by prompt.
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        assert generate_full_window(ns["graphdef"], ns["params"], prompt, 16)[0] == tokens
    assert capsys.readouterr().out.startswith("[16, 16] ")


def test_make_targets_exist_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    targets = set()
    for page in PAGES:
        targets |= set(re.findall(r"(?:^|`)make (\w+)", page.read_text(), flags=re.M))
    assert {"train", "test"} <= targets
    for target in targets:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_cli_commands_name_real_configs_fields_and_flags():
    from dynmoe_jax import main
    from dynmoe_jax.config import field_paths

    checked = {README: 0}
    for page, argv in _all_commands():
        if _python_module(argv) != "dynmoe_jax.main":
            continue
        args = argv[3:]
        config_file = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
        fields = field_paths(main.load_config_file(str(ROOT / config_file)))
        for arg in args:
            assert arg.startswith("--"), (page.name, arg)
            name = arg[2:].split("=", 1)[0]
            if name.startswith("config."):
                assert name[len("config.") :] in fields, (page.name, arg)
            else:
                assert name in main.FLAGS, (page.name, arg)
        checked[page] = checked.get(page, 0) + 1
    assert checked[README] >= 6 and sum(checked.values()) >= 20, checked


def test_experiment_commands_parse():
    parsed = 0
    for page, argv in _all_commands():
        module_name = _python_module(argv)
        if not (module_name or "").startswith("experiments."):
            continue
        path = ROOT / (module_name.replace(".", "/") + ".py")
        assert path.is_file(), (page.name, module_name)
        if "def parse_args" not in path.read_text():
            continue  # a script without flags of its own to check
        module = importlib.import_module(module_name)
        args = [str(FOLDERS.get(a, a)) for a in argv[3:]]
        module.parse_args(args)  # argparse exits on an unknown or invalid flag
        parsed += 1
    assert parsed >= 10


def _named_paths(page: Path) -> set[str]:
    """Repository paths a page names: in backticks, as script arguments, or as links."""
    text = page.read_text()
    names = set(re.findall(r"`((?:dynmoe_jax|experiments|tests|docs|notebooks)/[^`\s:]+)`", text))
    for argv in _commands(page):
        names |= {a.split("=")[-1] for a in argv if re.search(r"\.(py|sh|ipynb)$", a)}
    base = page.parent.relative_to(ROOT)
    for link in re.findall(r"\]\(([^)\s#]+)\)", text):
        names.add(str(base / link))
    expanded = set()
    for name in names:
        brace = re.search(r"\{([^}]*)\}", name)
        options = brace.group(1).split(",") if brace else [None]
        for option in options:
            expanded.add(name if option is None else name.replace(brace.group(0), option))
    return {n for n in expanded if not re.search(r"NAME|WORKDIR|\*|<", n)}


def test_paths_named_in_readme_docs_and_results_exist():
    checked = 0
    for page in PAGES:
        for name in _named_paths(page):
            assert (ROOT / name).exists(), (page.name, name)
            checked += 1
    assert checked >= 40


# A quoted figure: a duration, a decimal number, or a number with a unit of measurement.
FIGURE = re.compile(
    r"\d+ min \d+ s|\d[\d,]*\.\d+|\d+(?=x\b)|\d+(?= ?(?:%|ms\b|s\b|GB|GiB|MiB|tokens/s))"
)


def _prose(text: str) -> str:
    """The text without code blocks (fenced or indented), inline code and link targets."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    text = re.sub(r"`[^`]*`", " ", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def _recorded(figure: str, results: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d|\.\d)", results) is not None


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_figures_quoted_appear_in_results(page):
    results = RESULTS.read_text()
    figures = FIGURE.findall(_prose(page.read_text()))
    missing = sorted({f for f in figures if not _recorded(f, results)})
    assert missing == [], f"{page.name} quotes figures that experiments/RESULTS.md does not hold"


def test_the_figure_check_catches_a_figure_results_does_not_hold():
    results = "| time of the training steps | 9 min 14 s |\n| validation loss | 3.25 |"
    assert _recorded("9 min 14 s", results) and _recorded("3.25", results)
    assert not _recorded("9 min 15 s", results) and not _recorded("3.2", results)
    assert not _recorded("13.25", results) and not _recorded("25", results)
    quoted = FIGURE.findall(_prose(README.read_text()))
    assert len(quoted) >= 8  # the README quotes the main run, the test time and decoding
    assert any(re.fullmatch(r"\d+ min \d+ s", f) for f in quoted)  # durations are caught
    assert FIGURE.findall(_prose("at 1.37x, 66% and 229 s, `not 3.5` nor\n    4.2 GB")) == [
        "1.37",
        "66",
        "229",
    ]
