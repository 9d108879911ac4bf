"""Shared pieces of the small-scale reproduction of Huang et al. (2024).

The scripts beside this module (``compare_routers.py``, ``difficulty.py``,
``sweep_threshold.py``) train small language models through the library's public training
entry point, keep each run's outputs in a workdir under ``runs/experiments/`` (git-ignored) and
write their tables and plots to ``experiments/results/``.

This module holds what they share: the small model config, running or reusing a training run,
per-token routing statistics of a trained model, the statistics (rank correlation, binning,
confidence intervals) and the table and plot writers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "experiments" / "results"
RUNS_DIR = REPO_ROOT / "runs" / "experiments"
SUMMARY_FILE = "experiment_run.json"  # written into a workdir once its run has finished
CONFIG_FILE = "config.json"  # the run's config, so notebooks can rebuild the model

# The five models of the router comparison. Each maps to config overrides in `lm_config`.
VARIANTS = ("dense", "top1", "top2", "top_p", "top_p_sized")
VARIANT_LABELS = {
    "dense": "dense",
    "top1": "top-1",
    "top2": "top-2",
    "top_p": "top-p",
    "top_p_sized": "top-p, sized",
}
# Capacity of the "top_p_sized" variant: top-p (p = 0.4)'s mean experts per token at the end
# of training with capacity sized for 2 (1.40 over seeds 0 and 1, compare_routers), so that its
# compute follows the experts it selects instead of costing what top-2 costs.
SIZED_EXPECTED_K = 1.4
# One colour per model in every plot.
VARIANT_COLORS = {
    "dense": "tab:gray",
    "top1": "tab:blue",
    "top2": "tab:orange",
    "top_p": "tab:green",
    "top_p_sized": "tab:olive",
}


# ----------------------------------------------------------------------------- configs


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
    Every MoE variant uses the library's default capacity (factor 1.25; top-p sized for a
    mean of 2 experts), so top-p computes as many expert slots as top-2.
    """
    from dynmoe_jax.configs import default

    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is invalid: allowed {' | '.join(VARIANTS)}")
    if scale < 1:
        raise ValueError(f"scale={scale} is invalid: allowed an integer >= 1")
    c = default.get_config()
    c.seed = seed
    c.dataset = "kjv"
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
    if variant == "top_p_sized":
        c.moe.expected_k = SIZED_EXPECTED_K
    return c


def run_name(variant: str, seed: int, scale: int, threshold: float = 0.4) -> str:
    """Workdir name of one LM run; shared by the scripts so that they reuse each other's runs."""
    tag = {
        "top_p": f"top_p{threshold:g}",
        "top_p_sized": f"top_p{threshold:g}_k{SIZED_EXPECTED_K:g}",
    }.get(variant, variant)
    return f"{tag}-s{seed}-x{scale}"


def results_stem(name: str, scale: int) -> str:
    """File stem under results/: scale 1 is the committed CPU run; others get a suffix."""
    return name if scale == 1 else f"{name}_x{scale}"


# ----------------------------------------------------------------------------- runs


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


def load_run(workdir: Path, config: ConfigDict) -> RunResult | None:
    """The finished run in ``workdir`` if it was trained with exactly ``config``, else None."""
    from dynmoe_jax import metrics as metrics_lib

    summary_path = workdir / SUMMARY_FILE
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    if not same_config(json.loads(summary["config"]), json.loads(_config_json(config))):
        return None
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


def run_or_load(config: ConfigDict, workdir: Path, fresh: bool = False) -> RunResult:
    """Trains ``config`` in ``workdir`` with the library's ``train_and_evaluate``, or reuses the
    finished run there (same config), so that the scripts share runs and can be re-run cheaply.

    A workdir holding an unfinished run or a run of another config is cleared first: its
    checkpoint would be resumed and its wall time would not be one run's.
    """
    from dynmoe_jax import train as train_lib

    workdir = Path(workdir)
    if not fresh and (done := load_run(workdir, config)) is not None:
        print(f"[reuse] {workdir}", flush=True)
        return done
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / CONFIG_FILE).write_text(_config_json(config))
    print(f"[train] {workdir}", flush=True)
    start = time.perf_counter()
    final = train_lib.train_and_evaluate(config, workdir)
    wall_s = time.perf_counter() - start
    from dynmoe_jax import metrics as metrics_lib

    train = [r for r in metrics_lib.read_metrics(workdir) if r.get("split") == "train"]
    summary = {
        "config": _config_json(config),
        "final": jsonable(final),
        "wall_s": wall_s,
        "step_ms": steady_step_ms(train, config.batch_size * config.seq_len),
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary))
    result = load_run(workdir, config)
    assert result is not None
    return result


def load_workdir_config(workdir: str | Path) -> ConfigDict:
    """The config a workdir of these experiments was trained with, on top of the library's
    default config (so that fields added to the library since take their defaults)."""
    from dynmoe_jax.configs import default

    config = default.get_config()
    config.update(json.loads((Path(workdir) / CONFIG_FILE).read_text()))
    return config


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays as lists and non-finite floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def ffn_params_per_token(config: ConfigDict, experts_per_token: float) -> float:
    """Feed-forward parameters a token activates, summed over layers (SwiGLU: 3 matrices).

    A dense layer activates its whole width; an MoE layer activates ``experts_per_token``
    experts (the router ignored: it is d_model x E, tiny here)."""
    d, layers = config.model.d_model, config.model.num_layers
    if config.model.ffn == "dense":
        return 3.0 * d * config.model.d_ff * layers
    return 3.0 * d * config.moe.d_ff * experts_per_token * layers


# ----------------------------------------------------------------------------- checkpoints


def load_params(config: ConfigDict, workdir: str | Path):
    """(data, task, step, params) of the newest checkpoint in ``workdir``.

    Reads the checkpoint with Orbax directly rather than through ``inference._restore``: the
    library's checkpoint layout changed while these experiments ran (the train state gained
    fields and the state moved from the item 'default' to 'state'), and a restore target of
    another layout makes the library set the checkpoint aside as unreadable. Only the
    parameters are needed here, and they are the same in every layout.
    """
    import jax
    import orbax.checkpoint as ocp

    from dynmoe_jax import train as train_lib

    directory = Path(workdir).absolute() / "checkpoints"
    steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {directory}: train first")
    step = steps[-1]
    item = next(
        (
            directory / str(step) / n
            for n in ("state", "default")
            if (directory / str(step) / n).exists()
        ),
        None,
    )
    if item is None:
        raise FileNotFoundError(f"{directory / str(step)} holds no 'state' or 'default' item")
    data, _ = train_lib.load_run_data(config)
    task = train_lib.build_task(config, data.vocab_size)
    if hasattr(train_lib, "abstract_state"):  # the library with sharding
        abstract = train_lib.abstract_state(task)["params"]
    else:
        abstract = jax.eval_shape(lambda: train_lib.init_state(task))["params"]
    with ocp.StandardCheckpointer() as checkpointer:
        raw = checkpointer.restore(item)
    return data, task, step, _like(abstract, raw["params"])


def _like(abstract: Any, raw: Any) -> Any:
    """``raw`` (as Orbax reads it back: string keys, numpy arrays) in the structure of
    ``abstract`` (integer keys of layer lists, the dtypes and shapes the model expects)."""
    if isinstance(abstract, dict):
        return {k: _like(v, raw[k] if k in raw else raw[str(k)]) for k, v in abstract.items()}
    value = np.asarray(raw)
    if value.shape != abstract.shape:
        raise ValueError(f"checkpoint array of shape {value.shape}, expected {abstract.shape}")
    return value.astype(abstract.dtype)


# ----------------------------------------------------------------------------- per token


def token_statistics(task, params, batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Per-token loss, predictive entropy and experts of a trained model on ``batches``.

    Returns flat arrays over the tokens with weight > 0: ``loss`` (nats, of the target),
    ``entropy`` (nats, of the predictive distribution at that position), ``surprisal`` (the
    loss of the input token itself, as predicted one position earlier; NaN at position 0) and
    ``experts`` [L_moe, N] (experts the router selected at that position, before any capacity
    drop).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @jax.jit
    def stats(params, inputs, targets):
        logits, layer = nnx.merge(task.graphdef, params)(inputs)
        logp = jax.nn.log_softmax(logits, axis=-1)
        loss = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return loss, entropy, layer["token_experts"]

    out: dict[str, list] = {"loss": [], "entropy": [], "surprisal": [], "experts": []}
    for batch in batches:
        loss, entropy, experts = jax.device_get(stats(params, batch["inputs"], batch["targets"]))
        keep = batch["weights"] > 0
        # The input at position t was the target at position t - 1.
        surprisal = np.concatenate([np.full((loss.shape[0], 1), np.nan), loss[:, :-1]], axis=1)
        out["loss"].append(loss[keep])
        out["entropy"].append(entropy[keep])
        out["surprisal"].append(surprisal[keep])
        out["experts"].append(experts[:, keep])
    return {
        "loss": np.concatenate(out["loss"]),
        "entropy": np.concatenate(out["entropy"]),
        "surprisal": np.concatenate(out["surprisal"]),
        "experts": np.concatenate(out["experts"], axis=1),
    }


# ----------------------------------------------------------------------------- statistics


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t confidence interval of the mean (over seeds).

    With one value the interval is the value itself (no spread can be estimated)."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.5 + confidence / 2, df=len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), np.float64)
    # Runs of equal values share the average of their positions.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks); NaN when either
    side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
    return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def quantile_bins(values: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin index 0..num_bins-1 of every value, bins holding about equal counts.

    Equal values always share a bin (edges are quantiles, ties go to the lower bin), so with
    heavy ties some bins can be empty."""
    values = np.asarray(values, np.float64)
    edges = np.quantile(values, np.linspace(0, 1, num_bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="left").astype(np.int64)


def binned_means(x: np.ndarray, y: np.ndarray, num_bins: int) -> list[dict[str, float]]:
    """Mean of ``y`` in each quantile bin of ``x``: per bin the x range, mean x, mean y, its
    standard error and the count (empty bins left out)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    bins = quantile_bins(x, num_bins)
    rows = []
    for b in range(num_bins):
        sel = bins == b
        n = int(sel.sum())
        if n == 0:
            continue
        sem = float(y[sel].std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        rows.append(
            {
                "bin": b,
                "x_min": float(x[sel].min()),
                "x_max": float(x[sel].max()),
                "x_mean": float(x[sel].mean()),
                "y_mean": float(y[sel].mean()),
                "y_sem": sem,
                "count": n,
            }
        )
    return rows


# ----------------------------------------------------------------------------- writers


def fmt_mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± sd' of values, e.g. '3.412 ± 0.010' (just the mean for one value)."""
    mean, sd = mean_sd(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; every row must have one cell per header column."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(
    stem: str,
    title: str,
    tables: dict[str, tuple[Sequence[str], Sequence[Sequence[Any]]]],
    data: dict[str, Any],
    command: str,
    results_dir: Path = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Writes ``stem.md`` (a title, the command and each named table) and ``stem.json`` (the
    raw numbers, with the command)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n", f"Command: `{command}`\n"]
    for name, (header, rows) in tables.items():
        parts.append(f"## {name}\n\n" + markdown_table(header, rows))
    md = results_dir / f"{stem}.md"
    md.write_text("\n".join(parts))
    js = results_dir / f"{stem}.json"
    js.write_text(json.dumps(jsonable({"command": command, **data}), indent=1) + "\n")
    return md, js


def command_line(module: str) -> str:
    """How the script ``module`` (e.g. 'experiments.compare_routers') was invoked, for the
    results files."""
    return " ".join([".venv/bin/python", "-m", module, *sys.argv[1:]])


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    print(f"plot: {path}")
    return path


def band(ax, steps: np.ndarray, curves: np.ndarray, label: str, color=None) -> None:
    """Mean curve over seeds (rows) with a min-max band."""
    curves = np.asarray(curves, np.float64)
    (line,) = ax.plot(steps, curves.mean(axis=0), label=label, color=color)
    if len(curves) > 1:
        ax.fill_between(
            steps, curves.min(axis=0), curves.max(axis=0), alpha=0.2, color=line.get_color()
        )


def aligned_series(
    records_per_seed: Sequence[list[dict]], key: str
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values [seeds, steps]) of ``key`` over the steps every seed logged."""
    common = sorted(set.intersection(*[{r["step"] for r in recs} for recs in records_per_seed]))
    values = [
        [next(r[key] for r in recs if r["step"] == s) for s in common] for recs in records_per_seed
    ]
    return np.asarray(common), np.asarray(values, np.float64)
