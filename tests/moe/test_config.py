"""MoEConfig: the one-line message of every bad field, the worst-case selection bound, the
rule that sends few tokens down the decode path, and a routing target's checks."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from dynmoe_jax import MoEConfig
from dynmoe_jax.moe import config as moe_config
from dynmoe_jax.moe import routing

E, D, F = 8, 16, 32


BAD = [
    ("num_experts", 0, "integer >= 1"),
    ("router", "top_q", "'top_p' | 'top_k'"),
    ("threshold", 0.0, "0 < threshold <= 1"),
    ("threshold", 1.5, "0 < threshold <= 1"),
    ("top_k", 9, "1..moe.num_experts=8"),
    ("max_k", 0, "None or 1..moe.num_experts=8"),
    ("capacity_factor", -1.0, "None (no dropping) or a number > 0"),
    ("expected_k", 0.0, "0 < expected_k <= moe.num_experts=8"),
    ("group_size", 0, "None or an integer >= 1"),
    ("dispatch", "scatter", "'einsum' | 'index' | 'grouped'"),
    ("capacity_factor", 0.0, "None (no dropping) or a number > 0"),
    ("block_size", 0, "an integer >= 1"),
    ("matmul_backend", "cuda", "'blocks' | 'ragged_dot' | 'tokamax'"),
    ("drop_order", "random", "'rank' | 'weight'"),
]


@pytest.mark.parametrize("field, value, allowed", BAD)
def test_bad_config_names_field_and_range(field, value, allowed):
    with pytest.raises(ValueError) as err:
        MoEConfig(**{"num_experts": E, "d_model": D, "d_ff": F, field: value})
    message = str(err.value)
    assert f"moe.{field}=" in message and allowed in message and "\n" not in message


@pytest.mark.parametrize("threshold, max_k", [(0.4, None), (0.375, None), (1.0, None), (0.9, 3)])
def test_top_p_selection_bound_holds_in_the_worst_case(threshold, max_k):
    cfg = MoEConfig(num_experts=16, d_model=D, d_ff=F, threshold=threshold, max_k=max_k)
    # Equal probabilities select the most experts: ceil(threshold * E) (plus rounding).
    logits = jnp.concatenate([jnp.zeros((1, 16)), jax.random.normal(jax.random.key(0), (99, 16))])
    mask = routing.top_p_mask(jax.nn.softmax(logits), threshold, max_k)
    assert int(jnp.max(jnp.sum(mask, -1))) <= cfg.max_selections
    assert cfg.max_selections <= (max_k or 16)


def test_automatic_token_limit_hand_worked():
    # E=8, k=2, blocks of 32: N=42 gives u=8: 42*8=336 <= 84+256; N=43: 344 > 86+256.
    cfg = MoEConfig(num_experts=8, d_model=4, d_ff=4)
    assert cfg.auto_decode_tokens == 42
    # E=64, k=8: N=36: 36*64=2304 <= 288+2048; N=37: 2368 > 296+2048.
    assert (
        MoEConfig(num_experts=64, d_model=4, d_ff=4, router="top_k", top_k=8).auto_decode_tokens
        == 36
    )
    # Every N up to the block size passes, whatever k and E.
    assert (
        MoEConfig(
            num_experts=4, d_model=4, d_ff=4, expected_k=1.0, block_size=16
        ).auto_decode_tokens
        >= 16
    )


def test_path_needs_few_tokens_and_no_possible_drop():
    base = {"num_experts": 8, "d_model": 4, "d_ff": 4}
    free = MoEConfig(capacity_factor=None, **base)
    assert free.takes_decode_path(1, 1) and free.takes_decode_path(42, 42)
    assert not free.takes_decode_path(43, 43)
    # A grouped budget of ceil(1.25 * 2 * 1) = 3 < 4 selections a top-p token may make.
    assert not MoEConfig(capacity_factor=1.25, **base).takes_decode_path(1, 1)
    # Index capacity of one token per group is that token: nothing can drop.
    assert MoEConfig(capacity_factor=1.25, dispatch="index", **base).takes_decode_path(1, 1)
    assert not MoEConfig(capacity_factor=None, decode_tokens=0, **base).takes_decode_path(1, 1)
    assert MoEConfig(capacity_factor=None, decode_tokens=500, **base).takes_decode_path(500, 250)


@pytest.mark.parametrize("value", [-1, 2.5, "8", True])
def test_bad_decode_tokens_is_one_line(value):
    with pytest.raises(ValueError) as err:
        MoEConfig(num_experts=8, d_model=4, d_ff=4, decode_tokens=value)
    assert str(err.value) == (f"moe.decode_tokens={value!r} is invalid: allowed None (by the "
                              "rule) or an integer >= 0 (0 = never)")  # fmt: skip


def test_a_target_needs_top_p_and_a_rate_is_not_negative(tiny_run):
    with pytest.raises(ValueError, match=r"^moe.target_k=1.5 is invalid: .*moe.router='top_p'"):
        tiny_run(**{"moe.router": "top_k", "moe.target_k": 1.5})
    with pytest.raises(ValueError, match=r"^moe.target_k=9.0 is invalid: allowed None or 1"):
        tiny_run(**{"moe.target_k": 9.0})
    with pytest.raises(ValueError, match=r"^moe.bias_balance=-0.1 is invalid: allowed a number"):
        tiny_run(**{"moe.bias_balance": -0.1})
    run = tiny_run(**{"moe.target_k": 1.5})
    assert run.moe.capacity_k == 1.5  # the budget is sized on the target
    assert dataclasses.replace(run.moe, expected_k=2.0).capacity_k == 2.0


def test_capacity_and_budget_follow_one_sizing_rule():
    assert moe_config.capacity(64, 8, 2.0, 1.25) == 20  # ceil(1.25 * 64 * 2 / 8)
    assert moe_config.capacity(64, 8, 1.5, 1.0) == 12
    assert moe_config.capacity(4, 64, 1.0, 0.01) == 1  # never zero slots
    assert moe_config.capacity(8, 2, 2.0, 4.0) == 8  # never more than the group
    assert moe_config.capacity(8, 2, 2.0, None) == 8  # no dropping
    assert moe_config.capacity(10, 3, 1.1, 1.0) == 4  # ceil(1.1 * 10 / 3)
    assert moe_config.budget(64, 2.0, 1.25, num_ranks=2) == 128  # ceil(1.25*2*64) = S*K
    assert moe_config.budget(64, 1.75, 1.1, num_ranks=7) == 124  # ceil(123.2)
    assert moe_config.budget(64, 2.0, None, num_ranks=7) == 448  # S * K: never drops
    assert moe_config.budget(4, 1.0, 0.01, num_ranks=1) == 1
