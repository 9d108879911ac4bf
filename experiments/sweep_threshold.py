"""Top-p threshold sweep (the paper's finding 5: p below 0.3 hurts) and the per-layer analysis
(finding 3: lower layers use more experts than upper ones).

Trains the LM of ``compare_routers`` with top-p for every p (0.1 to 0.7 by default) and seed,
reusing finished runs (p = 0.4 and the top-1 / top-2 reference rows come from
``compare_routers`` when it ran first)::

    .venv/bin/python -m experiments.sweep_threshold    # 7 p x 2 seeds: ~15 min, 2 CPUs
    .venv/bin/python -m experiments.sweep_threshold --thresholds 0.1 0.3 --seeds 0

Writes ``experiments/results/sweep_threshold.{md,json}``, ``sweep_threshold.png`` (loss and
experts against p) and ``sweep_threshold_layers.png`` (experts per layer for every p).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments import plots, report, run_cache, stats, variants

MODULE = "experiments.sweep_threshold"
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--scale", type=int, default=1, help="multiplies steps and widths")
    p.add_argument("--steps", type=int, default=None, help="override the step count")
    p.add_argument("--runs-dir", type=Path, default=run_cache.RUNS_DIR / "lm")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="retrain even finished runs")
    return p.parse_args(argv)


def run_sweep(args) -> tuple[dict[float, list], dict[str, list]]:
    """Top-p runs per threshold and the top-1 / top-2 reference runs, seed-major."""
    sweep: dict[float, list[run_cache.RunResult]] = {p: [] for p in args.thresholds}
    reference: dict[str, list[run_cache.RunResult]] = {"top1": [], "top2": []}
    for seed in args.seeds:
        for p in args.thresholds:
            config = variants.lm_config("top_p", seed, args.scale, p, args.steps)
            workdir = args.runs_dir / variants.run_name("top_p", seed, args.scale, p)
            sweep[p].append(run_cache.run_or_load(config, workdir, args.fresh))
        for variant in reference:
            config = variants.lm_config(variant, seed, args.scale, steps=args.steps)
            workdir = args.runs_dir / variants.run_name(variant, seed, args.scale)
            reference[variant].append(run_cache.run_or_load(config, workdir, args.fresh))
    return sweep, reference


def layer_contrast(per_layer: np.ndarray) -> float:
    """Mean experts of the lower half of the layers minus the upper half (> 0: lower layers
    use more, as in the paper). The middle layer of an odd count is left out."""
    n = per_layer.shape[-1]
    return float(per_layer[..., : n // 2].mean() - per_layer[..., (n + 1) // 2 :].mean())


def summarize(sweep: dict, reference: dict) -> tuple[dict, dict]:
    rows, layer_rows, raw = [], [], {"thresholds": {}, "reference": {}}
    for p, runs in sweep.items():
        per_layer = np.stack([r.experts_per_layer for r in runs])
        loss = [r.final["loss"] for r in runs]
        rows.append(
            [
                f"top-p {p:g}",
                stats.fmt_mean_sd(loss, 3),
                stats.fmt_mean_sd([r.final["perplexity"] for r in runs], 1),
                stats.fmt_mean_sd([r.final["experts_per_token"] for r in runs], 2),
                f"{100 * np.mean([r.final['dropped_fraction'] for r in runs]):.1f}%",
            ]
        )
        rho = [stats.spearman(np.arange(len(row)), row) for row in per_layer]
        layer_rows.append(
            [
                f"{p:g}",
                ", ".join(f"{x:.2f}" for x in per_layer.mean(axis=0)),
                f"{layer_contrast(per_layer):+.3f}",
                ", ".join("n/a (constant)" if np.isnan(x) else f"{x:+.2f}" for x in rho),
            ]
        )
        raw["thresholds"][f"{p:g}"] = {
            "validation_loss": loss,
            "validation_perplexity": [r.final["perplexity"] for r in runs],
            "experts_per_token": [r.final["experts_per_token"] for r in runs],
            "dropped_fraction": [r.final["dropped_fraction"] for r in runs],
            "experts_per_layer": per_layer,
            "lower_minus_upper": layer_contrast(per_layer),
            "spearman_layer_experts": rho,
            "wall_s": [r.wall_s for r in runs],
        }
    for variant, runs in reference.items():
        loss = [r.final["loss"] for r in runs]
        rows.append(
            [
                variants.VARIANT_LABELS[variant] + " (reference)",
                stats.fmt_mean_sd(loss, 3),
                stats.fmt_mean_sd([r.final["perplexity"] for r in runs], 1),
                stats.fmt_mean_sd([r.final["experts_per_token"] for r in runs], 2),
                f"{100 * np.mean([r.final['dropped_fraction'] for r in runs]):.1f}%",
            ]
        )
        raw["reference"][variant] = {"validation_loss": loss}
    seeds = len(next(iter(sweep.values())))
    tables = {
        f"Validation after training, by threshold (mean ± sd over {seeds} seeds)": (
            ["router", "val loss", "val perplexity", "experts / token", "dropped"],
            rows,
        ),
        "Experts per token by layer (validation; 0 = lowest layer)": (
            [
                "p",
                "layers 0..L-1 (seed mean)",
                "lower half - upper half",
                "Spearman(layer, experts) per seed",
            ],
            layer_rows,
        ),
    }
    return tables, raw


def plot_sweep(raw: dict, path: Path) -> Path:
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ps = [float(p) for p in raw["thresholds"]]
    for key, ax, label in (
        ("validation_loss", left, "validation loss (nats / token)"),
        ("experts_per_token", right, "experts per token (validation)"),
    ):
        vals = [raw["thresholds"][f"{p:g}"][key] for p in ps]
        ax.plot(ps, [np.mean(v) for v in vals], "o-", color="tab:green", label="top-p")
        for p, v in zip(ps, vals, strict=True):
            ax.plot([p] * len(v), v, "k.", ms=4)
        ax.set_xlabel("threshold p")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for variant, style in (("top1", ":"), ("top2", "--")):
        if variant in raw["reference"]:
            left.axhline(
                np.mean(raw["reference"][variant]["validation_loss"]),
                ls=style,
                color=plots.VARIANT_COLORS[variant],
                label=variants.VARIANT_LABELS[variant],
            )
    right.axhline(2.0, ls="--", color=plots.VARIANT_COLORS["top2"], label="top-2")
    drop = [np.mean(raw["thresholds"][f"{p:g}"]["dropped_fraction"]) for p in ps]
    twin = right.twinx()
    twin.plot(ps, drop, "s:", color="tab:red", ms=4, label="dropped fraction")
    twin.set_ylabel("dropped fraction (capacity for 2 experts)", color="tab:red")
    left.set_title("Loss vs p (line: seed mean; dots: seeds)")
    right.set_title("Experts per token vs p")
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="upper left")
    return plots.save_figure(fig, path)


def plot_layers(raw: dict, path: Path) -> Path:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    cmap = plt.get_cmap("viridis")
    items = list(raw["thresholds"].items())
    for i, (p, entry) in enumerate(items):
        per_layer = np.asarray(entry["experts_per_layer"])
        layers = np.arange(per_layer.shape[1])
        ax.errorbar(
            layers,
            per_layer.mean(axis=0),
            yerr=per_layer.std(axis=0),
            fmt="o-",
            capsize=3,
            color=cmap(i / max(1, len(items) - 1)),
            label=f"p = {p}",
        )
    ax.set_xlabel("MoE layer (0 = lowest)")
    ax.set_ylabel("experts per token (validation)")
    ax.set_xticks(layers)
    ax.set_title("Experts per token by layer and threshold (bars: sd over seeds)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3)
    return plots.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    sweep, reference = run_sweep(args)
    tables, raw = summarize(sweep, reference)
    stem = variants.results_stem("sweep_threshold", args.scale)
    figures = [
        plot_sweep(raw, args.results_dir / f"{stem}.png"),
        plot_layers(raw, args.results_dir / f"{stem}_layers.png"),
    ]
    raw["plots"] = [p.name for p in figures]
    raw["seeds"] = list(args.seeds)
    md, _ = report.write_results(
        stem,
        "Top-p threshold sweep and experts per layer",
        tables,
        raw,
        report.command_line(MODULE),
        args.results_dir,
    )
    print(md.read_text())
    return raw


if __name__ == "__main__":
    main()
