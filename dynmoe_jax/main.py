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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    from dynmoe_jax import inference, train

    modes = {
        "train": lambda: train.train_and_evaluate(FLAGS.config, FLAGS.workdir),
        "eval": lambda: inference.evaluate_workdir(FLAGS.config, FLAGS.workdir),
        "sample": lambda: inference.sample_workdir(
            FLAGS.config, FLAGS.workdir, FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.temperature
        ),
    }
    try:
        modes[FLAGS.mode]()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
