"""Decoder: shapes, layer placement, causality, parameter annotations and names, and the
optional features of imported checkpoints (grouped-query attention, q/k/v biases, q/k norm,
tied embeddings, the shared expert) against float64 NumPy references written here."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from dynmoe_jax import sharding
from dynmoe_jax.model import attention, layer_stack
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.model.decoder import Attention, Decoder, DenseFFN, abstract_decoder, rope
from dynmoe_jax.model.layer_stack import Remat
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.moe.layer import MoELayer
from tests import reference as ref

V, D, T = 64, 32, 12


def _cfg(dispatch: str = "index", **kw) -> ModelConfig:
    # The decoder tests run the index mode, as configs/tiny.py does: a decoder with grouped
    # layers took about twice as long to compile. The grouped mode (the layer's default) has
    # its own tests in test_moe.py and runs here in the causality tests.
    moe = MoEConfig(num_experts=4, d_model=D, d_ff=32, capacity_factor=None, dispatch=dispatch)
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
    return model.logits(model.final_norm(x_BTD))


# Every optional feature of imported checkpoints at once.
IMPORTED = {"num_kv_heads": 2, "head_dim": 6, "qkv_bias": True, "qk_norm": True,
            "tie_embeddings": True, "shared_d_ff": 24, "shared_gate": True}  # fmt: skip


@pytest.mark.parametrize(
    "dispatch, capacity_factor, features",
    [("grouped", None, {}), ("grouped", 1.0, {}), ("index", None, IMPORTED)],
    ids=str,
)
def test_causal_through_gradients(dispatch, capacity_factor, features):
    cfg = _cfg(dispatch, **features)
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
    model = Decoder(_cfg("grouped"), rngs=nnx.Rngs(2))
    a = _tokens(3)
    b = a.at[:, 7:].set((a[:, 7:] + 1) % V)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_array_equal(la[:, :7], lb[:, :7])
    assert not np.allclose(la[:, 7:], lb[:, 7:])


def _loss_grads_metrics(capacity_factor=None, **kw):
    """Loss (lm + aux), gradients (pure dict) and per-layer metrics of a model seeded 4."""
    cfg = _cfg(**kw)
    cfg = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=capacity_factor)
    )
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(4)), nnx.Param)
    tokens = _tokens(5)

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
    cfg = _cfg(**kw)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(4)), nnx.Param)
    tokens = _tokens(5)

    def loss(p):
        logits, layer = nnx.merge(graphdef, p)(tokens)
        assert layer == {}
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), nnx.to_pure_dict(grads), {}, nnx.to_pure_dict(params)


def test_scanned_parameters_carry_the_layers_axis_replicated():
    model = Decoder(_cfg(num_layers=5, moe_every=2, scan_layers=True), rngs=nnx.Rngs(0))
    specs = sharding.param_specs(model)
    wq = model.scan_blocks.blocks[1].attn.wq_DNH
    assert wq.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    assert specs["scan_blocks"]["blocks"][1]["ffn"]["w_gate_EDF"] == PartitionSpec(
        None, "expert", None, "model"
    )
    assert isinstance(model.scan_blocks.blocks[1].ffn, MoELayer)
    assert isinstance(model.scan_blocks.blocks[0].ffn, DenseFFN)
    assert isinstance(model.tail_blocks[0].ffn, DenseFFN)


def test_remat_policy_values():
    assert _cfg(remat="none").remat is Remat.NONE and _cfg(remat="full").remat is Remat.FULL
    assert _cfg(remat="dots").remat is Remat.DOTS
    with pytest.raises(ValueError, match=re.escape(
        "model.remat='some' is invalid: allowed 'none' | 'full' | 'dots'"
    )):  # fmt: skip
        _cfg(remat="some")


def test_abstract_decoder_allocates_nothing():
    model = abstract_decoder(_cfg())
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    real = jax.tree.leaves(nnx.state(Decoder(_cfg(), rngs=nnx.Rngs(0)), nnx.Param))
    assert [x.shape for x in leaves] == [x.shape for x in real]


@pytest.mark.parametrize("features", [{}, IMPORTED], ids=["plain", "imported"])
def test_every_parameter_has_logical_axes(features):
    model = Decoder(_cfg(moe_every=2, **features), rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var[...].ndim, path


def _f64(a) -> np.ndarray:
    return np.asarray(a[...] if isinstance(a, nnx.Variable) else a, np.float64)


def _rms_norm_ref(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope_ref(x_TNH, theta):
    """RoPE as Hugging Face writes it: inv_freq = theta^(-2i/H), both halves, rotate_half."""
    t, h = x_TNH.shape[0], x_TNH.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    freqs = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    rotated = np.concatenate([-x_TNH[..., h // 2 :], x_TNH[..., : h // 2]], axis=-1)
    return x_TNH * np.cos(emb) + rotated * np.sin(emb)


def _attention_ref(attn, cfg: ModelConfig, x_BTD) -> np.ndarray:
    """Per-batch, per-head float64 loop; query head n reads key/value head n // (N / J)."""
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_width
    x = _f64(x_BTD)
    b, t, d = x.shape
    q = x @ _f64(attn.wq_DNH).reshape(d, n * h)
    key = x @ _f64(attn.wk_DJH).reshape(d, k * h)
    value = x @ _f64(attn.wv_DJH).reshape(d, k * h)
    if cfg.qkv_bias:
        q, key = q + _f64(attn.bq_NH).ravel(), key + _f64(attn.bk_JH).ravel()
        value = value + _f64(attn.bv_JH).ravel()
    if cfg.qk_norm:  # over the whole projection, before RoPE
        q = _rms_norm_ref(q, _f64(attn.q_norm.scale_D), cfg.norm_eps)
        key = _rms_norm_ref(key, _f64(attn.k_norm.scale_D), cfg.norm_eps)
    q, key, value = q.reshape(b, t, n, h), key.reshape(b, t, k, h), value.reshape(b, t, k, h)
    wo = _f64(attn.wo_NHD)
    y = np.zeros((b, t, d))
    for i in range(b):
        q_i, k_i = _rope_ref(q[i], cfg.rope_theta), _rope_ref(key[i], cfg.rope_theta)
        for head in range(n):
            j = head // (n // k)
            scores = q_i[:, head] @ k_i[:, j].T / np.sqrt(h)
            scores[np.triu_indices(t, 1)] = -np.inf
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            y[i] += (p @ value[i, :, j]) @ wo[head]
    return y


def _randomize(var: nnx.Variable, seed: int) -> None:
    # Biases start at zero and norm scales at one; random values make the test see them.
    var[...] = 1.0 + 0.5 * jax.random.normal(jax.random.key(seed), var[...].shape)


ATTENTION_CASES = {
    "plain": {},
    "gqa_bias_qknorm": {"num_kv_heads": 2, "head_dim": 6, "qkv_bias": True, "qk_norm": True},
    # Multi-query, three heads that do not divide d_model=32, a large RoPE theta (Mixtral's).
    "mqa_head_dim": {"num_heads": 3, "num_kv_heads": 1, "head_dim": 4, "qk_norm": True,
                     "rope_theta": 1e6},
}  # fmt: skip


@pytest.mark.parametrize("features", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_attention_matches_per_head_reference(features):
    cfg = _cfg(**features)
    attn = Attention(cfg, nnx.Rngs(7))
    for seed, name in enumerate(("bq_NH", "bk_JH", "bv_JH")):
        if cfg.qkv_bias:
            _randomize(getattr(attn, name), seed)
    if cfg.qk_norm:
        _randomize(attn.q_norm.scale_D, 3)
        _randomize(attn.k_norm.scale_D, 4)
    x = jax.random.normal(jax.random.key(8), (2, T, D))
    y = attn(x)
    assert y.shape == (2, T, D) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _attention_ref(attn, cfg, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_matches_the_rotate_half_convention(theta):
    x = jax.random.normal(jax.random.key(0), (2, T, 3, 8))
    got = rope(x, jnp.arange(T), theta)
    want = np.stack([_rope_ref(_f64(x[i]), theta) for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_have_no_head_and_use_the_embedding():
    model = Decoder(_cfg(tie_embeddings=True), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "head_DV" not in params and not hasattr(model, "head_DV")
    untied = nnx.state(Decoder(_cfg(), rngs=nnx.Rngs(0)), nnx.Param)
    size = sum(x.size for x in jax.tree.leaves(params))
    assert sum(x.size for x in jax.tree.leaves(untied)) - size == D * V
    tokens = _tokens()
    logits, _ = model(tokens)
    x_BTD = model.embed_VD[...][tokens]
    for block in model.blocks:
        x_BTD, _ = block(x_BTD)
    want = _f64(model.final_norm(x_BTD)) @ _f64(model.embed_VD).T
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gate", [False, True])
def test_shared_expert_adds_to_the_moe_output(gate):
    model = Decoder(_cfg(moe_every=2, shared_d_ff=24, shared_gate=gate), rngs=nnx.Rngs(3))
    dense, block = model.blocks[0], model.blocks[1]
    assert not hasattr(dense, "shared") and not hasattr(dense, "shared_gate_D")
    assert isinstance(block.shared, DenseFFN) and hasattr(block, "shared_gate_D") == gate
    x_BTD = jax.random.normal(jax.random.key(4), (2, T, D))
    y_BTD, _ = block(x_BTD)
    # Everything but the shared expert from the block's own parts (each tested elsewhere).
    h_BTD = x_BTD + block.attn(block.attn_norm(x_BTD))
    normed_BTD = block.ffn_norm(h_BTD)
    moe_BTD, _ = block.ffn(normed_BTD)
    x = _f64(normed_BTD)
    s = block.shared
    shared = ref.swiglu(x, _f64(s.w_gate_DF), _f64(s.w_up_DF), _f64(s.w_down_FD))
    if gate:
        shared = shared / (1.0 + np.exp(-(x @ _f64(block.shared_gate_D))))[..., None]
    assert np.abs(shared).mean() > 1e-2
    want = _f64(h_BTD) + _f64(moe_BTD) + shared
    np.testing.assert_allclose(y_BTD, want, rtol=1e-5, atol=1e-5)


def test_parameter_names_and_shapes_that_checkpoint_loaders_write():
    cfg = _cfg(moe_every=2, **IMPORTED)  # N=4 heads, J=2 kv heads, H=6
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
    plain = nnx.to_pure_dict(nnx.state(abstract_decoder(_cfg()), nnx.Param))
    assert set(plain["blocks"][0]["attn"]) == {"wq_DNH", "wk_DJH", "wv_DJH", "wo_NHD"}
    assert "head_DV" in plain


def test_head_dim_frees_the_head_width_from_d_model():
    cfg = _cfg(num_heads=3, head_dim=4)  # 32 % 3 != 0
    assert (cfg.kv_heads, cfg.head_width) == (3, 4)
    logits, _ = Decoder(cfg, rngs=nnx.Rngs(0))(_tokens())
    assert logits.shape == (2, T, V) and np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_heads", 5, "model.num_heads=5"),
        ("moe_every", 9, "model.moe_every=9"),
        ("vocab_size", 1, "model.vocab_size=1"),
        ("num_kv_heads", 3, "model.num_kv_heads=3 is invalid: allowed None (model.num_heads) "
                            "or an integer >= 1 dividing model.num_heads=4"),
        ("num_kv_heads", 0, "model.num_kv_heads=0 is invalid"),
        ("num_kv_heads", 2.0, "model.num_kv_heads=2.0 is invalid: allowed None (model.num_heads) "
                              "or an integer >= 1 dividing model.num_heads=4"),
        ("head_dim", 5, "model.head_dim=5 is invalid: allowed None (model.d_model // "
                        "model.num_heads) or an even integer >= 2"),
        ("qkv_bias", 1, "model.qkv_bias=1 is invalid: allowed True | False"),
        ("scan_layers", 1, "model.scan_layers=1 is invalid: allowed True | False"),
        ("qk_norm", "yes", "model.qk_norm='yes' is invalid: allowed True | False"),
        ("tie_embeddings", None, "model.tie_embeddings=None is invalid: allowed True | False"),
        ("shared_d_ff", 0, "model.shared_d_ff=0 is invalid: allowed None (no shared expert) "
                           "or an integer >= 1"),
        ("shared_gate", True, "model.shared_gate=True is invalid: allowed False when "
                              "model.shared_d_ff is None (it gates the shared expert)"),
        ("rope_theta", 0.0, "model.rope_theta=0.0 is invalid: allowed a number > 0"),
        ("norm_eps", -1e-6, "model.norm_eps=-1e-06 is invalid: allowed a number > 0"),
    ],
)  # fmt: skip
def test_bad_model_config(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        _cfg(**{field: value})
    assert "\n" not in str(err.value)


def test_shared_expert_needs_moe_layers():
    with pytest.raises(ValueError, match=re.escape(
        "model.shared_d_ff=8 is invalid: allowed None in a dense model (it adds to MoE layers)"
    )):  # fmt: skip
        _cfg(moe=None, shared_d_ff=8)


def test_grouped_query_attention_split_over_the_model_axis_matches_one_device():
    model = Decoder(_cfg(**{**IMPORTED, "num_layers": 2}), rngs=nnx.Rngs(0))
    tokens = _tokens(batch=4)
    want, _ = model(tokens)
    mesh = sharding.make_mesh("data=2,model=2")
    specs = sharding.param_specs(model)
    assert specs["blocks"][0]["attn"]["wk_DJH"] == PartitionSpec(None, "model", None)
    graphdef, params = nnx.split(model, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(params), sharding.named(mesh, specs))
    nnx.replace_by_pure_dict(params, placed)
    with jax.set_mesh(mesh):
        got, _ = nnx.jit(lambda m, t: m(t))(nnx.merge(graphdef, params), tokens)
    assert got.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, head_width, backend, want",
    [("bfloat16", 64, "gpu", "cudnn"), ("float16", 128, "gpu", "cudnn"),
     ("float32", 64, "gpu", "xla"), ("bfloat16", 12, "gpu", "xla_low_precision"),
     ("bfloat16", 256, "gpu", "xla_low_precision"), ("bfloat16", 64, "cpu", "xla_low_precision"),
     ("float32", 64, "tpu", "xla")],
)  # fmt: skip
def test_attention_implementation_follows_platform_dtype_and_shape(dtype, head_width, backend,
                                                                   want):  # fmt: skip
    assert attention.implementation(jnp.dtype(dtype), head_width, backend) == want


def _bf16_attention_layer():
    cfg = _cfg(**IMPORTED, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(Attention(cfg, nnx.Rngs(7)), nnx.Param)
    x_BTD = jax.random.normal(jax.random.key(8), (2, T, D)).astype(jnp.bfloat16)
    return cfg, graphdef, params, x_BTD


def _float32_residuals_of_scores_size(fn, *args, b, n, t) -> list:
    """Float32 arrays the backward pass of ``fn`` keeps with as many elements as [B, N, T, U]
    (in any arrangement of those axes, e.g. [B, J, N/J, T, U])."""
    _, vjp_fn = jax.vjp(fn, *args)
    return [r.shape for r in jax.tree.leaves(vjp_fn)
            if r.dtype == jnp.float32 and r.size >= b * n * t * t]  # fmt: skip


def test_bf16_attention_keeps_no_float32_scores_for_the_backward_pass():
    cfg, graphdef, params, x_BTD = _bf16_attention_layer()

    def layer(p, x):
        return nnx.merge(graphdef, p)(x)

    assert layer(params, x_BTD).dtype == jnp.bfloat16
    assert _float32_residuals_of_scores_size(layer, params, x_BTD, b=2, n=4, t=T) == []
    # The check has teeth: XLA's own path keeps float32 [B, J, G, T, U] tensors.
    q = jnp.ones((2, T, 4, 8), jnp.bfloat16)
    kv = jnp.ones((2, T, 2, 8), jnp.bfloat16)
    xla = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")
    assert _float32_residuals_of_scores_size(xla, q, kv, kv, b=2, n=4, t=T)


def test_bf16_attention_and_gradients_track_float32():
    cfg, graphdef, params, x_BTD = _bf16_attention_layer()
    cfg32 = dataclasses.replace(cfg, dtype=jnp.float32)
    graphdef32 = nnx.graphdef(Attention(cfg32, nnx.Rngs(7)))
    x32 = x_BTD.astype(jnp.float32)
    probe = jax.random.normal(jax.random.key(9), (2, T, D))

    def loss(g, p, x):
        return jnp.sum(nnx.merge(g, p)(x).astype(jnp.float32) * probe)

    want = jax.grad(loss, argnums=(1, 2))(graphdef32, params, x32)
    got = jax.grad(loss, argnums=(1, 2))(graphdef, params, x_BTD)
    np.testing.assert_allclose(
        np.asarray(nnx.merge(graphdef, params)(x_BTD), np.float32),
        nnx.merge(graphdef32, params)(x32), atol=0.05, rtol=0.05,
    )  # fmt: skip
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) <= 0.03 * np.linalg.norm(b)


def test_scanned_layers_sharded_over_experts_and_model_match_one_device():
    model = Decoder(_cfg(num_layers=5, moe_every=2, scan_layers=True), rngs=nnx.Rngs(0))
    tokens = _tokens(batch=4)
    want, want_layer = model(tokens)
    mesh = sharding.make_mesh("data=2,expert=2,model=2")
    specs = sharding.param_specs(model)
    graphdef, params = nnx.split(model, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(params), sharding.named(mesh, specs))
    nnx.replace_by_pure_dict(params, placed)
    with jax.set_mesh(mesh):
        got, layer = nnx.jit(lambda m, t: m(t))(nnx.merge(graphdef, params), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer["experts_per_token"], want_layer["experts_per_token"],
                               rtol=1e-6)  # fmt: skip
