"""ModelConfig: the one-line message of every bad field and the remat policy's values."""

import re

import pytest

from dynmoe_jax.model.config import Remat
from tests.model.decoders import (
    model_config,
)


def test_remat_policy_values():
    assert (
        model_config(remat="none").remat is Remat.NONE
        and model_config(remat="full").remat is Remat.FULL
    )
    assert model_config(remat="dots").remat is Remat.DOTS
    with pytest.raises(ValueError, match=re.escape(
        "model.remat='some' is invalid: allowed 'none' | 'full' | 'dots'"
    )):  # fmt: skip
        model_config(remat="some")


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
        model_config(**{field: value})
    assert "\n" not in str(err.value)


def test_shared_expert_needs_moe_layers():
    with pytest.raises(ValueError, match=re.escape(
        "model.shared_d_ff=8 is invalid: allowed None in a dense model (it adds to MoE layers)"
    )):  # fmt: skip
        model_config(moe=None, shared_d_ff=8)
