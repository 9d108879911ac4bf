"""The experiments' one door to the library's configs and training entry points.

The scripts build and change configs as ``ml_collections.ConfigDict`` objects (what
``dynmoe_jax.configs.<name>.get_config()`` returns, and what the run cache compares and
records); the library's entry points take the typed, frozen ``RunConfig`` that
``dynmoe_jax.config.resolve`` makes of one. Every crossing between the two goes through a
helper here, so that a change to how the library represents configs is a change to this
module alone.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

CONFIGS_PACKAGE = "dynmoe_jax.configs"


def named(name: str) -> ConfigDict:
    """The shipped config ``name`` (a module of ``dynmoe_jax.configs``: default, tiny, ...)."""
    return importlib.import_module(f"{CONFIGS_PACKAGE}.{name}").get_config()


def is_named(name: str) -> bool:
    """Whether ``name`` is a shipped config."""
    try:
        importlib.import_module(f"{CONFIGS_PACKAGE}.{name}")
    except ModuleNotFoundError:
        return False
    return True


def copy_of(config: ConfigDict) -> ConfigDict:
    """An independent copy, to change without touching ``config``."""
    return config.copy_and_resolve_references()


def to_json(config: ConfigDict) -> str:
    """The config as JSON with sorted keys (what the run cache records and compares)."""
    return config.to_json(sort_keys=True)


def resolved(config: ConfigDict) -> Any:
    """The library's typed config of ``config`` (``dynmoe_jax.config.RunConfig``), every field
    and rule checked; a bad one is a one-line ``ConfigError``."""
    from dynmoe_jax import config as config_lib

    return config_lib.resolve(config)


def check(config: ConfigDict) -> Any:
    """Every check that needs no data (fields, an imported checkpoint, the mesh), before
    anything is read or compiled; the typed config."""
    from dynmoe_jax import config as config_lib

    return config_lib.check_config(config)


def model_config(config: ConfigDict) -> Any:
    """The model's frozen config (``dynmoe_jax.model.ModelConfig``): the config's own, or an
    imported checkpoint's with the config's routing."""
    return resolved(config).model


def checked_init_from(path: str) -> str:
    """``path`` as the library accepts it for ``init_from`` (absolute), or its one-line
    ``ConfigError``."""
    from dynmoe_jax.pretrained import init_from

    return init_from.check_path(path)


def data(config: ConfigDict) -> Any:
    """The tokenized splits of the config's corpus (``dynmoe_jax.data.Data``)."""
    from dynmoe_jax import data as data_lib

    return data_lib.from_config(resolved(config).data)


def save_run_record(config: ConfigDict, workdir: Path, corpus: str) -> None:
    """Writes the workdir's run record: the config and the corpus actually trained on."""
    from dynmoe_jax.train import run_record

    run_record.save(resolved(config), workdir, corpus)


def recorded_corpus(workdir: Path) -> str | None:
    """The corpus a workdir's run record names (a fallback included); None without one."""
    from dynmoe_jax.train import run_record

    record = run_record.load(workdir)
    return None if record is None else record.corpus


def build_task(config: ConfigDict, vocab_size: int) -> Any:
    """The library's ``train.Task`` (model, optimizer, mesh) of ``config``."""
    from dynmoe_jax import train

    return train.build_task(resolved(config), vocab_size)


def train_and_evaluate(config: ConfigDict, workdir: Path) -> dict:
    """Trains ``config`` in ``workdir`` on its own corpus; the final validation metrics."""
    from dynmoe_jax import train

    return train.train_and_evaluate(resolved(config), workdir)


def train_with_data(config: ConfigDict, workdir: Path, data: Any, corpus: str,
                    validation_extras: Any = None) -> dict:  # fmt: skip
    """Trains ``config`` on ``data`` (a ``train.RunData``) named ``corpus``, recording the run
    in the workdir; ``validation_extras(task, params)`` adds fields to every validation
    record. The final validation metrics."""
    from dynmoe_jax import train

    return train.train_with_data(resolved(config), workdir, data, corpus, validation_extras)


def restore(config: ConfigDict, workdir: Path) -> Any:
    """The newest checkpoint of the run of ``config`` in ``workdir``, with its task and data
    (``dynmoe_jax.inference.Restored``)."""
    from dynmoe_jax import inference

    return inference.restore(resolved(config), workdir)
