"""The paired-seed comparison: the heterogeneous model's k from a layer profile, hand-worked;
the variants share their initial weights seed by seed; the paired statistics against a hand
computation; and the command line that retrains a run resolves to the run's own config."""

import numpy as np
import pytest
from flax import nnx
from scipy import stats as scipy_stats

from dynmoe_jax import config as config_lib
from dynmoe_jax import main as main_lib
from dynmoe_jax.configs import default
from dynmoe_jax.model.decoder import Decoder
from dynmoe_jax.moe.balance import RoutingState
from experiments import paired_report, paired_seeds
from experiments import paired_variants as pv


@pytest.mark.parametrize(
    "profile, k",
    [
        ([2.1, 1.9, 1.7, 1.3], (2, 2, 2, 1)),  # sum 7.0: floors 2, 1, 1, 1, then .9 and .7
        ([1.76, 1.76, 1.76, 1.76], (2, 2, 2, 1)),  # 7.04 -> 7: equal remainders, lower first
        ([2.6, 1.2, 1.1, 1.0], (3, 1, 1, 1)),  # 5.9 -> 6
        ([0.4, 9.5], (1, 8)),  # each k kept in 1..num_experts (8)
    ],
)
def test_per_layer_k_rounds_the_profile_to_its_total_rows(profile, k):
    assert pv.per_layer_k(profile, 8) == k


def _params(name: str, seed: int, size: str, **kw):
    run = config_lib.resolve(pv.lm_config(name, seed, size, steps=2, **kw))
    model = Decoder(run.model, rngs=nnx.Rngs(run.data.seed))
    trained = nnx.All(nnx.Param, nnx.Not(RoutingState))  # the routing state is not trained
    return dict(nnx.to_flat_state(nnx.state(model, trained))), run


def test_every_variant_of_a_seed_starts_from_the_same_weights():
    base, _ = _params("top2", 3, "small")
    for name in pv.VARIANTS:
        k = (2, 2, 2, 1) if name == "hetero" else None
        params, run = _params(name, 3, "small", per_layer_k=k)
        assert run.data.seed == 3 and run.moe.dispatch.value == "grouped"
        assert params.keys() == base.keys()
        for path, var in base.items():
            np.testing.assert_array_equal(params[path][...], var[...])
    other, _ = _params("top2", 4, "small")
    differ = [p for p, v in base.items() if not np.array_equal(other[p][...], v[...])]
    assert len(differ) > len(base) // 2  # every drawn weight; the norms' ones do not differ


def test_variant_configs_keep_their_budget_and_routing():
    fixed = config_lib.resolve(pv.lm_config("top_p_fixed", 0, "large", steps=2)).moe
    assert (fixed.num_experts, fixed.threshold, fixed.target_k) == (96, pv.FIXED_P["large"], None)
    assert fixed.budget(1024) == int(np.ceil(pv.BUDGET_FACTOR * pv.PAPER_K * 1024))
    bias = config_lib.resolve(pv.lm_config("top_p_t1.76_bias", 0, "small", steps=2))
    assert bias.moe.bias_balance == pv.BIAS_RATE and bias.loss.load_balance_weight == 0.0
    assert bias.moe.target_k == pv.PAPER_K
    with pytest.raises(ValueError, match="per_layer_k is given for variant 'hetero'"):
        pv.lm_config("hetero", 0, "small")
    with pytest.raises(ValueError, match=r"size='huge' is invalid: allowed small \| large"):
        pv.lm_config("top2", 0, "huge")


def test_every_variant_resolves_at_a_gpu_scale():
    for size in pv.SIZES:
        for name in pv.VARIANTS:
            k = (2, 2, 2, 1) if name == "hetero" else None
            run = config_lib.resolve(pv.lm_config(name, 0, size, scale=4, per_layer_k=k))
            assert (run.model.d_model, run.moe.d_ff, run.moe.num_experts) == (
                256,
                512,
                pv.EXPERTS[size],
            )


def test_hetero_follows_its_profile_source_in_each_seed():
    assert paired_seeds.variants_at("large", None) == list(pv.LARGE_VARIANTS)
    assert paired_seeds.variants_at("small", ["top2", "hetero"]) == [
        "top2", pv.PROFILE_SOURCE, "hetero"]  # fmt: skip


def test_paired_differences_and_their_interval_by_hand():
    base, values = [3.0, 3.1, 3.2, 3.3], [3.01, 3.09, 3.23, 3.31]
    p = paired_report.paired(values, base)
    d = np.array([0.01, -0.01, 0.03, 0.01])
    half = scipy_stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    np.testing.assert_allclose(p["differences"], d, atol=1e-12)
    np.testing.assert_allclose([p["mean"], p["low"], p["high"]],
                               [0.01, 0.01 - half, 0.01 + half], atol=1e-12)  # fmt: skip
    assert p["seeds_for_tolerance"] == int(np.ceil((1.96 * d.std(ddof=1) / 0.003) ** 2))
    assert paired_report.verdict(p) == "no difference detected at this power"
    lower = paired_report.paired([2.9, 3.0], [3.0, 3.1])  # the same difference twice: sd 0
    assert paired_report.verdict(lower) == "lower loss than the reference"
    assert paired_report.verdict({"low": 0.001, "high": 0.01}) == "higher loss than the reference"
    assert paired_report.verdict({"low": -0.2, "high": -0.1}, "accuracy") == (
        "less accurate than the reference"
    )


def test_the_command_of_a_run_resolves_to_its_config(tmp_path):
    config = pv.lm_config("hetero", 2, "large", per_layer_k=(2, 2, 1, 2))
    command = paired_report.cli_command(config, tmp_path / "run")
    assert "--config.moe.top_k=2,2,1,2" in command and "--config.seed=2" in command
    overrides, rest = main_lib.split_config_args(command.split()[3:])
    assert rest == ["--config=dynmoe_jax/configs/default.py", f"--workdir={tmp_path / 'run'}"]
    again = config_lib.set_fields(default.get_config(), overrides)
    assert config_lib.resolve(again) == config_lib.resolve(config)
