"""Decoder: shapes, layer placement, causality, parameter annotations and names, the optional
features of imported checkpoints (tied embeddings, the shared expert, RoPE, a free head width)
against float64 NumPy references, and the key/value cache of decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import train
from dynmoe_jax.model.decoder import Decoder, DenseFFN, abstract_decoder, rope
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.moe.layer import MoELayer
from tests import reference as ref
from tests.model.decoders import (
    IMPORTED,
    D,
    T,
    V,
    f64,
    model_config,
    rope_ref,
    token_ids,
)


def test_shapes_and_per_layer_metrics():
    model = Decoder(model_config(moe_every=2), rngs=nnx.Rngs(0))
    logits, layer = model(token_ids())
    assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
    assert [type(b.ffn) for b in model.blocks] == [DenseFFN, MoELayer, DenseFFN, MoELayer]
    assert layer["experts_per_token"].shape == (2,)
    assert layer["token_experts"].shape == (2, 2, T)


def test_a_heterogeneous_model_routes_each_layer_with_its_own_k():
    moe = MoEConfig(num_experts=4, d_model=D, d_ff=32, capacity_factor=None, dispatch="index",
                    router="top_k", top_k=(3, 1))  # fmt: skip
    model = Decoder(model_config(moe_every=2, moe=moe), rngs=nnx.Rngs(0))
    assert [b.ffn.config.top_k for b in model.blocks[1::2]] == [3, 1]
    _, layer = model(token_ids())
    np.testing.assert_array_equal(layer["experts_per_token"], [3.0, 1.0])
    same = Decoder(model_config(moe_every=2, moe=dataclasses.replace(moe, top_k=2)),
                   rngs=nnx.Rngs(0))  # fmt: skip
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(same, nnx.Param)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)  # k changes no weight: the models pair seed by seed
    with pytest.raises(TypeError, match=r"one layer's config; moe.top_k=\(3, 1\)"):
        MoELayer(moe, rngs=nnx.Rngs(0))


def test_dense_model_has_no_moe_metrics():
    model = Decoder(model_config(moe=None), rngs=nnx.Rngs(0))
    logits, layer = model(token_ids())
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
    return model.logits(model.final_norm(x_BTD))


@pytest.mark.parametrize(
    "dispatch, capacity_factor, features",
    [("grouped", None, {}), ("grouped", 1.0, {}), ("index", None, IMPORTED)],
    ids=str,
)
def test_causal_through_gradients(dispatch, capacity_factor, features):
    cfg = model_config(dispatch, **features)
    cfg = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=capacity_factor)
    )
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    for position in (0, 5, T - 1):
        g = np.abs(np.asarray(_embedding_grad(model, token_ids(), position))).sum(axis=(0, 2))
        assert np.all(g[position + 1 :] == 0.0), (position, g)
        assert np.all(g[: position + 1] > 0.0), (position, g)


def test_causal_under_perturbation_without_drops():
    # Without capacity limits nothing couples tokens inside the MoE layer, so changing future
    # tokens leaves earlier logits exactly unchanged.
    model = Decoder(model_config("grouped"), rngs=nnx.Rngs(2))
    a = token_ids(3)
    b = a.at[:, 7:].set((a[:, 7:] + 1) % V)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_array_equal(la[:, :7], lb[:, :7])
    assert not np.allclose(la[:, 7:], lb[:, 7:])


def test_abstract_decoder_allocates_nothing():
    model = abstract_decoder(model_config())
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    real = jax.tree.leaves(nnx.state(Decoder(model_config(), rngs=nnx.Rngs(0)), nnx.Param))
    assert [x.shape for x in leaves] == [x.shape for x in real]


@pytest.mark.parametrize("features", [{}, IMPORTED], ids=["plain", "imported"])
def test_every_parameter_has_logical_axes(features):
    model = Decoder(model_config(moe_every=2, **features), rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var[...].ndim, path


# The axes each weight contracts with its input (the embedding's: none, a one-hot lookup; D
# when tied, as the head's).
FAN_IN = {"wq_DNH": (0,), "wk_DJH": (0,), "wv_DJH": (0,), "wo_NHD": (0, 1),
          "w_gate_DF": (0,), "w_up_DF": (0,), "w_down_FD": (0,), "head_DV": (0,),
          "shared_gate_D": (0,), "router_DE": (0,), "w_gate_EDF": (1,), "w_up_EDF": (1,),
          "w_down_EFD": (1,)}  # fmt: skip


@pytest.mark.parametrize("features", [{}, IMPORTED], ids=["plain", "imported"])
def test_every_weight_is_a_truncated_normal_of_variance_one_over_its_fan_in(features):
    model = Decoder(model_config(moe_every=2, **features), rngs=nnx.Rngs(0))
    fan_in = {**FAN_IN, "embed_VD": (1,) if features.get("tie_embeddings") else ()}
    pooled = []
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        w, name = f64(var), path[-1]
        if name not in fan_in:  # biases start at 0 and norm scales at 1
            assert np.all(w == 0) or np.all(w == 1), path
            continue
        z = w * np.sqrt(np.prod([w.shape[a] for a in fan_in[name]]))
        # A standard normal cut at +-2 standard deviations of its own, rescaled to std 1.
        assert np.abs(z).max() <= 2 / 0.87962566 + 1e-5, path
        if z.size >= 1024:  # the sample std within 4 of its standard errors
            assert np.std(z) == pytest.approx(1.0, abs=4 / np.sqrt(2 * z.size)), path
        pooled.append(z.ravel())
    assert np.std(np.concatenate(pooled)) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_matches_the_rotate_half_convention(theta):
    x = jax.random.normal(jax.random.key(0), (2, T, 3, 8))
    got = rope(x, jnp.arange(T), theta)
    want = np.stack([rope_ref(f64(x[i]), theta) for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_have_no_head_and_use_the_embedding():
    model = Decoder(model_config(tie_embeddings=True), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "head_DV" not in params and not hasattr(model, "head_DV")
    untied = nnx.state(Decoder(model_config(), rngs=nnx.Rngs(0)), nnx.Param)
    size = sum(x.size for x in jax.tree.leaves(params))
    assert sum(x.size for x in jax.tree.leaves(untied)) - size == D * V
    tokens = token_ids()
    logits, _ = model(tokens)
    x_BTD = model.embed_VD[...][tokens]
    for block in model.blocks:
        x_BTD, _ = block(x_BTD)
    want = f64(model.final_norm(x_BTD)) @ f64(model.embed_VD).T
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gate", [False, True])
def test_shared_expert_adds_to_the_moe_output(gate):
    model = Decoder(model_config(moe_every=2, shared_d_ff=24, shared_gate=gate), rngs=nnx.Rngs(3))
    dense, block = model.blocks[0], model.blocks[1]
    assert not hasattr(dense, "shared") and not hasattr(dense, "shared_gate_D")
    assert isinstance(block.shared, DenseFFN) and hasattr(block, "shared_gate_D") == gate
    x_BTD = jax.random.normal(jax.random.key(4), (2, T, D))
    y_BTD, _ = block(x_BTD)
    # Everything but the shared expert from the block's own parts (each tested elsewhere).
    h_BTD = x_BTD + block.attn(block.attn_norm(x_BTD))
    normed_BTD = block.ffn_norm(h_BTD)
    moe_BTD, _ = block.ffn(normed_BTD)
    x = f64(normed_BTD)
    s = block.shared
    shared = ref.swiglu(x, f64(s.w_gate_DF), f64(s.w_up_DF), f64(s.w_down_FD))
    if gate:
        shared = shared / (1.0 + np.exp(-(x @ f64(block.shared_gate_D))))[..., None]
    assert np.abs(shared).mean() > 1e-2
    want = f64(h_BTD) + f64(moe_BTD) + shared
    np.testing.assert_allclose(y_BTD, want, rtol=1e-5, atol=1e-5)


def test_parameter_names_and_shapes_that_checkpoint_loaders_write():
    cfg = model_config(moe_every=2, **IMPORTED)  # N=4 heads, J=2 kv heads, H=6
    params = nnx.to_pure_dict(nnx.state(abstract_decoder(cfg), nnx.Param))
    shapes = jax.tree.map(lambda x: tuple(x.shape), params)
    assert shapes["blocks"][1]["attn"] == {
        "wq_DNH": (D, 4, 6), "wk_DJH": (D, 2, 6), "wv_DJH": (D, 2, 6), "wo_NHD": (4, 6, D),
        "bq_NH": (4, 6), "bk_JH": (2, 6), "bv_JH": (2, 6),
        "q_norm": {"scale_D": (24,)}, "k_norm": {"scale_D": (12,)},
    }  # fmt: skip
    assert shapes["blocks"][1]["shared"] == {
        "w_gate_DF": (D, 24),
        "w_up_DF": (D, 24),
        "w_down_FD": (24, D),
    }
    assert shapes["blocks"][1]["shared_gate_D"] == (D,)
    assert set(shapes["blocks"][0]) == {"attn_norm", "attn", "ffn_norm", "ffn"}
    assert set(shapes) == {"embed_VD", "blocks", "final_norm"}  # tied: no head_DV
    plain = nnx.to_pure_dict(nnx.state(abstract_decoder(model_config()), nnx.Param))
    assert set(plain["blocks"][0]["attn"]) == {"wq_DNH", "wk_DJH", "wv_DJH", "wo_NHD"}
    assert "head_DV" in plain


def test_head_dim_frees_the_head_width_from_d_model():
    cfg = model_config(num_heads=3, head_dim=4)  # 32 % 3 != 0
    assert (cfg.kv_heads, cfg.head_width) == (3, 4)
    logits, _ = Decoder(cfg, rngs=nnx.Rngs(0))(token_ids())
    assert logits.shape == (2, T, V) and np.all(np.isfinite(logits))


def test_decode_writes_each_row_at_its_own_position():
    cfg = model_config(num_kv_heads=2)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    decode = jax.jit(lambda p, tokens, cache, start: nnx.merge(graphdef, p).decode(
        tokens, cache, start))  # fmt: skip
    cache = nnx.merge(graphdef, params).init_cache(2, 8)
    assert cache.k_LBUJH.shape == (4, 2, 8, 2, D // 4)
    _, _, cache = decode(params, jnp.asarray([[5, 17, 3], [9, 1, 0]]), cache, 0)
    _, _, after = decode(params, jnp.asarray([[4], [5]]), cache, jnp.asarray([3, 2]))
    for before_LBUJH, after_LBUJH in zip(cache, after, strict=True):
        changed_BU = np.any(np.asarray(before_LBUJH != after_LBUJH), axis=(0, 3, 4))
        assert np.flatnonzero(changed_BU[0]).tolist() == [3]
        assert np.flatnonzero(changed_BU[1]).tolist() == [2]


def test_float32_model_runs_in_float32(tiny_run):
    task = train.build_task(tiny_run(**{"model.dtype": "float32"}), V)
    model = nnx.merge(task.graphdef, train.init_state(task).params)
    logits, layer = model(token_ids())
    assert logits.dtype == jnp.float32 and layer["load_balance_loss"].dtype == jnp.float32
