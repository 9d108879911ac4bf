"""Fast tests of the experiment scripts' pieces (experiments/): statistics, synthetic tasks,
configs, run reuse and the table writer, at tiny sizes."""

import json

import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax.train import run_record
from experiments import report, run_cache, stats, sweep_threshold, tasks, variants

# ----------------------------------------------------------------------------- statistics


def test_spearman_of_hand_ranked_values():
    # ranks x: 2, 3.5, 3.5, 1; y: 1, 3, 4, 2 -> Pearson of the ranks = 0.7379...
    rx, ry = np.array([2, 3.5, 3.5, 1]), np.array([1, 3, 4, 2.0])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    expected = (rx @ ry) / np.sqrt((rx @ rx) * (ry @ ry))
    assert stats.spearman([10, 20, 20, 5], [1, 3, 4, 2]) == pytest.approx(expected, abs=1e-12)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))


def test_t_interval_and_mean_sd():
    mean, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / np.sqrt(3)  # t(0.975, df=2) * sd 1 / sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert stats.t_interval([5.0]) == (5.0, 5.0, 5.0)
    assert stats.mean_sd([1.0, 3.0]) == pytest.approx((2.0, np.sqrt(2.0)))
    assert stats.fmt_mean_sd([1.0, 3.0], 2) == "2.00 ± 1.41"
    assert stats.fmt_mean_sd([1.5], 2) == "1.50"


def test_quantile_bins_split_evenly_and_keep_ties_together():
    bins = stats.quantile_bins(np.arange(100.0), 10)
    np.testing.assert_array_equal(np.bincount(bins), [10] * 10)
    assert np.all(np.diff(bins) >= 0)
    tied = stats.quantile_bins(np.array([1.0] * 50 + [2.0] * 50), 4)
    assert len(set(tied[:50])) == 1 and len(set(tied[50:])) == 1 and tied[0] < tied[-1]


def test_binned_means_of_a_known_relation():
    x = np.arange(100.0)
    y = np.where(x < 50, 1.0, 3.0)
    rows = stats.binned_means(x, y, 4)
    assert [r["count"] for r in rows] == [25, 25, 25, 25]
    assert [r["y_mean"] for r in rows] == [1.0, 1.0, 3.0, 3.0]
    assert rows[0]["x_min"] == 0.0 and rows[-1]["x_max"] == 99.0
    assert rows[1]["x_mean"] == pytest.approx(37.0)
    assert all(r["y_sem"] == 0.0 for r in rows)


def test_layer_contrast_leaves_out_the_middle_layer():
    assert sweep_threshold.layer_contrast(np.array([3.0, 2.0, 1.0, 1.0])) == pytest.approx(1.5)
    assert sweep_threshold.layer_contrast(np.array([[2.0, 9.0, 1.0]])) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- writers


def test_markdown_table_and_results_files(tmp_path):
    table = report.markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]])
    assert table == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |\n"
    with pytest.raises(ValueError, match="2 columns"):
        report.markdown_table(["a", "b"], [[1]])
    md, js = report.write_results(
        "demo",
        "Demo",
        {"T": (["a"], [[1]])},
        {"values": np.array([1.5, 2.0]), "bad": float("nan")},
        "cmd --x",
        tmp_path,
    )
    assert md.read_text() == "# Demo\n\nCommand: `cmd --x`\n\n## T\n\n| a |\n|---|\n| 1 |\n"
    assert json.loads(js.read_text()) == {"command": "cmd --x", "values": [1.5, 2.0], "bad": None}


def test_aligned_series_and_steady_step_ms():
    a = [{"step": 1, "v": 1.0}, {"step": 2, "v": 2.0}, {"step": 3, "v": 3.0}]
    b = [{"step": 2, "v": 5.0}, {"step": 3, "v": 6.0}]
    steps, values = report.aligned_series([a, b], "v")
    np.testing.assert_array_equal(steps, [2, 3])
    np.testing.assert_array_equal(values, [[2.0, 3.0], [5.0, 6.0]])
    records = [{"tokens_per_sec": 10.0}, {"tokens_per_sec": 1000.0}, {"tokens_per_sec": 2000.0}]
    # The first window (compilation) is left out: median of 1000 and 2000 tokens/s.
    assert run_cache.steady_step_ms(records, tokens_per_step=150) == pytest.approx(100.0)


# ----------------------------------------------------------------------------- configs, runs


def test_lm_config_variants_match_activated_parameters():
    dense, top1 = variants.lm_config("dense", 0), variants.lm_config("top1", 0)
    top2, top_p = variants.lm_config("top2", 0), variants.lm_config("top_p", 3, threshold=0.2)
    assert dense.model.ffn == "dense" and dense.model.d_ff == 2 * dense.moe.d_ff
    assert (top1.moe.router, top1.moe.top_k) == ("top_k", 1)
    assert (top2.moe.router, top2.moe.top_k) == ("top_k", 2)
    assert (top_p.moe.router, top_p.moe.threshold, top_p.seed) == ("top_p", 0.2, 3)
    sized = variants.lm_config("top_p_sized", 0)
    assert (sized.moe.router, sized.moe.expected_k) == ("top_p", variants.SIZED_EXPECTED_K)
    assert top_p.moe.expected_k == 2.0 and sized.moe.threshold == 0.4
    assert {c.moe.dispatch for c in (top1, top2, top_p, sized)} == {"index"}
    grouped_p = variants.lm_config("top_p_grouped", 0)
    grouped_2 = variants.lm_config("top2_grouped", 0)
    assert (grouped_p.moe.dispatch, grouped_p.moe.router) == ("grouped", "top_p")
    assert grouped_p.moe.expected_k == variants.SIZED_EXPECTED_K
    assert (grouped_2.moe.dispatch, grouped_2.moe.top_k) == ("grouped", 2)
    assert grouped_p.moe.capacity_factor == grouped_2.moe.capacity_factor == 1.1
    big = variants.lm_config("top_p", 0, scale=4)
    assert big.num_train_steps == 4 * top_p.num_train_steps and big.model.d_model == 256
    assert big.model.d_model // big.model.num_heads == 16
    with pytest.raises(ValueError, match="variant"):
        variants.lm_config("top3", 0)
    assert variants.run_name("top_p", 1, 2, 0.3) == "top_p0.3-s1-x2"
    assert variants.run_name("dense", 0, 1) == "dense-s0-x1"
    assert variants.run_name("top_p_sized", 2, 1) == "top_p0.4_k1.4-s2-x1"
    assert variants.run_name("top_p_grouped", 0, 1) == "top_p0.4_grouped1.1-s0-x1"
    assert variants.results_stem("sweep", 1) == "sweep"
    assert variants.results_stem("sweep", 4) == "sweep_x4"


def _fake_run(workdir, config, corpus="kjv"):
    """A finished run's files, as run_or_load and the library leave them, without training."""
    workdir.mkdir(parents=True)
    summary = {"final": {"loss": 2.5}, "wall_s": 12.0, "step_ms": 80.0}
    (workdir / run_cache.SUMMARY_FILE).write_text(json.dumps(summary))
    records = [{"step": 5, "split": "train", "loss": 3.0},
               {"step": 5, "split": "validation", "loss": 2.5}]  # fmt: skip
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if corpus is not None:  # the library's record of the corpus it trained on
        run_record.save(config_lib.resolve(config), workdir, corpus)


def _no_training(config, workdir):
    raise AssertionError("the cache trained instead of reusing or refusing")


def test_finished_runs_are_reused_only_with_the_same_config(tmp_path):
    config = variants.lm_config("top_p", 0, steps=5)
    _fake_run(tmp_path / "run", config)
    run = run_cache.run_or_load(config, tmp_path / "run", train=_no_training)
    assert (run.final, run.wall_s, run.step_ms) == ({"loss": 2.5}, 12.0, 80.0)
    assert [r["split"] for r in run.train + run.validation] == ["train", "validation"]
    other = variants.lm_config("top_p", 0, steps=5, threshold=0.3)
    with pytest.raises(run_cache.RunCacheError, match="another config; pass --fresh"):
        run_cache.run_or_load(other, tmp_path / "run", train=_no_training)
    assert (tmp_path / "run" / run_cache.SUMMARY_FILE).exists()  # nothing deleted
    assert run_cache.load_run(tmp_path / "empty", config) is None


@pytest.mark.parametrize("corpus, message", [("pydoc", "dataset='pydoc', not dataset='kjv'"),
                                             (None, "no record of its corpus")])  # fmt: skip
def test_a_run_on_another_corpus_is_refused_not_deleted(tmp_path, corpus, message):
    config = variants.lm_config("top_p", 0, steps=5)
    _fake_run(tmp_path / "run", config, corpus=corpus)
    record = run_record.load(tmp_path / "run")
    assert (record and record.corpus) == corpus
    with pytest.raises(run_cache.RunCacheError, match=message):
        run_cache.run_or_load(config, tmp_path / "run", train=_no_training)
    kept = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"metrics.jsonl", run_cache.SUMMARY_FILE} <= kept  # nothing deleted


def test_unfinished_run_is_refused_and_fresh_retrains_saying_so(tmp_path, capsys):
    config = variants.lm_config("top_p", 0, steps=5)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(run_cache.RunCacheError, match="unfinished run"):
        run_cache.run_or_load(config, tmp_path / "run", train=_no_training)

    def fake_train(config, workdir):
        _fake_run(workdir / "inner", config)  # any files; the cache writes the summary
        (workdir / "metrics.jsonl").write_text('{"step": 5, "split": "train", "loss": 3.0}\n')
        return {"loss": 2.0}

    run = run_cache.run_or_load(config, tmp_path / "run", fresh=True, train=fake_train)
    assert f"[fresh] removing {tmp_path / 'run'}" in capsys.readouterr().out
    assert run.final == {"loss": 2.0} and not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- synthetic tasks


def _digits(ids):
    return [t - tasks.DIGIT0 for t in ids]


def test_synthetic_examples_are_correct():
    rng = np.random.default_rng(0)
    for task_index, task in enumerate(tasks.TASKS):
        for _ in range(50):
            tokens, is_answer = tasks.make_example(task_index, rng)
            assert tokens[0] == tasks.FIRST_TAG + task_index
            assert tokens[-1] == tasks.END and len(tokens) == len(is_answer)
            eq = tokens.index(tasks.EQUALS)
            prompt, answer = tokens[1:eq], _digits(tokens[eq + 1 : -1])
            # The answer digits and the closing ';' are the answer, nothing before '='.
            assert is_answer == [False] * (eq + 1) + [True] * (len(tokens) - eq - 1)
            if task.kind == "copy":
                assert answer == _digits(prompt) and len(answer) == task.digits
            else:
                plus = prompt.index(tasks.PLUS)
                a, b = _digits(prompt[:plus]), _digits(prompt[plus + 1 :])
                assert len(a) == len(b) == task.digits and len(answer) == task.digits + 1
                value = lambda ds: int("".join(map(str, ds)))  # noqa: E731
                assert value(answer[::-1]) == value(a) + value(b)  # least significant first


def test_decode_example():
    tokens = [tasks.FIRST_TAG + 2, *tasks.digits_to_ids([4, 7]), tasks.PLUS,
              *tasks.digits_to_ids([1, 9]), tasks.EQUALS,
              *tasks.digits_to_ids([6, 6, 0]), tasks.END]  # fmt: skip
    assert tasks.decode_example(tokens) == "add2: 47+19=660;"


def test_synthetic_batch_layout():
    rng = np.random.default_rng(1)
    batch = tasks.make_batch(rng, batch_size=10, seq_len=24)
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (10, 24)
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
    np.testing.assert_array_equal(np.bincount(batch["task"]), [2] * 5)  # balanced
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    # Each row starts with its task's tag and holds no other task's tag.
    tags = tasks.FIRST_TAG + batch["task"]
    np.testing.assert_array_equal(batch["inputs"][:, 0], tags)
    is_tag = (batch["inputs"] >= tasks.FIRST_TAG) & (
        batch["inputs"] < tasks.FIRST_TAG + len(tasks.TASKS)
    )
    assert np.all(batch["inputs"][is_tag] == np.broadcast_to(tags[:, None], (10, 24))[is_tag])
    # Weighted targets are answer digits or ';', never a tag, '+' or '='.
    weighted = batch["targets"][batch["weights"] > 0]
    assert np.all((weighted <= tasks.DIGIT0 + 9) | (weighted == tasks.END))
    assert 0 < batch["weights"].mean() < 1
    assert batch["inputs"].max() < tasks.VOCAB_SIZE and batch["inputs"].min() > 0


def _tiny_tasks_config(steps=2):
    config = tasks.tasks_config(seed=0, steps=steps)
    config.model.d_model, config.model.num_heads, config.moe.d_ff = 32, 2, 32
    config.model.num_layers = 2
    config.eval_batches = 1
    return config


@pytest.mark.slow
def test_task_and_token_statistics_on_a_tiny_model():
    from dynmoe_jax import inference
    from dynmoe_jax import train as train_lib

    config = _tiny_tasks_config()
    task = train_lib.build_task(config_lib.resolve(config), tasks.VOCAB_SIZE)
    params = train_lib.init_state(task).params
    batches = list(tasks.TaskSuiteData(config).eval_batches(1))
    per_task = tasks.task_statistics(task.graphdef, params, batches)
    assert per_task["experts"].shape == per_task["acc"].shape == (5,)
    assert per_task["by_layer"].shape == (5, 2)
    assert np.all((per_task["experts"] >= 1) & (per_task["experts"] <= 8))
    np.testing.assert_allclose(per_task["by_layer"].mean(axis=1), per_task["experts"], rtol=1e-6)

    tokens = inference.token_statistics(task.graphdef, params, batches)
    batch = batches[0]
    n = int((batch["weights"] > 0).sum())
    assert tokens["loss"].shape == tokens["entropy"].shape == tokens["row"].shape == (n,)
    assert tokens["experts"].shape == (2, n)
    np.testing.assert_array_equal(tokens["inputs"], batch["inputs"][batch["weights"] > 0])
    # The per-token losses average to the library's own validation loss on the same batch.
    result = train_lib.evaluate(train_lib.make_eval_step(task), params, batches)
    assert tokens["loss"].mean() == pytest.approx(result["loss"], rel=1e-5)
    assert np.all(tokens["entropy"] > 0) and np.all(tokens["entropy"] <= np.log(32) + 1e-5)
    # Rows of task 0 by hand: the mean of their answer positions' experts.
    _, layer = nnx.merge(task.graphdef, params)(batch["inputs"])
    experts_LBT = np.asarray(layer["token_experts"], np.float64)
    sel = (batch["weights"] > 0) & (batch["task"] == 0)[:, None]
    assert per_task["experts"][0] == pytest.approx(experts_LBT[:, sel].mean(), rel=1e-12)


@pytest.mark.slow
def test_task_suite_trains_through_the_library_and_is_reused(tmp_path):
    config = _tiny_tasks_config(steps=4)
    config.eval_every_steps = 2
    data = tasks.TaskSuiteData(config)
    for key in ("inputs", "weights"):  # batches are a pure function of (seed, step)
        np.testing.assert_array_equal(data.train_batch(3)[key], data.train_batch(3)[key])
    run = run_cache.run_or_load(config, tmp_path / "tasks", train=tasks.train_tasks)
    history = tasks.task_history(run)
    assert [h["step"] for h in history] == [2, 4]
    assert history[-1]["experts"].shape == (5,) and history[-1]["by_layer"].shape == (5, 2)
    assert np.all(np.isfinite(history[-1]["loss"]))
    again = run_cache.run_or_load(config, tmp_path / "tasks", train=_no_training)
    assert again.final["loss"] == pytest.approx(run.final["loss"])


def test_same_config_ignores_fields_added_since_but_not_changed_ones():
    saved = {"seed": 0, "moe": {"threshold": 0.4}}
    assert run_cache.same_config(saved, {"seed": 0, "new": 1, "moe": {"threshold": 0.4, "x": 2}})
    assert not run_cache.same_config(saved, {"seed": 0, "moe": {"threshold": 0.3}})
    assert not run_cache.same_config(saved, {"moe": {"threshold": 0.4}})  # a field was removed


def test_router_table_reports_capacity_drops_and_per_seed_times():
    from experiments import compare_routers

    def run(variant, seed, loss, slots, dropped, step_ms):
        config = variants.lm_config(variant, seed)
        final = {"loss": loss, "perplexity": float(np.exp(loss)), "experts_per_token": 1.4,
                 "dropped_fraction": dropped, "experts_per_layer": [1.3, 1.5]}  # fmt: skip
        train = [{"step": 10, "experts_per_token": 1.4, "slots_per_token": slots}]
        return run_cache.RunResult("r", config, final, train, [], 30.0, step_ms)

    results = {"top_p_sized": [run("top_p_sized", s, 3.6 + s / 100, 1.75, 0.06, 60.0 + s)
                               for s in (0, 1)]}  # fmt: skip
    tables, raw = compare_routers.summarize(results, 0.4)
    _, rows = tables["Validation after training (mean ± sd over seeds)"]
    # active FFN params: 1.4 experts x (1 - 0.06) kept x 3 x 64 x 128 x 4 layers = 129,368
    assert rows == [["top-p (p=0.4), capacity for k=1.4", "3.605 ± 0.007", "36.8 ± 0.3",
                     "1.40 ± 0.00", "1.75 ± 0.00", "6.0%", "129k", "30, 30", "60, 61"]]  # fmt: skip
    assert raw["top_p_sized"]["dropped_fraction"] == [0.06, 0.06]


@pytest.mark.parametrize("stem, module, plot", [
    ("difficulty_tasks", "difficulty", "plot_tasks"),
    ("difficulty_tokens", "difficulty", "plot_tokens"),
    ("sweep_threshold", "sweep_threshold", "plot_sweep"),
    ("sweep_threshold", "sweep_threshold", "plot_layers"),
    ("pretrained_top_p_olmoe", "pretrained_top_p", "plot"),
])  # fmt: skip
def test_committed_results_replot(stem, module, plot, tmp_path):
    import importlib

    raw = json.loads((report.RESULTS_DIR / f"{stem}.json").read_text())
    plotter = getattr(importlib.import_module(f"experiments.{module}"), plot)
    path = plotter(raw, tmp_path / f"{plot}.png")
    assert path.stat().st_size > 10_000


# ----------------------------------------------------------------------------- pretrained


def test_pretrained_top_p_settings_cover_the_checkpoints_own_k():
    from experiments import pretrained_top_p as exp

    mixtral = exp.settings(None, [0.9, 0.5, 0.5], native_k=2, num_experts=8)
    assert mixtral == [{"router": "top_k", "top_k": k} for k in (1, 2, 4)] + [
        {"router": "top_p", "threshold": 0.5}, {"router": "top_p", "threshold": 0.9}
    ]  # fmt: skip
    olmoe = exp.settings(None, [], native_k=8, num_experts=64)
    assert [s["top_k"] for s in olmoe] == [1, 2, 8, 16]
    assert [s["top_k"] for s in exp.settings([3, 9], [], native_k=2, num_experts=4)] == [3]
    assert exp.label({"router": "top_k", "top_k": 8}, 8) == "top-8 (checkpoint's own)"
    assert exp.label({"router": "top_p", "threshold": 1.0}) == "top-p 1"


def test_pretrained_top_p_stops_in_one_line_on_a_bad_folder(tmp_path, capsys):
    from experiments import pretrained_top_p as exp

    with pytest.raises(SystemExit) as exit_info:
        exp.main([str(tmp_path / "missing"), "--results-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: init_from=") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_pretrained_top_p_on_a_fixture(tmp_path, capsys):
    from experiments import pretrained_top_p as exp

    fixture = "tests/fixtures/hf/mixtral"
    argv = [fixture, "--data-dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size",
            "4", "--eval-batches", "2", "--ks", "1", "2", "4", "--thresholds", "0.5", "1.0",
            "--results-dir", str(tmp_path), "--name", "demo", "--decode-tokens", "6"]  # fmt: skip
    raw = exp.main(argv)
    out = capsys.readouterr().out
    assert "[1/5] top-1: perplexity" in out and "[5/5] top-p 1: perplexity" in out
    assert "[1/5] top-1: decode " in out and "[5/5] top-p 1: decode " in out
    rows = {r["label"]: r for r in raw["settings"]}
    assert list(rows) == ["top-1", "top-2 (checkpoint's own)", "top-4", "top-p 0.5", "top-p 1"]
    for k, name in ((1, "top-1"), (2, "top-2 (checkpoint's own)"), (4, "top-4")):
        np.testing.assert_array_equal(rows[name]["experts_per_layer"], [k, k])
        assert rows[name]["decode_experts_per_token"] == k  # the decode graph routes alike
    assert all(r["decode_tokens_per_s"] > 0 for r in raw["settings"])
    assert raw["decode_tokens"] == 6
    assert 1.0 <= rows["top-p 0.5"]["experts_per_token"] < 4.0
    # p = 1 keeps every expert with its softmax weight, the same mixture as top-4
    # renormalised; only an expert whose weight is below float32 rounding of the running sum
    # (a few of these random tokens) is left out, and it changes nothing.
    assert 3.99 < rows["top-p 1"]["experts_per_token"] <= 4.0
    assert rows["top-p 1"]["perplexity"] == pytest.approx(rows["top-4"]["perplexity"], rel=1e-5)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["command"] == ".venv/bin/python -m experiments.pretrained_top_p " + " ".join(argv)
    assert saved["native_top_k"] == 2 and saved["architecture"] == "MixtralForCausalLM"
    table = (tmp_path / "demo.md").read_text()
    assert "| top-p 0.5 | " in table and table.count("\n| top-") == 5
    assert "| decode tokens/s (B=1) |" in table
    rate = f"{rows['top-p 0.5']['decode_tokens_per_s']:.1f}"
    assert f"| {rows['top-p 0.5']['loss']:.4f} | {rate} | " in table
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert saved["frontier_plot"] == "demo_frontier.png"
    assert (tmp_path / "demo_frontier.png").stat().st_size > 10_000


def test_pretrained_top_p_frontier_keeps_the_settings_no_other_beats():
    from experiments import pretrained_top_p as exp

    # (tokens/s, perplexity): 1 is slower and worse than 0; 3 is as fast as 2 but worse.
    points = [(100.0, 5.0), (90.0, 6.0), (120.0, 7.0), (120.0, 7.5), (60.0, 4.0)]
    assert exp.pareto(points) == [4, 0, 2]
    assert exp.pareto([]) == []


def test_pretrained_top_p_refuses_a_decode_without_steps_in_one_line(capsys):
    from experiments import pretrained_top_p as exp

    with pytest.raises(SystemExit) as exit_info:
        exp.parse_args(["tests/fixtures/hf/mixtral", "--decode-tokens", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --decode-tokens: 1 is not >= 2" in err, err
