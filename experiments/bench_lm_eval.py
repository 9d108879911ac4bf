"""Speed of the lm-eval model (``dynmoe_jax.lm_eval``) on a trained workdir.

    .venv/bin/python -m experiments.bench_lm_eval --workdir runs/default [--batches 8]
        [--repeats 3] [--limit 40] [--json experiments/results/bench_lm_eval.json]

1. **Scoring against eval mode, on the same tokens.** The run's first ``--batches`` validation
   batches go through ``--mode=eval``'s step (``train.make_eval_step``: the trained layout,
   its capacity) and, as log-likelihood requests (each window's first token the context, its
   other tokens the continuation), through the lm-eval model's scorer (the decode layout, rows
   sorted and padded to buckets, 8 rows a call: the model's default). One warm-up round
   compiles both; then ``--repeats`` rounds time them in alternation (wall clock, host work
   included), so load drift hits both alike. Printed: seconds per 1,000 tokens of each, their
   ratio, and the difference between the windows' summed log-likelihood and eval mode's.
2. **The example tasks** (multiple choice, generation, rolling perplexity; ``--limit`` documents
   each) through ``lm_eval.simple_evaluate``: per task its metric, experts per token and tokens
   per second, and the programs the scorer compiled.

The 1-minute load average is printed beside the figures; experiments/RESULTS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from dynmoe_jax import train as train_lib
from dynmoe_jax.inference import restore
from dynmoe_jax.lm_eval import DynMoELM, table, with_task_figures
from dynmoe_jax.lm_eval.task_files import SHIPPED

TASKS = ("dynmoe_pydoc_mc", "dynmoe_pydoc_gen", "dynmoe_pydoc_ppl")


def _requests(batches: list[dict]) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Each row's window as (first token, the rest with weight), and the tokens scored."""
    pairs, tokens = [], 0
    for batch in batches:
        for inputs, targets, weights in zip(batch["inputs"], batch["targets"],
                                            batch["weights"], strict=True):  # fmt: skip
            n = int(np.sum(np.asarray(weights) > 0))
            if n:
                pairs.append(([int(inputs[0])], np.asarray(targets[:n]).tolist()))
                tokens += n
    return pairs, tokens


def scoring_against_eval(lm: DynMoELM, workdir: str, num_batches: int, repeats: int) -> dict:
    restored = restore(lm.source.plan.run, workdir)
    batches = list(restored.data.eval_batches(num_batches))
    eval_step = train_lib.make_eval_step(restored.task)
    pairs, tokens = _requests(batches)

    def run_eval() -> float:
        with jax.set_mesh(restored.task.mesh):
            result = train_lib.evaluate(eval_step, restored.params, batches)
        return -result["loss"] * result["tokens"]

    def run_scoring() -> list[float]:
        scores, _ = lm.scorer.score(pairs)
        return [s.logprob for s in scores]

    eval_total, logprobs = run_eval(), run_scoring()  # compile and warm up
    times: dict[str, list[float]] = {"eval": [], "scoring": []}
    for _ in range(repeats):
        for name, fn in (("eval", run_eval), ("scoring", run_scoring)):
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    medians = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "tokens": tokens, "windows": len(pairs), "batch_size": lm.batch_size,
        "eval_ms_per_1k_tokens": 1e6 * medians["eval"] / tokens,
        "scoring_ms_per_1k_tokens": 1e6 * medians["scoring"] / tokens,
        "scoring_over_eval": medians["scoring"] / medians["eval"],
        "loglikelihood_total_difference": abs(float(np.sum(logprobs)) - eval_total),
        "scoring_programs": lm.scorer.programs, "load_1min": os.getloadavg()[0],
    }  # fmt: skip


def example_tasks(lm: DynMoELM, limit: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(SHIPPED), include_defaults=False)
    before = lm.scorer.programs
    results = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager,
                                      limit=limit)  # fmt: skip
    with_task_figures(results)
    print(table(results))
    info = results["config"]["dynmoe_jax"]
    return {"tasks": info["tasks"], "new_scoring_programs": lm.scorer.programs - before,
            "generation_programs": info["generation_programs"],
            "metrics": {t: {k: v for k, v in results["results"][t].items()
                            if "," in k and isinstance(v, float)} for t in TASKS},
            "load_1min": os.getloadavg()[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm = DynMoELM(pretrained=args.workdir)
    out = {"workdir": args.workdir,
           "scoring_against_eval": scoring_against_eval(lm, args.workdir, args.batches,
                                                        args.repeats)}  # fmt: skip
    s = out["scoring_against_eval"]
    print(f"eval mode {s['eval_ms_per_1k_tokens']:.1f} ms / 1k tokens, scoring "
          f"{s['scoring_ms_per_1k_tokens']:.1f} ms / 1k tokens: ratio "
          f"{s['scoring_over_eval']:.2f} over {s['tokens']} tokens ({s['windows']} windows); "
          f"log-likelihood difference {s['loglikelihood_total_difference']:.2e}; "
          f"load {s['load_1min']:.1f}")  # fmt: skip
    out["example_tasks"] = example_tasks(lm, args.limit)
    print(json.dumps({k: v for k, v in out["example_tasks"].items() if k != "tasks"}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
