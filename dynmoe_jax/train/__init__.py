"""Training: ``config`` (TrainConfig, LossConfig), ``task`` (model, optimizer, mesh, state),
``batches`` (rows onto the mesh), ``loss``, ``step`` (jitted train and eval steps),
``evaluation``, ``loop`` (``train_and_evaluate``), ``run_record``, ``checkpoint`` and
``metrics``.

The names below are importable from the package; each loads its module on first use, so that
importing one module of the package (its config, say) does not import all of them.
"""

import importlib

_HOMES = {
    "batches": ("Batch", "RunData", "process_rows", "put_batch"),
    "evaluation": ("describe_validation", "evaluate"),
    "loop": ("NonFiniteError", "train_and_evaluate", "train_with_data"),
    "loss": ("cross_entropy", "forward"),
    "step": ("make_eval_step", "make_train_step"),
    "task": ("Task", "TrainState", "abstract_state", "build_task", "imported_params",
             "init_state", "restore_or_init", "restore_state", "save_state"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
