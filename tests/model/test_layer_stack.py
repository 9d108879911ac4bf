"""Scanned layers and rematerialisation: the same loss, gradients and metrics as the plain
per-layer model, the parameters restacked and unstacked exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax.model import layer_stack
from dynmoe_jax.model.decoder import Decoder
from tests.model.decoders import (
    model_config,
    token_ids,
)


def _loss_grads_metrics(capacity_factor=None, **kw):
    """Loss (lm + aux), gradients (pure dict) and per-layer metrics of a model seeded 4."""
    cfg = model_config(**kw)
    cfg = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=capacity_factor)
    )
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(4)), nnx.Param)
    tokens = token_ids(5)

    def loss(p):
        logits, layer = nnx.merge(graphdef, p)(tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
        return nll + jnp.mean(layer["load_balance_loss"]) + jnp.mean(layer["z_loss"]), layer

    (value, layer), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(value), nnx.to_pure_dict(grads), layer, nnx.to_pure_dict(params)


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-7):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "capacity_factor, scan, remat",
    [(None, False, "full"), (1.0, False, "dots"), (1.0, True, "full"), (None, True, "dots")],
)
def test_remat_gives_the_same_loss_and_gradients(capacity_factor, scan, remat):
    plain, plain_grads, plain_layer, _ = _loss_grads_metrics(capacity_factor, scan_layers=scan)
    got, grads, layer, _ = _loss_grads_metrics(capacity_factor, scan_layers=scan, remat=remat)
    assert got == pytest.approx(plain, rel=1e-6)
    _assert_trees_close(grads, plain_grads)
    _assert_trees_close(layer, plain_layer, atol=0)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(plain_grads))


@pytest.mark.parametrize(
    "layers, moe_every, moe, remat",
    [(4, 1, True, "none"), (5, 2, True, "none"), (7, 3, True, "dots"), (5, 2, False, "full")],
    ids=["every_layer", "odd_layers_moe_every_2", "tail_of_2_remat_dots", "dense_remat_full"],
)
def test_scanned_layers_equal_per_layer_in_loss_gradients_and_metrics(layers, moe_every, moe,
                                                                      remat):  # fmt: skip
    kw = {"num_layers": layers, "moe_every": moe_every, "remat": remat}
    if not moe:
        kw["moe"] = None
    if moe:
        want, want_grads, want_layer, want_params = _loss_grads_metrics(**kw)
        got, grads, layer, params = _loss_grads_metrics(scan_layers=True, **kw)
    else:  # a dense model has no aux losses: compare the lm loss alone
        want, want_grads, want_layer, want_params = _dense_loss_grads(**kw)
        got, grads, layer, params = _dense_loss_grads(scan_layers=True, **kw)
    # Same seed, same values: the scanned parameters are the per-layer ones, restacked.
    restacked = layer_stack.stack_layers(want_params, moe_every)
    jax.tree.map(np.testing.assert_array_equal, params, restacked)
    jax.tree.map(np.testing.assert_array_equal,
                 layer_stack.unstack_layers(params, lambda x, k: x[k]), want_params)  # fmt: skip
    n_super = layers // moe_every
    assert params["scan_blocks"]["blocks"][0]["attn"]["wq_DNH"].shape[0] == n_super
    assert len(params.get("tail_blocks", {})) == layers % moe_every
    assert got == pytest.approx(want, rel=1e-6)
    _assert_trees_close(grads, layer_stack.stack_layers(want_grads, moe_every))
    _assert_trees_close(layer, want_layer, atol=0)
    if moe:
        assert layer["experts_per_token"].shape == (n_super,)


def _dense_loss_grads(**kw):
    cfg = model_config(**kw)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(4)), nnx.Param)
    tokens = token_ids(5)

    def loss(p):
        logits, layer = nnx.merge(graphdef, p)(tokens)
        assert layer == {}
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), nnx.to_pure_dict(grads), {}, nnx.to_pure_dict(params)
