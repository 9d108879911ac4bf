"""The paper's first claim at equal compute, seed by seed: top-p (target 2.0, target 1.76 and a
fixed p) and top-1 against top-2, with and without bias balancing, at two sizes; and a
heterogeneous top-k model whose k per layer comes from the same seed's top-p model.

A seed gives every variant the same initial weights, data order and evaluation tokens
(``paired_variants``), so each variant's validation loss is compared with top-2's seed by seed:
the mean paired difference and its 95% t-interval over seeds::

    .venv/bin/python -m experiments.paired_seeds --seeds 0 1 2 3 4 5 6 7 8 9
    .venv/bin/python -m experiments.paired_seeds --sizes small --seeds 0 1 2   # a quick look
    .venv/bin/python -m experiments.paired_seeds --scale 4                    # wider, longer (GPU)
    # then the held-out multiple-choice accuracy of every run (lm-eval; small size by default):
    .venv/bin/python -m experiments.paired_seeds --seeds 0 1 2 3 4 5 6 7 8 9 --accuracy 200
    # retrain one run from its command line alone; compare the logs record by record:
    .venv/bin/python -m experiments.paired_seeds --reproduce hetero small 0

Each run trains through the library's own entry point, seed-major (an interruption leaves whole
seeds), and is reused from ``runs/experiments/paired/`` when it has finished; the results JSON
holds every per-seed figure and the command line that retrains each run alone
(``paired_report.cli_command``). Writes ``experiments/results/paired_seeds.{md,json}`` and a
plot of the paired differences.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from experiments import paired_report, report, run_cache
from experiments import paired_variants as pv

MODULE = "experiments.paired_seeds"
ACCURACY_FILE = "held_out_accuracy.json"  # beside a run's checkpoints, once measured


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="paired seeds")
    p.add_argument("--sizes", nargs="+", choices=pv.SIZES, default=list(pv.SIZES))
    p.add_argument(
        "--variants", nargs="+", choices=tuple(pv.VARIANTS), default=None,
        help="default: all at the small size, LARGE_VARIANTS at the large one",
    )  # fmt: skip
    p.add_argument("--scale", type=int, default=1, help="multiplies steps and widths")
    p.add_argument("--steps", type=int, default=None, help="override the step count")
    p.add_argument(
        "--accuracy", type=int, default=0, metavar="N",
        help="also score each run on N held-out multiple-choice questions (lm-eval)",
    )  # fmt: skip
    p.add_argument(
        "--accuracy-sizes", nargs="+", choices=pv.SIZES, default=["small"],
        help="the sizes --accuracy scores (scoring a top-p run with 96 experts sizes its "
        "buffers for every expert a token may take: minutes of compile per run here)",
    )  # fmt: skip
    p.add_argument(
        "--reproduce", nargs=3, metavar=("VARIANT", "SIZE", "SEED"),
        help="retrain one finished run from its command alone and compare the logs",
    )  # fmt: skip
    p.add_argument("--reproduce-into", type=Path, default=Path("runs/reproduced"))
    p.add_argument("--runs-dir", type=Path, default=run_cache.RUNS_DIR / "paired")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--name", default="paired_seeds", help="stem of the result files")
    return p.parse_args(argv)


def variants_at(size: str, chosen: Sequence[str] | None) -> list[str]:
    """The variants run at ``size``, in training order (hetero after its profile's source)."""
    names = list(chosen or (pv.VARIANTS if size == "small" else pv.LARGE_VARIANTS))
    if "hetero" in names and pv.PROFILE_SOURCE not in names:
        names.insert(names.index("hetero"), pv.PROFILE_SOURCE)
    return names


def train_seed(args, size: str, seed: int) -> dict[str, run_cache.RunResult]:
    """Every variant of one seed at one size; "hetero" takes its k per layer from this seed's
    top-p model."""
    out = {}
    for name in variants_at(size, args.variants):
        k = None
        if name == "hetero":
            profile = out[pv.PROFILE_SOURCE].experts_per_layer
            k = pv.per_layer_k(profile, pv.EXPERTS[size])
        config = pv.lm_config(name, seed, size, args.scale, args.steps, per_layer_k=k)
        workdir = args.runs_dir / pv.run_name(name, seed, size, args.scale)
        out[name] = run_cache.run_or_load(config, workdir)
    return out


class HeldOut:
    """The held-out multiple-choice questions (``experiments.benchmarks``: sentences of the
    corpus's validation split, each against three others), built once and scored for every run
    with lm-eval's evaluator and the library's lm-eval model; kept in each run's workdir."""

    def __init__(self, workdir: Path, limit: int):
        from lm_eval.tasks import TaskManager, get_task_dict

        from dynmoe_jax.lm_eval import DynMoELM, task_files
        from experiments import benchmarks

        self.limit = limit
        paragraphs = benchmarks.held_out_paragraphs(DynMoELM(pretrained=str(workdir)), workdir)
        folder = Path("runs") / "benchmarks_tasks" / f"paired_{limit}"
        names = task_files.write(folder, task_files.build(paragraphs, n=limit, seed=0), "held_out")
        self.task = next(n for n in names if n.endswith("_mc"))
        self.tasks = get_task_dict([self.task], TaskManager(include_path=str(folder)))

    def __call__(self, workdir: Path) -> dict:
        path = workdir / ACCURACY_FILE
        saved = json.loads(path.read_text()) if path.exists() else {}
        if saved.get("limit") == self.limit:
            return saved["tasks"]
        from lm_eval.evaluator import evaluate

        from dynmoe_jax.lm_eval import DynMoELM, with_task_figures

        lm = DynMoELM(pretrained=str(workdir))
        results = evaluate(lm=lm, task_dict=self.tasks, limit=self.limit)
        results["config"] = lm.get_model_info()
        entry = with_task_figures(results)["results"][self.task]
        keys = ("experts_per_token", "experts_per_token_by_layer")
        rows = {self.task: {"metric": "acc", "value": entry["acc,none"],
                            **{key: entry[key] for key in keys}}}  # fmt: skip
        path.write_text(json.dumps({"limit": self.limit, "tasks": rows}))
        return rows


def reproduce(args, name: str, size: str, seed: int, into: Path) -> str:
    """Retrains one finished run of the set from its command line alone (a new process, in
    ``into``) and compares the two logs record by record, timings left out."""
    import shlex
    import subprocess

    workdir = args.runs_dir / pv.run_name(name, seed, size, args.scale)
    recorded = json.loads((workdir / "config.json").read_text())
    config = pv.lm_config(name, seed, size, args.scale, args.steps,
                          per_layer_k=tuple(recorded["config"]["moe"]["top_k"])
                          if name == "hetero" else None)  # fmt: skip
    command = paired_report.cli_command(config, into / workdir.name)
    print(command, flush=True)
    subprocess.run(shlex.split(command), check=True)
    logs = [_untimed(w / "metrics.jsonl") for w in (workdir, into / workdir.name)]
    same = logs[0] == logs[1]
    print(f"{'identical' if same else 'DIFFERENT'}: {len(logs[0])} records", flush=True)
    return "identical" if same else "different"


def _untimed(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in records]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.reproduce:
        name, size, seed = args.reproduce
        return {"reproduced": reproduce(args, name, size, int(seed), args.reproduce_into)}
    results: paired_report.Results = {}
    for seed in args.seeds:
        for size in args.sizes:
            for name, run in train_seed(args, size, seed).items():
                results.setdefault(size, {}).setdefault(name, []).append(run)
    accuracy = {}
    if args.accuracy:
        first = next(iter(next(iter(results.values())).values()))[0]
        score = HeldOut(args.runs_dir / first.name, args.accuracy)
        for size, by_variant in results.items():
            if size not in args.accuracy_sizes:
                continue
            for name, runs in by_variant.items():
                accuracy.setdefault(size, {})[name] = [
                    score(args.runs_dir / r.name) for r in runs]  # fmt: skip
    return paired_report.write(results, accuracy, args, MODULE)


if __name__ == "__main__":
    main()
