"""The paper's protocol: a checkpoint's accuracy and experts per task as its routing varies.

    .venv/bin/python -m experiments.benchmarks --pretrained runs/default \\
        [--top_k 1,2] [--thresholds 0.2,0.4,0.6] [--tasks held_out|shipped|NAME,...]
        [--include_path DIR] [--limit 100] [--out experiments/results/benchmarks_default]

``--pretrained`` is a training workdir or a Hugging Face MoE folder, loaded once; every routing
setting (top-k at each ``--top_k``, top-p at each ``--thresholds``) reuses its weights
(``DynMoELM.with_routing``). Tasks:

* ``held_out`` (a workdir's default): the three kinds of ``dynmoe_jax.lm_eval.task_files``
  (multiple choice, last word, rolling perplexity) built from the validation split of the
  run's own corpus, decoded from its token stream, so the model is scored on text it never
  trained on, in its own domain (written to ``runs/benchmarks_tasks/``);
* ``shipped`` (a folder's default): the example tasks built from pydoc_data;
* or any lm-eval task names, with ``--include_path`` for local ones.

Per setting and task: the task's main metric, the mean experts per token and tokens per
second. Written: ``OUT.json`` (every figure), ``OUT.md`` (the table) and two plots,
``OUT_accuracy.png`` (accuracy against mean experts per token, one line per task) and
``OUT_experts.png`` (each task's experts per token at every setting, tasks sorted by the
accuracy of the first top-p setting).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from dynmoe_jax.lm_eval import DynMoELM, task_files, with_task_figures
from dynmoe_jax.lm_eval.figures import main_metric
from dynmoe_jax.lm_eval.source import Kind


def held_out_paragraphs(lm: DynMoELM, workdir: str) -> list[str]:
    """The run's validation split as text: its token stream cut at end-of-text, decoded."""
    from dynmoe_jax.inference import restore

    data = restore(lm.source.plan.run, workdir).data
    stream = np.asarray(data.validation_stream)
    cuts = np.flatnonzero(stream == lm.tok.eos_id)
    records = np.split(stream, cuts + 1)
    return [lm.tok.decode(r[r != lm.tok.eos_id].tolist()) for r in records if len(r) > 1]


def task_list(args, lm: DynMoELM, out: Path) -> tuple[list[str], list[str]]:
    """(task names, include paths)."""
    which = args.tasks or ("held_out" if lm.source.plan.kind is Kind.WORKDIR else "shipped")
    if which == "shipped":
        return [f"{task_files.SHIPPED_PREFIX}_{k}" for k in task_files.KINDS], [
            str(task_files.SHIPPED)]  # fmt: skip
    if which == "held_out":
        docs = task_files.build(held_out_paragraphs(lm, args.pretrained), n=args.limit, seed=0)
        folder = Path("runs") / "benchmarks_tasks" / out.name  # absolute paths: not for git
        return task_files.write(folder, docs, "held_out"), [str(folder)]
    return which.split(","), [args.include_path] if args.include_path else []


def settings(args) -> list[dict]:
    top_k = [{"router": "top_k", "top_k": int(k)} for k in args.top_k.split(",") if k]
    top_p = [{"router": "top_p", "threshold": float(p)} for p in args.thresholds.split(",") if p]
    return top_k + top_p


def label(setting: dict) -> str:
    return f"top-{setting['top_k']}" if setting["router"] == "top_k" else \
        f"top-p {setting['threshold']}"  # fmt: skip


def evaluate(lm: DynMoELM, tasks: list[str], include: list[str], limit: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include or None)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit)
    with_task_figures(results)
    rows = {}
    for task in tasks:
        entry = results["results"][task]
        metric, value = main_metric(entry) or ("-", float("nan"))
        rows[task] = {"metric": metric, "value": value,
                      "experts_per_token": entry.get("experts_per_token"),
                      "experts_per_token_by_layer": entry.get("experts_per_token_by_layer"),
                      "tokens_per_second": entry.get("tokens_per_second")}  # fmt: skip
    return rows


def write_table(runs: list[dict], path: Path) -> str:
    lines = ["| routing | task | metric | value | experts/token | tokens/s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        for task, r in run["tasks"].items():
            cells = (run["label"], task, r["metric"], f"{r['value']:.4f}",
                     f"{r['experts_per_token']:.3f}", f"{r['tokens_per_second']:.1f}")  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plots(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(runs[0]["tasks"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in tasks:
        ks = [r["tasks"][task]["experts_per_token"] for r in runs]
        values = [r["tasks"][task]["value"] for r in runs]
        order = np.argsort(ks)
        ax.plot(np.asarray(ks)[order], np.asarray(values)[order], "o-", label=task)
    ax.set_xlabel("mean experts per token")
    ax.set_ylabel("task metric")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}_accuracy.png", dpi=120)
    reference = next((r for r in runs if r["setting"]["router"] == "top_p"), runs[0])
    ranked = sorted(tasks, key=lambda t: reference["tasks"][t]["value"])
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        ys = [run["tasks"][t]["experts_per_token"] for t in ranked]
        ax.bar(np.arange(len(ranked)) + i * width, ys, width, label=run["label"])
    ax.set_xticks(np.arange(len(ranked)) + 0.4 - width / 2, ranked, rotation=20, fontsize=7)
    ax.set_ylabel("mean experts per token")
    ax.set_title(f"tasks by the metric of {reference['label']} (ascending)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}_experts.png", dpi=120)
    plt.close("all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--top_k", default="1,2")
    parser.add_argument("--thresholds", default="0.2,0.4,0.6")
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--include_path", default=None)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max_length", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/benchmarks"))
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    extra = {"max_length": args.max_length} if args.max_length else {}
    base = DynMoELM(pretrained=args.pretrained, **extra)
    tasks, include = task_list(args, base, args.out)
    runs = []
    for setting in settings(args):
        rows = evaluate(base.with_routing(**setting), tasks, include, args.limit)
        runs.append({"setting": setting, "label": label(setting), "tasks": rows,
                     "load_1min": os.getloadavg()[0]})  # fmt: skip
        print(f"{label(setting)}: " + ", ".join(
            f"{t} {r['value']:.4f} at {r['experts_per_token']:.2f} experts" for t, r in
            rows.items()), flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(
        {"pretrained": args.pretrained, "tasks": tasks, "limit": args.limit, "runs": runs},
        indent=2) + "\n")  # fmt: skip
    print(write_table(runs, Path(f"{args.out}.md")))
    plots(runs, args.out)


if __name__ == "__main__":
    main()
