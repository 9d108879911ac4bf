"""The command line: every mistake ends in one ``error:`` line and exit code 2, before any data
is read or anything is compiled."""

import errno
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynmoe_jax import main
from dynmoe_jax.config import INIT_FROM_ALLOWED
from dynmoe_jax.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = "dynmoe_jax/configs/tiny.py"


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "dynmoe_jax.main", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.moe.threshold=1.5", "moe.threshold=1.5 is invalid"),
        ("--config.seq_len=0", "seq_len=0 is invalid"),
        ("--config.model.num_heads=3", "model.num_heads=3 is invalid"),
        ("--config.grad_accum_steps=3", "grad_accum_steps=3 is invalid"),
        ("--config.moe.router=top_q", "moe.router='top_q' is invalid"),
    ],
)
def test_cli_rejects_bad_config_before_compiling(tmp_path, flag, message):
    proc = _cli(f"--config={TINY}", f"--workdir={tmp_path}", flag)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "args, line",
    [
        ([f"--config={TINY}", "--config.moe.treshold=0.3"],
         "error: moe.treshold='0.3' is invalid: allowed a field of the config "
         "(did you mean moe.threshold?)"),
        (["--config=dynmoe_jax/configs/nope.py"],
         "error: --config='dynmoe_jax/configs/nope.py' is invalid: allowed a config file that "
         "exists, e.g. dynmoe_jax/configs/default.py"),
        ([f"--config={TINY}", "--config.init_from=no/such/folder", "--mode=eval"],
         f"error: init_from='no/such/folder' is invalid: allowed {INIT_FROM_ALLOWED}"),
        (["--config=dynmoe_jax/configs/pretrained.py"],
         f"error: init_from=None is invalid: allowed {INIT_FROM_ALLOWED}: this config needs "
         "--config.init_from=PATH"),
    ],
)  # fmt: skip
def test_cli_mistakes_print_exactly_one_line(tmp_path, args, line):
    proc = _cli(*args, f"--workdir={tmp_path / 'run'}")
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, line + "\n", "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "prompt, max_new_tokens, temperature, message",
    [
        ("", 8, 0.0, "--prompt='' is invalid: allowed non-empty text"),
        ("And", 0, 0.0, "--max_new_tokens=0 is invalid: allowed an integer in 1..32768"),
        ("And", 32769, 0.0,
         "--max_new_tokens=32769 is invalid: allowed an integer in 1..32768"),
        ("And", 8, -0.5, "--temperature=-0.5 is invalid: allowed a number >= 0 (0 = greedy)"),
        ("And", 8, float("nan"),
         "--temperature=nan is invalid: allowed a number >= 0 (0 = greedy)"),
    ],
)  # fmt: skip
def test_sample_flags_are_checked_up_front(prompt, max_new_tokens, temperature, message):
    main.check_sample_flags("And God said", 64, 0.7)
    with pytest.raises(ConfigError) as err:
        main.check_sample_flags(prompt, max_new_tokens, temperature)
    assert str(err.value) == message


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
def test_parse_flags_exits_2_with_one_line(capsys):
    argv = ["main", f"--config={TINY}", "--workdir=unused", "--mode=sample", "--temperature=-1"]
    with pytest.raises(SystemExit) as exit_info:
        main.parse_flags(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: --temperature=-1.0 is invalid: allowed a number >= 0 (0 = greedy)\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main.parse_flags(["main", f"--config={TINY}", "--workdir=unused", "--max_new_tokens=x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: flag --max_new_tokens=x: invalid literal for int() with base 10: 'x'\n"
    )
    for extra, message in [
        (["--prompts_file=absent.txt"],
         "--prompts_file='absent.txt' is invalid: allowed a text file with one prompt per line"),
        (["--sample_batch_size=0"], "--sample_batch_size=0 is invalid: allowed an integer >= 1"),
    ]:  # fmt: skip
        main.FLAGS.unparse_flags()  # absl keeps earlier values: start from the defaults
        with pytest.raises(SystemExit) as exit_info:
            main.parse_flags(["main", f"--config={TINY}", "--workdir=unused", *extra])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    main.FLAGS.unparse_flags()


def test_split_config_args_and_the_run_config_of_a_command_line(tmp_path):
    overrides, rest = main.split_config_args(
        [f"--config={TINY}", "--config.moe.threshold=0.3", "--config.moe.max_k=None", "--x=1"]
    )
    assert overrides == {"moe.threshold": "0.3", "moe.max_k": "None"}
    assert rest == [f"--config={TINY}", "--x=1"]
    main.FLAGS.unparse_flags()
    main.FLAGS(["main", f"--config={TINY}"])
    run = main.run_config(["--config.moe.max_k=None", "--config.moe.threshold=0.3"], "train",
                          str(tmp_path))  # fmt: skip
    assert (run.moe.max_k, run.moe.threshold) == (None, 0.3)
    main.FLAGS.unparse_flags()


def test_ctrl_c_names_where_a_rerun_resumes(tmp_path):
    assert main.interrupted_message("train", str(tmp_path)) == (
        "interrupted before the first checkpoint; rerunning the command starts over"
    )
    for step in ("3", "6", "tmp"):
        (tmp_path / "checkpoints" / step).mkdir(parents=True)
    assert main.interrupted_message("train", str(tmp_path)) == (
        "interrupted; rerunning the same command resumes from the checkpoint of step 6 in "
        f"{tmp_path / 'checkpoints'}"
    )
    assert main.interrupted_message("eval", str(tmp_path)) == (
        "interrupted (--mode=eval); nothing was written"
    )


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _cli(f"--config={TINY}", f"--workdir={tmp_path / 'file'}")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"error: --workdir='{tmp_path / 'file'}' is invalid: allowed a folder "
                           "(a file of that name exists)\n")  # fmt: skip


def test_a_workdir_under_a_file_is_one_line_before_any_data_is_read(tmp_path):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"
    proc = _cli(f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={tmp_path / 'd'}")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"error: --workdir='{workdir}' is invalid: allowed a folder this user "
                           f"can write ({tmp_path / 'file'} is a file)\n")  # fmt: skip
    assert not (tmp_path / "d").exists()  # the corpus was not read


# Root writes through permission bits, so an unwritable folder is one the kernel refuses to
# anyone: sysfs takes no new files (and is read-only in most containers).
@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
@pytest.mark.parametrize("workdir", ["/sys/kernel", "/sys/dynmoe_test_workdir"])
def test_a_workdir_that_cannot_be_written_is_one_line_before_any_data_is_read(tmp_path, workdir):
    proc = _cli(f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={tmp_path / 'd'}")
    assert (proc.returncode, proc.stdout) == (2, "")
    folder = "/sys/kernel" if workdir == "/sys/kernel" else "/sys"
    assert re.fullmatch(rf"error: --workdir='{workdir}' is invalid: allowed a folder this user "
                        rf"can write \(creating a folder in {folder} fails: [^\n]+\)\n",
                        proc.stderr), proc.stderr  # fmt: skip
    assert not (tmp_path / "d").exists()


def test_a_writable_workdir_passes_and_the_probe_leaves_nothing(tmp_path):
    assert main.unwritable_reason(str(tmp_path / "new" / "run")) is None
    assert main.unwritable_reason(str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []
    main.check_mode_flags("eval", "/sys/kernel", 1.0)  # reading needs no write access


def test_a_full_disk_outside_a_checkpoint_is_one_line_naming_the_file(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert main.disk_full_message(full, str(tmp_path)) == (
        f"No space left on device writing {tmp_path / 'metrics.jsonl'}; free some space: "
        "rerunning the same command starts over"
    )
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    assert main.disk_full_message(full, str(tmp_path)).endswith(
        "rerunning the same command resumes from the checkpoint of step 4"
    )


FIXTURES = ROOT / "tests" / "fixtures" / "hf"


def test_cli_rejects_an_unsupported_checkpoint_in_one_line(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    proc = _cli(f"--config={TINY}", f"--workdir={tmp_path / 'run'}", f"--config.init_from={folder}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "GPT2LMHeadModel" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_fine_tunes_evaluates_and_samples_an_imported_checkpoint(tmp_path):
    common = [
        "--config=dynmoe_jax/configs/pretrained.py",
        f"--config.init_from={FIXTURES / 'olmoe'}",
        f"--config.data_dir={tmp_path / 'cache'}",
        "--config.seq_len=32", "--config.batch_size=4", "--config.eval_batches=2",
    ]  # fmt: skip
    steps = ["--config.num_train_steps=2", "--config.eval_every_steps=2",
             "--config.checkpoint_every_steps=2", "--config.log_every_steps=1"]  # fmt: skip
    run = tmp_path / "run"
    proc = _cli(*common, *steps, f"--workdir={run}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "experts per token by layer (validation): " in proc.stdout
    assert (run / "checkpoints" / "2").is_dir()

    proc = _cli(*common, f"--workdir={run}", "--mode=eval", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 2 on pydoc: validation split, 2 batches" in proc.stdout
    layers = proc.stdout.split("experts per token by layer: ")[1].splitlines()[0].split(", ")
    assert len(layers) == 2 and all(0 < float(x) <= 8 for x in layers)

    fresh = tmp_path / "fresh"
    proc = _cli(*common, f"--workdir={fresh}", "--mode=sample", "--max_new_tokens=4",
                "--prompt=The list", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "The list" in proc.stdout
    generated = re.search(r"^\[(\d+) tokens, ([\d.]+) experts per token on average\]$",
                          proc.stdout, flags=re.M)  # fmt: skip
    none = "[0 tokens: the first token the model chose was the end-of-text token]"
    assert none in proc.stdout or (
        generated and int(generated[1]) <= 4 and float(generated[2]) <= 8
    )
    # Each token after the first comes from a cached step (the first from the prefill).
    rate = re.search(r"^decode: ([\d.]+) tokens/s over (\d+) cached steps after a (\d+)-token "
                     r"prefill$", proc.stdout, flags=re.M)  # fmt: skip
    assert none in proc.stdout or (rate and float(rate[1]) > 0 and 1 <= int(rate[2]) <= 4)
    assert not fresh.exists()


def test_cli_reports_bad_corpus_in_one_line(tmp_path):
    proc = _cli(
        f"--config={TINY}",
        f"--workdir={tmp_path / 'w'}",
        f"--config.data_dir={tmp_path / 'd'}",
        "--config.dataset=text_dir:/no/such/dir",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dataset='text_dir:/no/such")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ctrl_c_during_training_prints_one_line_and_no_traceback(data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "dynmoe_jax.main", f"--config={TINY}", f"--workdir={workdir}",
            f"--config.data_dir={data_dir}", "--config.num_train_steps=100000",
            "--config.checkpoint_every_steps=2"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    checkpoints = workdir / "checkpoints"
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == main.INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(
        "error: interrupted; rerunning the same command resumes from the checkpoint of step "
    )


@pytest.mark.slow
def test_sampling_a_prompts_file_writes_only_json_lines_to_stdout(trained, tmp_path):
    run = trained("grouped")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The \nIn\n")
    # Another config file than the run's: the run's record wins, and says so once on stderr.
    proc = _cli("--config=dynmoe_jax/configs/default.py", f"--workdir={run.workdir}",
                "--mode=sample", f"--prompts_file={prompts}", "--max_new_tokens=3",
                "--ignore_eos", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["The ", "In"]
    assert [len(r["tokens"]) for r in records] == [3, 3]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2, proc.stderr[-3000:]
    assert notes[0].startswith(f"note: {run.workdir / 'config.json'} (the run's record) wins ")
    assert "model.d_model=32 (--config: 256)" in notes[0]
    assert notes[1].startswith("note: using corpus=pydoc, the one this run trained on")
    assert f"prompts: 2 from {prompts} (text)" in proc.stderr


def test_cli_refuses_a_checkpoint_with_a_missing_shard_before_reading_data(tmp_path):
    from tests.pretrained.hf_fixtures import broken_copy

    folder = broken_copy("shard", tmp_path / "ckpt")
    proc = _cli("--config=dynmoe_jax/configs/pretrained.py", f"--config.init_from={folder}",
                f"--config.data_dir={tmp_path / 'cache'}",
                f"--workdir={tmp_path / 'run'}")  # fmt: skip
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-2000:]
    assert proc.stderr == (f"error: {folder / 'model-00002-of-00002.safetensors'}: missing, "
                           "though model.safetensors.index.json lists it (1 of 2 shards "
                           "missing)\n")  # fmt: skip
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_cli_refuses_to_resume_with_another_model_shape(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained("grouped").workdir, workdir)
    before = (workdir / "config.json").read_text()
    proc = _cli(f"--config={TINY}", f"--workdir={workdir}", "--config.model.d_model=64")
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-2000:]
    assert proc.stderr == (
        f"error: model.d_model=64 is invalid: allowed 32, the value {workdir / 'config.json'} "
        "records: a resumed run keeps its model's shape, vocabulary and corpus (a new "
        "--workdir starts a run with another)\n"
    )
    assert (workdir / "config.json").read_text() == before


@pytest.mark.slow
def test_a_full_disk_ends_the_cli_in_one_line_at_the_failed_save(data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "tests.disk_full", "6", f"--config={TINY}",
            f"--workdir={workdir}", f"--config.data_dir={data_dir}",
            "--config.num_train_steps=9"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # Besides the progress bar, one line: no traceback, nothing from Orbax's threads.
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("train:")]
    size = sum(p.stat().st_size for p in (workdir / "checkpoints" / "3").rglob("*") if p.is_file())
    assert lines == [
        f"error: no space left in {workdir} for the checkpoint of step 6 (about {size / 1e6:.1f} "
        "MB needed); free some space: rerunning the same command resumes from the checkpoint of "
        "step 3"
    ]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3"]
