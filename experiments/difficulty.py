"""Do harder inputs get more experts? (the paper's finding 2), at small scale, two ways.

``tokens``: per token. The top-p language models of ``compare_routers`` (trained here if
missing) are run over the whole validation split; tokens are binned by the model's own loss,
its predictive entropy, and the surprisal of the input token, and the mean number of experts
(over the MoE layers) is reported per bin with Spearman's rank correlation per seed.

``tasks``: per task. One top-p model is trained jointly on a suite of synthetic tasks of graded
difficulty (``tasks.py``: copying 4 digits, then sums of 1- to 4-digit numbers), and the mean
number of experts on each task's answer positions is reported with the rank correlation between
task difficulty and experts, with 95% confidence intervals over seeds::

    .venv/bin/python -m experiments.difficulty       # both: ~9 min (after compare_routers)
    .venv/bin/python -m experiments.difficulty tasks --seeds 0 1 2 3 4

Writes ``experiments/results/difficulty_{tokens,tasks}.{md,json,png}``. (Slightly over 300
lines: the two analyses share this command line and their results files.)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynmoe_jax import config as config_lib
from experiments import plots, report, run_cache, stats, tasks, variants
from experiments.tasks import TASKS

MODULE = "experiments.difficulty"
NUM_BINS = 10

# ----------------------------------------------------------------------------- task suite


def run_tasks(args: argparse.Namespace) -> tuple[dict, dict]:
    """The task suite over seeds: tables and raw numbers."""
    runs = []
    for seed in args.seeds:
        config = tasks.tasks_config(seed, args.scale, args.steps)
        workdir = (
            args.runs_dir.parent / f"tasks-x{args.scale}" / f"s{seed}-steps{config.num_train_steps}"
        )
        run = run_cache.run_or_load(config, workdir, args.fresh, tasks.train_tasks)
        history = tasks.task_history(run)
        runs.append({"final": history[-1], "history": history, "wall_s": run.wall_s})
    finals = {k: np.stack([r["final"][k] for r in runs]) for k in runs[0]["final"] if k != "step"}
    rank = np.arange(len(TASKS))
    rho = [stats.spearman(rank, e) for e in finals["experts"]]
    rho_loss = [
        stats.spearman(l, e) for l, e in zip(finals["loss"], finals["experts"], strict=True)
    ]
    rows = []
    for t, spec in enumerate(TASKS):
        mean, lo, hi = stats.t_interval(finals["experts"][:, t])
        rows.append(
            [
                f"{t}: {spec.name}",
                f"{mean:.3f} [{lo:.3f}, {hi:.3f}]",
                stats.fmt_mean_sd(finals["experts_all"][:, t], 3),
                stats.fmt_mean_sd(finals["loss"][:, t], 3),
                stats.fmt_mean_sd(finals["acc"][:, t], 3),
                ", ".join(f"{x:.2f}" for x in finals["by_layer"][:, t].mean(axis=0)),
            ]
        )
    corr_rows = [
        [name, ", ".join(f"{x:+.2f}" for x in vals), _interval_text(vals)]
        for name, vals in (
            ("Spearman(difficulty rank, experts)", rho),
            ("Spearman(answer loss, experts)", rho_loss),
        )
    ]
    pooled = stats.spearman(rank, finals["experts"].mean(axis=0))
    corr_rows.append(["Spearman(difficulty rank, seed-mean experts)", f"{pooled:+.2f}", "—"])
    header = [
        "task (difficulty rank)",
        "experts / answer token, mean [95% CI]",
        "experts / token (all positions)",
        "answer loss",
        "answer token accuracy",
        "experts by layer (0 = lowest)",
    ]
    tables = {
        f"Experts per task after {runs[0]['final']['step']} steps ({len(args.seeds)} seeds)": (
            header,
            rows,
        ),
        "Rank correlation over the 5 tasks, per seed": (
            ["correlation", "per seed", "mean [95% CI over seeds]"],
            corr_rows,
        ),
    }
    raw = {
        "tasks": [dataclasses.asdict(t) for t in TASKS],
        "seeds": list(args.seeds),
        "final": finals,
        "spearman_rank_experts": rho,
        "spearman_loss_experts": rho_loss,
        "spearman_rank_seed_mean_experts": pooled,
        "history": [r["history"] for r in runs],
        "wall_s": [r["wall_s"] for r in runs],
        "config": tasks.tasks_config(args.seeds[0], args.scale, args.steps).to_dict(),
    }
    return tables, raw


def _interval_text(values: Sequence[float]) -> str:
    """Mean correlation and its 95% t-interval over seeds, clipped to [-1, 1]."""
    mean, lo, hi = stats.t_interval(values)
    return f"{mean:+.2f} [{max(lo, -1.0):+.2f}, {min(hi, 1.0):+.2f}]"


def plot_tasks(raw: dict, path: Path) -> Path:
    """Left: experts per answer token per task (seed dots, CI bars); right: over training."""
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    experts = np.asarray(raw["final"]["experts"])
    names = [t["name"] for t in raw["tasks"]]
    for t in range(len(names)):
        mean, lo, hi = stats.t_interval(experts[:, t])
        left.errorbar(
            t, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", color="tab:green", capsize=4
        )
        left.plot(np.full(len(experts), t) + 0.1, experts[:, t], "k.", ms=4)
    left.set_xticks(range(len(names)), names)
    left.set_xlabel("task (easiest to hardest)")
    left.set_ylabel("experts per answer token")
    left.set_title("Experts by task (mean, 95% CI over seeds; dots: seeds)")
    for t, name in enumerate(names):
        steps = np.asarray([h["step"] for h in raw["history"][0]])
        curves = np.asarray([[h["experts"][t] for h in hist] for hist in raw["history"]])
        plots.band(right, steps, curves, name)
    right.set_xlabel("step")
    right.set_ylabel("experts per answer token")
    right.set_title("Over training (band: min-max over seeds)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    return plots.save_figure(fig, path)


# ----------------------------------------------------------------------------- per token


def run_tokens(args: argparse.Namespace) -> tuple[dict, dict]:
    """Per-token analysis of the top-p LM of every seed (reused from compare_routers)."""
    from dynmoe_jax import inference

    per_seed = []
    for seed in args.seeds:
        config = variants.lm_config("top_p", seed, args.scale, args.threshold, args.lm_steps)
        workdir = args.runs_dir / variants.run_name("top_p", seed, args.scale, args.threshold)
        run_cache.run_or_load(config, workdir)
        run = inference.restore(config_lib.resolve(config), workdir)
        per_token = inference.token_statistics(
            run.task.graphdef, run.params, run.data.eval_batches()
        )
        per_seed.append(_token_analysis(per_token))
        print(
            f"seed {seed}: {per_token['loss'].size} tokens, Spearman(loss, experts) "
            f"{per_seed[-1]['spearman']['loss']:+.3f}",
            flush=True,
        )
    return _token_tables(per_seed), {"seeds": list(args.seeds), "per_seed": per_seed}


MEASURES = {
    "loss": "next-token loss (nats)",
    "entropy": "predictive entropy (nats)",
    "surprisal": "input-token surprisal (nats)",
}


def _token_analysis(per_token: dict[str, np.ndarray]) -> dict:
    """Deciles and rank correlations of one model's per-token statistics."""
    experts = per_token["experts"].astype(np.float64)
    mean_experts = experts.mean(axis=0)
    out: dict = {
        "tokens": int(mean_experts.size),
        "bins": {},
        "spearman": {},
        "spearman_by_layer": {},
        "mean_experts": float(mean_experts.mean()),
    }
    for measure in MEASURES:
        x = per_token[measure]
        ok = np.isfinite(x)
        out["bins"][measure] = stats.binned_means(x[ok], mean_experts[ok], NUM_BINS)
        out["spearman"][measure] = stats.spearman(x[ok], mean_experts[ok])
        out["spearman_by_layer"][measure] = [stats.spearman(x[ok], e[ok]) for e in experts]
    return out


def _token_tables(per_seed: list[dict]) -> dict:
    rows = []
    for measure, label in MEASURES.items():
        vals = [s["spearman"][measure] for s in per_seed]
        layers = np.mean([s["spearman_by_layer"][measure] for s in per_seed], axis=0)
        rows.append(
            [
                label,
                ", ".join(f"{v:+.3f}" for v in vals),
                _interval_text(vals),
                ", ".join(f"{v:+.2f}" for v in layers),
            ]
        )
    bins = [s["bins"]["loss"] for s in per_seed]
    decile_rows = []
    for b in range(min(len(x) for x in bins)):
        decile_rows.append(
            [
                b + 1,
                f"{np.mean([x[b]['x_min'] for x in bins]):.2f}–"
                f"{np.mean([x[b]['x_max'] for x in bins]):.2f}",
                stats.fmt_mean_sd([x[b]["y_mean"] for x in bins], 3),
            ]
        )
    n = per_seed[0]["tokens"]
    return {
        f"Spearman correlation with experts per token ({n} validation tokens per seed)": (
            [
                "difficulty measure",
                "per seed",
                "mean [95% CI over seeds]",
                "by layer (seed mean, 0 = lowest)",
            ],
            rows,
        ),
        "Experts per token by decile of the next-token loss (mean ± sd over seeds)": (
            ["decile", "loss range (nats)", "experts / token"],
            decile_rows,
        ),
    }


def plot_tokens(raw: dict, path: Path) -> Path:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(13, 3.8), sharey=True)
    for ax, (measure, label) in zip(axes, MEASURES.items(), strict=True):
        for seed, s in zip(raw["seeds"], raw["per_seed"], strict=True):
            bins = s["bins"][measure]
            ax.errorbar(
                [b["x_mean"] for b in bins],
                [b["y_mean"] for b in bins],
                yerr=[b["y_sem"] for b in bins],
                fmt="o-",
                ms=3,
                capsize=2,
                label=f"seed {seed} (ρ = {s['spearman'][measure]:+.2f})",
            )
        ax.set_xlabel(f"{label}, decile mean")
        ax.set_title(f"by {measure}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("experts per token (mean over layers)")
    return plots.save_figure(fig, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("analysis", nargs="?", default="all", choices=("all", "tokens", "tasks"))
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds (default: 0 1 for tokens, as compare_routers; 0 1 2 for tasks)",
    )
    p.add_argument("--scale", type=int, default=1, help="multiplies steps and widths")
    p.add_argument("--steps", type=int, default=None, help="task-suite training steps")
    p.add_argument("--lm-steps", type=int, default=None, help="LM steps if it must be trained")
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--runs-dir", type=Path, default=run_cache.RUNS_DIR / "lm")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="retrain the task suite's runs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    explicit_seeds = args.seeds
    out: dict = {}
    command = report.command_line(MODULE)
    if args.analysis in ("all", "tokens"):
        args.seeds = explicit_seeds or [0, 1]
        tables, raw = run_tokens(args)
        stem = variants.results_stem("difficulty_tokens", args.scale)
        plot = plot_tokens(raw, args.results_dir / f"{stem}.png")
        raw["plot"] = plot.name
        md, _ = report.write_results(
            stem,
            "Difficulty per token: experts vs the model's loss",
            tables,
            raw,
            command,
            args.results_dir,
        )
        print(md.read_text())
        out["tokens"] = raw
    if args.analysis in ("all", "tasks"):
        args.seeds = explicit_seeds or [0, 1, 2]
        tables, raw = run_tasks(args)
        stem = variants.results_stem("difficulty_tasks", args.scale)
        plot = plot_tasks(raw, args.results_dir / f"{stem}.png")
        raw["plot"] = plot.name
        md, _ = report.write_results(
            stem, "Difficulty per task: a synthetic suite", tables, raw, command, args.results_dir
        )
        print(md.read_text())
        out["tasks"] = raw
    return out


if __name__ == "__main__":
    main()
