"""train_and_evaluate end to end on the tiny config, in both dispatch modes: what a run
writes and prints, exact resume, the NaN guard (skip and stop), SIGKILL at any moment and
resume, determinism, bfloat16, and the dense and top-k variants."""

import io
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dynmoe_jax import data as data_lib
from dynmoe_jax import inference, train
from dynmoe_jax.moe import balance
from dynmoe_jax.train import checkpoint as ckpt_lib
from dynmoe_jax.train import loop
from tests.disk_full import full_disk_at
from tests.nan_injection import NanAt
from tests.runs import DISPATCHES, records

ROOT = Path(__file__).resolve().parents[2]
TRAIN_KEYS = {
    "step", "loss", "lm_loss", "load_balance_loss", "dynamic_loss", "experts_per_token",
    "experts_per_layer", "slots_per_token", "dropped_fraction", "learning_rate",
    "tokens_per_sec", "split",
}  # fmt: skip
LONG = {"num_train_steps": 24, "checkpoint_every_steps": 4, "log_every_steps": 2,
        "eval_every_steps": 8}  # fmt: skip


def _params(config, workdir, step):
    """The parameters of the newest checkpoint, which must be ``step``."""
    run = inference.restore(config, workdir)
    assert run.step == step
    return run.params


def _cli(workdir, data_dir, overrides):
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [sys.executable, "-m", "dynmoe_jax.main", "--config=dynmoe_jax/configs/tiny.py",
            f"--workdir={workdir}", f"--config.data_dir={data_dir}", *flags]  # fmt: skip


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_outputs_of_a_run(trained, dispatch):
    run = trained(dispatch)
    workdir, final = run.workdir, run.final
    logged = records(workdir)
    train_records = [r for r in logged if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert set(train_records[0]) >= TRAIN_KEYS
    assert len(train_records[0]["experts_per_layer"]) == 2
    assert [r["step"] for r in logged if r["split"] == "validation"] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in logged)
    validation = [r["loss"] for r in logged if r["split"] == "validation"]
    assert validation[1] < validation[0]  # it learns
    assert final["perplexity"] == pytest.approx(np.exp(final["loss"]))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3", "6",
    ]  # fmt: skip
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "experts_per_layer.png").stat().st_size > 1000


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_end_of_run_summary_names_the_split_and_its_size(trained, dispatch):
    run = trained(dispatch)
    final, printed = run.final, run.printed
    # tiny: eval_batches=2 of 8 x 32 tokens, no padding in the first two batches
    assert (final["batches"], final["tokens"]) == (2, 512.0)
    line = next(x for x in printed.splitlines() if x.startswith("final validation split"))
    assert line.startswith("final validation split, 2 batches (512 tokens): loss ")
    assert f"perplexity {final['perplexity']:.2f}" in line and "unigram baseline" in line
    # Each validation is printed when it happens: steps 3 and 6.
    steps = [x.split(":")[0] for x in printed.splitlines() if " validation split, " in x]
    assert steps == ["step 3", "step 6", "final validation split, 2 batches (512 tokens)"]


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_resume_matches_uninterrupted_run(trained, dispatch, tmp_path):
    run = trained(dispatch)
    expected = _params(run.config, run.workdir, 6)
    # Simulate a run killed after its step-3 checkpoint: drop the later checkpoint and the
    # log records after step 3 would be rewritten by the resumed run.
    resumed = tmp_path / "resumed"
    shutil.copytree(run.workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    again = train.train_and_evaluate(run.config, resumed)
    got = _params(run.config, resumed, 6)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert again["loss"] == pytest.approx(run.final["loss"], rel=1e-6)
    steps = [(r["split"], r["step"]) for r in records(resumed)]
    assert len(steps) == len(set(steps)) == len(records(run.workdir))


def test_rerunning_a_finished_run_reports_it_and_adds_no_file(trained, tmp_path):
    run = trained("grouped")
    workdir = tmp_path / "finished"
    shutil.copytree(run.workdir, workdir)
    events = sorted(p.name for p in (workdir / "tensorboard").iterdir())
    log = (workdir / "metrics.jsonl").read_bytes()
    final = train.train_and_evaluate(run.config, workdir)
    assert final["loss"] == pytest.approx(run.final["loss"], rel=1e-6)
    assert sorted(p.name for p in (workdir / "tensorboard").iterdir()) == events
    assert (workdir / "metrics.jsonl").read_bytes() == log


def test_resume_with_the_routing_controller_and_bias_is_bit_exact(tiny_run, tmp_path):
    # The thresholds, their integrals and the biases are train state: a run resumed from its
    # step-3 checkpoint must end with the same parameters and routing state, bit for bit.
    config = tiny_run(**{"moe.target_k": 1.5, "moe.bias_balance": 0.01,
                         "loss.load_balance_weight": 0.0})  # fmt: skip
    straight = tmp_path / "straight"
    train.train_and_evaluate(config, straight)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    train.train_and_evaluate(config, resumed)
    expected, got = _params(config, straight, 6), _params(config, resumed, 6)
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    state = [path for path, _ in flat if path[-1].key in balance.FROZEN]
    assert len(state) == 6  # threshold, integral and bias of both MoE layers
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert records(resumed, timing=False) == records(straight, timing=False)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_same_seed_same_metrics(trained, dispatch, tmp_path):
    run = trained(dispatch)
    train.train_and_evaluate(run.config, tmp_path / "again")
    assert records(tmp_path / "again", timing=False) == records(run.workdir, timing=False)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_nan_is_skipped_and_counted(tiny_run, dispatch, tmp_path):
    config = tiny_run(**{"moe.dispatch": dispatch})
    data = NanAt(data_lib.from_config(config.data), 2)
    final = train.train_with_data(config, tmp_path / "bad", data, config.data.dataset)
    logged = [r for r in records(tmp_path / "bad") if r["split"] == "train"]
    assert [r["nonfinite_steps"] for r in logged] == [1.0, 1.0, 1.0]
    assert np.isfinite(final["loss"])
    params = _params(config, tmp_path / "bad", 6)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_nan_stops_with_clear_error_and_keeps_checkpoint(trained, dispatch, data_dir, tmp_path):
    run = trained(dispatch)
    clean = tmp_path / "clean"  # the run as it stood at its step-3 checkpoint
    shutil.copytree(run.workdir, clean)
    shutil.rmtree(clean / "checkpoints" / "6")
    bad = tmp_path / "bad"
    cli = _cli(bad, data_dir, {"nonfinite": "stop", "moe.dispatch": dispatch})
    cli[1:3] = ["-m", "tests.nan_injection", "5"]  # the CLI with step 5 poisoned
    proc = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "non-finite loss or gradients at step 5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (bad / "checkpoints").iterdir()) == ["3"]
    expected = _params(run.config, clean, 3)
    jax.tree.map(np.testing.assert_array_equal, _params(run.config, bad, 3), expected)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_that_save_and_a_rerun_matches_an_uninterrupted_one(
    trained, tmp_path
):
    run = trained("grouped")
    workdir = tmp_path / "run"
    message = r"for the checkpoint of step 3 .*: no checkpoint is complete yet"
    with pytest.raises(ckpt_lib.CheckpointSpaceError, match=message), full_disk_at(3):
        train.train_and_evaluate(run.config, workdir)
    assert max(r["step"] for r in records(workdir)) == 3  # not one step past the failed save
    assert list((workdir / "checkpoints").iterdir()) == []  # its unfinished files removed
    train.train_and_evaluate(run.config, workdir)  # space freed: the same call again
    assert records(workdir, timing=False) == records(run.workdir, timing=False)
    jax.tree.map(np.testing.assert_array_equal, _params(run.config, workdir, 6),
                 _params(run.config, run.workdir, 6))  # fmt: skip


def test_the_progress_bars_rate_starts_after_the_compiling_step():
    from tqdm.auto import tqdm

    rates = {}
    for restart in (False, True):
        out = io.StringIO()
        bar = tqdm(total=100, initial=10, file=out, mininterval=0)  # resumed at step 10
        time.sleep(1.0)  # the first step, compiling
        loop.count_untimed_step(bar) if restart else bar.update(1)
        for _ in range(3):  # steps of about 10 ms
            time.sleep(0.01)
            bar.update(1)
        rates[restart] = bar.format_dict["rate"]
        assert bar.n == 14 and "14/100" in out.getvalue().splitlines()[-1].split("\r")[-1]
        bar.close()
    # Counted in, the compiling step weighs on the smoothed rate for many steps after it.
    assert rates[True] > 4 * rates[False]


def _logged_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    steps = [0]
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                break
    return max(steps)


def _kill_when(proc, workdir: Path, mode: str, at_step: int) -> bool:
    """SIGKILLs the run once it has logged `at_step` (mode 'step'), or the moment Orbax has a
    temporary checkpoint directory open (mode 'save'). Returns whether it killed."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        ckpts = workdir / "checkpoints"
        saving = ckpts.exists() and any("tmp" in p.name for p in ckpts.iterdir())
        if (mode == "save" and saving) or (mode == "step" and _logged_step(workdir) >= at_step):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes_exactly(tiny_run, data_dir, tmp_path):
    # The shipped dispatch only: what a kill interrupts (checkpoint writes, the data position)
    # does not depend on it, and test_resume_matches_uninterrupted_run resumes both exactly.
    overrides = {**LONG, "moe.dispatch": "grouped"}
    reference = tmp_path / "reference"
    subprocess.run(_cli(reference, data_dir, overrides), check=True, capture_output=True,
                   cwd=ROOT)  # fmt: skip
    workdir = tmp_path / "killed"
    rng = random.Random(0)
    plan = [("save", 0), ("step", rng.randint(6, 10)), ("save", 0), ("step", rng.randint(15, 20))]
    kills = []
    for mode, at_step in plan:
        proc = subprocess.Popen(_cli(workdir, data_dir, overrides), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        kills.append(_kill_when(proc, workdir, mode, at_step))
    assert sum(kills) >= 3, kills  # the loop really interrupted the run
    done = subprocess.run(_cli(workdir, data_dir, overrides), capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    config = tiny_run(**overrides)
    expected = _params(config, reference, 24)
    got = _params(config, workdir, 24)
    jax.tree.map(np.testing.assert_array_equal, got, expected)  # bit for bit on CPU
    # no duplicated, no missing steps
    assert records(workdir, timing=False) == records(reference, timing=False)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_bfloat16_training_learns_and_stays_finite(tiny_run, dispatch, tmp_path):
    config = tiny_run(**{"model.dtype": "bfloat16", "moe.dispatch": dispatch})
    final = train.train_and_evaluate(config, tmp_path)
    logged = records(tmp_path)
    assert all(np.isfinite(r["loss"]) for r in logged)
    validation = [r["loss"] for r in logged if r["split"] == "validation"]
    assert validation[1] < validation[0] and np.isfinite(final["loss"])
    train_loss = [r["lm_loss"] for r in logged if r["split"] == "train"]
    assert train_loss[-1] < train_loss[0]


@pytest.mark.slow
def test_dense_baseline_and_top_k_train(tiny_run, tmp_path):
    for name, overrides in {
        "dense": {"model.ffn": "dense"},
        "top2": {"moe.router": "top_k", "moe.top_k": 2, "grad_accum_steps": 2},
    }.items():
        final = train.train_and_evaluate(tiny_run(num_train_steps=2, **overrides), tmp_path / name)
        assert np.isfinite(final["loss"])
        if name == "top2":
            assert final["experts_per_token"] == pytest.approx(2.0)
