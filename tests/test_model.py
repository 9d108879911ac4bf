"""Decoder: shapes, layer placement, causality and parameter annotations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax.model import Decoder, DenseFFN, ModelConfig, abstract_decoder
from dynmoe_jax.moe import MoEConfig, MoELayer

V, D, T = 64, 32, 12


def _cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, d_model=D, d_ff=32, capacity_factor=None)
    return ModelConfig(**{"vocab_size": V, "d_model": D, "num_layers": 4, "num_heads": 4,
                          "d_ff": 64, "moe": moe, **kw})  # fmt: skip


def _tokens(seed=0, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, T), 0, V)


def test_shapes_and_per_layer_metrics():
    model = Decoder(_cfg(moe_every=2), rngs=nnx.Rngs(0))
    logits, layer = model(_tokens())
    assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
    assert [type(b.ffn) for b in model.blocks] == [DenseFFN, MoELayer, DenseFFN, MoELayer]
    assert layer["experts_per_token"].shape == (2,)
    assert layer["token_experts"].shape == (2, 2, T)


def test_dense_model_has_no_moe_metrics():
    model = Decoder(_cfg(moe=None), rngs=nnx.Rngs(0))
    logits, layer = model(_tokens())
    assert logits.shape == (2, T, V) and layer == {}


def _embedding_grad(model, tokens, position):
    """d(sum of logits at `position`) / d(input embeddings), per position."""

    def f(x_BTD):
        # Differentiate with respect to the looked-up embeddings, one row per position.
        return jnp.sum(_forward_from_embeddings(model, x_BTD)[:, position])

    x = model.embed_VD[...][tokens]
    return jax.grad(f)(x)


def _forward_from_embeddings(model, x_BTD):
    for block in model.blocks:
        x_BTD, _ = block(x_BTD)
    return model.final_norm(x_BTD) @ model.head_DV[...]


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_causal_through_gradients(capacity_factor):
    cfg = _cfg()
    cfg = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=capacity_factor)
    )
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    for position in (0, 5, T - 1):
        g = np.abs(np.asarray(_embedding_grad(model, _tokens(), position))).sum(axis=(0, 2))
        assert np.all(g[position + 1 :] == 0.0), (position, g)
        assert np.all(g[: position + 1] > 0.0), (position, g)


def test_causal_under_perturbation_without_drops():
    # Without capacity limits nothing couples tokens inside the MoE layer, so changing future
    # tokens leaves earlier logits exactly unchanged.
    model = Decoder(_cfg(), rngs=nnx.Rngs(2))
    a = _tokens(3)
    b = a.at[:, 7:].set((a[:, 7:] + 1) % V)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_array_equal(la[:, :7], lb[:, :7])
    assert not np.allclose(la[:, 7:], lb[:, 7:])


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_remat_gives_the_same_loss_and_gradients(capacity_factor):
    def loss_and_grads(remat):
        cfg = _cfg(remat=remat)
        cfg = dataclasses.replace(
            cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=capacity_factor)
        )
        model = Decoder(cfg, rngs=nnx.Rngs(4))
        tokens = _tokens(5)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits, layer = nnx.merge(graphdef, p)(tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
            return nll + jnp.mean(layer["load_balance_loss"]) + jnp.mean(layer["z_loss"])

        return jax.jit(jax.value_and_grad(loss))(params)

    (plain, plain_grads), (remat, remat_grads) = loss_and_grads(False), loss_and_grads(True)
    assert remat == pytest.approx(float(plain), rel=1e-6)
    flat_plain, flat_remat = jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)
    assert len(flat_plain) == len(flat_remat) > 0
    for a, b in zip(flat_plain, flat_remat, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in flat_plain)


def test_abstract_decoder_allocates_nothing():
    model = abstract_decoder(_cfg())
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    real = jax.tree.leaves(nnx.state(Decoder(_cfg(), rngs=nnx.Rngs(0)), nnx.Param))
    assert [x.shape for x in leaves] == [x.shape for x in real]


def test_every_parameter_has_logical_axes():
    model = Decoder(_cfg(moe_every=2), rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var[...].ndim, path


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_heads", 5, "model.num_heads=5"),
        ("moe_every", 9, "model.moe_every=9"),
        ("vocab_size", 1, "model.vocab_size=1"),
    ],
)
def test_bad_model_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**{field: value})
