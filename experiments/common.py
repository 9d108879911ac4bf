"""Shared pieces of the small-scale reproduction of Huang et al. (2024): configs and runs.

The scripts beside this module (``compare_routers.py``, ``difficulty.py``,
``sweep_threshold.py``) train small language models through the library's public training
entry point, keep each run's outputs in a workdir under ``runs/experiments/`` (git-ignored) and
write their tables and plots to ``experiments/results/``.

This module holds the small model config and the run cache (train, or reuse a finished run
of the same config on the same corpus). ``stats.py`` holds the statistics and ``report.py``
the table and plot writers.
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
from experiments.report import REPO_ROOT, jsonable

RUNS_DIR = REPO_ROOT / "runs" / "experiments"
SUMMARY_FILE = "experiment_run.json"  # written into a workdir once its run has finished

# The models of the router comparison. Each maps to config overrides in `lm_config`.
VARIANTS = ("dense", "top1", "top2", "top_p", "top_p_sized", "top2_grouped", "top_p_grouped")
VARIANT_LABELS = {
    "dense": "dense",
    "top1": "top-1",
    "top2": "top-2",
    "top_p": "top-p",
    "top_p_sized": "top-p, sized",
    "top2_grouped": "top-2, grouped",
    "top_p_grouped": "top-p, grouped",
}
# Capacity of the "top_p_sized" variant: top-p (p = 0.4)'s mean experts per token at the end
# of training with capacity sized for 2 (1.40 over seeds 0 and 1, compare_routers), so that its
# compute follows the experts it selects instead of costing what top-2 costs.
SIZED_EXPECTED_K = 1.4
# Budget factor of the "_grouped" variants: one token budget per routing group of
# GROUPED_BUDGET_FACTOR * k * S selections (k = SIZED_EXPECTED_K for top-p, 2 for top-2).
GROUPED_BUDGET_FACTOR = 1.1
# One colour per model in every plot.
VARIANT_COLORS = {
    "dense": "tab:gray",
    "top1": "tab:blue",
    "top2": "tab:orange",
    "top_p": "tab:green",
    "top_p_sized": "tab:olive",
    "top2_grouped": "tab:red",
    "top_p_grouped": "tab:purple",
}


def lm_config(
    variant: str,
    seed: int,
    scale: int = 1,
    threshold: float = 0.4,
    steps: int | None = None,
) -> ConfigDict:
    """The small language-model config every LM experiment shares.

    Scale 1 is sized for 2 shared CPU cores (about 0.15-0.3 s a step): 4 layers of width 64,
    8 experts of width 128 per layer, 400 steps of 16 x 64 tokens of the King James Bible.
    ``scale`` multiplies the step count and every width (for a GPU/TPU); ``steps`` overrides
    the step count (tests use a handful).

    Variants: 'dense' (feed-forward width 2 x the expert width, so that it matches top-2's
    activated feed-forward parameters), 'top1', 'top2' and 'top_p' (threshold ``threshold``).
    The first MoE variants use per-expert capacity (``index`` dispatch, factor 1.25; top-p
    sized for a mean of 2 experts, so top-p computes as many expert slots as top-2;
    'top_p_sized' sizes it for ``SIZED_EXPECTED_K``). 'top2_grouped' and 'top_p_grouped' use
    grouped dispatch with one budget per group, ``GROUPED_BUDGET_FACTOR`` over k (top-p's k
    being ``SIZED_EXPECTED_K``).
    """
    from dynmoe_jax.configs import default

    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is invalid: allowed {' | '.join(VARIANTS)}")
    if scale < 1:
        raise ValueError(f"scale={scale} is invalid: allowed an integer >= 1")
    c = default.get_config()
    c.seed = seed
    c.dataset = "kjv"
    c.fallback_dataset = ""  # the committed results are on the Bible: never train on another corpus
    c.vocab_size = 1024
    c.seq_len = 64
    c.batch_size = 16
    c.num_train_steps = steps if steps is not None else 400 * scale
    c.warmup_steps = max(1, c.num_train_steps // 10)
    c.learning_rate = 3e-3
    c.log_every_steps = max(1, min(20, c.num_train_steps // 10))
    c.eval_every_steps = max(1, c.num_train_steps // 8)
    c.eval_batches = 8
    # One checkpoint at the end: the analyses load it, and saving is slow on a shared CPU.
    c.checkpoint_every_steps = c.num_train_steps
    c.keep_checkpoints = 1
    c.model.d_model = 64 * scale
    c.model.num_layers = 4
    c.model.num_heads = c.model.d_model // 16  # head width 16 at every scale
    c.moe.num_experts = 8
    c.moe.d_ff = 128 * scale
    c.model.d_ff = 2 * c.moe.d_ff  # dense baseline: top-2's activated feed-forward width
    c.model.ffn = "dense" if variant == "dense" else "moe"
    c.moe.router = "top_p" if variant.startswith("top_p") else "top_k"
    c.moe.top_k = 1 if variant == "top1" else 2
    c.moe.threshold = threshold
    # Pinned: the committed results of these experiments were trained with index dispatch.
    c.moe.dispatch = "index"
    if variant in ("top_p_sized", "top_p_grouped"):
        c.moe.expected_k = SIZED_EXPECTED_K
    if variant.endswith("_grouped"):
        c.moe.dispatch = "grouped"
        c.moe.capacity_factor = GROUPED_BUDGET_FACTOR
    return c


def run_name(variant: str, seed: int, scale: int, threshold: float = 0.4) -> str:
    """Workdir name of one LM run; shared by the scripts so that they reuse each other's runs."""
    tag = {
        "top_p": f"top_p{threshold:g}",
        "top_p_sized": f"top_p{threshold:g}_k{SIZED_EXPECTED_K:g}",
        "top_p_grouped": f"top_p{threshold:g}_grouped{GROUPED_BUDGET_FACTOR:g}",
        "top2_grouped": f"top2_grouped{GROUPED_BUDGET_FACTOR:g}",
    }.get(variant, variant)
    return f"{tag}-s{seed}-x{scale}"


def results_stem(name: str, scale: int) -> str:
    """File stem under results/: scale 1 is the committed CPU run; others get a suffix."""
    return name if scale == 1 else f"{name}_x{scale}"


# ----------------------------------------------------------------------------- runs


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


def _config_json(config: ConfigDict) -> str:
    return config.to_json(sort_keys=True)


def steady_step_ms(train_records: Sequence[dict], tokens_per_step: int) -> float:
    """Median milliseconds per step over the logged windows, leaving out the first window
    (it includes compilation)."""
    rates = [r["tokens_per_sec"] for r in train_records[1:] if r.get("tokens_per_sec")]
    if not rates:
        rates = [r["tokens_per_sec"] for r in train_records if r.get("tokens_per_sec")]
    if not rates:
        return float("nan")
    return 1000.0 * tokens_per_step / float(np.median(rates))


def trained_corpus(workdir: Path) -> str | None:
    """The corpus a run was trained on, as its workdir's run record says (the corpus actually
    used, a fallback included); None when there is no record."""
    run = config_lib.load_run_config(workdir)
    return None if run is None else run.corpus


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


def _read_run(workdir: Path, config: ConfigDict, summary: dict) -> RunResult:
    from dynmoe_jax.train import metrics as metrics_lib

    records = metrics_lib.read_metrics(workdir)
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
    summary = json.loads(summary_path.read_text())
    if not same_config(json.loads(summary["config"]), json.loads(_config_json(config))):
        raise RunCacheError(f"{workdir} holds a run of another config; {fix}")
    corpus = trained_corpus(workdir)
    if corpus != config.dataset:
        found = "no record of its corpus" if corpus is None else f"a run on dataset={corpus!r}"
        raise RunCacheError(f"{workdir} holds {found}, not dataset={config.dataset!r}; {fix}")
    return _read_run(workdir, config, summary)


Trainer = Callable[[ConfigDict, Path], dict]


def _train_and_evaluate(config: ConfigDict, workdir: Path) -> dict:
    from dynmoe_jax import train as train_lib

    return train_lib.train_and_evaluate(config, workdir)


def run_or_load(
    config: ConfigDict, workdir: Path, fresh: bool = False, train: Trainer = _train_and_evaluate
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
    from dynmoe_jax.train import metrics as metrics_lib

    train_records = [r for r in metrics_lib.read_metrics(workdir) if r.get("split") == "train"]
    summary = {
        "config": _config_json(config),
        "final": jsonable(final),
        "wall_s": wall_s,
        "step_ms": steady_step_ms(train_records, config.batch_size * config.seq_len),
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary))
    return _read_run(workdir, config, summary)


def ffn_params_per_token(config: ConfigDict, experts_per_token: float) -> float:
    """Feed-forward parameters a token activates, summed over layers (SwiGLU: 3 matrices).

    A dense layer activates its whole width; an MoE layer activates ``experts_per_token``
    experts (the router ignored: it is d_model x E, tiny here)."""
    d, layers = config.model.d_model, config.model.num_layers
    if config.model.ffn == "dense":
        return 3.0 * d * config.model.d_ff * layers
    return 3.0 * d * config.moe.d_ff * experts_per_token * layers
