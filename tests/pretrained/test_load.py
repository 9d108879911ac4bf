"""Importing Hugging Face MoE checkpoints (from_hf): logits equal to transformers' for every
family, bfloat16 tensors, top-p at threshold 1 as the dense mixture, experts sharded over a
mesh, a truncated file in one line, and peak memory; a resolved model config built as given;
the checks of a folder that a run starts from (``--config.init_from``) and of its vocabulary."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dynmoe_jax import config as config_lib
from dynmoe_jax import sharding, train
from dynmoe_jax.configs import pretrained as pretrained_config
from dynmoe_jax.moe.layer import MoELayer
from dynmoe_jax.pretrained import PretrainedError, from_hf, hf_model_config
from dynmoe_jax.pretrained import load as load_lib
from dynmoe_jax.validation import ConfigError
from tests.pretrained.hf_fixtures import (
    FAMILY_DIRS,
    FIXTURES,
    broken_copy,
    edited_copy,
    forward,
    transformers_logits,
)


@pytest.mark.parametrize("family", FAMILY_DIRS)
def test_logits_match_transformers(family):
    tokens, expected = transformers_logits(family)
    logits, aux = forward(from_hf(FIXTURES / family), tokens)
    diff = float(np.max(np.abs(np.asarray(logits) - expected)))
    print(f"{family}: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-4
    # The checkpoint's own routing: top-k, k experts for every token.
    cfg = hf_model_config(FIXTURES / family)
    np.testing.assert_array_equal(aux["token_experts"], cfg.moe.top_k)


def test_bfloat16_checkpoint(tmp_path):
    """bf16 tensors are read as such and widened into the float32 parameters."""

    def to_bf16(weights):
        return {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}

    path = edited_copy("olmoe", tmp_path, tensors=to_bf16)
    model = from_hf(path)
    src = load_file(FIXTURES / "olmoe" / "model.safetensors")
    want_EDF = np.stack(
        [src[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].T for e in range(8)]
    ).astype(ml_dtypes.bfloat16)
    got_EDF = model.blocks[1].ffn.w_up_EDF[...]
    assert got_EDF.dtype == jnp.float32
    np.testing.assert_array_equal(got_EDF, want_EDF.astype(np.float32))


def test_top_p_threshold_one_is_the_dense_mixture():
    """threshold=1.0 with raw weights: every expert, weighted by its probability. The layer of
    the imported model against a float64 loop over the checkpoint's own expert tensors."""
    path = FIXTURES / "olmoe"
    model = from_hf(path, router="top_p", threshold=1.0, renormalize=False)
    tokens, _ = transformers_logits("olmoe")
    _, aux = forward(model, tokens)
    assert np.all(np.asarray(aux["token_experts"]) == 8)  # every expert, every token

    layer = model.blocks[0].ffn
    assert isinstance(layer, MoELayer)
    x_MD = np.random.default_rng(0).normal(size=(10, 32))
    y_MD = np.asarray(forward(layer, x_MD[None].astype(np.float32))[0][0], np.float64)

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


def test_expert_weights_sharded_over_a_mesh():
    mesh = sharding.make_mesh("data=2,expert=4")
    tokens, expected = transformers_logits("olmoe")
    model = from_hf(FIXTURES / "olmoe", mesh=mesh)
    w_gate = model.blocks[0].ffn.w_gate_EDF[...]
    assert w_gate.sharding.spec[0] == "expert"
    assert w_gate.sharding.shard_shape(w_gate.shape) == (2, 32, 16)
    # The batch is split over data x expert = 8: the two sequences, four times each.
    with jax.set_mesh(mesh):
        logits, _ = forward(model, np.tile(tokens, (4, 1)))
    np.testing.assert_allclose(logits, np.tile(expected, (4, 1, 1)), atol=1e-4)


def test_truncated_checkpoint_is_one_line(tmp_path):
    path = edited_copy("olmoe", tmp_path)
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


def test_a_resolved_config_is_built_as_given_and_not_with_overrides_too():
    cfg = hf_model_config(FIXTURES / "olmoe", router="top_p", threshold=0.5)
    model = from_hf(FIXTURES / "olmoe", cfg)
    assert model.cfg == cfg and model.cfg.moe.threshold == 0.5
    with pytest.raises(TypeError, match="a resolved cfg or overrides, not both"):
        from_hf(FIXTURES / "olmoe", cfg, router="top_k")


# ----------------------------------------------------------------------------- init_from


def test_the_vocabulary_must_be_the_tokenizers_with_at_most_its_padding():
    cfg = hf_model_config(FIXTURES / "olmoe")  # a vocabulary of 128
    load_lib.check_vocabulary(str(FIXTURES / "olmoe"), cfg, 128)
    with pytest.raises(ConfigError) as err:
        load_lib.check_vocabulary("ckpt", cfg, 129)
    assert str(err.value) == (
        "init_from='ckpt' is invalid: allowed a checkpoint whose vocab_size (128) covers the "
        "129 ids of its tokenizer.json"
    )
    # Twice the ids, or the next multiple of 128 for a tiny vocabulary.
    assert load_lib.most_rows(128) == 256 and load_lib.most_rows(40) == 128


def _expected(kind: str, folder) -> str:
    return {
        "shard": f"{folder / 'model-00002-of-00002.safetensors'}: missing, though "
                 "model.safetensors.index.json lists it (1 of 2 shards missing)",
        "shape": f"{folder / 'model.safetensors'}:model.norm.weight.shape=(31,) is invalid: "
                 "allowed (32,) (for final_norm.scale_D)",
        "vocab=512": f"init_from={str(folder)!r} is invalid: allowed a tokenizer.json of the "
                     "checkpoint's own vocabulary: config.json's vocab_size (512) is more than "
                     "256, the padding of its tokenizer's 128 ids (a tokenizer of another "
                     "model?)",
    }[kind]  # fmt: skip


@pytest.mark.parametrize("kind", ["shard", "shape", "vocab=512"])
def test_a_broken_folder_is_refused_before_any_data_is_read(kind, tmp_path):
    folder = broken_copy(kind, tmp_path / "ckpt")
    c = pretrained_config.get_config()
    c.init_from, c.data_dir = str(folder), str(tmp_path / "cache")
    with pytest.raises(ConfigError) as err:
        config_lib.check_config(c)
    assert str(err.value) == _expected(kind, folder)
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(config_lib.resolve(c), tmp_path / "run")
    assert str(err.value) == _expected(kind, folder)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_missing_shard_is_a_pretrained_error_in_python(tmp_path):
    folder = broken_copy("shard", tmp_path / "ckpt")
    with pytest.raises(PretrainedError) as err:
        from_hf(folder)
    assert str(err.value) == _expected("shard", folder)


def test_padding_rows_are_accepted_with_one_note(tmp_path, capsys):
    folder = broken_copy("vocab=192", tmp_path / "ckpt")  # 128 ids padded to 192 rows
    c = pretrained_config.get_config()
    c.init_from = str(folder)
    config_lib.check_config(c)
    config_lib.check_config(c)  # an unchanged folder is checked, and noted, once
    assert capsys.readouterr().err == (
        f"note: init_from={folder}: the embedding has 192 rows, the tokenizer 128 ids; the "
        "other 64 rows are padding that no text encodes to\n"
    )
