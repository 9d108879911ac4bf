"""Command line: train, evaluate, sample or plan.

    python -m dynmoe_jax.main --config=dynmoe_jax/configs/default.py --workdir=DIR \\
        [--mode=train|eval|sample] [--config.FIELD=VALUE ...]
    python -m dynmoe_jax.main ... --mode=sample --prompts_file=FILE > samples.jsonl
    python -m dynmoe_jax.main --config=dynmoe_jax/configs/paper.py --mode=plan \\
        [--device_memory_bytes=80e9]

``--mode=plan`` compiles the train step for the config's mesh on the devices present (or
simulated: ``XLA_FLAGS=--xla_force_host_platform_device_count=16``) without allocating or
reading anything, and prints the plan as one JSON object on its last line (``plan.py``).

``--config.init_from=PATH`` starts from a Hugging Face MoE checkpoint folder: training
fine-tunes it, eval and sample use its weights while the workdir holds no checkpoint
(``pretrained/load.py``; ``configs/pretrained.py`` holds fine-tuning defaults).

Every mistake on the command line (a missing config file, a misspelt field, a bad value,
a bad sampling flag) ends in one ``error: ...`` line and exit code 2, before any data is read
or anything is compiled.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from absl import app, flags, logging

from dynmoe_jax.sample_checks import check_max_new_tokens, check_temperature, read_prompts
from dynmoe_jax.validation import ConfigError, check, invalid

if TYPE_CHECKING:
    from ml_collections import ConfigDict

    from dynmoe_jax.config import RunConfig

USAGE_ERROR = 2  # exit code of every command-line mistake
INTERRUPTED = 130  # exit code after Ctrl-C, as a shell reports it

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "config",
    None,
    "A config file (its get_config()), e.g. dynmoe_jax/configs/default.py; "
    "--config.FIELD=VALUE sets a field.",
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample", "plan"], "What to do with the workdir."
)
flags.DEFINE_float(
    "device_memory_bytes", 80e9, "--mode=plan: the memory of one device the plan must fit."
)
flags.DEFINE_string("prompt", "And God said", "Prompt for --mode=sample.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate in --mode=sample.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_string(
    "prompts_file",
    None,
    '--mode=sample: a file of prompts, one per line (or JSON Lines of {"prompt": ...}); '
    "writes one JSON object per prompt "
    "(text, tokens, experts per token, seconds) to standard output.",
)
flags.DEFINE_integer("sample_batch_size", 8, "--mode=sample --prompts_file: prompts per batch.")
flags.DEFINE_bool(
    "ignore_eos",
    False,
    "--mode=sample: generate exactly --max_new_tokens per prompt, past the end-of-text token.",
)
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU pods, SLURM)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config"])
NEEDS_WORKDIR = ("train", "eval", "sample")  # plan writes nothing
READS_RUN = ("eval", "sample")  # modes that evaluate the run the workdir records


def split_config_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(``--config.a.b=V`` arguments as {'a.b': 'V'}, the other arguments). The config's fields
    are parsed here, from their declarations (``dynmoe_jax.config``), not by absl."""
    overrides, rest = {}, []
    for arg in argv:
        if arg.startswith("--config."):
            path, _, value = arg[len("--config.") :].partition("=")
            overrides[path] = value
        else:
            rest.append(arg)
    return overrides, rest


def load_config_file(path: str) -> ConfigDict:
    """The ConfigDict that a config file's ``get_config()`` returns."""
    if not Path(path).is_file():
        invalid("--config", path, "a config file that exists, e.g. dynmoe_jax/configs/default.py")
    spec = importlib.util.spec_from_file_location("dynmoe_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_config(argv: Sequence[str], mode: str, workdir: str | None) -> RunConfig:
    """The typed config of a command line: the ``--config`` file with its ``--config.FIELD``
    values set, every field checked. In eval and sample modes, the run the workdir records
    (its routing, its corpus), with only the fields set on this command line changed, and a
    note (standard error) naming the recorded fields that win. In train mode, a change that
    resuming the workdir's run refuses (``run_record.changes_on_resume``)."""
    from dynmoe_jax import config as config_lib
    from dynmoe_jax.train import run_record

    overrides, _ = split_config_args(argv)
    config = config_lib.set_fields(load_config_file(FLAGS.config), overrides)
    if mode in READS_RUN and workdir:
        config = run_record.config_for(workdir, config, overrides)
    run = config_lib.resolve(config)
    if mode == "train" and workdir:  # a change a resume refuses: one line, before any data
        run_record.changes_on_resume(workdir, run)
    return run


def check_sample_flags(prompt: str, max_new_tokens: int, temperature: float) -> None:
    """The sampling flags, checked in every mode so that a typo never waits for a model."""
    # An empty prompt is almost always an unset shell variable.
    check(bool(prompt), "--prompt", prompt, "non-empty text")
    check_max_new_tokens(max_new_tokens, "--max_new_tokens")
    check_temperature(temperature, "--temperature")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(workdir: str) -> str | None:
    """Why training could not create or write ``workdir``, or None when it can. A probe folder
    is created and removed, because permission bits do not tell: root ignores them, yet a
    read-only filesystem (or /sys) refuses root too."""
    existing = _nearest_existing(Path(workdir).absolute())
    if not existing.is_dir():
        return f"{existing} is a file"
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".dynmoe_probe_").cleanup()
    except OSError as e:
        return f"creating a folder in {existing} fails: {e.strerror}"
    return None


def check_mode_flags(mode: str, workdir: str | None, device_memory_bytes: float) -> None:
    """A workdir for the modes that write or read one (a folder, not a file), one that can be
    created and written to train; a positive memory for plan."""
    if mode in NEEDS_WORKDIR:
        check(bool(workdir), "--workdir", workdir, f"a folder (--mode={mode} needs one)")
        check(not Path(workdir).is_file(), "--workdir", workdir,
              "a folder (a file of that name exists)")  # fmt: skip
    if mode == "train":
        reason = unwritable_reason(workdir)
        check(reason is None, "--workdir", workdir, f"a folder this user can write ({reason})")
    allowed = "a number of bytes > 0, e.g. 80e9"
    check(device_memory_bytes > 0, "--device_memory_bytes", device_memory_bytes, allowed)


def _exit(message: str, code: int = USAGE_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: list[str]) -> RunConfig:
    """absl's flag parsing and the config's, with every mistake reported in one line and exit
    code 2, before any data is read or anything is compiled. Returns the command line's typed
    config, resolved here once; absl hands it to ``main``."""
    _, rest = split_config_args(argv[1:])
    try:
        FLAGS([argv[0], *rest])
        check_sample_flags(FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.temperature)
        if FLAGS.prompts_file is not None:
            read_prompts(FLAGS.prompts_file)
        batch = FLAGS.sample_batch_size
        check(batch >= 1, "--sample_batch_size", batch, "an integer >= 1")
        check_mode_flags(FLAGS.mode, FLAGS.workdir, FLAGS.device_memory_bytes)
        return run_config(argv[1:], FLAGS.mode, FLAGS.workdir)
    except ConfigError as e:
        _exit(str(e))
    except flags.Error as e:  # a value of the wrong type, a missing required flag, ...
        _exit(" ".join(str(e).split()))


def init_distributed() -> None:
    """JAX's own multi-controller runtime: every process runs this same command."""
    import jax

    if not (FLAGS.distributed or FLAGS.coordinator_address):
        return
    # CPU processes need a collectives backend of their own (no-op for GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


def _sample(run: RunConfig) -> None:
    from dynmoe_jax import inference

    args = (run, FLAGS.workdir)
    if FLAGS.prompts_file is None:
        inference.sample_workdir(*args, FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.temperature,
                                 ignore_eos=FLAGS.ignore_eos)  # fmt: skip
        return
    inference.sample_file(*args, FLAGS.prompts_file, FLAGS.max_new_tokens, FLAGS.temperature,
                          batch_size=FLAGS.sample_batch_size,
                          ignore_eos=FLAGS.ignore_eos)  # fmt: skip


def _newest_checkpoint(workdir: str) -> int | None:
    steps = [int(p.name) for p in (Path(workdir) / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=None)


def interrupted_message(mode: str, workdir: str | None) -> str:
    """One line after Ctrl-C: where a rerun of the same command resumes."""
    if mode != "train":
        return f"interrupted (--mode={mode}); nothing was written"
    step = _newest_checkpoint(workdir)
    if step is None:
        return "interrupted before the first checkpoint; rerunning the command starts over"
    return (f"interrupted; rerunning the same command resumes from the checkpoint of step "
            f"{step} in {Path(workdir) / 'checkpoints'}")  # fmt: skip


def disk_full_message(error: OSError, workdir: str) -> str:
    """One line for a write other than a checkpoint's that found the disk full."""
    step = _newest_checkpoint(workdir)
    rerun = ("rerunning the same command starts over" if step is None else
             f"rerunning the same command resumes from the checkpoint of step {step}")  # fmt: skip
    where = error.filename or workdir  # a failed flush does not name its file
    return f"{error.strerror} writing {where}; free some space: {rerun}"


def run_mode(run: RunConfig) -> None:
    """Runs ``--mode`` on ``run`` (the command line's config) with the parsed flags; every
    expected failure ends in one line, exit 2, and Ctrl-C in one line saying where a rerun
    resumes."""
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    init_distributed()
    from dynmoe_jax import inference, plan, train
    from dynmoe_jax.train import checkpoint

    modes = {
        "train": lambda run: train.train_and_evaluate(run, FLAGS.workdir),
        "eval": lambda run: inference.evaluate_workdir(run, FLAGS.workdir),
        "sample": _sample,
        "plan": lambda run: plan.print_plan(run, FLAGS.device_memory_bytes),
    }
    try:
        modes[FLAGS.mode](run)
    except (
        ConfigError,
        FileNotFoundError,
        checkpoint.CheckpointMismatchError,
        train.NonFiniteError,
    ) as e:
        _exit(str(e))
    except checkpoint.CheckpointSpaceError as e:
        # Orbax's threads may still hold the failed write; an interpreter teardown under them
        # prints their tracebacks.
        _exit_now(str(e), USAGE_ERROR)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # At exit TensorBoard's writer flushes again onto the full disk, with a traceback.
        _exit_now(disk_full_message(e, FLAGS.workdir), USAGE_ERROR)
    except KeyboardInterrupt:
        # Compiler and checkpoint threads may still be running, and tearing down under them
        # can crash. A checkpoint cut short is in a temporary folder that the next run removes.
        _exit_now(interrupted_message(FLAGS.mode, FLAGS.workdir), INTERRUPTED)


def _exit_now(message: str, code: int) -> None:
    """The error line, then exit without interpreter teardown (no atexit handlers, no thread
    joins), for failures that leave background work that the teardown would report."""
    print(f"error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(run: RunConfig) -> None:
    """absl's entry point: ``run`` is what ``parse_flags`` returns."""
    run_mode(run)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
