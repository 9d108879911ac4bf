"""The run cache of the experiments: train a config once in its workdir, reuse the finished run.

A workdir under ``runs/experiments/`` (git-ignored) holds one run. The library's run record
(``config.json``, ``dynmoe_jax.train.run_record``) says which config and corpus it trained;
once it has finished, a summary (``SUMMARY_FILE``) adds what the library does not record: the
final metrics and the wall time. A later script that asks for the same config on the same
corpus reads the run back instead of training again; anything else in the workdir is refused,
never silently reused or deleted.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib
from dynmoe_jax import train
from dynmoe_jax.train import run_record
from experiments.report import REPO_ROOT, jsonable

RUNS_DIR = REPO_ROOT / "runs" / "experiments"
SUMMARY_FILE = "experiment_run.json"  # final metrics and timings, once the run has finished

Trainer = Callable[[ConfigDict, Path], dict]


class RunCacheError(RuntimeError):
    """A workdir holds something the cache must not reuse and will not delete unasked."""


@dataclasses.dataclass
class RunResult:
    """One finished training run: its final validation metrics, logs and timings."""

    name: str
    config: ConfigDict
    final: dict[str, Any]
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    wall_s: float
    step_ms: float

    @property
    def experts_per_layer(self) -> np.ndarray:
        return np.asarray(self.final.get("experts_per_layer", []), np.float64)

    def after_warmup(self, figure: Callable[[dict], float]) -> float:
        """The mean of ``figure`` (of one train record) over the records after warm-up, the
        first 10% of the steps."""
        warmup = self.config.num_train_steps // 10
        return float(np.mean([figure(r) for r in self.train if r["step"] > warmup]))


def steady_step_ms(train_records: Sequence[dict], tokens_per_step: int) -> float:
    """Median milliseconds per step over the logged windows, leaving out the first window
    (it includes compilation)."""
    rates = [r["tokens_per_sec"] for r in train_records[1:] if r.get("tokens_per_sec")]
    if not rates:
        rates = [r["tokens_per_sec"] for r in train_records if r.get("tokens_per_sec")]
    if not rates:
        return float("nan")
    return 1000.0 * tokens_per_step / float(np.median(rates))


def same_config(saved: dict, current: dict) -> bool:
    """Whether a run saved with config ``saved`` is a run of ``current``: every saved field
    has the same value now. Fields added to the library's config since (new options, off by
    default) are ignored, so that a finished run stays reusable while the library grows."""
    for key, value in saved.items():
        if key not in current:
            return False
        if isinstance(value, dict) and isinstance(current[key], dict):
            if not same_config(value, current[key]):
                return False
        elif value != current[key]:
            return False
    return True


def _metrics(workdir: Path) -> list[dict]:
    from dynmoe_jax.train import metrics as metrics_lib

    return metrics_lib.read_metrics(workdir)


def _read_run(workdir: Path, config: ConfigDict, summary: dict) -> RunResult:
    records = _metrics(workdir)
    return RunResult(
        name=workdir.name,
        config=config,
        final=summary["final"],
        train=[r for r in records if r.get("split") == "train"],
        validation=[r for r in records if r.get("split") == "validation"],
        wall_s=summary["wall_s"],
        step_ms=summary["step_ms"],
    )


def load_run(workdir: Path, config: ConfigDict) -> RunResult | None:
    """The finished run in ``workdir`` if it is a run of ``config`` on ``config.dataset``;
    None when the workdir holds nothing. Anything else there (an unfinished run, another
    config, another or an unrecorded corpus) is a RunCacheError: it is neither reused nor
    deleted unasked."""
    workdir = Path(workdir)
    if not workdir.exists() or not any(workdir.iterdir()):
        return None
    fix = "pass --fresh to retrain it there (its files are removed) or use another --runs-dir"
    summary_path = workdir / SUMMARY_FILE
    if not summary_path.exists():
        raise RunCacheError(f"{workdir} holds an unfinished run; {fix}")
    record = run_record.load(workdir)
    if record is None:
        raise RunCacheError(f"{workdir} holds no record of its corpus, not "
                            f"dataset={config.dataset!r}; {fix}")  # fmt: skip
    ours = json.loads(config_lib.as_dict(config_lib.resolve(config)).to_json())
    if not same_config(record.config.to_dict(), ours):
        raise RunCacheError(f"{workdir} holds a run of another config; {fix}")
    if record.corpus != config.dataset:
        raise RunCacheError(f"{workdir} holds a run on dataset={record.corpus!r}, not "
                            f"dataset={config.dataset!r}; {fix}")  # fmt: skip
    return _read_run(workdir, config, json.loads(summary_path.read_text()))


def _train_and_evaluate(config: ConfigDict, workdir: Path) -> dict:
    return train.train_and_evaluate(config_lib.resolve(config), workdir)


def run_or_load(
    config: ConfigDict,
    workdir: Path,
    fresh: bool = False,
    train: Trainer = _train_and_evaluate,
) -> RunResult:
    """Trains ``config`` in ``workdir`` (with the library's ``train_and_evaluate``, or
    ``train``), or reuses the finished run there, so that the scripts share runs and can be
    re-run cheaply. ``fresh`` removes what the workdir holds first, and says so."""
    workdir = Path(workdir)
    if fresh and workdir.exists():
        print(f"[fresh] removing {workdir}", flush=True)
        shutil.rmtree(workdir)
    done = load_run(workdir, config)
    if done is not None:
        print(f"[reuse] {workdir}", flush=True)
        return done
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[train] {workdir}", flush=True)
    start = time.perf_counter()
    final = train(config, workdir)
    wall_s = time.perf_counter() - start
    train_records = [r for r in _metrics(workdir) if r.get("split") == "train"]
    summary = {
        "final": jsonable(final),
        "wall_s": wall_s,
        "step_ms": steady_step_ms(train_records, config.batch_size * config.seq_len),
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary))
    return _read_run(workdir, config, summary)
