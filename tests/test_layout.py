"""The package's layout: no import cycle between its modules, no module grows past about 400
lines, and the tests mirror the modules (tests/moe/test_layer.py for dynmoe_jax/moe/layer.py).
Every import counts: those inside functions and those under ``TYPE_CHECKING`` are a dependency
all the same (a cycle hidden in either is still a cycle)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dynmoe_jax"
MAX_LINES = 410


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere: at the top, inside functions or
    under ``if TYPE_CHECKING:``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
    return {m for m in out if m in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, set(modules)) for name, path in modules.items()}
    # A package's __init__ re-exports its submodules: it is their dependant, not a peer.
    return {n: {m for m in deps if m != n and not m.startswith(n + ".")} | (
        {m for m in deps if m.startswith(n + ".")} if path.name == "__init__.py" else set())
        for (n, deps), path in zip(graph.items(), modules.values(), strict=True)}  # fmt: skip


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 40 and graph["dynmoe_jax.train.loop"] >= {"dynmoe_jax.train.task"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_and_under_type_checking_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from dynmoe_jax import sharding\n"
        "if TYPE_CHECKING:\n"
        "    from dynmoe_jax.train.task import Task\n"
        "def f():\n"
        "    import dynmoe_jax.config\n"
        "    from dynmoe_jax.pretrained import load\n"
    )
    known = {"dynmoe_jax.sharding", "dynmoe_jax.train.task", "dynmoe_jax.config",
             "dynmoe_jax.pretrained.load", "dynmoe_jax.plan"}  # fmt: skip
    assert _imports(source, known) == known - {"dynmoe_jax.plan"}


def test_no_module_grows_past_about_400_lines():
    sizes = {name: len(p.read_text().splitlines()) for name, p in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


TESTS = PACKAGE.parent / "tests"
# Tests about the repository rather than one module of the package.
REPOSITORY_TESTS = {
    "test_layout.py",
    "test_readme.py",
    "test_notebooks.py",
    "test_pytest_setup.py",
    "test_axis_letters.py",
}


def _without_test_file(path: Path) -> bool:
    """Modules left without a test file of their own: a package's __init__.py only re-exports
    (its names are tested where they are defined), a __main__.py only calls the main() of the
    module that is tested, and configs/ hold the configs that tests/test_config.py resolves and
    the end-to-end tests run."""
    thin = ("__init__.py", "__main__.py")
    return path.name in thin or path.relative_to(PACKAGE).parts[0] == "configs"


def _test_file(module: Path) -> Path:
    """dynmoe_jax/moe/layer.py -> tests/moe/test_layer.py."""
    relative = module.relative_to(PACKAGE)
    return TESTS.joinpath(*relative.parts[:-1], f"test_{relative.name}")


def test_every_module_has_its_test_file():
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if not _without_test_file(p)]
    assert len(modules) > 40
    missing = [str(_test_file(p).relative_to(TESTS.parent)) for p in modules
               if not _test_file(p).is_file()]  # fmt: skip
    assert missing == []


def test_every_test_file_mirrors_a_module_or_is_about_the_repository():
    stray = []
    for path in sorted(TESTS.rglob("test_*.py")):
        relative = path.relative_to(TESTS)
        if relative.parts[0] in ("experiments", "fixtures") or str(relative) in REPOSITORY_TESTS:
            continue
        module = PACKAGE.joinpath(*relative.parts[:-1], relative.name[len("test_") :])
        if not module.is_file():
            stray.append(str(relative))
    assert stray == []
    # Every folder of tests is a package, so that test files of the same name do not clash.
    folders = {p.parent for p in TESTS.rglob("test_*.py")}
    assert [str(f) for f in sorted(folders) if not (f / "__init__.py").is_file()] == []
