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
def test_an_example_task_runs_on_a_trained_workdir(trained, tmp_path):
    run = trained("grouped")
    # The tiny run's 32-token window is shorter than some of the task's endings.
    out = _cli("--model_args", f"pretrained={run.workdir},max_length=64", "--tasks",
               "dynmoe_pydoc_mc",
               "--limit", "6", "--batch_size", "4", "--output_path", str(tmp_path),
               "--log_samples")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results_*.json")
    entry = json.loads(results_file.read_text())["results"]["dynmoe_pydoc_mc"]
    assert 0 <= entry["acc,none"] <= 1
    assert 1 <= entry["experts_per_token"] <= 4
    assert len(entry["experts_per_token_by_layer"]) == 2
    assert entry["tokens_per_second"] > 0 and entry["scored_tokens"] > 0
    assert list(tmp_path.rglob("samples_dynmoe_pydoc_mc_*.jsonl"))
    table = out.stdout.splitlines()
    assert table[-3].startswith("| task | metric | value | experts/token | tokens/s |")
    assert table[-1].startswith("| dynmoe_pydoc_mc | acc |")
