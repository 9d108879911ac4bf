"""bfloat16 mixed precision: float32 parameters and optimizer state, bf16 activations and
matmuls, a float32 router and losses; a bf16 run learns and tracks float32 step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import train
from dynmoe_jax.configs import tiny

V, STEPS = 64, 20


def _config(dtype: str, scan: bool = False):
    c = tiny.get_config()
    c.model.dtype = dtype
    c.model.scan_layers = scan
    c.num_train_steps, c.warmup_steps = STEPS, 2
    return config_lib.resolve(c)


def _batch(step: int, batch: int = 8, length: int = 32) -> dict[str, np.ndarray]:
    """Sequences counting up mod V from a random start by a stride of 1 or 2: learnable."""
    rng = np.random.default_rng(step)
    start = rng.integers(0, V, (batch, 1))
    stride = rng.integers(1, 3, (batch, 1))
    tokens = (start + stride * np.arange(length + 1)) % V
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": np.ones((batch, length), np.float32),
    }


def _run(dtype: str, scan: bool = False):
    task = train.build_task(_config(dtype, scan), V)
    state = train.init_state(task)
    step_fn = train.make_train_step(task)
    losses = []
    for step in range(STEPS):
        state, metrics = step_fn(state, train.put_batch(task, _batch(step)))
        assert metrics["loss"].dtype == jnp.float32
        losses.append(float(metrics["lm_loss"]))
    return task, state, np.asarray(losses)


@pytest.fixture(scope="module")
def runs():
    return {dtype: _run(dtype) for dtype in ("float32", "bfloat16")}


def test_bf16_loss_falls_and_tracks_float32(runs):
    _, _, f32 = runs["float32"]
    _, _, bf16 = runs["bfloat16"]
    assert np.all(np.isfinite(bf16))
    assert bf16[-5:].mean() < bf16[0] - 1.0  # it learns (from ln 64 = 4.16)
    # Same init, same batches: every step's loss within 3% of float32's.
    np.testing.assert_allclose(bf16, f32, rtol=0.03)
    assert np.abs(bf16 - f32).max() > 0  # it did run in another precision


def test_bf16_run_keeps_parameters_and_optimizer_state_in_float32(runs):
    _, state, _ = runs["bfloat16"]
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]  # fmt: skip
    assert len(floats) > 2 * len(jax.tree.leaves(state.params)) - 1
    assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
def test_bf16_matmuls_run_in_bf16_except_the_router(scan):
    task = train.build_task(_config("bfloat16", scan), V)
    params = train.init_state(task).params
    num_experts, d = task.config.moe.num_experts, task.config.model.d_model

    def loss(p):
        return train.forward(task, p, _batch(0))[0]

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    f32 = [tuple(v.aval.shape for v in e.invars) for e in dots
           if any(v.aval.dtype == jnp.float32 for v in e.invars)]  # fmt: skip
    assert len(dots) > len(f32) > 0
    # Every float32 matmul is the router's: [M, D] x [D, E] forward, and its two gradients.
    for shapes in f32:
        assert (d, num_experts) in shapes or any(s[-1] == num_experts for s in shapes), shapes


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _subs(eqn):
            yield from _equations(sub)


def _subs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                yield inner


def test_float32_model_runs_in_float32():
    task = train.build_task(_config("float32"), V)
    model = nnx.merge(task.graphdef, train.init_state(task).params)
    logits, layer = model(_batch(0)["inputs"])
    assert logits.dtype == jnp.float32 and layer["load_balance_loss"].dtype == jnp.float32
