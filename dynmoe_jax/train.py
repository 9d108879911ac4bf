"""Training: the task, the train state, jitted train/eval steps and the step loop.

``train_and_evaluate(config, workdir)`` trains on the configured corpus; ``train_with_data``
is the same loop on any object with the ``RunData`` methods (the experiments' synthetic tasks).
The state is a ``TrainState`` (params as a pure dict of arrays); the model is rebuilt from its
graph definition inside the jitted step.

Why this module is long (about 510 lines without the corpus lookup, which belongs to the data
package): it is the one definition of a training run - task, state, train and eval steps,
loop, progress and summary - and each part reads the others' fields; split, every change to
the state would touch several modules.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from dynmoe_jax import checkpoint as ckpt_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import init_from as init_from_lib
from dynmoe_jax import metrics as metrics_lib
from dynmoe_jax import model as model_lib
from dynmoe_jax import sharding as sharding_lib
from dynmoe_jax.config import mesh_for, model_config, save_run_config
from dynmoe_jax.model import Decoder, ModelConfig
from dynmoe_jax.validation import check

Batch = dict[str, np.ndarray]

# Per-layer metrics averaged into one number for the log.
LAYER_MEANS = ("experts_per_token", "slots_per_token", "dropped_fraction", "router_confidence")


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss or gradient with ``nonfinite='stop'``."""


class TrainState(NamedTuple):
    """Everything a step changes. Checkpoints store it as a dict of these fields."""

    step: jax.Array  # int32 scalar: optimizer updates taken (skipped ones included)
    params: Any  # pure dict of arrays, as nnx.to_pure_dict gives it
    opt_state: Any
    nonfinite_steps: jax.Array  # int32 scalar: steps whose update was skipped
    first_nonfinite_step: jax.Array  # int32 scalar, -1 while every step was finite


class RunData(Protocol):
    """What the loop reads from its data (``data.Data`` or an experiment's own tasks)."""

    vocab_size: int

    def train_batch(self, step: int) -> Batch: ...

    def eval_batches(self, max_batches: int | None = None) -> Iterable[Batch]: ...

    def unigram_cross_entropy(self, max_batches: int | None = None) -> float: ...

    def summary(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything a run needs besides its state: built once from the config."""

    config: ConfigDict
    model_cfg: ModelConfig
    graphdef: Any
    optimizer: optax.GradientTransformation
    schedule: Callable[[int], float]
    mesh: Mesh
    state_shardings: Any  # NamedShardings, same tree as the state
    batch_sharding: NamedSharding


def learning_rate_schedule(config: ConfigDict) -> optax.Schedule:
    """Linear warm-up, then cosine decay to ``min_learning_rate_ratio`` of the peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_learning_rate_ratio,
    )


def make_optimizer(config: ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    def decay_mask(params):
        # Norm scales stay undecayed, as in LLaMA-style training.
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "scale" not in jax.tree_util.keystr(path), params
        )

    adamw = optax.adamw(
        schedule,
        b1=config.adam_b1,
        b2=config.adam_b2,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


def build_task(config: ConfigDict, vocab_size: int, devices=None) -> Task:
    """Model, optimizer, mesh and shardings; every check here runs before any compilation.
    With ``init_from`` the model is the checkpoint's, with the config's routing."""
    check_batch_split(config.batch_size)
    if init_from_lib.path_of(config):
        model_cfg = init_from_lib.model_config(config, vocab_size)
    else:
        model_cfg = model_config(config, vocab_size)
    mesh = mesh_for(config, model_cfg, devices)
    abstract_model = model_lib.abstract_decoder(model_cfg)
    schedule = learning_rate_schedule(config)
    optimizer = make_optimizer(config, schedule)
    param_specs = sharding_lib.param_specs(abstract_model)
    abstract_params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    opt_specs = optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        jax.eval_shape(optimizer.init, abstract_params),
        param_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    scalar = PartitionSpec()
    specs = TrainState(
        step=scalar,
        params=param_specs,
        opt_state=opt_specs,
        nonfinite_steps=scalar,
        first_nonfinite_step=scalar,
    )
    return Task(
        config=config,
        model_cfg=model_cfg,
        graphdef=nnx.graphdef(abstract_model),
        optimizer=optimizer,
        schedule=schedule,
        mesh=mesh,
        state_shardings=sharding_lib.named(mesh, specs),
        batch_sharding=NamedSharding(mesh, sharding_lib.batch_spec()),
    )


def _step_zero(task: Task, params) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=task.optimizer.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def _init_fn(task: Task) -> Callable[[], TrainState]:
    def init():
        model = Decoder(task.model_cfg, rngs=nnx.Rngs(task.config.seed))
        return _step_zero(task, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    return init


def init_state(task: Task) -> TrainState:
    """A fresh state, created directly in its sharded layout: random weights, or those of
    the config's ``init_from`` checkpoint."""
    if init_from_lib.path_of(task.config):
        return _imported_state(task)
    with jax.set_mesh(task.mesh):
        return jax.jit(_init_fn(task), out_shardings=task.state_shardings)()


def _imported_state(task: Task) -> TrainState:
    """Step 0 with the imported weights and a fresh optimizer state."""
    params = init_from_lib.load_params(task)
    shardings = task.state_shardings
    init = jax.jit(
        lambda p: _step_zero(task, p), in_shardings=(shardings.params,), out_shardings=shardings
    )
    with jax.set_mesh(task.mesh):
        return init(params)


def abstract_state(task: Task) -> TrainState:
    """Shapes, dtypes and target shardings of the state (what checkpoints restore onto)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(_init_fn(task)),
        task.state_shardings,
    )


BATCH_KEYS = ("inputs", "targets", "weights")


def check_batch_split(batch_size: int, process_count: int | None = None) -> None:
    """Each process reads its own share of every batch: ``batch_size`` must divide evenly."""
    count = jax.process_count() if process_count is None else process_count
    allowed = f"a multiple of the process count {count} (each process reads an equal share)"
    check(batch_size % count == 0, "batch_size", batch_size, allowed)


def process_rows(task: Task) -> np.ndarray:
    """Rows of the global batch that this process's devices hold, ascending: the only rows
    it reads (all of them with one process). ``make_array_from_process_local_data`` takes
    them concatenated in this order."""
    shape = (task.config.batch_size, task.config.seq_len)
    rows: set[int] = set()
    for index in task.batch_sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def put_batch(task: Task, batch: Batch) -> dict[str, jax.Array]:
    """Places a batch onto the mesh: either this process's rows of the global batch (those of
    ``process_rows``, in that order) or the whole global batch, the same on every process, of
    which each process keeps its own rows. Keys other than inputs/targets/weights (labels an
    experiment carries along) stay on the host."""
    if jax.process_count() == 1:  # every row is local: the batch is the global array
        # make_array_from_callback: 0.2 ms against make_array_from_process_local_data's 0.65
        # for make train's batch, for the same array.
        return {
            k: jax.make_array_from_callback(
                batch[k].shape, task.batch_sharding, lambda idx, v=batch[k]: v[idx]
            )
            for k in BATCH_KEYS
        }
    rows, size = process_rows(task), task.config.batch_size
    local = batch
    if len(batch["inputs"]) == size:
        local = {k: batch[k][rows] for k in BATCH_KEYS}
    elif len(batch["inputs"]) != len(rows):
        raise ValueError(f"a batch of {len(batch['inputs'])} rows is neither the global batch "
                         f"({size}) nor this process's {len(rows)} rows")  # fmt: skip
    return {
        k: jax.make_array_from_process_local_data(
            task.batch_sharding, np.asarray(local[k]), (size, *local[k].shape[1:])
        )
        for k in BATCH_KEYS
    }


def read_train_batch(data: RunData, step: int, rows: np.ndarray) -> Batch:
    """Batch ``step``: only ``rows`` of it where the data reads by row (``data.Data``), the
    global batch otherwise (``put_batch`` takes either)."""
    if isinstance(data, data_lib.Data):
        return data.train_batch(step, rows)
    return data.train_batch(step)


def read_eval_batches(data: RunData, max_batches: int | None, rows: np.ndarray):
    """``data.eval_batches(max_batches)``, only ``rows`` of each where the data reads by row."""
    if isinstance(data, data_lib.Data):
        return data.eval_batches(max_batches, rows)
    return data.eval_batches(max_batches)


def cross_entropy(logits_BTV, targets_BT, weights_BT) -> tuple[jax.Array, jax.Array]:
    """Sum of weighted token negative log-likelihoods (float32) and the weight sum."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


def forward(task: Task, params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of one batch: lm loss plus the weighted aux losses, each averaged over
    the MoE layers (the paper leaves the reduction open; a mean keeps weights depth-free)."""
    model = nnx.merge(task.graphdef, params)
    logits, layer = model(batch["inputs"], batch["weights"] > 0)
    nll, count = cross_entropy(logits, batch["targets"], batch["weights"])
    lm_loss = nll / jnp.maximum(count, 1.0)
    w = task.config.loss
    metrics = {"lm_loss": lm_loss}
    loss = lm_loss
    for name, weight in (
        ("load_balance_loss", w.load_balance_weight),
        ("dynamic_loss", w.dynamic_weight),
        ("z_loss", w.z_loss_weight),
    ):
        value = jnp.mean(layer[name]) if layer else jnp.zeros(())
        metrics[name] = value
        loss = loss + weight * value
    metrics["loss"] = loss
    if layer:
        metrics.update({k: jnp.mean(layer[k]) for k in LAYER_MEANS})
        metrics["experts_per_layer"] = layer["experts_per_token"]
        metrics["experts_per_token_max"] = jnp.max(layer["experts_per_token_max"])
    return loss, metrics


def _accumulated_grads(task: Task, params, batch: Batch):
    """Gradients of the mean loss over ``grad_accum_steps`` micro-batches (a scan)."""
    grad_fn = jax.value_and_grad(lambda p, b: forward(task, p, b), has_aux=True)
    n = task.config.grad_accum_steps
    if n == 1:
        (_, metrics), grads = grad_fn(params, batch)
        return grads, metrics
    micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

    def body(acc, mb):
        (_, m), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, acc, (g, m)), None

    (_, metrics_shape), grads_shape = jax.eval_shape(
        grad_fn, params, jax.tree.map(lambda x: x[0], micro)
    )
    zeros = jax.tree.map(jnp.zeros_like, (grads_shape, metrics_shape))
    (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / n, (grads, metrics))


TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict]]


def make_train_step(task: Task) -> TrainStep:
    """A jitted step. A non-finite loss or gradient leaves params and optimizer state as they
    were and is counted in the state (``nonfinite_steps``, ``first_nonfinite_step``)."""

    def train_step(state: TrainState, batch: Batch):
        grads, metrics = _accumulated_grads(task, state.params, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = task.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep_if_bad = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        first_bad = (state.first_nonfinite_step < 0) & ~finite
        new_state = TrainState(
            step=state.step + 1,
            params=jax.tree.map(keep_if_bad, params, state.params),
            opt_state=jax.tree.map(keep_if_bad, opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(first_bad, state.step + 1, state.first_nonfinite_step),
        )
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = task.schedule(state.step)
        metrics["nonfinite_steps"] = new_state.nonfinite_steps
        return new_state, metrics

    shardings = task.state_shardings
    return jax.jit(
        train_step,
        in_shardings=(shardings, task.batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def make_eval_step(task: Task) -> Callable[[Any, Batch], dict]:
    def eval_step(params, batch: Batch):
        model = nnx.merge(task.graphdef, params)
        weights_BT = batch["weights"]
        logits, layer = model(batch["inputs"], weights_BT > 0)
        nll, count = cross_entropy(logits, batch["targets"], weights_BT)
        out = {"nll": nll, "tokens": count}
        if layer:
            # Weighted sums, so that batches add up by tokens (evaluate divides by the total).
            experts_LBT = layer["token_experts"].astype(jnp.float32)
            out["experts_per_layer"] = jnp.sum(experts_LBT * weights_BT, axis=(1, 2))
            out["dropped_fraction"] = jnp.mean(layer["dropped_fraction"]) * count
        return out

    jitted = jax.jit(eval_step, in_shardings=(task.state_shardings.params, task.batch_sharding))
    return lambda params, batch: jitted(params, put_batch(task, batch))


def evaluate(eval_step, params, batches: Iterable[Batch]) -> dict:
    """Token-weighted validation loss, perplexity and experts per token per layer, with the
    number of batches and weighted tokens they cover."""
    total: dict[str, Any] = {}
    num_batches = 0
    for batch in batches:
        out = jax.device_get(eval_step(params, batch))
        total = {k: total.get(k, 0) + np.asarray(v, np.float64) for k, v in out.items()}
        num_batches += 1
    if not total:
        raise ValueError("the validation split produced no batch")
    tokens = float(total.pop("tokens"))
    result = {"loss": float(total.pop("nll")) / tokens}
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    result.update({k: v / tokens for k, v in total.items()})
    if "experts_per_layer" in result:
        result["experts_per_token"] = float(np.mean(result["experts_per_layer"]))
    result["tokens"] = tokens
    result["batches"] = num_batches
    return result


def describe_validation(result: dict, unigram_cross_entropy: float | None = None) -> str:
    """One labelled line: the split, how much of it was read, and the numbers."""
    line = (f"validation split, {result['batches']} batches ({result['tokens']:,.0f} tokens): "
            f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")  # fmt: skip
    if unigram_cross_entropy is not None:
        line += f" (unigram baseline on these tokens: {math.exp(unigram_cross_entropy):.2f})"
    if "experts_per_token" in result:
        line += f", experts per token {result['experts_per_token']:.2f}"
    return line


def _host_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = v.tolist() if v.ndim else float(v)
    return out


def restore_or_init(task: Task, checkpointer: ckpt_lib.Checkpointer) -> TrainState:
    """The newest readable checkpoint (resharded onto this task's mesh), or a fresh state."""
    restored = restore_state(task, checkpointer)
    if restored is None:
        return init_state(task)
    step, state = restored
    print(f"resumed from {checkpointer.directory}/{step}")
    return state


def restore_state(task: Task, checkpointer: ckpt_lib.Checkpointer) -> tuple[int, TrainState] | None:
    """(step, state) of the newest readable checkpoint, or None when there is none."""
    restored = checkpointer.restore_latest(abstract_state(task)._asdict())
    if restored is None:
        return None
    step, saved = restored
    return step, TrainState(**saved)


def save_state(checkpointer: ckpt_lib.Checkpointer, step: int, state: TrainState) -> None:
    # Stored as a plain dict, so a checkpoint does not depend on this class's definition.
    checkpointer.save(step, state._asdict())


def train_and_evaluate(config: ConfigDict, workdir: str | Path) -> dict:
    """Trains (resuming from the workdir's latest checkpoint) and returns the final validation
    metrics. Writes metrics.jsonl, TensorBoard events, checkpoints and the experts plot."""
    init_from_lib.check_config(config)  # every data-free check, before reading or compiling
    workdir = Path(workdir)
    data = data_lib.from_config(config)
    dataset = data.config.dataset  # the fallback corpus, if the config named one and used it
    save_run_config(config, workdir, dataset)
    print(data.summary())
    return train_with_data(config, workdir, data, dataset)


ValidationExtras = Callable[[Task, Any], dict]


def train_with_data(
    config: ConfigDict,
    workdir: str | Path,
    data: RunData,
    dataset: str,
    validation_extras: ValidationExtras | None = None,
) -> dict:
    """``train_and_evaluate`` on ``data`` (named ``dataset`` in the logs). Each validation
    record also holds ``validation_extras(task, params)``, if given (JSON-able values).

    The config's corpus fields are not read, and only the checks of ``build_task`` run here:
    a caller with its own data checks the rest of its config itself."""
    workdir = Path(workdir)
    task = build_task(config, data.vocab_size)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    state = restore_or_init(task, checkpointer)
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
        unigram = data.unigram_cross_entropy(config.eval_batches)
        _print_summary(workdir, dataset, final, unigram, plot)
    return final


class _Loop:
    """The step loop with its progress bar, periodic logging, validation and checkpointing."""

    def __init__(self, task, data, checkpointer, writer, validation_extras=None):
        self.task, self.data = task, data
        self.checkpointer, self.writer = checkpointer, writer
        self.validation_extras = validation_extras
        self.train_step = make_train_step(task)
        self.eval_step = make_eval_step(task)
        self.tokens_per_step = task.config.batch_size * task.config.seq_len
        self.rows = process_rows(task)  # the rows of each batch this process reads
        self.bar = None

    def run(self, state: TrainState, start: int) -> tuple[TrainState, dict]:
        from tqdm.auto import tqdm

        cfg = self.task.config
        total = cfg.num_train_steps
        final = {}
        lead = jax.process_index() == 0
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                        mininterval=1.0, disable=not lead)  # fmt: skip
        window_start, window_steps = time.perf_counter(), 0
        previous = None  # metrics of the step dispatched before this one
        for step in range(start + 1, total + 1):
            batch = put_batch(self.task, read_train_batch(self.data, step - 1, self.rows))
            state, metrics = self.train_step(state, batch)
            window_steps += 1
            if previous is not None:
                self._advance(previous)
            previous = metrics
            if step % cfg.log_every_steps == 0 or step == total:
                self._check_finite(state)
                host = _host_metrics(metrics)  # waits for the step, so the timing is real
                elapsed = time.perf_counter() - window_start
                host["tokens_per_sec"] = window_steps * self.tokens_per_step / elapsed
                self.writer.write({"step": step, "split": "train", **host})
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.eval_every_steps == 0 or step == total:
                self._advance(previous)
                previous = None
                final = self.validate(state, step)
            if step % cfg.checkpoint_every_steps == 0 or step == total:
                self._check_finite(state)  # never save past a non-finite step in stop mode
                save_state(self.checkpointer, step, state)
        if previous is not None:
            self._advance(previous)
        self.bar.close()
        if not final:  # resumed after the last step: report the restored model
            final = evaluate(self.eval_step, state.params, self._eval_batches())
        return state, final

    def _advance(self, metrics: dict) -> None:
        """Moves the bar one step once the step of ``metrics`` has finished. Waiting on the
        step before the one just dispatched keeps the bar true while the device always has
        work queued; the postfix costs two scalar transfers."""
        fields = {"loss": f"{float(metrics['loss']):.3f}"}
        if "experts_per_token" in metrics:
            fields["experts/tok"] = f"{float(metrics['experts_per_token']):.2f}"
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(1)

    def _check_finite(self, state: TrainState) -> None:
        if self.task.config.nonfinite == "stop" and int(state.nonfinite_steps) > 0:
            first = int(state.first_nonfinite_step)
            raise NonFiniteError(
                f"non-finite loss or gradients at step {first} (nonfinite=stop); the last "
                f"checkpoint before it is intact in {self.checkpointer.directory}. Set "
                "--config.nonfinite=skip to skip such updates instead."
            )

    def _eval_batches(self):
        return read_eval_batches(self.data, self.task.config.eval_batches, self.rows)

    def validate(self, state: TrainState, step: int) -> dict:
        result = evaluate(self.eval_step, state.params, self._eval_batches())
        if self.validation_extras is not None:
            result.update(self.validation_extras(self.task, state.params))
        self.writer.write({"step": step, "split": "validation", **result})
        if self.bar is not None and not self.bar.disable:
            self.bar.write(f"step {step}: {describe_validation(result)}")
        return result


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
