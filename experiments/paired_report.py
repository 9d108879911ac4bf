"""The tables, JSON and plot of ``paired_seeds``: each variant against top-2 seed by seed, and
the command line that retrains any one run through the library's entry point."""

from __future__ import annotations

import enum
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib
from dynmoe_jax.configs import default
from experiments import paired_variants as pv
from experiments import plots, report, run_cache, stats

Results = dict[str, dict[str, list[run_cache.RunResult]]]  # size -> variant -> runs by seed
TOLERANCE = 0.003  # nats: the interval half-width the comparison aims at
# The comparisons beside "against top-2": the heterogeneous model against the top-p model
# whose profile sized it (the same rows), and bias balancing against the same target without.
ALSO = {"hetero": pv.PROFILE_SOURCE, "top_p_t1.76_bias": "top_p_t1.76"}


def _flag(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _value(config: ConfigDict, path: str):
    for key in path.split("."):
        config = config[key]
    return config


def cli_command(config: ConfigDict, workdir: Path) -> str:
    """``python -m dynmoe_jax.main`` training ``config`` in ``workdir``: the default config
    file with every field that differs from it set on the command line."""
    ours = config_lib.as_dict(config_lib.resolve(config))
    base = config_lib.as_dict(config_lib.resolve(default.get_config()))
    flags = [f"--config.{path}={_flag(_value(ours, path))}"
             for path in config_lib.field_paths(ours)
             if _value(ours, path) != _value(base, path)]  # fmt: skip
    if workdir.is_relative_to(report.REPO_ROOT):  # the command runs from the repository root
        workdir = workdir.relative_to(report.REPO_ROOT)
    return " ".join([".venv/bin/python -m dynmoe_jax.main --config=dynmoe_jax/configs/default.py",
                     f"--workdir={workdir}", *flags])  # fmt: skip


def _sizes(run: run_cache.RunResult) -> dict[str, float]:
    """The model's parameters, and the feed-forward parameters a token passes through."""
    from dynmoe_jax import plan
    from dynmoe_jax.model.decoder import abstract_decoder

    model = config_lib.resolve(run.config).model
    total, _ = plan.count_params(abstract_decoder(model))
    return {"total": total, "ffn_per_token": plan.ffn_params_per_token(model)}


def _kept(record: dict) -> float:
    """Selections computed per token: those selected, less those dropped."""
    return record["experts_per_token"] * (1 - record["dropped_fraction"])


def per_seed(runs: list[run_cache.RunResult], runs_dir: Path) -> dict:
    """Every per-seed figure of one variant at one size."""
    return {
        "seeds": [r.config.seed for r in runs],
        "validation_loss": [r.final["loss"] for r in runs],
        "experts_per_token": [r.final["experts_per_token"] for r in runs],
        "experts_per_layer": [r.experts_per_layer.tolist() for r in runs],
        "top_k": [r.config.moe.top_k for r in runs],
        "kept_per_token": [r.after_warmup(_kept) for r in runs],
        "rows_per_token": [r.after_warmup(lambda x: x["slots_per_token"]) for r in runs],
        "dropped_fraction": [r.after_warmup(lambda x: x["dropped_fraction"]) for r in runs],
        "step_ms": [r.step_ms for r in runs],
        "wall_s": [r.wall_s for r in runs],
        "command": [cli_command(r.config, runs_dir / r.name) for r in runs],
    }


def paired(values: list[float], base: list[float]) -> dict:
    """Mean of the paired differences, its 95% t-interval, their sd, and the seeds an interval
    of +-TOLERANCE would take at that sd."""
    d = np.asarray(values, np.float64) - np.asarray(base, np.float64)
    mean, low, high = stats.t_interval(d)
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    return {"differences": d.tolist(), "mean": mean, "low": low, "high": high, "sd": sd,
            "seeds_for_tolerance": int(np.ceil((1.96 * sd / TOLERANCE) ** 2))}  # fmt: skip


def verdict(p: dict, what: str = "loss") -> str:
    if p["low"] <= 0 <= p["high"]:
        return "no difference detected at this power"
    lower = p["high"] < 0
    if what == "loss":
        return "lower loss than the reference" if lower else "higher loss than the reference"
    return "less accurate than the reference" if lower else "more accurate than the reference"


def _interval(p: dict, digits: int = 4) -> str:
    return f"{p['mean']:+.{digits}f} [{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]"


def loss_table(size: str, figures: dict) -> tuple[list, list]:
    header = ["variant", "against", "val loss (mean ± sd)", "paired difference [95% CI]",
              "verdict", "experts / token", "k by layer", "computed / token (share of top-2)",
              "dropped", "rows with padding", "seeds", "seeds for ±0.003"]  # fmt: skip
    rows = []
    top2_kept = np.mean(figures[pv.BASELINE]["kept_per_token"])
    for name, f in figures.items():
        layers = np.mean(f["experts_per_layer"], axis=0)
        for ref, p in f["paired"].items():
            rows.append([pv.VARIANTS[name].label, pv.VARIANTS[ref].label,
                         stats.fmt_mean_sd(f["validation_loss"], 4), _interval(p),
                         verdict(p), stats.fmt_mean_sd(f["experts_per_token"], 3),
                         ", ".join(f"{k:.2f}" for k in layers),
                         f"{np.mean(f['kept_per_token']):.3f} "
                         f"({np.mean(f['kept_per_token']) / top2_kept:.0%})",
                         f"{100 * np.mean(f['dropped_fraction']):.2f}%",
                         f"{np.mean(f['rows_per_token']):.2f}", len(f["seeds"]),
                         p["seeds_for_tolerance"]])  # fmt: skip
    return header, rows


def accuracy_figures(acc_runs: list[dict], base_runs: list[dict]) -> dict:
    """Per task: the accuracies by seed, experts per token on the task, and the paired
    difference from the reference's."""
    out = {}
    for task in acc_runs[0]:
        values = [r[task]["value"] for r in acc_runs]
        out[task] = {"metric": acc_runs[0][task]["metric"], "values": values,
                     "experts_per_token": [r[task]["experts_per_token"] for r in acc_runs],
                     "paired": paired(values, [r[task]["value"] for r in base_runs])}  # fmt: skip
    return out


def accuracy_table(figures: dict) -> tuple[list, list]:
    header = ["size", "variant", "task", "metric (mean ± sd)", "difference from top-2 [95% CI]",
              "verdict", "experts / token on the task"]  # fmt: skip
    rows = []
    for size, by_variant in figures.items():
        for name, f in by_variant.items():
            for task, t in f.get("accuracy", {}).items():
                base = name == pv.BASELINE  # no difference from itself to show
                rows.append([size, pv.VARIANTS[name].label, task, stats.fmt_mean_sd(t["values"]),
                             "—" if base else _interval(t["paired"], 3),
                             "—" if base else verdict(t["paired"], "accuracy"),
                             stats.fmt_mean_sd(t["experts_per_token"], 2)])  # fmt: skip
    return header, rows


def plot(figures: dict, path: Path) -> Path:
    """Each variant's paired loss difference from top-2 with its 95% interval, per size."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(figures), figsize=(5.5 * len(figures), 4), squeeze=False)
    for ax, (size, by_variant) in zip(axes[0], figures.items(), strict=True):
        names = [n for n in by_variant if n != pv.BASELINE]
        for y, name in enumerate(names):
            p = by_variant[name]["paired"][pv.BASELINE]
            color = f"C{list(pv.VARIANTS).index(name)}"  # one colour per variant, both sizes
            ax.errorbar(p["mean"], y, xerr=[[p["mean"] - p["low"]], [p["high"] - p["mean"]]],
                        fmt="o", capsize=4, color=color)  # fmt: skip
            ax.plot(p["differences"], [y] * len(p["differences"]), "k.", ms=3, alpha=0.4)
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(range(len(names)), [pv.VARIANTS[n].label for n in names], fontsize=8)
        ax.set_xlabel("validation loss minus top-2's, same seed (nats)")
        seeds = len(by_variant[pv.BASELINE]["seeds"])
        ax.set_title(f"{size} ({pv.EXPERTS[size]} experts): mean, 95% CI, {seeds} seeds")
        ax.grid(alpha=0.3, axis="x")
    return plots.save_figure(fig, path)


def write(results: Results, accuracy: dict, args, module: str) -> dict:
    figures = {}
    for size, by_variant in results.items():
        figures[size] = {n: per_seed(runs, args.runs_dir) for n, runs in by_variant.items()}
        for name, f in figures[size].items():
            refs = [pv.BASELINE, *([ALSO[name]] if name in ALSO else [])]
            f["paired"] = {ref: paired(f["validation_loss"],
                                       figures[size][ref]["validation_loss"])
                           for ref in refs if ref in figures[size] and ref != name}  # fmt: skip
            if size in accuracy:
                base = accuracy[size][pv.BASELINE]
                f["accuracy"] = accuracy_figures(accuracy[size][name], base)
    tables = {f"Validation loss against top-2, {size}": loss_table(size, figures[size])
              for size in figures}  # fmt: skip
    if accuracy:
        tables["Held-out task accuracy against top-2"] = accuracy_table(figures)
    stem = args.name if args.scale == 1 else f"{args.name}_x{args.scale}"
    figure = plot(figures, args.results_dir / f"{stem}_differences.png")
    data = {"results": figures, "fixed_p": pv.FIXED_P, "experts": pv.EXPERTS,
            "parameters": {size: _sizes(results[size][pv.BASELINE][0]) for size in results},
            "plots": [figure.name]}  # fmt: skip
    title = "Paired seeds: top-p against top-2 at equal compute"
    command = report.command_line(module)
    md, _ = report.write_results(stem, title, tables, data, command, args.results_dir)
    print(md.read_text())
    return figures
