"""Importing Hugging Face MoE checkpoints: fidelity to transformers, overrides, errors, memory.

The fixtures in tests/fixtures/hf were written by tests/fixtures/make_hf_fixtures.py with
transformers; the logits it recorded are the reference. Nothing here needs torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers
from flax import nnx
from safetensors.numpy import load_file, save_file

from dynmoe_jax import sharding
from dynmoe_jax.model.layer_stack import Remat
from dynmoe_jax.moe.layer import MoELayer
from dynmoe_jax.pretrained import PretrainedError, from_hf, hf_model_config
from dynmoe_jax.pretrained.safetensors_io import checkpoint_tensors
from dynmoe_jax.validation import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FAMILY_DIRS = ("mixtral", "olmoe", "qwen2_moe")

# One compiled call (op-by-op execution compiles every primitive and was ~3x slower here).
_forward = nnx.jit(lambda module, inputs: module(inputs))


def _reference(family: str) -> tuple[np.ndarray, np.ndarray]:
    ref = np.load(FIXTURES / family / "logits.npz")
    return ref["tokens"], ref["logits"]


def _copy(family: str, dest: Path, config=None, tensors=None) -> Path:
    """A copy of a fixture whose config (dict -> dict) or tensors (dict -> dict) are edited."""
    src = FIXTURES / family
    dest.mkdir(parents=True, exist_ok=True)
    hf = json.loads((src / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config(hf) if config else hf))
    weights = load_file(src / "model.safetensors")
    save_file(tensors(weights) if tensors else weights, dest / "model.safetensors")
    return dest


# ----------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("family", FAMILY_DIRS)
def test_logits_match_transformers(family):
    tokens, expected = _reference(family)
    logits, aux = _forward(from_hf(FIXTURES / family), tokens)
    diff = float(np.max(np.abs(np.asarray(logits) - expected)))
    print(f"{family}: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-4
    # The checkpoint's own routing: top-k, k experts for every token.
    cfg = hf_model_config(FIXTURES / family)
    np.testing.assert_array_equal(aux["token_experts"], cfg.moe.top_k)


def test_config_mapping():
    mixtral, olmoe, qwen = (hf_model_config(FIXTURES / f) for f in FAMILY_DIRS)
    for cfg in (mixtral, olmoe, qwen):
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.d_model) == (4, 2, 32)
        assert cfg.moe.router.value == "top_k" and cfg.moe.top_k == 2
        assert cfg.moe.capacity_factor is None and cfg.norm_eps == 1e-5
    assert mixtral.head_dim == 16 and mixtral.rope_theta == 1e6 and mixtral.moe.renormalize
    assert (mixtral.moe.num_experts, mixtral.moe.d_ff, mixtral.moe_every) == (4, 32, 1)
    assert olmoe.qk_norm and not olmoe.qkv_bias and olmoe.moe.renormalize is False
    assert not olmoe.tie_embeddings and olmoe.shared_d_ff is None
    assert qwen.qkv_bias and qwen.tie_embeddings and qwen.shared_gate
    assert (qwen.shared_d_ff, qwen.moe.d_ff, qwen.d_ff, qwen.moe_every) == (32, 16, 48, 2)
    assert not qwen.qk_norm and qwen.rope_theta == 1e4


def test_top_level_rope_theta(tmp_path):
    """Checkpoints written before transformers 5 keep rope_theta at the top level."""

    def old_style(hf):
        hf.pop("rope_parameters")
        return {**hf, "rope_theta": 5e5}

    path = _copy("olmoe", tmp_path, config=old_style)
    assert hf_model_config(path).rope_theta == 5e5


@pytest.mark.parametrize(
    ("step", "mlp_only", "moe_every"),
    [(1, [], 1), (2, [], 2), (1, [0, 2], 2), (2, [0], 2), (4, [], 4)],
)
def test_sparse_step_maps_to_moe_every(tmp_path, step, mlp_only, moe_every):
    def edit(hf):
        return {**hf, "num_hidden_layers": 4, "decoder_sparse_step": step,
                "mlp_only_layers": mlp_only}  # fmt: skip

    assert hf_model_config(_copy("qwen2_moe", tmp_path, config=edit)).moe_every == moe_every


def test_overrides_switch_the_router():
    cfg = hf_model_config(
        FIXTURES / "olmoe", router="top_p", threshold=0.5, max_k=3, dispatch="grouped"
    )
    assert (cfg.moe.router.value, cfg.moe.threshold, cfg.moe.max_k) == ("top_p", 0.5, 3)
    assert cfg.moe.dispatch.value == "grouped" and cfg.moe.num_experts == 8


def test_dtype_override():
    cfg = hf_model_config(FIXTURES / "mixtral", dtype="bfloat16", remat="full")
    assert jnp.dtype(cfg.dtype) == jnp.bfloat16 and jnp.dtype(cfg.moe.dtype) == jnp.bfloat16
    assert cfg.remat is Remat.FULL


def test_bfloat16_checkpoint(tmp_path):
    """bf16 tensors are read as such and widened into the float32 parameters."""

    def to_bf16(weights):
        return {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}

    path = _copy("olmoe", tmp_path, tensors=to_bf16)
    model = from_hf(path)
    src = load_file(FIXTURES / "olmoe" / "model.safetensors")
    want_EDF = np.stack(
        [src[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].T for e in range(8)]
    ).astype(ml_dtypes.bfloat16)
    got_EDF = model.blocks[1].ffn.w_up_EDF[...]
    assert got_EDF.dtype == jnp.float32
    np.testing.assert_array_equal(got_EDF, want_EDF.astype(np.float32))


def test_fixture_tokenizers_match_configs():
    """What the command line reads with the model: vocabulary size and end-of-text id."""
    for family in FAMILY_DIRS:
        tok = tokenizers.Tokenizer.from_file(str(FIXTURES / family / "tokenizer.json"))
        hf = json.loads((FIXTURES / family / "config.json").read_text())
        assert tok.get_vocab_size() == hf["vocab_size"] == 128
        assert tok.token_to_id("<eos>") == hf["eos_token_id"]


def test_top_p_threshold_one_is_the_dense_mixture():
    """threshold=1.0 with raw weights: every expert, weighted by its probability. The layer of
    the imported model against a float64 loop over the checkpoint's own expert tensors."""
    path = FIXTURES / "olmoe"
    model = from_hf(path, router="top_p", threshold=1.0, renormalize=False)
    tokens, _ = _reference("olmoe")
    _, aux = _forward(model, tokens)
    assert np.all(np.asarray(aux["token_experts"]) == 8)  # every expert, every token

    layer = model.blocks[0].ffn
    assert isinstance(layer, MoELayer)
    x_MD = np.random.default_rng(0).normal(size=(10, 32))
    y_MD = np.asarray(_forward(layer, x_MD[None].astype(np.float32))[0][0], np.float64)

    w = {k: v.astype(np.float64) for k, v in load_file(path / "model.safetensors").items()}
    moe = "model.layers.0.mlp"
    logits_ME = x_MD @ w[f"{moe}.gate.weight"].T
    probs_ME = np.exp(logits_ME - logits_ME.max(-1, keepdims=True))
    probs_ME /= probs_ME.sum(-1, keepdims=True)
    expected_MD = np.zeros_like(x_MD)
    for e in range(8):
        gate = x_MD @ w[f"{moe}.experts.{e}.gate_proj.weight"].T
        up = x_MD @ w[f"{moe}.experts.{e}.up_proj.weight"].T
        out = (gate / (1 + np.exp(-gate)) * up) @ w[f"{moe}.experts.{e}.down_proj.weight"].T
        expected_MD += probs_ME[:, e : e + 1] * out
    np.testing.assert_allclose(y_MD, expected_MD, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- layouts


def test_sharded_checkpoint_files(tmp_path):
    """model-0000x-of-0000y.safetensors with model.safetensors.index.json."""
    weights = load_file(FIXTURES / "qwen2_moe" / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, tmp_path / file)
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(FIXTURES / "qwen2_moe" / "config.json", tmp_path)
    tokens, expected = _reference("qwen2_moe")
    np.testing.assert_allclose(_forward(from_hf(tmp_path), tokens)[0], expected, atol=1e-4)


def _fused(weights: dict) -> dict:
    """The experts of each layer in transformers' in-memory layout: gate_up_proj [E, 2F, D]
    and down_proj [E, D, F]."""
    out = dict(weights)
    for layer in range(2):
        moe = f"model.layers.{layer}.mlp.experts"
        names = [f"{moe}.{e}.{{}}.weight" for e in range(8)]
        gate = [out.pop(n.format("gate_proj")) for n in names]
        up = [out.pop(n.format("up_proj")) for n in names]
        out[f"{moe}.gate_up_proj"] = np.stack(
            [np.concatenate(p) for p in zip(gate, up, strict=True)]
        )
        out[f"{moe}.down_proj"] = np.stack([out.pop(n.format("down_proj")) for n in names])
    return out


def test_fused_expert_layout(tmp_path):
    tokens, expected = _reference("olmoe")
    path = _copy("olmoe", tmp_path, tensors=_fused)
    np.testing.assert_allclose(_forward(from_hf(path), tokens)[0], expected, atol=1e-4)


def test_reads_every_dtype_as_safetensors_does(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
        "f16": rng.normal(size=(4,)).astype(np.float16),
        "f32": rng.normal(size=(2, 3, 4)).astype(np.float32),
        "i64": np.arange(7, dtype=np.int64),
        "scalar": np.array(3.0, np.float32),
    }
    save_file(arrays, tmp_path / "model.safetensors", metadata={"format": "np"})
    tensors = checkpoint_tensors(tmp_path)
    for name, want in load_file(tmp_path / "model.safetensors").items():
        got = tensors[name].read()
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))


def test_expert_weights_sharded_over_a_mesh():
    mesh = sharding.make_mesh("data=2,expert=4")
    tokens, expected = _reference("olmoe")
    model = from_hf(FIXTURES / "olmoe", mesh=mesh)
    w_gate = model.blocks[0].ffn.w_gate_EDF[...]
    assert w_gate.sharding.spec[0] == "expert"
    assert w_gate.sharding.shard_shape(w_gate.shape) == (2, 32, 16)
    # The batch is split over data x expert = 8: the two sequences, four times each.
    with jax.set_mesh(mesh):
        logits, _ = _forward(model, np.tile(tokens, (4, 1)))
    np.testing.assert_allclose(logits, np.tile(expected, (4, 1, 1)), atol=1e-4)


# ----------------------------------------------------------------------------- errors


def test_unknown_architecture(tmp_path):
    path = _copy("mixtral", tmp_path, config=lambda hf: {**hf, "architectures": ["Foo"]})
    with pytest.raises(PretrainedError, match=r"config\.json:architectures=\['Foo'\].*Mixtral"):
        from_hf(path)


def test_missing_tensor(tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    path = _copy("olmoe", tmp_path, tensors=lambda w: {k: v for k, v in w.items() if k != name})
    with pytest.raises(PretrainedError, match=rf"model\.safetensors:{name}='missing'.*\(16, 32\)"):
        from_hf(path)


def test_wrong_shape(tmp_path):
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    path = _copy("olmoe", tmp_path, tensors=lambda w: {**w, name: w[name][:8]})
    with pytest.raises(PretrainedError, match=rf"{name}\.shape=\(8, 32\).*\(16, 32\)"):
        from_hf(path)


def test_unknown_tensor(tmp_path):
    name = "model.layers.0.mlp.extra.weight"
    path = _copy("olmoe", tmp_path, tensors=lambda w: {**w, name: np.zeros(3, np.float32)})
    with pytest.raises(PretrainedError, match=rf"model\.safetensors:{name}="):
        from_hf(path)


def test_ignorable_tensor_is_ignored(tmp_path):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    path = _copy("olmoe", tmp_path, tensors=lambda w: {**w, name: np.zeros(4, np.float32)})
    tokens, expected = _reference("olmoe")
    np.testing.assert_allclose(_forward(from_hf(path), tokens)[0], expected, atol=1e-4)


def test_missing_config(tmp_path):
    with pytest.raises(PretrainedError, match=r"^path=.* holding config\.json"):
        from_hf(tmp_path)


def test_truncated_checkpoint_is_one_line(tmp_path):
    path = _copy("olmoe", tmp_path)
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # an interrupted download: the tail of the data is missing
        f.truncate(size - 1000)
    with pytest.raises(PretrainedError) as err:
        from_hf(path)
    assert str(err.value) == (
        f"{weights}: truncated: its header announces {size} bytes, the file holds {size - 1000}"
    )
    # One traceback: nothing chained to it is printed ("During handling of ...").
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_value_the_decoder_rejects_names_the_checkpoint(tmp_path):
    path = _copy("olmoe", tmp_path, config=lambda hf: {**hf, "num_key_value_heads": 3})
    with pytest.raises(PretrainedError, match=r"config\.json: model\.num_kv_heads=3 is invalid"):
        hf_model_config(path)


def test_bad_override_value_names_the_override():
    with pytest.raises(ConfigError, match=r"^moe\.threshold=2\.0 is invalid"):
        hf_model_config(FIXTURES / "olmoe", router="top_p", threshold=2.0)


def test_bad_override_name():
    with pytest.raises(PretrainedError, match=r"^thresold=0\.5 is invalid: .*threshold"):
        hf_model_config(FIXTURES / "olmoe", thresold=0.5)


@pytest.mark.parametrize(
    ("family", "edit", "match"),
    [
        ("mixtral", {"sliding_window": 4096}, r"config\.json:sliding_window=4096"),
        ("qwen2_moe", {"use_sliding_window": True}, r"config\.json:use_sliding_window=True"),
        ("olmoe", {"clip_qkv": 8.0}, r"config\.json:clip_qkv=8\.0"),
        ("qwen2_moe", {"mlp_only_layers": [1]}, r"config\.json:mlp_only_layers=\[1\]"),
        ("olmoe", {"hidden_act": "gelu"}, r"config\.json:hidden_act='gelu'"),
    ],
)
def test_unsupported_config(tmp_path, family, edit, match):
    path = _copy(family, tmp_path, config=lambda hf: {**hf, **edit})
    with pytest.raises(PretrainedError, match=match):
        hf_model_config(path)


# ----------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from dynmoe_jax.pretrained import from_hf

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    jax.device_put(np.zeros(8, np.float32)).block_until_ready()  # the runtime is up
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # peak := now
        f.write("5")
    model = from_hf(sys.argv[1])
    jax.block_until_ready(jax.tree.leaves(model))
    print(status("VmHWM") - base)
""")


def test_import_peak_memory(tmp_path):
    """A ~200 MB Mixtral-like checkpoint: resident memory grows by less than 1.5x its size
    (the model itself lives in host memory on CPU, so 1.0x is the floor)."""
    v, d, f, e, n_layers = 1024, 512, 1024, 8, 4
    hf = {"architectures": ["MixtralForCausalLM"], "vocab_size": v, "hidden_size": d,
          "intermediate_size": f, "num_hidden_layers": n_layers, "num_attention_heads": 8,
          "num_key_value_heads": 2, "num_local_experts": e, "num_experts_per_tok": 2,
          "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf))
    rng = np.random.default_rng(0)
    weights = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d),
               "model.norm.weight": (d,)}  # fmt: skip
    for i in range(n_layers):
        p = f"model.layers.{i}"
        weights |= {f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight":
                    (d,), f"{p}.self_attn.q_proj.weight": (d, d), f"{p}.self_attn.k_proj.weight":
                    (d // 4, d), f"{p}.self_attn.v_proj.weight": (d // 4, d),
                    f"{p}.self_attn.o_proj.weight": (d, d),
                    f"{p}.block_sparse_moe.gate.weight": (e, d)}  # fmt: skip
        for j in range(e):
            x = f"{p}.block_sparse_moe.experts.{j}"
            weights |= {f"{x}.w1.weight": (f, d), f"{x}.w3.weight": (f, d),
                        f"{x}.w2.weight": (d, f)}  # fmt: skip
    arrays = {k: rng.standard_normal(s, np.float32) for k, s in weights.items()}
    save_file(arrays, tmp_path / "model.safetensors")
    size = (tmp_path / "model.safetensors").stat().st_size
    del arrays
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    growth = int(out.stdout.split()[-1])
    ratio = growth / size
    print(f"checkpoint {size / 2**20:.0f} MiB, resident growth {growth / 2**20:.0f} MiB, "
          f"ratio {ratio:.2f}")  # fmt: skip
    assert 0.9 < ratio < 1.5
