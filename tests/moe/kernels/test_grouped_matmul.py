"""grouped_matmul against a per-expert float64 loop, values and gradients, on each backend, and
the choice of backend by platform."""

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax.moe.kernels import grouped_matmul as gm

ROWS = 32
GROUP_SIZES = {
    "empty_expert": [8, 0, 4, 12],  # expert 1 has no rows; 8 rows past the groups
    "one_expert_every_row": [0, 32, 0, 0],  # the full buffer, one group
    "one_expert_rows_past": [0, 0, 20, 0],  # one group, then 12 rows past it
    "no_rows": [0, 0, 0, 0],  # every row past the groups
}
# float32 against float64; bfloat16 keeps 8 bits of mantissa, and its rounding of the inputs
# alone moves a 5-term dot product by a few units in the second digit.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 5e-2}


def _backend(name):
    if name == "tokamax":
        pytest.importorskip("tokamax")
    return name


def _inputs(sizes, dtype=jnp.float32, rows=ROWS, x_dim=5, y_dim=6):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (rows, x_dim)).astype(dtype)
    w = jax.random.normal(kw, (len(sizes), x_dim, y_dim)).astype(dtype)
    cotangent = jax.random.normal(kc, (rows, y_dim)).astype(dtype)
    return x, w, jnp.asarray(sizes, jnp.int32), cotangent


def _loop_reference(x, w, sizes, cotangent):
    """(y, dx, dw) of sum(y * cotangent) by a per-expert float64 loop."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, cotangent))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        y[rows] = x[rows] @ w[e]
        dx[rows] = ct[rows] @ w[e].T
        dw[e] = x[rows].T @ ct[rows]
        start += n
    return y, dx, dw


def _value_and_grads(backend, x, w, sizes, ct):
    def loss(x, w):
        y = gm.grouped_matmul(x, w, sizes, backend=backend)
        return jnp.sum((y * ct).astype(jnp.float32)), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return y, dx, dw


def _assert_matches_reference(got, x, w, sizes, ct, tol):
    for a, want in zip(got, _loop_reference(x, w, sizes, ct), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), want, rtol=tol, atol=tol)
    y, dx, dw = (np.asarray(a, np.float64) for a in got)
    assert not np.any(y[sum(sizes) :])  # rows past the groups are zeros
    assert not np.any(dx[sum(sizes) :])  # and get no gradient
    assert not np.any(dw[np.asarray(sizes) == 0])  # an expert with no rows gets none


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(GROUP_SIZES))
@pytest.mark.parametrize("backend", ["ragged_dot", "tokamax"])
def test_backend_matches_loop_reference_with_gradients(backend, case, dtype):
    # On CPU the tokamax backend runs tokamax's "xla" implementation.
    sizes = GROUP_SIZES[case]
    x, w, group_sizes, ct = _inputs(sizes, dtype)
    got = _value_and_grads(_backend(backend), x, w, group_sizes, ct)
    assert all(a.dtype == dtype for a in got)
    _assert_matches_reference(got, x, w, sizes, ct, TOLERANCE[dtype])


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_tokamax_falls_through_the_accelerator_kernels_to_xla_off_the_accelerator(
    platform, monkeypatch
):
    # The GPU and TPU orders, run on CPU: every kernel before "xla" refuses the CPU with
    # NotImplementedError, which is what lets tokamax try the next one.
    pytest.importorskip("tokamax")
    monkeypatch.setattr(gm, "tokamax_implementations", lambda: gm._TOKAMAX_ORDER[platform])
    sizes = GROUP_SIZES["empty_expert"]
    x, w, group_sizes, ct = _inputs(sizes)
    got = _value_and_grads("tokamax", x, w, group_sizes, ct)
    _assert_matches_reference(got, x, w, sizes, ct, TOLERANCE[jnp.float32])


def _leaves_nan_past_the_groups(lhs, rhs, *, group_sizes, ragged_dot_dimension_numbers,
                                precision, preferred_element_type, activation):  # fmt: skip
    """A tokamax implementation that leaves NaN where a Pallas kernel leaves unwritten rows."""
    del activation
    out = jax.lax.ragged_dot_general(
        lhs, rhs, group_sizes, ragged_dot_dimension_numbers, precision,
        preferred_element_type,
    )  # fmt: skip
    if not ragged_dot_dimension_numbers.rhs_group_dimensions:  # dW: one result per group
        return out
    in_use = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(in_use[:, None], out, jnp.nan)


def test_tokamax_rows_past_the_groups_are_zeros_whatever_the_kernel_leaves_there(monkeypatch):
    pytest.importorskip("tokamax")
    monkeypatch.setattr(gm, "tokamax_implementations", lambda: (_leaves_nan_past_the_groups,))
    sizes = GROUP_SIZES["empty_expert"]
    x, w, group_sizes, ct = _inputs(sizes)
    got = _value_and_grads("tokamax", x, w, group_sizes, ct)
    _assert_matches_reference(got, x, w, sizes, ct, TOLERANCE[jnp.float32])


def test_blocks_is_refused_as_a_matmul_backend():
    x, w, sizes, _ = _inputs(GROUP_SIZES["empty_expert"])
    with pytest.raises(ValueError, match="'blocks' is grouped_swiglu's fused loop"):
        gm.grouped_matmul(x, w, sizes, backend="blocks")


@pytest.fixture
def fresh_tokamax_check():
    check = gm.tokamax_available  # the cached function, whatever a test patches in its place
    check.cache_clear()
    yield
    check.cache_clear()


def test_default_backend_by_platform(monkeypatch, fresh_tokamax_check):
    monkeypatch.setattr(gm, "_gpu_capability", lambda: 9.0)
    monkeypatch.setattr(gm, "tokamax_available", lambda: True)
    assert gm.default_backend("cpu") is gm.Backend.BLOCKS
    assert gm.default_backend("tpu") is gm.Backend.TOKAMAX
    assert gm.default_backend("gpu") is gm.Backend.TOKAMAX
    monkeypatch.setattr(gm, "tokamax_available", lambda: False)
    assert gm.default_backend("tpu") is gm.Backend.RAGGED_DOT
    assert gm.default_backend("gpu") is gm.Backend.RAGGED_DOT
    monkeypatch.setattr(gm, "_gpu_capability", lambda: 7.5)
    assert gm.default_backend("gpu") is gm.Backend.BLOCKS


def test_tokamax_order_by_platform():
    assert gm.tokamax_implementations("gpu") == ("mosaic", "triton", "xla")
    assert gm.tokamax_implementations("tpu") == ("mosaic", "xla")
    assert gm.tokamax_implementations("cpu") == ("xla",)


def test_missing_tokamax_is_said_once_and_falls_back_to_ragged_dot(
    monkeypatch, fresh_tokamax_check
):
    monkeypatch.setitem(sys.modules, "tokamax", None)  # makes `import tokamax` fail
    with pytest.warns(UserWarning, match="tokamax is not installed.*jax.lax.ragged_dot"):
        assert gm.default_backend("tpu") is gm.Backend.RAGGED_DOT
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second check says nothing
        assert gm.default_backend("tpu") is gm.Backend.RAGGED_DOT
