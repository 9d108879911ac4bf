"""Do harder inputs get more experts? (the paper's finding 2), at small scale, two ways.

``tokens``: per token. The top-p language models of ``compare_routers`` (trained here if
missing) are run over the whole validation split; tokens are binned by the model's own loss,
its predictive entropy, and the surprisal of the input token, and the mean number of experts
(over the MoE layers) is reported per bin with Spearman's rank correlation per seed.

``tasks``: per task. One top-p model is trained jointly on a suite of synthetic tasks of graded
difficulty generated here (copying 4 digits, then sums of 1- to 4-digit numbers), and the mean
number of experts on each task's answer positions is reported with the rank correlation between
task difficulty and experts, with 95% confidence intervals over seeds::

    .venv/bin/python -m experiments.difficulty       # both: ~9 min (after compare_routers)
    .venv/bin/python -m experiments.difficulty tasks --seeds 0 1 2 3 4

Writes ``experiments/results/difficulty_{tokens,tasks}.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from experiments import common

MODULE = "experiments.difficulty"
NUM_BINS = 10

# ----------------------------------------------------------------------------- synthetic tasks

# Token ids of the synthetic vocabulary. 0 is never produced (the library's padding id).
PAD = 0
DIGIT0 = 1  # digits 0-9 are ids 1-10
PLUS, EQUALS, END = 11, 12, 13
FIRST_TAG = 14  # one tag token per task, starting every example
VOCAB_SIZE = 32  # the config check wants >= 16; ids above the tags are unused


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One task of the suite. ``kind`` 'copy' repeats ``digits`` random digits; 'add' writes
    the sum of two ``digits``-digit numbers, least significant digit first, zero-padded to
    ``digits + 1`` digits (the order a causal model can compute, carry by carry)."""

    name: str
    kind: str
    digits: int


# Ordered from easiest to hardest: the index is the difficulty rank.
TASKS = (
    SyntheticTask("copy4", "copy", 4),
    SyntheticTask("add1", "add", 1),
    SyntheticTask("add2", "add", 2),
    SyntheticTask("add3", "add", 3),
    SyntheticTask("add4", "add", 4),
)


def digits_to_ids(digits: Sequence[int]) -> list[int]:
    return [DIGIT0 + int(d) for d in digits]


def make_example(task_index: int, rng: np.random.Generator) -> tuple[list[int], list[bool]]:
    """One example of task ``TASKS[task_index]``: its tokens and which of them are the answer
    (the answer digits and the closing ``;``, the tokens the loss is taken on)."""
    task = TASKS[task_index]
    a = rng.integers(0, 10, size=task.digits)
    if task.kind == "copy":
        prompt, answer = digits_to_ids(a), [int(d) for d in a]
    elif task.kind == "add":
        b = rng.integers(0, 10, size=task.digits)
        prompt = digits_to_ids(a) + [PLUS] + digits_to_ids(b)
        total = int("".join(map(str, a))) + int("".join(map(str, b)))
        answer = [int(c) for c in reversed(str(total).zfill(task.digits + 1))]
    else:
        raise ValueError(f"task kind {task.kind!r} is invalid: allowed 'copy' | 'add'")
    tokens = [FIRST_TAG + task_index, *prompt, EQUALS, *digits_to_ids(answer), END]
    is_answer = [False] * (len(prompt) + 2) + [True] * (len(answer) + 1)
    return tokens, is_answer


def make_row(task_index: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``length`` tokens of back-to-back examples of one task (the last one cut off) and their
    answer flags."""
    tokens: list[int] = []
    flags: list[bool] = []
    while len(tokens) < length:
        t, f = make_example(task_index, rng)
        tokens += t
        flags += f
    return np.asarray(tokens[:length], np.int32), np.asarray(flags[:length], bool)


def make_batch(
    rng: np.random.Generator, batch_size: int, seq_len: int, task_ids: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """A batch in the library's format (inputs/targets int32 [B, T], weights float32 [B, T])
    plus ``task`` int32 [B]. Each row holds one task; tasks take turns over the rows (in a
    random order) unless ``task_ids`` gives them. Only answer targets carry weight."""
    if task_ids is None:
        task_ids = rng.permutation(np.arange(batch_size) % len(TASKS))
    rows = [make_row(int(t), seq_len + 1, rng) for t in task_ids]
    tokens = np.stack([r[0] for r in rows])
    flags = np.stack([r[1] for r in rows])
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": flags[:, 1:].astype(np.float32),
        "task": np.asarray(task_ids, np.int32),
    }


def decode_example(tokens: Sequence[int]) -> str:
    """Human-readable text of synthetic tokens, e.g. 'add2: 47+19=660;'."""
    names = {PLUS: "+", EQUALS: "=", END: ";", PAD: "_"}
    out = []
    for t in tokens:
        if FIRST_TAG <= t < FIRST_TAG + len(TASKS):
            out.append(f" {TASKS[t - FIRST_TAG].name}: ")
        elif DIGIT0 <= t < DIGIT0 + 10:
            out.append(str(t - DIGIT0))
        else:
            out.append(names.get(int(t), "?"))
    return "".join(out).strip()


def tasks_config(seed: int, scale: int = 1, steps: int | None = None) -> ConfigDict:
    """The top-p model of the task suite: the LM experiments' model on 32 x 48-token batches
    of the synthetic tasks."""
    c = common.lm_config("top_p", seed, scale, steps=steps if steps is not None else 600 * scale)
    c.dataset = "synthetic"  # not read: batches come from make_batch
    c.vocab_size = VOCAB_SIZE
    c.seq_len = 48
    c.batch_size = 30  # a multiple of the 5 tasks, so every batch is balanced
    return c


# ----------------------------------------------------------------------------- task suite


def task_statistics(task, params, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per task: experts per token on answer positions (mean over layers and by layer), on
    every position, and the answer loss and token accuracy."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @jax.jit
    def forward(params, inputs, targets):
        logits, layer = nnx.merge(task.graphdef, params)(inputs)
        logp = jax.nn.log_softmax(logits, axis=-1)
        loss = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        correct = jnp.argmax(logits, axis=-1) == targets
        return loss, correct, layer["token_experts"]

    loss, correct, experts = jax.device_get(forward(params, batch["inputs"], batch["targets"]))
    answer = batch["weights"] > 0
    out: dict[str, list] = {k: [] for k in ("experts", "experts_all", "by_layer", "loss", "acc")}
    for t in range(len(TASKS)):
        rows = batch["task"] == t
        sel = answer & rows[:, None]
        out["experts"].append(experts[:, sel].mean())
        out["by_layer"].append(experts[:, sel].mean(axis=1))
        out["experts_all"].append(experts[:, rows].mean())
        out["loss"].append(loss[sel].mean())
        out["acc"].append(correct[sel].mean())
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def eval_batch(config: ConfigDict, rows_per_task: int = 40) -> dict[str, np.ndarray]:
    """A fixed evaluation batch (the same for every seed), ``rows_per_task`` rows per task."""
    rng = np.random.default_rng(12345)
    task_ids = np.repeat(np.arange(len(TASKS)), rows_per_task)
    return make_batch(rng, len(task_ids), config.seq_len, task_ids)


def train_tasks(config: ConfigDict, log_every: int = 50) -> dict:
    """Trains one model on the task suite with the library's train step; returns the final
    per-task statistics and their history over training."""
    from dynmoe_jax import train as train_lib

    task = train_lib.build_task(config, VOCAB_SIZE)
    state = train_lib.init_state(task)
    train_step = train_lib.make_train_step(task)
    rng = np.random.default_rng(config.seed)
    evaluation = eval_batch(config)
    history = []
    start = time.perf_counter()
    for step in range(1, config.num_train_steps + 1):
        batch = make_batch(rng, config.batch_size, config.seq_len)
        batch.pop("task")
        state, _ = train_step(state, batch)
        if step % log_every == 0 or step == config.num_train_steps:
            stats = task_statistics(task, state["params"], evaluation)
            history.append({"step": step, **stats})
            print(
                f"seed {config.seed} step {step}: experts per task "
                + " ".join(f"{x:.2f}" for x in stats["experts"])
                + " | answer acc "
                + " ".join(f"{x:.2f}" for x in stats["acc"]),
                flush=True,
            )
    return {"final": history[-1], "history": history, "wall_s": time.perf_counter() - start}


def train_or_load_tasks(config: ConfigDict, cache_dir: Path, fresh: bool = False) -> dict:
    """``train_tasks(config)``, cached as JSON in ``cache_dir`` (one file per seed and step
    count) so that the tables can be rebuilt without retraining; reused for the same config."""
    path = cache_dir / f"tasks-s{config.seed}-steps{config.num_train_steps}.json"
    if not fresh and path.exists():
        cached = json.loads(path.read_text())
        if common.same_config(json.loads(cached["config"]), json.loads(config.to_json())):
            print(f"[reuse] {path}", flush=True)
            return _with_arrays(cached["run"])
    run = train_tasks(config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config.to_json(), "run": common.jsonable(run)}))
    return run


def _with_arrays(run: dict) -> dict:
    """A cached run with its per-task lists back as arrays."""
    history = [
        {k: v if k == "step" else np.asarray(v, np.float64) for k, v in h.items()}
        for h in run["history"]
    ]
    return {"final": history[-1], "history": history, "wall_s": run["wall_s"]}


def run_tasks(args: argparse.Namespace) -> tuple[dict, dict]:
    """The task suite over seeds: tables and raw numbers."""
    cache = args.runs_dir.parent / f"tasks-x{args.scale}"
    runs = [
        train_or_load_tasks(tasks_config(s, args.scale, args.steps), cache, args.fresh)
        for s in args.seeds
    ]
    finals = {k: np.stack([r["final"][k] for r in runs]) for k in runs[0]["final"] if k != "step"}
    rank = np.arange(len(TASKS))
    rho = [common.spearman(rank, e) for e in finals["experts"]]
    rho_loss = [
        common.spearman(l, e) for l, e in zip(finals["loss"], finals["experts"], strict=True)
    ]
    rows = []
    for t, spec in enumerate(TASKS):
        mean, lo, hi = common.t_interval(finals["experts"][:, t])
        rows.append(
            [
                f"{t}: {spec.name}",
                f"{mean:.3f} [{lo:.3f}, {hi:.3f}]",
                common.fmt_mean_sd(finals["experts_all"][:, t], 3),
                common.fmt_mean_sd(finals["loss"][:, t], 3),
                common.fmt_mean_sd(finals["acc"][:, t], 3),
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
    pooled = common.spearman(rank, finals["experts"].mean(axis=0))
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
        "config": tasks_config(args.seeds[0], args.scale, args.steps).to_dict(),
    }
    return tables, raw


def _interval_text(values: Sequence[float]) -> str:
    """Mean correlation and its 95% t-interval over seeds, clipped to [-1, 1]."""
    mean, lo, hi = common.t_interval(values)
    return f"{mean:+.2f} [{max(lo, -1.0):+.2f}, {min(hi, 1.0):+.2f}]"


def plot_tasks(raw: dict, path: Path) -> Path:
    """Left: experts per answer token per task (seed dots, CI bars); right: over training."""
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    experts = np.asarray(raw["final"]["experts"])
    names = [t["name"] for t in raw["tasks"]]
    for t in range(len(names)):
        mean, lo, hi = common.t_interval(experts[:, t])
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
        common.band(right, steps, curves, name)
    right.set_xlabel("step")
    right.set_ylabel("experts per answer token")
    right.set_title("Over training (band: min-max over seeds)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    return common.save_figure(fig, path)


# ----------------------------------------------------------------------------- per token


def run_tokens(args: argparse.Namespace) -> tuple[dict, dict]:
    """Per-token analysis of the top-p LM of every seed (reused from compare_routers)."""
    per_seed = []
    for seed in args.seeds:
        config = common.lm_config("top_p", seed, args.scale, args.threshold, args.lm_steps)
        workdir = args.runs_dir / common.run_name("top_p", seed, args.scale, args.threshold)
        common.run_or_load(config, workdir)
        data, task, _, params = common.load_params(config, workdir)
        stats = common.token_statistics(task, params, data.eval_batches())
        per_seed.append(_token_analysis(stats))
        print(
            f"seed {seed}: {stats['loss'].size} tokens, Spearman(loss, experts) "
            f"{per_seed[-1]['spearman']['loss']:+.3f}",
            flush=True,
        )
    return _token_tables(per_seed), {"seeds": list(args.seeds), "per_seed": per_seed}


MEASURES = {
    "loss": "next-token loss (nats)",
    "entropy": "predictive entropy (nats)",
    "surprisal": "input-token surprisal (nats)",
}


def _token_analysis(stats: dict[str, np.ndarray]) -> dict:
    """Deciles and rank correlations of one model's per-token statistics."""
    experts = stats["experts"].astype(np.float64)
    mean_experts = experts.mean(axis=0)
    out: dict = {
        "tokens": int(mean_experts.size),
        "bins": {},
        "spearman": {},
        "spearman_by_layer": {},
        "mean_experts": float(mean_experts.mean()),
    }
    for measure in MEASURES:
        x = stats[measure]
        ok = np.isfinite(x)
        out["bins"][measure] = common.binned_means(x[ok], mean_experts[ok], NUM_BINS)
        out["spearman"][measure] = common.spearman(x[ok], mean_experts[ok])
        out["spearman_by_layer"][measure] = [common.spearman(x[ok], e[ok]) for e in experts]
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
                common.fmt_mean_sd([x[b]["y_mean"] for x in bins], 3),
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
    plt = common.pyplot()
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
    return common.save_figure(fig, path)


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
    p.add_argument("--runs-dir", type=Path, default=common.RUNS_DIR / "lm")
    p.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="retrain the task suite")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    explicit_seeds = args.seeds
    out: dict = {}
    command = common.command_line(MODULE)
    if args.analysis in ("all", "tokens"):
        args.seeds = explicit_seeds or [0, 1]
        tables, raw = run_tokens(args)
        stem = common.results_stem("difficulty_tokens", args.scale)
        plot = plot_tokens(raw, args.results_dir / f"{stem}.png")
        raw["plot"] = plot.name
        md, _ = common.write_results(
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
        stem = common.results_stem("difficulty_tasks", args.scale)
        plot = plot_tasks(raw, args.results_dir / f"{stem}.png")
        raw["plot"] = plot.name
        md, _ = common.write_results(
            stem, "Difficulty per task: a synthetic suite", tables, raw, command, args.results_dir
        )
        print(md.read_text())
        out["tasks"] = raw
    return out


if __name__ == "__main__":
    main()
