"""``python -m dynmoe_jax.lm_eval``: lm-eval's own command line, with the model ``dynmoe_jax``
chosen and the shipped example tasks on the task path.

    python -m dynmoe_jax.lm_eval --model_args pretrained=runs/default,threshold=0.5 \\
        --tasks dynmoe_pydoc_mc --output_path out/ --log_samples

Every flag is lm-eval's (``--tasks``, ``--include_path``, ``--batch_size`` (default here 8),
``--limit``, ``--num_fewshot``, ``--output_path``, ``--log_samples``, ...). Datasets are read
offline (``HF_DATASETS_OFFLINE=1`` unless set). The results JSON carries each task's experts
per token, per layer, and tokens per second in that task's entry (``figures.py``), and a table
of them ends the output.

Mistakes end in one ``error: ...`` line and exit code 2 before any weight is read or anything
compiles: an unknown task, an ``--include_path`` that is not a folder, a ``pretrained`` that is
neither a workdir nor a model folder, an unknown model argument or a routing value out of
range. Ctrl-C ends in one line.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from dynmoe_jax.validation import ConfigError, check

USAGE_ERROR = 2
INTERRUPTED = 130
DEFAULT_BATCH_SIZE = "8"
# lm-eval's message for a task name it cannot find (raised before the model is built).
_TASKS_NOT_FOUND = "Tasks not found"


def _argv(argv: Sequence[str]) -> list[str]:
    """lm-eval's ``run`` command line with the model chosen and a batch size."""
    argv = [a for a in argv if a != "run"]
    for i, arg in enumerate(argv):
        if arg == "--model" or arg.startswith("--model="):
            value = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            check(value == "dynmoe_jax", "--model", value,
                  "dynmoe_jax (this command's model; leave --model out)")  # fmt: skip
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["--model", "dynmoe_jax", *argv]
    if not any(a.startswith(("--batch_size", "-b")) for a in argv):
        argv += ["--batch_size", DEFAULT_BATCH_SIZE]
    return ["lm-eval", "run", *argv]


def _check(args) -> None:
    """The command line's values that need no data and no weights."""
    from dynmoe_jax.lm_eval import model, task_files

    include = args.include_path
    if include is not None:
        check(Path(include).is_dir(), "--include_path", include, "a folder of task YAML files")
    args.include_path = [str(task_files.SHIPPED), *([include] if include else [])]
    check(bool(args.tasks), "--tasks", args.tasks, "one or more task names, comma-separated")
    model.check_model_args(args.model_args or {})


@contextlib.contextmanager
def _with_figures(captured: dict) -> Iterator[None]:
    """lm-eval's ``simple_evaluate``, for this command only, putting each task's figures in
    its results entry before the command line saves them."""
    import lm_eval
    from lm_eval import evaluator

    from dynmoe_jax.lm_eval.figures import with_task_figures

    def evaluate(*args, **kwargs):
        results = evaluator.simple_evaluate(*args, **kwargs)
        if results is not None:
            captured["results"] = with_task_figures(results)
        return results

    lm_eval.simple_evaluate = evaluate
    try:
        yield
    finally:
        del lm_eval.simple_evaluate  # the package's lazy attribute again


def _exit(message: str, code: int = USAGE_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no teardown under compiler threads


def main(argv: Sequence[str] | None = None) -> None:
    """Runs lm-eval's command line (``argv``: its arguments, default ``sys.argv[1:]``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from dynmoe_jax.lm_eval import figures  # registers the model too
    from dynmoe_jax.pretrained import PretrainedError

    captured: dict = {}
    try:
        sys.argv = _argv(sys.argv[1:] if argv is None else argv)
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        _check(args)
        with _with_figures(captured):
            parser.execute(args)
    except (ConfigError, PretrainedError, FileNotFoundError) as e:
        _exit(str(e))
    except ValueError as e:
        if not str(e).startswith(_TASKS_NOT_FOUND):
            raise
        _exit(f"--tasks: {e}; see `python -m lm_eval ls tasks`, or --include_path")
    except KeyboardInterrupt:
        _exit("interrupted; nothing was written", INTERRUPTED)
    if "results" in captured:
        print(figures.table(captured["results"]))
