"""The training config: an ml_collections ConfigDict, checked, then turned into frozen objects.

* ``check_config(config)`` runs every check that needs no data, before anything is read or
  compiled; it only checks.
* ``model_config(config, vocab_size)`` and ``mesh_for(config, model_cfg)`` build the frozen
  ``ModelConfig`` (with its ``MoEConfig``) and the device mesh.
* ``check_overrides(config, overrides)`` backs the command line's one-line error for a misspelt
  ``--config.FIELD``.
* ``save_run_config`` / ``load_run_config`` keep ``workdir/config.json``: the config of a run
  and the corpus it actually trained on; ``with_recorded_corpus`` makes evaluation and
  sampling read that corpus (and its tokenizer), never a fallback.

Every message goes through :mod:`dynmoe_jax.validation` (``field=value is invalid: allowed``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import ConfigDict

from dynmoe_jax import sharding
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.validation import ConfigError, check, invalid, is_int

__all__ = [
    "RUN_CONFIG_FILE",
    "ConfigError",
    "RunConfig",
    "check_config",
    "check_overrides",
    "field_paths",
    "load_run_config",
    "mesh_for",
    "model_config",
    "moe_config",
    "save_run_config",
    "with_recorded_corpus",
]

RUN_CONFIG_FILE = "config.json"


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: is_int(v) and v >= low), f"an integer >= {low}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_POSITIVE = _int_at_least(1)
_NON_NEGATIVE = _int_at_least(0)

# field -> (predicate, allowed): one table holds the top-level rules.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _NON_NEGATIVE,
    "dataset": (
        lambda v: isinstance(v, str) and bool(v),
        "kjv | pydoc | text_dir:PATH | a TFDS name",
    ),
    "fallback_dataset": (
        lambda v: isinstance(v, str),
        "'' (none) or a corpus name such as 'pydoc'",
    ),
    "data_dir": (lambda v: isinstance(v, str), "'' (the default cache) or a folder"),
    "seq_len": _POSITIVE,
    "batch_size": _POSITIVE,
    "num_train_steps": _POSITIVE,
    "warmup_steps": _NON_NEGATIVE,
    "learning_rate": (lambda v: _number(v) and v > 0, "a number > 0"),
    "min_learning_rate_ratio": (lambda v: _number(v) and 0 <= v <= 1, "0 <= ratio <= 1"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "adam_b1": (lambda v: _number(v) and 0 <= v < 1, "0 <= b1 < 1"),
    "adam_b2": (lambda v: _number(v) and 0 <= v < 1, "0 <= b2 < 1"),
    "grad_clip_norm": (lambda v: _number(v) and v >= 0, "a number >= 0 (0 = no clipping)"),
    "grad_accum_steps": (_POSITIVE[0], "an integer >= 1 dividing batch_size"),
    "log_every_steps": _POSITIVE,
    "eval_every_steps": _POSITIVE,
    "eval_batches": _POSITIVE,
    "checkpoint_every_steps": _POSITIVE,
    "keep_checkpoints": _POSITIVE,
    "vocab_size": (lambda v: is_int(v) and 16 <= v <= 1_000_000, "16..1000000"),
    "tokenizer": (lambda v: v in ("sentencepiece", "bytes"), "'sentencepiece' | 'bytes'"),
    "nonfinite": (lambda v: v in ("skip", "stop"), "'skip' | 'stop'"),
    "mesh_shape": (lambda v: isinstance(v, str), "a string such as 'data=2,expert=4'"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FFN_KINDS = ("moe", "dense")


def check_top_level(config: ConfigDict) -> None:
    """The rules on the training fields (``RULES``), shared by every run and ``init_from``."""
    for field, (ok, allowed) in RULES.items():
        value = config.get(field)
        check(ok(value), field, value, allowed)
    if config.batch_size % config.grad_accum_steps:
        invalid("grad_accum_steps", config.grad_accum_steps, f"a divisor of {config.batch_size}")


def _choice(table: Iterable[str], field: str, value: Any) -> None:
    check(value in table, field, value, " | ".join(map(repr, table)))


def moe_config(config: ConfigDict) -> MoEConfig | None:
    """The MoE layer's frozen config (None for the dense baseline)."""
    m = config.model
    _choice(FFN_KINDS, "model.ffn", m.ffn)
    _choice(DTYPES, "model.dtype", m.dtype)
    if m.ffn != "moe":
        return None
    return MoEConfig(d_model=m.d_model, dtype=DTYPES[m.dtype], **config.moe.to_dict())


def model_config(config: ConfigDict, vocab_size: int) -> ModelConfig:
    """Builds (and so validates) the frozen model config, with ``vocab_size`` from the data."""
    m = config.model
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=m.d_model,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            d_ff=m.d_ff,
            moe=moe_config(config),
            moe_every=m.moe_every,
            dtype=DTYPES[m.dtype],
            remat=m.remat,
            # Configs saved before scanning existed have no such field: they ran per layer.
            scan_layers=m.get("scan_layers", False),
        )
    except ConfigError:
        raise
    except TypeError as e:  # a comparison of a value of the wrong type, e.g. a str threshold
        raise ConfigError(f"model or moe config has a value of the wrong type: {e}") from None


def mesh_for(config: ConfigDict, model_cfg: ModelConfig, devices=None) -> Mesh:
    """The configured mesh, checked against the devices present and the model's sizes."""
    moe = model_cfg.moe
    try:
        mesh = sharding.make_mesh(config.mesh_shape, devices)
        sharding.check_fits(
            mesh,
            batch_size=config.batch_size,
            grad_accum_steps=config.grad_accum_steps,
            num_experts=moe.num_experts if moe else None,
            num_heads=model_cfg.num_heads,
            num_kv_heads=model_cfg.num_kv_heads,
            d_ff=model_cfg.d_ff,
            expert_d_ff=moe.d_ff if moe else None,
        )
    except sharding.MeshError as e:
        raise ConfigError(str(e)) from None
    return mesh


def check_config(config: ConfigDict, devices=None) -> None:
    """Every check that needs no data (the vocabulary size is checked as configured).

    ``devices``: what the mesh must fit (default: every device of this process's runtime).
    """
    check_top_level(config)
    mesh_for(config, model_config(config, config.vocab_size), devices)


# ----------------------------------------------------------------------------- field names


def field_paths(config: ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field, e.g. ``['seed', ..., 'moe.threshold', ...]``."""
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths += field_paths(value, f"{path}.") if isinstance(value, ConfigDict) else [path]
    return paths


def check_overrides(config: ConfigDict, overrides: dict[str, str]) -> None:
    """One-line error for the first override (dotted path -> value as typed) naming no field,
    with the nearest field name as a suggestion."""
    known = field_paths(config)
    groups = {p.rsplit(".", 1)[0] for p in known if "." in p}
    for path, value in overrides.items():
        if path in known or path in groups:
            continue
        near = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else " (see the config file for them all)"
        invalid(path, value, f"a field of the config{hint}")


# ----------------------------------------------------------------------------- run record


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What ``workdir/config.json`` records: the run's config and the corpus it trained on.

    ``corpus`` differs from ``config.dataset`` when ``config.fallback_dataset`` was used.
    """

    config: ConfigDict
    corpus: str


def save_run_config(config: ConfigDict, workdir: str | os.PathLike, corpus: str) -> Path:
    """Writes ``workdir/config.json`` (process 0 only) and returns its path.

    A workdir records one corpus: continuing a run on another corpus is refused, since its
    checkpoints, tokenizer ids and metrics belong to the first one.
    """
    path = Path(workdir) / RUN_CONFIG_FILE
    previous = load_run_config(workdir)
    if previous is not None and previous.corpus != corpus:
        invalid("dataset", corpus, f"{previous.corpus!r}, the corpus {path} records for this run")
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"corpus": corpus, "config": json.loads(config.to_json())}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # never a half-written record
    return path


def load_run_config(workdir: str | os.PathLike) -> RunConfig | None:
    """The config and corpus a run recorded, or None when ``workdir`` holds no config.json."""
    path = Path(workdir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return RunConfig(config=ConfigDict(record["config"]), corpus=record["corpus"])


def with_recorded_corpus(config: ConfigDict, workdir: str | os.PathLike) -> ConfigDict:
    """``config`` with ``dataset`` set to the corpus the run in ``workdir`` trained on and no
    fallback, so that evaluating or sampling it reads that corpus and its tokenizer (or fails
    saying how to install it). Unchanged when the workdir records no run."""
    run = load_run_config(workdir)
    if run is None:
        return config
    out = config.copy_and_resolve_references()
    if run.corpus != config.dataset:
        print(f"note: using corpus={run.corpus}, the one this run trained on ({RUN_CONFIG_FILE})")
    out.dataset, out.fallback_dataset = run.corpus, ""
    return out
