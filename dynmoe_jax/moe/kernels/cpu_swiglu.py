"""One expert's SwiGLU at decode sizes on CPU: the project's own kernel, an XLA FFI custom call.

At a few tokens per step, XLA's forms run every row of the call through each expert some row
selected, and none of them reads bfloat16 weights faster than float32 (docs/decoding.md, "The
CPU kernel"). ``cpu/expert_swiglu.cc`` multiplies only the rows that selected the expert,
reads float32 or bfloat16 weights stored [out, in] as they lie, sums in float32 and splits
output rows over XLA's intra-op threads.

The source ships with the package and is compiled on first use with the system C++ compiler
(``$CXX``, else ``c++``) for this machine's instruction set, into a cache folder
(``$DYNMOE_JAX_KERNEL_DIR``, else ``$XDG_CACHE_HOME/dynmoe_jax/kernels`` or
``~/.cache/dynmoe_jax/kernels``), one file per source, compiler, jaxlib and CPU. Where no
compiler is found or the build fails, ``available()`` is False, one warning says why, and the
decode path keeps XLA's forms.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("cpu") / "expert_swiglu.cc"
TARGET = "dynmoe_expert_swiglu"
_SYMBOL = "DynmoeExpertSwiglu"
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def kernel_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("DYNMOE_JAX_KERNEL_DIR"):
        return Path(os.environ["DYNMOE_JAX_KERNEL_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dynmoe_jax" / "kernels"


def available() -> bool:
    """Whether the kernel is built and registered with XLA (building it on first call)."""
    return _load() is not None


def expert_swiglu(x_MD: jax.Array, take_M: jax.Array, w_gate, w_up, w_down) -> jax.Array:
    """SwiGLU of the rows of x [M, D] with ``take_M``, zeros for the others, in x's dtype.

    Weights stored [out, in] (gate and up [F, D], down [D, F]), float32 or bfloat16, all three
    alike. CPU only, and only where ``available()``.
    """
    _check(x_MD, take_M, w_gate, w_up, w_down)
    if not available():
        raise RuntimeError("the CPU decode kernel is not available (see the warning)")
    out = jax.ShapeDtypeStruct(x_MD.shape, jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out)
    y_MD = call(x_MD.astype(jnp.float32), take_M.astype(jnp.bool_), w_gate, w_up, w_down)
    return y_MD.astype(x_MD.dtype)


def _check(x_MD, take_M, w_gate, w_up, w_down) -> None:
    """Shapes and dtypes, checked before anything is compiled."""
    if x_MD.ndim != 2:
        raise ValueError(f"x_MD must be [M, D], got shape {x_MD.shape}")
    (m, d), f = x_MD.shape, w_up.shape[0]
    if take_M.shape != (m,):
        raise ValueError(f"take_M must be [{m}] (one flag per row of x), got {take_M.shape}")
    want = {"w_gate": (f, d), "w_up": (f, d), "w_down": (d, f)}
    for name, w in zip(want, (w_gate, w_up, w_down), strict=True):
        if w.shape != want[name]:
            raise ValueError(f"{name} must be {want[name]} ([out, in]), got {w.shape}")
        if w.dtype not in KERNEL_DTYPES or w.dtype != w_gate.dtype:
            raise ValueError(f"{name} is {w.dtype}: gate, up and down must all be float32 or "
                             "all bfloat16")  # fmt: skip


@functools.cache
def _load() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as err:
        warnings.warn(
            f"dynmoe_jax: the CPU decode kernel is not available ({_reason(err)}); "
            "decoding uses XLA's forms",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    capsule = jax.ffi.pycapsule(getattr(library, _SYMBOL))
    jax.ffi.register_ffi_target(TARGET, capsule, platform="cpu")
    return library


def _build() -> Path:
    """The shared library for this source, compiler, jaxlib and CPU, compiled if missing."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise FileNotFoundError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True)
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.stdout, " ".join(_FLAGS),
                 importlib.metadata.version("jaxlib"), _cpu_signature()):  # fmt: skip
        key.update(part if isinstance(part, bytes) else part.encode())
    folder = kernel_dir()
    path = folder / f"expert_swiglu-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load half a
    # file.
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        subprocess.run(command, capture_output=True, text=True, check=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and instruction flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _reason(err: Exception) -> str:
    if isinstance(err, subprocess.CalledProcessError):
        errors = [line for line in (err.stderr or "").splitlines() if "error" in line]
        return "the build failed: " + (errors[0].strip() if errors else f"exit {err.returncode}")
    return str(err)
