"""``workdir/config.json``: the config a run trained with and the corpus it trained on.

Evaluating or sampling a workdir reads the run's own config from it (``config_for``), so the
routing it was trained or fine-tuned with is the one evaluated, with only the fields the
command line sets explicitly changed; and its corpus and tokenizer, never a fallback.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib
from dynmoe_jax.validation import invalid

RUN_CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What ``workdir/config.json`` records. ``corpus`` differs from ``config.dataset`` when
    the run trained on its ``fallback_dataset``."""

    config: ConfigDict
    corpus: str


def load(workdir: str | os.PathLike) -> RunRecord | None:
    """The record of the run in ``workdir``, or None when it holds no config.json."""
    path = Path(workdir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return RunRecord(ConfigDict(record["config"], type_safe=False), record["corpus"])


def check_corpus(workdir: str | os.PathLike, corpus: str) -> None:
    """A workdir records one corpus: continuing a run on another one is refused (its
    checkpoints, tokenizer ids and metrics belong to the first)."""
    previous = load(workdir)
    if previous is not None and previous.corpus != corpus:
        path = Path(workdir) / RUN_CONFIG_FILE
        invalid("dataset", corpus, f"{previous.corpus!r}, the corpus {path} records for this run")


def save(run: config_lib.RunConfig, workdir: str | os.PathLike, corpus: str) -> Path:
    """Writes ``workdir/config.json`` (process 0 only; atomically) and returns its path."""
    check_corpus(workdir, corpus)
    path = Path(workdir) / RUN_CONFIG_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"corpus": corpus, "config": config_lib.as_dict(run).to_dict()}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # never a half-written record
    return path


def config_for(
    workdir: str | os.PathLike, config: ConfigDict, overrides: Mapping[str, str] = {}
) -> ConfigDict:
    """The config to evaluate or sample ``workdir`` with: the run's recorded one, its corpus
    and no fallback, with ``overrides`` (the command line's ``--config.FIELD=VALUE``) set;
    ``config`` itself when the workdir records no run."""
    record = load(workdir)
    if record is None:
        return config
    recorded = config_lib.set_fields(record.config, overrides)
    if record.corpus != config.dataset:
        print(f"note: using corpus={record.corpus}, the one this run trained on "
              f"({RUN_CONFIG_FILE})")  # fmt: skip
    recorded.dataset, recorded.fallback_dataset = record.corpus, ""
    return recorded


def with_recorded_corpus(run: config_lib.RunConfig, workdir: str | os.PathLike):
    """``run`` reading the corpus the run in ``workdir`` trained on, and no fallback, so that
    evaluating or sampling it reads that corpus and its tokenizer (or fails saying how to
    install it); ``run`` itself when the workdir records no run."""
    record = load(workdir)
    if record is None or record.corpus == run.dataset and not run.fallback_dataset:
        return run
    data = dataclasses.replace(run.data, dataset=record.corpus, fallback_dataset="")
    return dataclasses.replace(run, data=data)
