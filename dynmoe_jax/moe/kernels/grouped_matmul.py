"""One grouped matmul, ``y[r] = x[r] @ w[expert of row r]``, with a backend per platform.

Rows come sorted by expert: ``group_sizes_E[e]`` consecutive rows belong to expert e, and rows
past ``sum(group_sizes_E)`` come out as zeros. The MoE layer calls ``grouped_swiglu``, which
on CPU runs its own fused loop of big chunks and elsewhere composes three calls of this
function. Backends (``Backend``; ``None`` picks by platform, ``default_backend``):

* ``blocks`` (CPU, and GPUs of compute capability below 8): ``grouped_swiglu``'s fused chunk
  loop. It is a SwiGLU, not a single matmul, so this function refuses it.
* ``tokamax`` (GPU of compute capability >= 8, and TPU, when tokamax is installed): tokamax's
  ``ragged_dot``, which tries its kernels in the order of ``tokamax_implementations``: Mosaic
  GPU (sm90/sm100), then Pallas-Triton, then XLA on a GPU; Mosaic TPU, then XLA on a TPU. The
  backward is this module's own ``custom_vjp`` of two more ragged dots (dX with w transposed,
  dW with the rows contracted) that walk the same order, because a kernel can support the
  forward and not a backward form, and tokamax falls back only where it is called. Only this
  module imports tokamax, and only on GPU/TPU or when this backend runs: CPU installs do not
  need it.
* ``ragged_dot``: ``jax.lax.ragged_dot``, lowered by XLA (the fallback where tokamax is not
  installed). XLA's GPU lowering expands it over every expert unless the process-wide flag
  ``jax_ragged_dot_use_gpu_pallas_triton_lowering`` is set, which a library must not flip, so
  this module leaves it alone (and JAX 0.10.2, the tested pin, lacks the module it imports).

Both matmul backends zero the rows past the groups themselves: tokamax's Pallas-Triton kernel
stores only the rows of some group, so the rest of its output is whatever the buffer held.
Masking the input too keeps those rows out of dX in the backward.

Axis letters (the package's glossary): R rows (sorted by expert), E experts, X input width, Y
output width.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from dynmoe_jax.moe.config import Backend

# tokamax's kernels in the order tried; the first that does not raise NotImplementedError runs
# (Mosaic TPU, for one, refuses widths below 128, and Mosaic GPU anything but sm90/sm100).
_TOKAMAX_ORDER = {
    "gpu": ("mosaic", "triton", "xla"),
    "tpu": ("mosaic", "xla"),
}

# jax.lax.ragged_dot_general's forms of the backward: dX = dY @ w[e]^T (rows ragged, w's
# output axis contracted) and dW[e] = X^T @ dY over each group's rows (rows ragged and
# contracted, one [X, Y] result per group).
_DX_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
_DW_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def default_backend(platform: str | None = None) -> Backend:
    """``tokamax`` on TPUs and on GPUs of compute capability >= 8 (``ragged_dot`` there when
    tokamax is not installed); ``blocks`` elsewhere, CPU included."""
    platform = platform or jax.default_backend()
    if platform == "tpu" or (platform == "gpu" and _gpu_capability() >= 8.0):
        return Backend.TOKAMAX if tokamax_available() else Backend.RAGGED_DOT
    return Backend.BLOCKS


def _gpu_capability() -> float:
    return float(getattr(jax.devices()[0], "compute_capability", "0"))


@functools.cache
def tokamax_available() -> bool:
    """Whether tokamax imports; says once per process when it does not."""
    try:
        import tokamax  # noqa: F401
    except ImportError as err:
        warnings.warn(
            f"tokamax is not installed ({err}): grouped matmuls fall back to "
            "jax.lax.ragged_dot (pip install 'dynmoe_jax[gpu]' or '[tpu]' installs it)",
            stacklevel=2,
        )
        return False
    return True


def tokamax_implementations(platform: str | None = None) -> tuple[str, ...]:
    """tokamax ``implementation`` order for ``platform``: its kernels first, XLA last."""
    return _TOKAMAX_ORDER.get(platform or jax.default_backend(), ("xla",))


def grouped_matmul(
    x_RX: jax.Array,
    w_EXY: jax.Array,
    group_sizes_E: jax.Array,
    *,
    backend: Backend | str | None = None,
) -> jax.Array:
    """``x_RX`` [R, X] rows sorted by expert, ``w_EXY`` [E, X, Y] -> [R, Y] in x's dtype.

    ``None`` takes the platform's backend, and ``ragged_dot`` where that is ``blocks``.
    """
    backend = _matmul_backend(backend)
    group_sizes_E = group_sizes_E.astype(jnp.int32)
    x_RX = zero_past_groups(x_RX, group_sizes_E)
    w_EXY = w_EXY.astype(x_RX.dtype)
    if backend is Backend.TOKAMAX:
        y_RY = _tokamax_matmul(tokamax_implementations(), x_RX, w_EXY, group_sizes_E)
    else:
        y_RY = jax.lax.ragged_dot(x_RX, w_EXY, group_sizes_E)
    return zero_past_groups(y_RY, group_sizes_E)


def _matmul_backend(backend: Backend | str | None) -> Backend:
    if backend is None:
        backend = default_backend()
        return Backend.RAGGED_DOT if backend is Backend.BLOCKS else backend
    backend = Backend(backend)
    if backend is Backend.BLOCKS:
        raise ValueError(
            "grouped_matmul: 'blocks' is grouped_swiglu's fused loop, not a matmul backend; "
            "use 'ragged_dot' or 'tokamax'"
        )
    return backend


def zero_past_groups(a_RX: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """``a_RX`` with the rows past ``sum(group_sizes_E)`` set to zero."""
    in_use_R = jnp.arange(a_RX.shape[0]) < jnp.sum(group_sizes_E)
    return jnp.where(in_use_R[:, None], a_RX, jnp.zeros((), a_RX.dtype))


def _tokamax():
    """tokamax, imported here because only GPU/TPU installs carry it."""
    import tokamax
    from absl import flags

    # tokamax reads its options as absl flags and, where no one has parsed them yet, parses
    # the whole sys.argv, which fails on any argument absl does not know (pytest's, argparse's)
    # and on the validators of other modules' flags (a required flag of a command line that
    # was imported, not run). Marking the flags parsed lets tokamax read its defaults and
    # leaves sys.argv to the program that owns it.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def _tokamax_dot(order, lhs, rhs, group_sizes_E, dims, out_dtype):
    return _tokamax().ragged_dot_general(
        lhs, rhs, group_sizes_E, dims, preferred_element_type=out_dtype, implementation=order
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tokamax_matmul(order, x_RX, w_EXY, group_sizes_E):
    return _tokamax().ragged_dot(x_RX, w_EXY, group_sizes_E, implementation=order)


def _tokamax_matmul_fwd(order, x_RX, w_EXY, group_sizes_E):
    return _tokamax_matmul(order, x_RX, w_EXY, group_sizes_E), (x_RX, w_EXY, group_sizes_E)


def _tokamax_matmul_bwd(order, res, dy_RY):
    x_RX, w_EXY, group_sizes_E = res
    dy_RY = dy_RY.astype(x_RX.dtype)
    dx_RX = _tokamax_dot(order, dy_RY, w_EXY, group_sizes_E, _DX_DIMS, x_RX.dtype)
    dw_EXY = _tokamax_dot(order, x_RX, dy_RY, group_sizes_E, _DW_DIMS, w_EXY.dtype)
    return dx_RX, dw_EXY, None


_tokamax_matmul.defvjp(_tokamax_matmul_fwd, _tokamax_matmul_bwd)
