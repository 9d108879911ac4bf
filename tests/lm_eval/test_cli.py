"""python -m dynmoe_jax.lm_eval: lm-eval's command line with the model chosen. Bad input is
one line and exit 2 before any weight is read; an example task runs end to end on a trained
workdir and its results JSON carries the experts per token of the task."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrained.hf_fixtures import FIXTURES

ROOT = Path(__file__).resolve().parents[2]
MIXTRAL = str(FIXTURES / "mixtral")


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dynmoe_jax.lm_eval", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model_args", f"pretrained={MIXTRAL},threshold=1.5", "--tasks", "x"],
         "error: moe.threshold=1.5 is invalid: allowed 0 < threshold <= 1"),
        (["--model_args", f"pretrained={MIXTRAL},temperature=2", "--tasks", "x"],
         "error: temperature=2 is invalid: allowed a model argument among pretrained"),
        (["--model_args", f"pretrained={FIXTURES}", "--tasks", "x"],
         "error: pretrained="),
        (["--model_args", f"pretrained={MIXTRAL}", "--tasks", "x", "--include_path", "nope"],
         "error: --include_path='nope' is invalid: allowed a folder of task YAML files"),
        (["--model", "hf", "--model_args", f"pretrained={MIXTRAL}", "--tasks", "x"],
         "error: --model='hf' is invalid: allowed dynmoe_jax"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = _cli(*args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(message), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_an_unknown_task_is_one_line_before_the_model_loads():
    out = _cli("--model_args", f"pretrained={MIXTRAL}", "--tasks", "no_such_task_here")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[-1].startswith("error: --tasks: Tasks not found: no_such")
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_example_tasks_run_on_a_trained_workdir(trained, tmp_path):
    run = trained("grouped")
    tasks = ["dynmoe_pydoc_mc", "dynmoe_pydoc_gen", "dynmoe_pydoc_ppl"]
    # The tiny run's 32-token window is shorter than some of the task's endings.
    out = _cli("--model_args", f"pretrained={run.workdir},max_length=64", "--tasks",
               ",".join(tasks), "--limit", "4", "--batch_size", "4", "--output_path",
               str(tmp_path), "--log_samples")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert 0 <= results["dynmoe_pydoc_mc"]["acc,none"] <= 1
    assert 0 <= results["dynmoe_pydoc_gen"]["exact_match,first_word"] <= 1
    assert results["dynmoe_pydoc_ppl"]["word_perplexity,none"] > 1
    for task in tasks:
        entry = results[task]
        assert 1 <= entry["experts_per_token"] <= 4, task
        assert len(entry["experts_per_token_by_layer"]) == 2
        assert entry["tokens_per_second"] > 0 and entry["scored_tokens"] > 0
        assert list(tmp_path.rglob(f"samples_{task}_*.jsonl"))
    table = out.stdout.splitlines()
    assert table[-5].startswith("| task | metric | value | experts/token | tokens/s |")
    assert [line.split(" | ")[:2] for line in table[-3:]] == [
        ["| dynmoe_pydoc_mc", "acc"], ["| dynmoe_pydoc_gen", "exact_match"],
        ["| dynmoe_pydoc_ppl", "word_perplexity"]]  # fmt: skip
