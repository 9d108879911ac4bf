"""TrainConfig and LossConfig: defaults and the edges of each range pass; a bad field is one
line naming it and its allowed range."""

import pytest

from dynmoe_jax.train.config import LossConfig, NonFinite, TrainConfig
from dynmoe_jax.validation import ConfigError


def test_defaults_and_the_edges_of_each_range_pass():
    assert TrainConfig().nonfinite is NonFinite.SKIP
    assert TrainConfig(nonfinite="stop").nonfinite is NonFinite.STOP
    edges = TrainConfig(min_learning_rate_ratio=1.0, adam_b1=0.0, warmup_steps=0,
                        grad_clip_norm=0.0)  # fmt: skip
    assert (edges.min_learning_rate_ratio, edges.adam_b1) == (1.0, 0.0)
    assert (LossConfig().load_balance_weight, LossConfig().dynamic_weight) == (1e-2, 1e-4)


@pytest.mark.parametrize(
    "owner, field, value, message",
    [
        (TrainConfig, "adam_b1", 1.0, "adam_b1=1.0 is invalid: allowed 0 <= adam_b1 < 1"),
        (TrainConfig, "min_learning_rate_ratio", 1.5,
         "min_learning_rate_ratio=1.5 is invalid: allowed 0 <= min_learning_rate_ratio <= 1"),
        (TrainConfig, "warmup_steps", -1, "warmup_steps=-1 is invalid: allowed an integer >= 0"),
        (TrainConfig, "keep_checkpoints", True,
         "keep_checkpoints=True is invalid: allowed an integer >= 1"),
        (TrainConfig, "nonfinite", "ignore",
         "nonfinite='ignore' is invalid: allowed 'skip' | 'stop'"),
        (LossConfig, "z_loss_weight", -0.5,
         "loss.z_loss_weight=-0.5 is invalid: allowed a number >= 0"),
    ],
)  # fmt: skip
def test_a_bad_field_is_one_line_naming_it(owner, field, value, message):
    with pytest.raises(ConfigError) as err:
        owner(**{field: value})
    assert str(err.value) == message
