"""The tiny config with dotted overrides, a batch placed as the loop places it, the records
of a run's log and a random decoder whose every parameter counts, shared by the tests
(conftest.py builds its fixtures from them; subprocess helpers import them directly)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from dynmoe_jax import train
from dynmoe_jax.config import RunConfig
from dynmoe_jax.configs import tiny

# The end-to-end tests run both: the shipped mode (configs/tiny.py, like `make train`) and the
# per-expert capacity mode of GShard.
DISPATCHES = ("grouped", "index")


def set_fields(config: ConfigDict, **overrides: Any) -> ConfigDict:
    """``config`` with ``overrides`` set by dotted path: ``{"moe.dispatch": "index"}``."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def tiny_config(**overrides: Any) -> ConfigDict:
    """configs/tiny.py with ``overrides`` set by dotted path."""
    return set_fields(tiny.get_config(), **overrides)


def placed(task: train.Task, batch: dict) -> dict:
    """``batch`` on ``task``'s mesh, as the training loop places it."""
    return train.put_batch(task.batch_sharding, task.config.data.batch_size, batch)


def records(workdir: str | Path, *, timing: bool = True) -> list[dict]:
    """The records of a run's metrics.jsonl; ``timing=False`` leaves out tokens_per_sec, the
    one field two identical runs may differ in."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    if timing:
        return parsed
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in parsed]


@dataclasses.dataclass(frozen=True)
class Trained:
    """A finished run of the tiny config: 6 steps, checkpoints at 3 and 6."""

    config: RunConfig
    workdir: Path
    final: dict  # train_and_evaluate's result
    printed: str  # what the run printed


def perturbed_params(model_cfg: Any, init_seed: int = 3, noise_seed: int = 7) -> Any:
    """A fresh decoder's parameters with noise on every one: biases and norm scales start at 0
    and 1, so that each of them counts."""
    import jax
    from flax import nnx

    from dynmoe_jax.model.decoder import Decoder

    _, params = nnx.split(Decoder(model_cfg, rngs=nnx.Rngs(init_seed)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(noise_seed), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)
