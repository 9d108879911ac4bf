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
(``pretrained/init_from.py``; ``configs/pretrained.py`` holds fine-tuning defaults).

Every mistake on the command line (a missing config file, a misspelt field, a bad value,
a bad sampling flag) ends in one ``error: ...`` line and exit code 2, before any data is read
or anything is compiled.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from dynmoe_jax.sample_checks import check_max_new_tokens, check_temperature, read_prompts
from dynmoe_jax.validation import ConfigError, check, invalid

USAGE_ERROR = 2  # exit code of every command-line mistake

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
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
    "--mode=sample: a text file of prompts, one per line; writes one JSON object per prompt "
    "(text, tokens, experts per token, seconds) to standard output.",
)
flags.DEFINE_integer("sample_batch_size", 8, "--mode=sample --prompts_file: prompts per batch.")
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU pods, SLURM)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config"])
NEEDS_WORKDIR = ("train", "eval", "sample")  # plan writes nothing


def _flag_values(argv: Sequence[str], name: str) -> list[str]:
    """Values given to ``--name=V`` or ``--name V`` in argv (absl's two spellings)."""
    values = []
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            values.append(arg.split("=", 1)[1])
        elif arg == f"--{name}" and i + 1 < len(argv):
            values.append(argv[i + 1])
    return values


def _overrides(argv: Sequence[str]) -> dict[str, str]:
    """``--config.a.b=V`` arguments as {'a.b': 'V'} (booleans may be given bare)."""
    out = {}
    for arg in argv:
        if arg.startswith("--config."):
            path, _, value = arg[len("--config.") :].partition("=")
            out[path] = value
    return out


def load_config_file(path: str) -> ConfigDict:
    """The ConfigDict that a config file's ``get_config()`` returns."""
    if not Path(path).is_file():
        invalid("--config", path, "a config file that exists, e.g. dynmoe_jax/configs/default.py")
    spec = importlib.util.spec_from_file_location("dynmoe_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_argv(argv: Sequence[str]) -> None:
    """The mistakes that absl and ml_collections report as tracebacks: a config file that does
    not exist, and ``--config.FIELD`` naming no field (the nearest field name is suggested)."""
    from dynmoe_jax.config import check_overrides

    paths = _flag_values(argv, "config")
    if paths:
        check_overrides(load_config_file(paths[-1]), _overrides(argv))


def check_sample_flags(prompt: str, max_new_tokens: int, temperature: float) -> None:
    """The sampling flags, checked in every mode so that a typo never waits for a model."""
    # An empty prompt is almost always an unset shell variable.
    check(bool(prompt), "--prompt", prompt, "non-empty text")
    check_max_new_tokens(max_new_tokens, "--max_new_tokens")
    check_temperature(temperature, "--temperature")


def check_mode_flags(mode: str, workdir: str | None, device_memory_bytes: float) -> None:
    """A workdir for the modes that write or read one; a positive memory for plan."""
    if mode in NEEDS_WORKDIR:
        check(bool(workdir), "--workdir", workdir, f"a folder (--mode={mode} needs one)")
    allowed = "a number of bytes > 0, e.g. 80e9"
    check(device_memory_bytes > 0, "--device_memory_bytes", device_memory_bytes, allowed)


def resolve_init_from(config: ConfigDict) -> None:
    """Checks ``init_from`` (a folder with config.json, or '') and makes it absolute, so that
    the run's config.json records where the weights came from."""
    from dynmoe_jax.pretrained import init_from

    folder = init_from.check_path(config)
    if folder:
        config.init_from = folder


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake reported in one line and exit code 2."""
    try:
        check_argv(argv[1:])
        rest = FLAGS(argv)
        check_sample_flags(FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.temperature)
        if FLAGS.prompts_file is not None:
            read_prompts(FLAGS.prompts_file)
        batch = FLAGS.sample_batch_size
        check(batch >= 1, "--sample_batch_size", batch, "an integer >= 1")
        resolve_init_from(FLAGS.config)
        check_mode_flags(FLAGS.mode, FLAGS.workdir, FLAGS.device_memory_bytes)
    except ConfigError as e:
        _exit(str(e))
    except flags.Error as e:  # a value of the wrong type, a missing required flag, ...
        _exit(" ".join(str(e).split()))
    return rest


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


def _sample() -> None:
    from dynmoe_jax import inference

    args = (FLAGS.config, FLAGS.workdir)
    if FLAGS.prompts_file is None:
        inference.sample_workdir(*args, FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.temperature)
        return
    inference.sample_file(*args, FLAGS.prompts_file, FLAGS.max_new_tokens, FLAGS.temperature,
                          batch_size=FLAGS.sample_batch_size)  # fmt: skip


def run_mode(make_step=None) -> None:
    """Runs ``--mode`` with the parsed flags; every expected failure ends in one line, exit 2.
    ``make_step``: the train step factory (None: the library's; a test may poison it)."""
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    init_distributed()
    from dynmoe_jax import inference, plan, train
    from dynmoe_jax.train import checkpoint

    step = {} if make_step is None else {"make_step": make_step}
    modes = {
        "train": lambda: train.train_and_evaluate(FLAGS.config, FLAGS.workdir, **step),
        "eval": lambda: inference.evaluate_workdir(FLAGS.config, FLAGS.workdir),
        "sample": _sample,
        "plan": lambda: plan.print_plan(FLAGS.config, FLAGS.device_memory_bytes),
    }
    try:
        modes[FLAGS.mode]()
    except (
        ConfigError,
        FileNotFoundError,
        checkpoint.CheckpointMismatchError,
        train.NonFiniteError,
    ) as e:
        _exit(str(e))


def main(argv):
    del argv
    run_mode()


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
