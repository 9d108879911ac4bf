"""The task of a run: model, optimizer, mesh and shardings built once from the config, and the
train state (create, restore, save).

The state is a ``TrainState`` (params as a pure dict of arrays); the model is rebuilt from its
graph definition inside the jitted steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dynmoe_jax import sharding as sharding_lib
from dynmoe_jax.config import RunConfig, mesh_for
from dynmoe_jax.model.decoder import Decoder, abstract_decoder
from dynmoe_jax.moe import balance
from dynmoe_jax.pretrained.hf_config import PretrainedError
from dynmoe_jax.pretrained.load import check_vocabulary, from_hf
from dynmoe_jax.train import checkpoint as ckpt_lib


class TrainState(NamedTuple):
    """Everything a step changes. Checkpoints store it as a dict of these fields."""

    step: jax.Array  # int32 scalar: optimizer updates taken (skipped ones included)
    params: Any  # pure dict of arrays, as nnx.to_pure_dict gives it
    opt_state: Any
    nonfinite_steps: jax.Array  # int32 scalar: steps whose update was skipped
    first_nonfinite_step: jax.Array  # int32 scalar, -1 while every step was finite


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything a run needs besides its state: built once from the config, whose model is
    the one built (its vocabulary the data's)."""

    config: RunConfig
    graphdef: Any
    optimizer: optax.GradientTransformation
    schedule: Callable[[int], float]
    mesh: Mesh
    state_shardings: Any  # NamedShardings, same tree as the state
    batch_sharding: NamedSharding


def learning_rate_schedule(config: RunConfig) -> optax.Schedule:
    """Linear warm-up, then cosine decay to ``min_learning_rate_ratio`` of the peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.train.learning_rate,
        warmup_steps=config.train.warmup_steps,
        decay_steps=max(config.train.num_train_steps, config.train.warmup_steps + 1),
        end_value=config.train.learning_rate * config.train.min_learning_rate_ratio,
    )


def make_optimizer(config: RunConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    def decay_mask(params):
        # Norm scales stay undecayed, as in LLaMA-style training. The routers' state
        # (moe/balance.py) gets no weight decay, and with its gradient stopped no update:
        # it moves by its own rules after each step.
        def decays(path, _) -> bool:
            return "scale" not in jax.tree_util.keystr(path) and path[-1].key not in balance.FROZEN

        return jax.tree_util.tree_map_with_path(decays, params)

    adamw = optax.adamw(
        schedule,
        b1=config.train.adam_b1,
        b2=config.train.adam_b2,
        weight_decay=config.train.weight_decay,
        mask=decay_mask,
    )
    if config.train.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.train.grad_clip_norm), adamw)
    return adamw


def build_task(config: RunConfig, vocab_size: int | None, devices=None) -> Task:
    """Model, optimizer, mesh and shardings; every check here runs before any compilation.
    ``vocab_size``: the data's (None: the configured one). With ``init_from`` the model is the
    checkpoint's, with the config's routing."""
    mesh = mesh_for(config, devices)
    if config.data.init_from:  # the checkpoint's vocabulary: its embedding's rows
        if vocab_size is not None:
            check_vocabulary(config.data.init_from, config.model, vocab_size)
    else:
        vocab = config.data.vocab_size if vocab_size is None else vocab_size
        model = dataclasses.replace(config.model, vocab_size=vocab)
        config = dataclasses.replace(config, model=model)
    abstract_model = abstract_decoder(config.model)
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
        model = Decoder(task.config.model, rngs=nnx.Rngs(task.config.data.seed))
        return _step_zero(task, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    return init


def init_state(task: Task) -> TrainState:
    """A fresh state, created directly in its sharded layout: random weights, or those of
    the config's ``init_from`` checkpoint."""
    if task.config.data.init_from:
        return _imported_state(task)
    with jax.set_mesh(task.mesh):
        return jax.jit(_init_fn(task), out_shardings=task.state_shardings)()


def imported_params(task: Task) -> Any:
    """The weights of the config's ``init_from`` checkpoint as the pure dict of ``task``'s
    params, each on its sharding."""
    folder = task.config.data.init_from
    model = from_hf(folder, task.config.model, mesh=task.mesh)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    wanted = task.state_shardings.params
    if jax.tree.structure(params) != jax.tree.structure(wanted):
        raise PretrainedError(
            f"init_from={folder!r}: the imported parameters do not form the tree of the "
            "configured model"
        )
    print(f"initialised from {folder} (imported weights)")
    return jax.device_put(params, wanted)


def _imported_state(task: Task) -> TrainState:
    """Step 0 with the imported weights and a fresh optimizer state."""
    params = imported_params(task)
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


def restore_params(task: Task, checkpointer: ckpt_lib.Checkpointer) -> tuple[int, Any] | None:
    """(step, params) of the newest readable checkpoint, reading the parameters alone (not the
    optimizer's moments), or None when there is none."""
    restored = checkpointer.restore_latest({"params": abstract_state(task).params}, partial=True)
    if restored is None:
        return None
    step, saved = restored
    return step, saved["params"]


def save_state(checkpointer: ckpt_lib.Checkpointer, step: int, state: TrainState) -> None:
    # Stored as a plain dict, so a checkpoint does not depend on this class's definition.
    checkpointer.save(step, state._asdict())
