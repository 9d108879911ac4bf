"""Training: ``task`` (model, optimizer, mesh, state), ``batches`` (rows onto the mesh),
``loss``, ``step`` (jitted train and eval steps), ``evaluation``, ``loop``
(``train_and_evaluate``), ``checkpoint`` and ``metrics``."""

from dynmoe_jax.train.batches import (
    Batch,
    RunData,
    check_batch_split,
    process_rows,
    put_batch,
    read_eval_batches,
    read_train_batch,
)
from dynmoe_jax.train.evaluation import describe_validation, evaluate
from dynmoe_jax.train.loop import NonFiniteError, train_and_evaluate, train_with_data
from dynmoe_jax.train.loss import cross_entropy, forward
from dynmoe_jax.train.step import make_eval_step, make_train_step
from dynmoe_jax.train.task import (
    Task,
    TrainState,
    abstract_state,
    build_task,
    init_state,
    restore_or_init,
    restore_state,
    save_state,
)

__all__ = [
    "Batch", "NonFiniteError", "RunData", "Task", "TrainState", "abstract_state", "build_task",
    "check_batch_split", "cross_entropy", "describe_validation", "evaluate", "forward",
    "init_state", "make_eval_step", "make_train_step", "process_rows", "put_batch",
    "read_eval_batches", "read_train_batch", "restore_or_init", "restore_state", "save_state",
    "train_and_evaluate", "train_with_data",
]  # fmt: skip
