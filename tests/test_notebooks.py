"""The notebooks execute from top to bottom on CPU, in this venv's Python, with no stored outputs.

Each notebook has a cell tagged ``parameters``; like papermill, the test adds a cell after it that
sets the workdir to a temporary directory and shortens training, so both run in about 2 minutes.
"""

import builtins
import functools
import json
import sys
import types
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "dynmoe-test-venv"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel started with this interpreter (the venv's), whatever kernelspecs are installed."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dynmoe test venv",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _with_parameters(nb, parameters: dict) -> None:
    """Inserts a cell assigning ``parameters`` right after the cell tagged 'parameters'."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))


def _execute(name: str, parameters: dict, tmp_path: Path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    _with_parameters(nb, parameters)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    # A client given its own kernel manager leaves the kernel running by default; its sockets
    # were then collected after the event loop had closed ("Event loop is closed").
    client.execute(cleanup_kc=True)
    return nb


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "routing_analysis.ipynb"])
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert "github.com" not in json.dumps(nb) and "colab.research" not in json.dumps(nb)


def _install_cell(name: str) -> str:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    return next(c for c in nb.cells if c.cell_type == "code").source


def _exec_cell(source: str, **modules) -> None:
    """Runs a cell's source with the modules named in ``modules`` (by their top-level name)
    standing in for those the cell imports: the cell's own namespace gets an import function
    of its own, and nothing of this process is patched."""

    def cell_import(name, *args, **kwargs):
        top = name.split(".")[0]
        return modules[top] if top in modules else builtins.__import__(name, *args, **kwargs)

    exec(source, {"__builtins__": {**vars(builtins), "__import__": cell_import}})


@pytest.mark.parametrize("name", ["quickstart.ipynb", "routing_analysis.ipynb"])
def test_install_cell_installs_from_the_clone_else_from_what_the_user_gave(
    name, tmp_path, monkeypatch
):
    """Where the package is missing: pip on the clone the notebook is opened in, else on
    REPO_URL or an uploaded wheel, else one clear error. pip is replaced by a recorder:
    nothing touches the network."""
    source = _install_cell(name)
    assert source.count('REPO_URL = ""') == 1 and "python -m build" not in source
    calls = []
    # The cell sees a Python without dynmoe_jax whose pip only records its command line.
    missing = types.SimpleNamespace(
        util=types.SimpleNamespace(find_spec=lambda name: None), invalidate_caches=lambda: None
    )
    recorder = types.SimpleNamespace(check_call=lambda argv: calls.append(argv))
    run = functools.partial(_exec_cell, importlib=missing, subprocess=recorder)
    clone = tmp_path / "clone"
    (clone / "notebooks").mkdir(parents=True)
    (clone / "pyproject.toml").write_text((NOTEBOOKS.parent / "pyproject.toml").read_text())
    monkeypatch.chdir(clone / "notebooks")
    run(source)
    assert calls[-1][-1] == str(clone)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(RuntimeError, match="not in a clone of it: .*set REPO_URL") as err:
        run(source)
    assert "\n" not in str(err.value) and len(calls) == 1
    (elsewhere / "dynmoe_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
    run(source)
    assert calls[-1][-1] == "dynmoe_jax-0.1.0-py3-none-any.whl"
    run(source.replace('REPO_URL = ""', 'REPO_URL = "git+https://example.org/x.git"'))
    assert calls[-1][-1] == "git+https://example.org/x.git"


def test_install_cell_does_nothing_where_the_package_is_installed():
    pip = types.SimpleNamespace(check_call=lambda argv: pytest.fail("pip was called"))
    _exec_cell(_install_cell("quickstart.ipynb"), subprocess=pip)


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    nb = _execute("quickstart.ipynb", {"STEPS": 60, "WORKDIR": str(tmp_path / "run")}, tmp_path)
    assert _text(nb.cells[-1]).strip() == sys.executable
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert _images(nb) == 2  # training curves and the experts heatmap
    assert any("mean experts per token" in _text(c) for c in nb.cells)


@pytest.mark.slow
def test_routing_analysis_trains_when_the_workdir_has_no_checkpoint(tmp_path):
    parameters = {
        "WORKDIR": str(tmp_path / "missing"),
        "FALLBACK_WORKDIR": str(tmp_path / "small"),
        "FALLBACK_STEPS": 16,
        "EVAL_BATCHES": 4,
    }
    nb = _execute("routing_analysis.ipynb", parameters, tmp_path)
    assert _text(nb.cells[-1]).strip() == sys.executable
    assert (tmp_path / "small" / "checkpoints").is_dir()
    assert _images(nb) >= 4
    assert any("Spearman" in _text(c) for c in nb.cells)
