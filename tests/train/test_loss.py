"""The training loss: the cross-entropy against float64, the weighted aux losses added to it,
and which matmuls of a bfloat16 model stay in float32 (the router's only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import train
from dynmoe_jax.train import loss
from tests.train.synthetic import V, counting_batch


def test_cross_entropy_is_the_weighted_nll_sum_in_float64():
    rng = np.random.default_rng(0)
    logits = (3 * rng.normal(size=(2, 3, 5))).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3)).astype(np.int32)
    weights = np.asarray([[1, 1, 0], [1, 0.5, 0]], np.float32)
    z = logits.astype(np.float64)
    logp = (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )
    want = -sum(weights[b, t] * logp[b, t, targets[b, t]] for b in range(2) for t in range(3))
    nll, count = loss.cross_entropy(jnp.asarray(logits), targets, weights)
    assert float(nll) == pytest.approx(want, rel=1e-6) and float(count) == 3.5
    half, _ = loss.cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, weights)
    assert half.dtype == jnp.float32  # bf16 logits, a float32 log-softmax


def test_forward_adds_the_weighted_aux_losses_to_the_lm_loss(tiny_run):
    config = tiny_run(**{"loss.z_loss_weight": 0.5})
    task = train.build_task(config, V)
    params = train.init_state(task).params
    batch = counting_batch(0)
    total, (metrics, _) = jax.jit(lambda p, b: loss.forward(task, p, b))(params, batch)
    w = config.loss
    want = (metrics["lm_loss"] + w.load_balance_weight * metrics["load_balance_loss"]
            + w.dynamic_weight * metrics["dynamic_loss"] + 0.5 * metrics["z_loss"])  # fmt: skip
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    # The lm loss: the token mean of the float64 negative log-likelihoods of the model's logits.
    logits, layer = jax.jit(lambda p, x: nnx.merge(task.graphdef, p)(x))(params, batch["inputs"])
    z = np.asarray(logits, np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)
    assert float(metrics["lm_loss"]) == pytest.approx(nll.mean(), rel=1e-5)
    for name in ("load_balance_loss", "dynamic_loss", "z_loss"):  # the mean over the layers
        assert float(metrics[name]) == pytest.approx(float(np.mean(layer[name])), rel=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
def test_bf16_matmuls_run_in_bf16_except_the_router(tiny_run, scan):
    task = train.build_task(tiny_run(**{"model.dtype": "bfloat16", "model.scan_layers": scan}), V)
    params = train.init_state(task).params
    num_experts, d = task.config.moe.num_experts, task.config.model.d_model

    def loss(p):
        return train.forward(task, p, counting_batch(0))[0]

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
