"""Per-task figures: the means of the counted experts, their place in lm-eval's results, and
the table."""

import numpy as np
import pytest

from dynmoe_jax.lm_eval import figures


def test_a_counter_adds_calls_and_divides_by_the_counted_tokens():
    counter = figures.TaskCounter()
    counter.add(np.array([3, 6]), counted=2, tokens=10, seconds=0.5)
    counter.add(np.array([1, 2]), counted=2, tokens=6, seconds=0.3)
    out = counter.figures()
    assert out["experts_per_token_by_layer"] == [1.0, 2.0]
    assert out["experts_per_token"] == 1.5
    assert out["tokens_per_second"] == pytest.approx(16 / 0.8)
    assert out["scored_tokens"] == 4


def test_figures_go_into_each_tasks_entry_and_the_table():
    results = {
        "results": {"mc": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "mc"},
                    "ppl": {"word_perplexity,none": 12.0, "bits_per_byte,none": 1.1}},
        "config": {"dynmoe_jax": {"tasks": {
            "mc": {"experts_per_token": 1.25, "tokens_per_second": 100.0},
            "ppl": {"experts_per_token": 2.0, "tokens_per_second": 50.0}}}},
    }  # fmt: skip
    figures.with_task_figures(results)
    assert results["results"]["mc"]["experts_per_token"] == 1.25
    assert results["results"]["ppl"]["tokens_per_second"] == 50.0
    lines = figures.table(results).splitlines()
    assert lines[2] == "| mc | acc | 0.5000 | 1.250 | 100.0 |"
    assert lines[3] == "| ppl | word_perplexity | 12.0000 | 2.000 | 50.0 |"


def test_the_main_metric_prefers_accuracy_and_skips_errors():
    assert figures.main_metric({"acc_norm,none": 0.3, "acc,none": 0.2}) == ("acc", 0.2)
    assert figures.main_metric({"acc_stderr,none": 0.1, "f1,none": 0.4}) == ("f1", 0.4)
    assert figures.main_metric({"alias": "x"}) is None
