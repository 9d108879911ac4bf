"""Test set-up: 8 simulated CPU devices (set before JAX is imported anywhere), rank promotion
as an error, and the fixtures the tests share, each built once per session: the corpus cache,
the tiny config with dotted overrides and trained tiny runs."""

import atexit
import os
import shutil
import signal
import tempfile

# Only two real cores back the 8 devices, so a collective can wait long on its peers; raise
# XLA's rendezvous time-out so a slow step is not mistaken for a deadlock.
# The tests' programs are small and many, so compiling them costs more than running them:
# LLVM's cheapest optimisation level compiles them faster.
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_collective_call_terminate_timeout_seconds=600",
    "--xla_backend_optimization_level=0",
)
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing, *(f for f in _FLAGS if f not in _existing)])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests build the same small programs many times over, from fresh closures that JAX's
# in-memory caches treat as new. A compilation cache on disk, shared by the session, its
# pytest-xdist workers and the subprocesses they start, compiles each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dynmoe_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# The CPU decode kernel is built once per session too, into a folder removed at its end.
if "DYNMOE_JAX_KERNEL_DIR" not in os.environ:
    _kernels = tempfile.mkdtemp(prefix="dynmoe_jax_tests_kernels_")
    os.environ["DYNMOE_JAX_KERNEL_DIR"] = _kernels
    atexit.register(shutil.rmtree, _kernels, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import contextlib  # noqa: E402  (after the flags: JAX reads them when it is imported)
import gc  # noqa: E402
import io  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.runs import Trained, tiny_config  # noqa: E402

# An implicit broadcast between arrays of different ranks hides a wrong axis; every test runs
# with it as an error, so that library and tests spell their broadcasts out.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
def pytest_sessionfinish(session) -> None:
    """Frees JAX's programs and arrays before a pytest-xdist worker reports that it has
    finished, then has the worker ignore SIGINT. Once every worker has reported, the controller
    asks them to stop, and execnet sends one still running 5 s later a SIGINT; a worker still
    freeing them got it inside JAX's garbage-collection callback, which printed a
    KeyboardInterrupt traceback at the end of a passing `make test`."""
    jax.clear_caches()
    gc.collect()
    if hasattr(session.config, "workerinput"):  # every result of this worker is reported
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The tiny config's corpus cache (the pydoc build, its SentencePiece model and packed
    tokens), built once for the whole session."""
    from dynmoe_jax import config as config_lib
    from dynmoe_jax import data as data_lib

    folder = str(tmp_path_factory.mktemp("data"))
    data_lib.from_config(config_lib.resolve(tiny_config(data_dir=folder)).data)
    return folder


@pytest.fixture(scope="session")
def tiny_run(data_dir):
    """``tiny_run(**{"moe.dispatch": "index"})``: the typed RunConfig of configs/tiny.py with
    dotted overrides, reading the session's corpus cache."""
    from dynmoe_jax import config as config_lib

    def make(**overrides):
        return config_lib.resolve(tiny_config(**{"data_dir": data_dir, **overrides}))

    return make


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_run):
    """``trained(dispatch)``: the tiny config's run in that dispatch mode, trained once per
    session. Tests only read it; one that changes its files works on a copy."""
    from dynmoe_jax import train

    runs = {}

    def get(dispatch: str) -> Trained:
        if dispatch not in runs:
            config = tiny_run(**{"moe.dispatch": dispatch})
            workdir = tmp_path_factory.mktemp(f"trained_{dispatch}")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                final = train.train_and_evaluate(config, workdir)
            runs[dispatch] = Trained(config, workdir, final, printed.getvalue())
        return runs[dispatch]

    return get
