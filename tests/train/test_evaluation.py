"""Validation: token-weighted loss and experts per token, by hand and on padded batches of the
tiny model, and the line that reports them."""

import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import data as data_lib
from dynmoe_jax import train
from dynmoe_jax.train import evaluation


def test_evaluate_weighs_every_batch_by_its_tokens_and_one_line_says_so():
    # An eval step returns sums over its batch; two batches of 4 and 1 weighted tokens.
    outs = [{"nll": 6.0, "tokens": 4.0, "experts_per_layer": np.asarray([6.0, 4.0])},
            {"nll": 2.0, "tokens": 1.0, "experts_per_layer": np.asarray([2.0, 1.0])}]  # fmt: skip
    result = evaluation.evaluate(lambda params, batch: outs[batch], None, [0, 1])
    assert result["loss"] == pytest.approx(8 / 5) and result["perplexity"] == pytest.approx(
        np.exp(8 / 5)
    )
    np.testing.assert_allclose(result["experts_per_layer"], [8 / 5, 5 / 5])
    assert result["experts_per_token"] == pytest.approx(1.3)
    assert (result["tokens"], result["batches"]) == (5.0, 2)
    assert evaluation.describe_validation(result, np.log(20.0)) == (
        "validation split, 2 batches (5 tokens): loss 1.6000, perplexity 4.95 (unigram "
        "baseline on these tokens: 20.00), experts per token 1.30"
    )
    one = evaluation.describe_validation({**result, "batches": 1})
    assert one.startswith("validation split, 1 batch (5 tokens): loss 1.6000")
    with pytest.raises(ValueError, match="produced no batch"):
        evaluation.evaluate(lambda params, batch: outs[batch], None, [])


@pytest.mark.slow
def test_padded_positions_are_not_counted_in_validation_experts(tiny_run):
    config = tiny_run()
    data = data_lib.from_config(config.data)
    task = train.build_task(config, data.vocab_size)
    params = train.init_state(task).params
    batch = dict(data.train_batch(0))
    weights = np.ones_like(batch["weights"])
    weights[5:] = 0.0  # three padded rows, as the last validation batch has
    weights[0, 20:] = 0.0  # and a padded tail
    batch["inputs"] = np.where(weights > 0, batch["inputs"], data.pad_id).astype(np.int32)
    batch["weights"] = weights
    result = train.evaluate(train.make_eval_step(task), params, [batch])
    _, layer = nnx.merge(task.graphdef, params)(batch["inputs"])
    experts_LBT = np.asarray(layer["token_experts"], np.float64)
    kept = weights > 0
    by_hand = [experts_BT[kept].sum() / kept.sum() for experts_BT in experts_LBT]
    np.testing.assert_allclose(result["experts_per_layer"], by_hand, rtol=1e-6)
    assert result["tokens"] == kept.sum() == 5 * 32 - 12
    every_position = experts_LBT.mean(axis=(1, 2))
    assert np.abs(every_position - by_hand).max() > 1e-3  # padding would have shifted it
