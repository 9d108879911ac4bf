"""A synthetic suite of tasks of graded difficulty (copying 4 digits, then sums of 1- to
4-digit numbers), trained through the library's loop as its own data (``train.RunData``).

Each validation record of such a run also holds per-task statistics (``task_*`` fields of
metrics.jsonl), so the experts per task can be followed over training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib
from dynmoe_jax import train
from experiments import run_cache, variants

# Token ids of the synthetic vocabulary. 0 is never produced (the library's padding id).
PAD = 0
DIGIT0 = 1  # digits 0-9 are ids 1-10
PLUS, EQUALS, END = 11, 12, 13
FIRST_TAG = 14  # one tag token per task, starting every example
VOCAB_SIZE = 32  # the config check wants >= 16; ids above the tags are unused


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One task of the suite. ``kind`` 'copy' repeats ``digits`` random digits; 'add' writes
    the sum of two ``digits``-digit numbers, least significant digit first, zero-padded to
    ``digits + 1`` digits (the order a causal model can compute, carry by carry)."""

    name: str
    kind: str
    digits: int


# Ordered from easiest to hardest: the index is the difficulty rank.
TASKS = (
    SyntheticTask("copy4", "copy", 4),
    SyntheticTask("add1", "add", 1),
    SyntheticTask("add2", "add", 2),
    SyntheticTask("add3", "add", 3),
    SyntheticTask("add4", "add", 4),
)


def digits_to_ids(digits: Sequence[int]) -> list[int]:
    return [DIGIT0 + int(d) for d in digits]


def make_example(task_index: int, rng: np.random.Generator) -> tuple[list[int], list[bool]]:
    """One example of task ``TASKS[task_index]``: its tokens and which of them are the answer
    (the answer digits and the closing ``;``, the tokens the loss is taken on)."""
    task = TASKS[task_index]
    a = rng.integers(0, 10, size=task.digits)
    if task.kind == "copy":
        prompt, answer = digits_to_ids(a), [int(d) for d in a]
    elif task.kind == "add":
        b = rng.integers(0, 10, size=task.digits)
        prompt = digits_to_ids(a) + [PLUS] + digits_to_ids(b)
        total = int("".join(map(str, a))) + int("".join(map(str, b)))
        answer = [int(c) for c in reversed(str(total).zfill(task.digits + 1))]
    else:
        raise ValueError(f"task kind {task.kind!r} is invalid: allowed 'copy' | 'add'")
    tokens = [FIRST_TAG + task_index, *prompt, EQUALS, *digits_to_ids(answer), END]
    is_answer = [False] * (len(prompt) + 2) + [True] * (len(answer) + 1)
    return tokens, is_answer


def make_row(task_index: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``length`` tokens of back-to-back examples of one task (the last one cut off) and their
    answer flags."""
    tokens: list[int] = []
    flags: list[bool] = []
    while len(tokens) < length:
        t, f = make_example(task_index, rng)
        tokens += t
        flags += f
    return np.asarray(tokens[:length], np.int32), np.asarray(flags[:length], bool)


def make_batch(
    rng: np.random.Generator, batch_size: int, seq_len: int, task_ids: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """A batch in the library's format (inputs/targets int32 [B, T], weights float32 [B, T])
    plus ``task`` int32 [B]. Each row holds one task; tasks take turns over the rows (in a
    random order) unless ``task_ids`` gives them. Only answer targets carry weight."""
    if task_ids is None:
        task_ids = rng.permutation(np.arange(batch_size) % len(TASKS))
    rows = [make_row(int(t), seq_len + 1, rng) for t in task_ids]
    tokens = np.stack([r[0] for r in rows])
    flags = np.stack([r[1] for r in rows])
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": flags[:, 1:].astype(np.float32),
        "task": np.asarray(task_ids, np.int32),
    }


def decode_example(tokens: Sequence[int]) -> str:
    """Human-readable text of synthetic tokens, e.g. 'add2: 47+19=660;'."""
    names = {PLUS: "+", EQUALS: "=", END: ";", PAD: "_"}
    out = []
    for t in tokens:
        if FIRST_TAG <= t < FIRST_TAG + len(TASKS):
            out.append(f" {TASKS[t - FIRST_TAG].name}: ")
        elif DIGIT0 <= t < DIGIT0 + 10:
            out.append(str(t - DIGIT0))
        else:
            out.append(names.get(int(t), "?"))
    return "".join(out).strip()


def tasks_config(seed: int, scale: int = 1, steps: int | None = None) -> ConfigDict:
    """The top-p model of the task suite: the LM experiments' model on 32 x 48-token batches
    of the synthetic tasks."""
    c = variants.lm_config("top_p", seed, scale, steps=steps if steps is not None else 600 * scale)
    c.dataset = "synthetic"  # not read: batches come from make_batch
    c.vocab_size = VOCAB_SIZE
    c.seq_len = 48
    c.batch_size = 30  # a multiple of the 5 tasks, so every batch is balanced
    c.eval_batches = EVAL_BATCHES
    return c


# ----------------------------------------------------------------------------- data

EVAL_BATCHES = 7  # 42 validation rows per task at batch size 30
EVAL_SEED = 12345  # the validation rows are the same for every seed


class TaskSuiteData:
    """The task suite in the shape the library's loop reads (``train.RunData``).

    Train batch ``step`` is a pure function of (seed, step), so a resumed run sees the batches
    an uninterrupted one would. Validation batches hold every task equally, with a ``task``
    row label the loop leaves on the host.
    """

    def __init__(self, config: ConfigDict):
        if config.batch_size % len(TASKS):
            raise ValueError(f"batch_size={config.batch_size} is invalid: allowed a multiple "
                             f"of the {len(TASKS)} tasks")  # fmt: skip
        self.vocab_size = VOCAB_SIZE
        self.seed, self.batch_size, self.seq_len = config.seed, config.batch_size, config.seq_len

    def train_batch(self, step: int, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """The global batch ``step`` (``rows`` is not read: the loop takes the whole batch)."""
        batch = make_batch(np.random.default_rng([self.seed, step]), self.batch_size, self.seq_len)
        batch.pop("task")
        return batch

    def eval_batches(
        self, max_batches: int | None = None, rows: Sequence[int] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The validation batches, whole (``rows`` is not read), each with its task labels."""
        rng = np.random.default_rng(EVAL_SEED)
        task_ids = np.repeat(np.arange(len(TASKS)), self.batch_size // len(TASKS))
        for _ in range(EVAL_BATCHES if max_batches is None else max_batches):
            yield make_batch(rng, self.batch_size, self.seq_len, task_ids)

    def unigram_cross_entropy(self, max_batches: int | None = None) -> float:
        """Cross-entropy of the answer tokens under their own frequencies (a floor for a
        model that ignores the question)."""
        targets = np.concatenate([b["targets"][b["weights"] > 0]
                                  for b in self.eval_batches(max_batches)])  # fmt: skip
        p = np.bincount(targets, minlength=VOCAB_SIZE) / len(targets)
        return float(-np.mean(np.log(p[targets])))

    def summary(self) -> str:
        names = ", ".join(t.name for t in TASKS)
        return f"dataset=synthetic tasks ({names}) vocab={VOCAB_SIZE} seq_len={self.seq_len}"


# ----------------------------------------------------------------------------- statistics


def task_statistics(graphdef, params, batches: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per task: experts per token on answer positions (mean over layers and by layer), on
    every position, and the answer loss and token accuracy."""
    from dynmoe_jax import inference

    answer = inference.token_statistics(graphdef, params, batches)
    every = inference.token_statistics(
        graphdef, params, [dict(b, weights=np.ones_like(b["weights"])) for b in batches]
    )
    task_of_row = np.concatenate([b["task"] for b in batches])
    out: dict[str, list] = {k: [] for k in ("experts", "experts_all", "by_layer", "loss", "acc")}
    for t in range(len(TASKS)):
        sel = task_of_row[answer["row"]] == t
        experts = answer["experts"][:, sel]
        out["experts"].append(experts.mean())
        out["by_layer"].append(experts.mean(axis=1))
        out["experts_all"].append(every["experts"][:, task_of_row[every["row"]] == t].mean())
        out["loss"].append(answer["loss"][sel].mean())
        out["acc"].append(answer["correct"][sel].mean())
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


PREFIX = "task_"  # of the per-task fields in the run's validation records


def train_tasks(config: ConfigDict, workdir: Path) -> dict:
    """Trains one model on the suite with the library's loop (``train.train_with_data``)."""
    data = TaskSuiteData(config)
    evaluation = list(data.eval_batches(config.eval_batches))

    def per_task(task, params) -> dict:
        stats = task_statistics(task.graphdef, params, evaluation)
        return {PREFIX + k: v for k, v in stats.items()}

    # Recorded as corpus "synthetic" (the config's dataset), as the run cache checks.
    run = config_lib.resolve(config)
    return train.train_with_data(run, workdir, data, config.dataset, per_task)


def task_history(run: run_cache.RunResult) -> list[dict]:
    """The per-task statistics of every validation of a run, with their step."""
    return [
        {"step": r["step"], **{k[len(PREFIX) :]: np.asarray(v, np.float64)
                               for k, v in r.items() if k.startswith(PREFIX)}}
        for r in run.validation
    ]  # fmt: skip
