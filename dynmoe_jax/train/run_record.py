"""``workdir/config.json``: the config a run trained with and the corpus it trained on.

Evaluating or sampling a workdir reads the run's own config from it (``config_for``), so the
routing it was trained or fine-tuned with is the one evaluated, with only the fields the
command line sets explicitly changed; and its corpus and tokenizer, never a fallback.

Resuming a run (``changes_on_resume``) keeps what its checkpoints and token ids depend on: the
model's shape (``model.*`` but ``dtype``, ``remat`` and ``scan_layers``, which a restore
converts; ``moe.num_experts``, ``moe.d_ff``), the vocabulary (``vocab_size``, ``tokenizer``),
the imported checkpoint and the corpus; a change to one of them is refused in one line and
nothing is rewritten. Any other change (the number of steps, a cadence, the routing
threshold, the learning rate) is accepted, named in one line (old -> new), and recorded in
config.json's ``changes`` with the step it took effect from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib
from dynmoe_jax.model.config import ModelConfig
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
    """Writes ``workdir/config.json`` (process 0 only; atomically) and returns its path. On a
    resume, a change the run may not take is refused first, and the accepted ones are named
    in one line and appended to the record's ``changes``."""
    check_corpus(workdir, corpus)
    changes = changes_on_resume(workdir, run, corpus)
    path = Path(workdir) / RUN_CONFIG_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"corpus": corpus, "config": config_lib.as_dict(run).to_dict()}
        step = resume_step(workdir)
        if step is not None:  # a run that starts over has no history
            history = _recorded_changes(path) + [{"step": step, **c} for c in changes]
            record.update({"changes": history} if history else {})
        if changes:
            named = ", ".join(f"{c['field']} {c['old']!r} -> {c['new']!r}" for c in changes)
            print(f"note: resuming from step {step} with {named} (recorded in {path})",
                  file=sys.stderr)  # fmt: skip
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # never a half-written record
    return path


CHECKPOINTS = "checkpoints"  # the Checkpointer's folder, one sub-folder per step
# What a resumed run keeps (paths, or prefixes ending in "."), but for CHANGEABLE_MODEL.
KEPT_ON_RESUME = ("model.", "moe.num_experts", "moe.d_ff", "vocab_size", "tokenizer",
                  "init_from")  # fmt: skip
CHANGEABLE_MODEL = ("model.dtype", "model.remat", "model.scan_layers")  # restore converts


def resume_step(workdir: str | os.PathLike) -> int | None:
    """The step a run in ``workdir`` resumes from (its newest checkpoint), None if none."""
    folder = Path(workdir) / CHECKPOINTS
    steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=None)


def _kept(path: str) -> bool:
    if path in CHANGEABLE_MODEL:
        return False
    return any(path.startswith(k) if k.endswith(".") else path == k for k in KEPT_ON_RESUME)


def changes_on_resume(
    workdir: str | os.PathLike, run: config_lib.RunConfig, corpus: str | None = None
) -> list[dict]:
    """The fields ``run`` changes from the run ``workdir`` records, as {field, old, new}; []
    when the workdir holds no run to resume. A change of a field the run keeps (see the
    module docstring) is a one-line ConfigError. ``corpus``: the one the run reads, checked
    by ``check_corpus`` (None: before any data is read, the config must name the recorded
    one as its dataset or fallback)."""
    record, path = load(workdir), Path(workdir) / RUN_CONFIG_FILE
    if record is None or resume_step(workdir) is None:
        return []
    if corpus is None and record.corpus not in (run.data.dataset, run.data.fallback_dataset):
        invalid("dataset", run.data.dataset, f"{record.corpus!r}, the corpus {path} records for "
                "this run (a new --workdir starts a run on another)")  # fmt: skip
    old, new = _plain(record.config), _plain(config_lib.as_dict(run))
    out = []
    for d in config_lib.declarations():
        before, after = _value(old, d.path), _value(new, d.path)
        if d.path in CORPUS_FIELDS or before == after:
            continue
        if _kept(d.path):
            invalid(d.path, after, f"{before!r}, the value {path} records: a resumed run keeps "
                    "its model's shape, vocabulary and corpus (a new --workdir starts a run "
                    "with another)")  # fmt: skip
        out.append({"field": d.path, "old": before, "new": after})
    return out


def _plain(config: ConfigDict) -> ConfigDict:
    """``config`` as JSON gives it back (tuples as lists), so records and runs compare."""
    return ConfigDict(json.loads(json.dumps(config.to_dict())), type_safe=False)


def _recorded_changes(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("changes", [])


def config_for(
    workdir: str | os.PathLike, config: ConfigDict, overrides: Mapping[str, str] = {}
) -> ConfigDict:
    """The config to evaluate or sample ``workdir`` with (the one place a run's record is
    applied): the run's recorded one, its corpus and no fallback, with ``overrides`` (the
    command line's ``--config.FIELD=VALUE``) set; ``config`` itself when the workdir records
    no run. Says on standard error, in one line each, which recorded values win over
    ``config`` and which corpus is read."""
    record = load(workdir)
    if record is None:
        return config
    recorded = config_lib.set_fields(record.config, overrides)
    _note_recorded(workdir, config, recorded, overrides)
    if record.corpus != config.dataset:
        print(f"note: using corpus={record.corpus}, the one this run trained on "
              f"({RUN_CONFIG_FILE})", file=sys.stderr)  # fmt: skip
    recorded.dataset, recorded.fallback_dataset = record.corpus, ""
    return recorded


CORPUS_FIELDS = ("dataset", "fallback_dataset")  # the corpus has its own note


def _note_recorded(workdir, config: ConfigDict, recorded: ConfigDict, overrides) -> None:
    """One line naming each field whose recorded value replaces the --config file's: a
    config file that differs from the run's never changes the model evaluated silently."""
    wins = []
    imported = bool(_value(recorded, "init_from"))
    for d in config_lib.declarations():
        if d.path in overrides or d.path in CORPUS_FIELDS:
            continue
        ours, theirs = _value(recorded, d.path), _value(config, d.path)
        if imported and _from_checkpoint(d, theirs):
            continue  # never read from a config file: no file's value loses to the record
        if not _same(d.path, ours, theirs):
            wins.append(f"{d.path}={ours!r} (--config: {theirs!r})")
    if wins:
        print(f"note: {Path(workdir) / RUN_CONFIG_FILE} (the run's record) wins over --config "
              f"for {', '.join(wins)}; --config.FIELD=VALUE sets one", file=sys.stderr)  # fmt: skip


# What a run with init_from takes from its checkpoint, besides the model's fields that do not
# override it and the ones the config leaves at None: the record holds the checkpoint's values.
FROM_CHECKPOINT = ("vocab_size", "tokenizer", "moe.num_experts", "moe.d_ff")


def _from_checkpoint(d: config_lib.Declaration, config_value) -> bool:
    if d.overrides_import:
        return config_value is None  # None keeps the checkpoint's (config.import_overrides)
    return d.owner is ModelConfig or d.path in FROM_CHECKPOINT


def _same(path: str, a, b) -> bool:
    """Equal values; folders equal where they name the same one (the record's is absolute)."""
    if path in ("init_from", "data_dir") and isinstance(a, str) and isinstance(b, str) and a and b:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def _value(config: ConfigDict, path: str):
    node = config
    for part in path.split("."):
        if part not in node:
            return None
        node = node[part]
    return node
