"""How the suite itself runs under pytest: what it leaves in the system's temporary folder
(nothing after a passing session, pyproject's tmp_path_retention_policy, so that the memory
tests' gigabyte does not pile up run after run; a failing test keeps its folder to look at),
and the end of a pytest-xdist run (no KeyboardInterrupt traceback, conftest's
pytest_sessionfinish)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUITE = """
import pytest

@pytest.fixture(scope="session")
def corpus(tmp_path_factory):  # like the suite's data_dir and trained runs
    path = tmp_path_factory.mktemp("corpus") / "tokens"
    path.write_bytes(b"x" * 4096)
    return path

def test_passes(tmp_path, corpus):
    (tmp_path / "big").write_bytes(corpus.read_bytes())

def test_fails(tmp_path):
    (tmp_path / "kept").write_bytes(b"x")
    assert {fail}
"""


def _run_pytest(folder: Path, fail: bool, *options: str) -> Path:
    """Runs a small suite under this repository's pytest options; returns pytest's temp root."""
    suite = folder / "suite"
    suite.mkdir()
    (suite / "test_suite.py").write_text(SUITE.format(fail=not fail))
    temp = folder / "temp"
    temp.mkdir()  # pytest makes its folder inside, not this one
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(temp)}
    args = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
            str(suite), "-p", "no:cacheprovider", *options, str(suite)]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == (1 if fail else 0), proc.stdout[-2000:]
    return temp


def test_a_passing_session_leaves_no_file_in_the_temp_folder(tmp_path):
    temp = _run_pytest(tmp_path, False, "-n", "2")  # as make test runs it
    assert [p for p in temp.rglob("*") if p.is_file()] == []


def test_a_failing_session_keeps_the_failed_tests_folder_not_the_passed_ones(tmp_path):
    temp = _run_pytest(tmp_path, True, "-p", "no:xdist")
    kept = sorted(p.relative_to(temp).parts[-2:] for p in temp.rglob("*") if p.is_file())
    assert kept == [("corpus0", "tokens"), ("test_fails0", "kept")]  # a session's folders stay


# A worker that is still collecting garbage after it has reported its results, as one holding
# many JAX programs and arrays is at the end of a long session under load.
SLOW_TEARDOWN = """
import gc
import time


def _slow(phase, info):
    if phase == "start":
        time.sleep(0.5)


def pytest_unconfigure(config):
    if hasattr(config, "workerinput"):
        gc.callbacks.append(_slow)
        deadline = time.monotonic() + 6.5  # execnet interrupts a worker busy after 5 s
        while time.monotonic() < deadline:
            gc.collect()
"""


def test_an_xdist_worker_slow_to_exit_ends_the_run_without_a_traceback(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(SLOW_TEARDOWN)
    (suite / "test_suite.py").write_text("def test_passes():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the suite's conftest, as a plugin
    args = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
            "-n", "1", "--rootdir", str(suite), str(suite)]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "KeyboardInterrupt" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
