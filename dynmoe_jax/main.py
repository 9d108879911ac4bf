"""Command line: train, evaluate or sample.

    python -m dynmoe_jax.main --config=dynmoe_jax/configs/default.py --workdir=DIR \\
        [--mode=train|eval|sample] [--config.FIELD=VALUE ...]
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dynmoe_jax.config_check import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do with the workdir.")
flags.DEFINE_string("prompt", "And God said", "Prompt for --mode=sample.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate in --mode=sample.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU pods, SLURM)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])


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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    init_distributed()
    from dynmoe_jax import checkpoint, inference, train

    modes = {
        "train": lambda: train.train_and_evaluate(FLAGS.config, FLAGS.workdir),
        "eval": lambda: inference.evaluate_workdir(FLAGS.config, FLAGS.workdir),
        "sample": lambda: inference.sample_workdir(
            FLAGS.config, FLAGS.workdir, FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.temperature
        ),
    }
    try:
        modes[FLAGS.mode]()
    except (
        ConfigError,
        FileNotFoundError,
        checkpoint.CheckpointMismatchError,
        train.NonFiniteError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
