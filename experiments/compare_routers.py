"""Dense vs top-1 vs top-2 vs top-p (p = 0.4) on the same data, steps and seeds; top-p with
its capacity sized to the experts it selects (``variants.SIZED_EXPECTED_K``); and top-2 and
top-p with grouped dispatch, one token budget per routing group.

Checks the paper's findings 1 (top-p beats top-2 with fewer experts), 3 (lower layers use more
experts) and 4 (the mean number of experts falls during training) at small scale::

    .venv/bin/python -m experiments.compare_routers            # 7 models x 3 seeds
    .venv/bin/python -m experiments.compare_routers --scale 4  # wider and longer (GPU/TPU)
    # grouped against capacity, in one invocation, into compare_routers_grouped.{md,json}:
    .venv/bin/python -m experiments.compare_routers --name compare_routers_grouped \
        --variants top2 top_p top2_grouped top_p_grouped
    # routing that keeps its budget (a target mean k, bias balance), one invocation:
    .venv/bin/python -m experiments.compare_routers --name compare_routers_budget \
        --variants top2_budget top_p_fixed top_p_target top_p_target_bias top2_bias

Writes ``experiments/results/compare_routers.{md,json}`` and three plots (validation loss
curves, experts per token over training, experts per layer). Finished runs are reused from
``runs/experiments/lm/`` (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynmoe_jax import config as config_lib
from dynmoe_jax import plan
from experiments import plots, report, run_cache, stats, variants

MODULE = "experiments.compare_routers"
Results = dict[str, list[run_cache.RunResult]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--scale", type=int, default=1, help="multiplies steps and widths")
    p.add_argument("--steps", type=int, default=None, help="override the step count")
    p.add_argument("--threshold", type=float, default=0.4, help="top-p threshold p")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=variants.VARIANTS,
        default=[v for v in variants.VARIANTS if v not in variants.BUDGET_VARIANTS],
    )
    p.add_argument("--runs-dir", type=Path, default=run_cache.RUNS_DIR / "lm")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="retrain even finished runs")
    p.add_argument("--name", default="compare_routers", help="stem of the result files")
    return p.parse_args(argv)


def run_all(args: argparse.Namespace) -> Results:
    """Trains (or reuses) every variant for every seed, seed-major so that an interrupted
    invocation leaves whole seeds behind."""
    results: Results = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            config = variants.lm_config(variant, seed, args.scale, args.threshold, args.steps)
            name = variants.run_name(variant, seed, args.scale, args.threshold)
            results[variant].append(run_cache.run_or_load(config, args.runs_dir / name, args.fresh))
    return results


def _label(variant: str, threshold: float) -> str:
    labels = {
        "top_p": f"top-p (p={threshold:g})",
        "top_p_sized": f"top-p (p={threshold:g}), capacity for k={variants.SIZED_EXPECTED_K:g}",
        "top_p_grouped": f"top-p (p={threshold:g}), grouped, budget "
        f"{variants.GROUPED_BUDGET_FACTOR:g} x {variants.SIZED_EXPECTED_K:g}",
        "top2_grouped": f"top-2, grouped, budget {variants.GROUPED_BUDGET_FACTOR:g} x 2",
        "dense": "dense (d_ff = 2 x expert)",
    }
    return labels.get(variant, variants.VARIANT_LABELS[variant])


def _last_train(run: run_cache.RunResult, key: str) -> float:
    return float(run.train[-1][key])


def summarize(results: Results, threshold: float) -> tuple[dict, dict]:
    """The markdown tables and the raw numbers of the comparison."""
    rows, raw = [], {}
    for variant, runs in results.items():
        loss = [r.final["loss"] for r in runs]
        ppl = [r.final["perplexity"] for r in runs]
        moe = runs[0].config.model.ffn == "moe"
        experts = [r.final["experts_per_token"] for r in runs] if moe else None
        slots = [_last_train(r, "slots_per_token") for r in runs] if moe else None
        dropped = [r.final.get("dropped_fraction", 0.0) for r in runs] if moe else None
        kept = np.mean(experts) * (1 - np.mean(dropped)) if moe else None
        ffn = plan.ffn_params_per_token(config_lib.resolve(runs[0].config).model, kept)
        rows.append(
            [
                _label(variant, threshold),
                stats.fmt_mean_sd(loss, 3),
                stats.fmt_mean_sd(ppl, 1),
                stats.fmt_mean_sd(experts, 2) if moe else "—",
                stats.fmt_mean_sd(slots, 2) if moe else "—",
                f"{100 * np.mean(dropped):.1f}%" if moe else "—",
                f"{ffn / 1e3:.0f}k",
                # Per seed: runs trained at different times saw different machine loads.
                ", ".join(f"{r.wall_s:.0f}" for r in runs),
                ", ".join(f"{r.step_ms:.0f}" for r in runs),
            ]
        )
        raw[variant] = {
            "seeds": [r.config.seed for r in runs],
            "validation_loss": loss,
            "validation_perplexity": ppl,
            "experts_per_token": experts,
            "slots_per_token": slots,
            "dropped_fraction": dropped,
            "experts_per_layer": [r.experts_per_layer for r in runs] if moe else None,
            "active_ffn_params_per_token": ffn,
            "wall_s": [r.wall_s for r in runs],
            "step_ms": [r.step_ms for r in runs],
            "train_experts_first_last": [
                (r.train[0].get("experts_per_token"), r.train[-1].get("experts_per_token"))
                for r in runs
            ],
        }
    header = [
        "model",
        "val loss",
        "val perplexity",
        "experts / token",
        "expert slots / token",
        "dropped",
        "active FFN params / token",
        "wall s, per seed",
        "ms / step, per seed",
    ]
    tables = {"Validation after training (mean ± sd over seeds)": (header, rows)}
    if "top_p" in results:
        tables.update(_top_p_tables(results["top_p"]))
    budget = {v: runs for v, runs in results.items() if v in variants.BUDGET_VARIANTS}
    if budget:
        table, raw["budget"] = _budget_table(budget, results.get("top2_budget"))
        tables["Routing that keeps its budget (mean ± sd over seeds)"] = table
    return tables, raw


def _windows(run: run_cache.RunResult, key: str, width: int = 50) -> np.ndarray:
    """[windows, layers] means of a per-layer train metric over consecutive ``width``-step
    windows after warm-up (the first 10% of the steps)."""
    warmup = run.config.num_train_steps // 10
    records = [r for r in run.train if r["step"] > warmup]
    starts = range(warmup, run.config.num_train_steps, width)
    return np.asarray([np.mean([r[key] for r in records if s < r["step"] <= s + width], axis=0)
                       for s in starts])  # fmt: skip


def _after_warmup(run: run_cache.RunResult, key: str) -> float:
    return run.after_warmup(lambda r: r[key])


def _budget_table(results: Results, top2: list | None) -> tuple[tuple, dict]:
    """Tracking, balance, drops, cost and quality of the budget variants."""
    header = ["model", "val loss", "experts / token", "largest window distance from 1.5",
              "experts by layer", "dropped (train)", "busiest expert / mean load",
              "expert rows / token (vs top-2)", "ms / step"]  # fmt: skip
    top2_rows = np.mean([_after_warmup(r, "slots_per_token") for r in top2]) if top2 else None
    rows, raw = [], {}
    for variant, runs in results.items():
        distance = [np.max(np.abs(_windows(r, "experts_per_layer") / variants.TARGET_K - 1))
                    for r in runs]  # fmt: skip
        per_layer = np.mean([r.experts_per_layer for r in runs], axis=0)
        load = [_after_warmup(r, "max_load_ratio") for r in runs]
        dropped = [_after_warmup(r, "dropped_fraction") for r in runs]
        slots = [_after_warmup(r, "slots_per_token") for r in runs]
        loss = [r.final["loss"] for r in runs]
        experts = [r.final["experts_per_token"] for r in runs]
        share = f" ({np.mean(slots) / top2_rows:.0%})" if top2_rows else ""
        rows.append([variants.VARIANT_LABELS[variant], stats.fmt_mean_sd(loss, 3),
                     stats.fmt_mean_sd(experts, 2), f"{100 * max(distance):.1f}%",
                     ", ".join(f"{k:.2f}" for k in per_layer),
                     f"{100 * np.mean(dropped):.2f}%", stats.fmt_mean_sd(load, 2),
                     f"{np.mean(slots):.2f}{share}",
                     ", ".join(f"{r.step_ms:.0f}" for r in runs)])  # fmt: skip
        raw[variant] = {"validation_loss": loss, "experts_per_token": experts,
                        "largest_window_distance": distance, "experts_per_layer":
                        per_layer, "dropped_fraction": dropped, "max_load_ratio": load,
                        "slots_per_token": slots, "step_ms": [r.step_ms for r in runs]}  # fmt: skip
    return (header, rows), raw


def plot_budget(results: Results, path: Path) -> Path:
    """Experts per token and threshold of each layer over training, for the target runs
    (the first seed)."""
    plt = plots.pyplot()
    targets = [v for v in results if v.startswith("top_p_target")]
    fig, axes = plt.subplots(len(targets), 2, figsize=(11, 3.5 * len(targets)), squeeze=False)
    for row, variant in zip(axes, targets, strict=True):
        run = results[variant][0]
        steps = [r["step"] for r in run.train]
        for key, ax in zip(("experts_per_layer", "threshold_per_layer"), row, strict=True):
            values = np.asarray([r[key] for r in run.train])
            for layer in range(values.shape[1]):
                ax.plot(steps, values[:, layer], label=f"layer {layer}", lw=1)
            ax.set_title(f"{variants.VARIANT_LABELS[variant]}: {key.replace('_', ' ')}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        row[0].axhline(variants.TARGET_K, color="k", ls="--", lw=1)
        row[0].legend(fontsize=8)
    return plots.save_figure(fig, path)


def _top_p_tables(runs: list[run_cache.RunResult]) -> dict:
    """Per-layer experts (finding 3) and experts over training (finding 4) of the top-p runs."""
    per_layer = np.stack([r.experts_per_layer for r in runs])
    layer_rows = [[i, stats.fmt_mean_sd(per_layer[:, i], 2)] for i in range(per_layer.shape[1])]
    rho = [stats.spearman(np.arange(per_layer.shape[1]), row) for row in per_layer]
    layer_rows.append(["Spearman(layer, experts) per seed", ", ".join(f"{x:+.2f}" for x in rho)])
    steps, curves = report.aligned_series([r.train for r in runs], "experts_per_token")
    peak = int(np.argmax(curves.mean(axis=0)))
    time_rows = [
        [f"first log (step {steps[0]})", stats.fmt_mean_sd(curves[:, 0], 2)],
        [f"peak of the seed mean (step {steps[peak]})", stats.fmt_mean_sd(curves[:, peak], 2)],
        [f"last log (step {steps[-1]})", stats.fmt_mean_sd(curves[:, -1], 2)],
    ]
    return {
        "Top-p: experts per token by layer (validation, 0 = lowest)": (
            ["layer", "experts / token"],
            layer_rows,
        ),
        "Top-p: experts per token over training (train batches)": (
            ["when", "experts / token"],
            time_rows,
        ),
    }


# ----------------------------------------------------------------------------- plots


def plot_validation_loss(results: Results, threshold: float, path: Path) -> Path:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, runs in results.items():
        steps, curves = report.aligned_series([r.validation for r in runs], "loss")
        plots.band(ax, steps, curves, _label(variant, threshold), plots.VARIANT_COLORS[variant])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(
        f"Validation loss (mean over {len(next(iter(results.values())))} seeds, band = min-max)"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    return plots.save_figure(fig, path)


def plot_experts_over_training(results: Results, threshold: float, path: Path) -> Path:
    """Left: mean experts per token of each MoE model; right: top-p by layer."""
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, runs in results.items():
        if runs[0].config.model.ffn != "moe":
            continue
        steps, curves = report.aligned_series([r.train for r in runs], "experts_per_token")
        label, color = _label(variant, threshold), plots.VARIANT_COLORS[variant]
        plots.band(left, steps, curves, label, color)
    left.set_title("Experts per token over training (train batches)")
    if "top_p" in results:
        runs = results["top_p"]
        steps, _ = report.aligned_series([r.train for r in runs], "experts_per_token")
        per_layer = np.stack([_per_layer_series(r, steps) for r in runs])  # [seed, step, L]
        for layer in range(per_layer.shape[2]):
            plots.band(right, steps, per_layer[:, :, layer], f"layer {layer}")
        right.set_title(f"Top-p (p={threshold:g}) by layer (0 = lowest)")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("experts per token")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return plots.save_figure(fig, path)


def _per_layer_series(run: run_cache.RunResult, steps: np.ndarray) -> np.ndarray:
    by_step = {r["step"]: r["experts_per_layer"] for r in run.train}
    return np.asarray([by_step[s] for s in steps], np.float64)


def plot_experts_per_layer(results: Results, threshold: float, path: Path) -> Path:
    """Final validation experts per token of each MoE layer, per model (seed dots)."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    moe = {v: runs for v, runs in results.items() if runs[0].config.model.ffn == "moe"}
    width = 0.8 / max(1, len(moe))
    for i, (variant, runs) in enumerate(moe.items()):
        per_layer = np.stack([r.experts_per_layer for r in runs])
        x = np.arange(per_layer.shape[1]) + (i - (len(moe) - 1) / 2) * width
        ax.bar(
            x,
            per_layer.mean(axis=0),
            width,
            label=_label(variant, threshold),
            alpha=0.7,
            color=plots.VARIANT_COLORS[variant],
        )
        for row in per_layer:
            ax.plot(x, row, "k.", ms=4)
    ax.set_xticks(range(per_layer.shape[1]))
    ax.set_xlabel("MoE layer (0 = lowest)")
    ax.set_ylabel("experts per token (validation)")
    ax.set_title("Experts per token by layer (bars: seed mean; dots: seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return plots.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run_all(args)
    tables, raw = summarize(results, args.threshold)
    stem = variants.results_stem(args.name, args.scale)
    out = args.results_dir
    figures = [
        plot_validation_loss(results, args.threshold, out / f"{stem}_val_loss.png"),
        *(
            [plot_budget(results, out / f"{stem}_budget.png")]
            if any(v.startswith("top_p_target") for v in results)
            else []
        ),  # fmt: skip
        plot_experts_over_training(results, args.threshold, out / f"{stem}_experts_training.png"),
        plot_experts_per_layer(results, args.threshold, out / f"{stem}_experts_per_layer.png"),
    ]
    md, _ = report.write_results(
        stem,
        "Router comparison: dense vs top-1 vs top-2 vs top-p",
        tables,
        {"results": raw, "plots": [p.name for p in figures]},
        report.command_line(MODULE),
        out,
    )
    print(md.read_text())
    return raw


if __name__ == "__main__":
    main()
