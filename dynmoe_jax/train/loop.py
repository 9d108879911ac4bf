"""The training run: ``train_and_evaluate(config, workdir)`` trains on the configured corpus;
``train_with_data`` is the same loop on any object with the ``RunData`` methods (the
experiments' synthetic tasks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dynmoe_jax import data as data_lib
from dynmoe_jax.config import RunConfig, check_config
from dynmoe_jax.train import checkpoint as ckpt_lib
from dynmoe_jax.train import metrics as metrics_lib
from dynmoe_jax.train import run_record
from dynmoe_jax.train.batches import RunData, process_rows, put_batch
from dynmoe_jax.train.evaluation import describe_validation, evaluate
from dynmoe_jax.train.step import make_eval_step, make_train_step
from dynmoe_jax.train.task import Task, TrainState, build_task, restore_or_init, save_state


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss or gradient with ``nonfinite='stop'``."""


def train_and_evaluate(config: RunConfig, workdir: str | Path) -> dict:
    """Trains (resuming from the workdir's latest checkpoint) and returns the final validation
    metrics. Writes metrics.jsonl, TensorBoard events, checkpoints and the experts plot."""
    check_config(config)  # every data-free check, before reading or compiling
    workdir = Path(workdir)
    data = data_lib.from_config(config.data)
    dataset = data.config.dataset  # the fallback corpus, if the config named one and used it
    run_record.check_corpus(workdir, dataset)
    print(data.summary())
    return train_with_data(config, workdir, data, dataset)


ValidationExtras = Callable[[Task, Any], dict]


def train_with_data(
    config: RunConfig,
    workdir: str | Path,
    data: RunData,
    dataset: str,
    validation_extras: ValidationExtras | None = None,
) -> dict:
    """``train_and_evaluate`` on ``data`` (named ``dataset`` in the logs). Each validation
    record also holds ``validation_extras(task, params)``, if given (JSON-able values).

    The config's corpus fields are not read, and only the checks of ``build_task`` run here:
    a caller with its own data checks the rest of its config itself. ``workdir/config.json``
    records the run once its state is restored or made (a refused run writes nothing)."""
    workdir = Path(workdir)
    task = build_task(config, data.vocab_size)
    checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints)
    state = restore_or_init(task, checkpointer)
    run_record.save(config, workdir, dataset)
    start = int(state.step)
    lead = jax.process_index() == 0  # one process writes the logs of a multi-host run
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start, enabled=lead)
    loop = _Loop(task, data, checkpointer, writer, validation_extras)
    try:
        with jax.set_mesh(task.mesh):  # the layer's sharding constraints read this mesh
            state, final = loop.run(state, start)
    finally:
        checkpointer.close()
        writer.close()
    if lead:
        plot = metrics_lib.plot_experts_per_layer(workdir)
        unigram = data.unigram_cross_entropy(config.data.eval_batches)
        _print_summary(workdir, dataset, final, unigram, plot)
    return final


class _Loop:
    """The step loop with its progress bar, periodic logging, validation and checkpointing."""

    def __init__(self, task, data, checkpointer, writer, validation_extras):
        self.task, self.data = task, data
        self.checkpointer, self.writer = checkpointer, writer
        self.validation_extras = validation_extras
        self.train_step = make_train_step(task)
        self.eval_step = make_eval_step(task)
        self.tokens_per_step = task.config.data.batch_size * task.config.data.seq_len
        shape = (task.config.data.batch_size, task.config.data.seq_len)
        self.rows = process_rows(task.batch_sharding, shape)  # the rows this process reads
        self.bar = None
        self.compiled = False  # whether a step of this process has finished (compiling it)

    def run(self, state: TrainState, start: int) -> tuple[TrainState, dict]:
        from tqdm.auto import tqdm

        total = self.task.config.train.num_train_steps
        lead = jax.process_index() == 0
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                        mininterval=1.0, disable=not lead)  # fmt: skip
        try:
            state, final = self._steps(state, start)
        finally:
            self.bar.close()  # once, and before Ctrl-C's one line (not again at exit)
        if not final:  # resumed after the last step: report the restored model
            final = evaluate(self.eval_step, state.params, self._eval_batches())
        return state, final

    def _steps(self, state: TrainState, start: int) -> tuple[TrainState, dict]:
        cfg, final = self.task.config, {}
        total = cfg.train.num_train_steps
        window_start, window_steps = time.perf_counter(), 0
        previous = None  # metrics of the step dispatched before this one
        for step in range(start + 1, total + 1):
            host = self.data.train_batch(step - 1, self.rows)
            batch = put_batch(self.task.batch_sharding, cfg.data.batch_size, host)
            state, metrics = self.train_step(state, batch)
            window_steps += 1
            if previous is not None:
                self._advance(previous)
            previous = metrics
            if step % cfg.train.log_every_steps == 0 or step == total:
                self._check_finite(state)
                host = _host_metrics(metrics)  # waits for the step, so the timing is real
                elapsed = time.perf_counter() - window_start
                host["tokens_per_sec"] = window_steps * self.tokens_per_step / elapsed
                self.writer.write({"step": step, "split": "train", **host})
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.train.eval_every_steps == 0 or step == total:
                self._advance(previous)
                previous = None
                final = self.validate(state, step)
            if step % cfg.train.checkpoint_every_steps == 0 or step == total:
                self._check_finite(state)  # never save past a non-finite step in stop mode
                save_state(self.checkpointer, step, state)
        if previous is not None:
            self._advance(previous)
        return state, final

    def _advance(self, metrics: dict) -> None:
        """Moves the bar one step once the step of ``metrics`` has finished. Waiting on the
        step before the one just dispatched keeps the bar true while the device always has
        work queued; the postfix costs two scalar transfers."""
        fields = {"loss": f"{float(metrics['loss']):.3f}"}
        if "experts_per_token" in metrics:
            fields["experts/tok"] = f"{float(metrics['experts_per_token']):.2f}"
        self.bar.set_postfix(fields, refresh=False)
        if self.compiled:
            self.bar.update(1)
        else:
            self.compiled = True
            count_untimed_step(self.bar)

    def _check_finite(self, state: TrainState) -> None:
        if self.task.config.train.nonfinite == "stop" and int(state.nonfinite_steps) > 0:
            first = int(state.first_nonfinite_step)
            raise NonFiniteError(
                f"non-finite loss or gradients at step {first} (nonfinite=stop); the last "
                f"checkpoint before it is intact in {self.checkpointer.directory}. Set "
                "--config.nonfinite=skip to skip such updates instead."
            )

    def _eval_batches(self):
        return self.data.eval_batches(self.task.config.data.eval_batches, self.rows)

    def validate(self, state: TrainState, step: int) -> dict:
        result = evaluate(self.eval_step, state.params, self._eval_batches())
        if self.validation_extras is not None:
            result.update(self.validation_extras(self.task, state.params))
        self.writer.write({"step": step, "split": "validation", **result})
        if self.bar is not None and not self.bar.disable:
            self.bar.write(f"step {step}: {describe_validation(result)}")
        return result


def count_untimed_step(bar) -> None:
    """Counts one finished step on a tqdm bar without timing it, and starts the bar's clock
    now. The first step's time is mostly compiling it; timed, it makes the first estimates of
    the rate and the time left many times too long."""
    bar.unpause()  # the clock starts now (no step has been timed yet)
    # Counted as done before the clock started, so no rate includes it.
    bar.n = bar.initial = bar.last_print_n = bar.n + 1
    bar.refresh()


def _print_summary(workdir: Path, dataset: str, final: dict, unigram: float, plot) -> None:
    lines = [f"dataset: {dataset}", f"final {describe_validation(final, unigram)}"]
    if "experts_per_layer" in final:
        per_layer = ", ".join(f"{v:.2f}" for v in np.atleast_1d(final["experts_per_layer"]))
        lines.append(f"experts per token by layer (validation): {per_layer}")
    lines += [
        f"metrics: {workdir / metrics_lib.METRICS_FILE}",
        f"tensorboard: {workdir / 'tensorboard'}",
        f"checkpoints: {workdir / 'checkpoints'}",
    ]
    if plot is not None:
        lines.append(f"plot: {plot}")
    print("\n".join(lines))


def _host_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = v.tolist() if v.ndim else float(v)
    return out
