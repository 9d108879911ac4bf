"""The experts each task gets, and its speed: what the model counted per task, moved into
lm-eval's results and printed as one table.

Per task, over the tokens the model scored (loglikelihood, rolling windows) or generated:

* ``experts_per_token``: the mean number of experts a token used, over the MoE layers;
* ``experts_per_token_by_layer``: the same mean for each MoE layer;
* ``tokens_per_second``: positions the model ran (contexts, continuations and generated
  tokens; padding excluded) per second of its calls, compilation excluded;
* ``scored_tokens``: how many tokens the means are over.

The model reports them in ``results["config"]["dynmoe_jax"]["tasks"]`` (lm-eval asks every
model for its info after a run); ``with_task_figures`` copies them into each task's entry of
``results["results"]``, beside its metrics, which is where the command line's results JSON
carries them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

KEY = "dynmoe_jax"  # the model's section of results["config"]
# The metric shown for a task, the first of these it reports.
MAIN_METRICS = ("acc", "acc_norm", "exact_match", "word_perplexity", "bits_per_byte")


@dataclasses.dataclass
class TaskCounter:
    """What one task's requests cost, accumulated over the model's calls."""

    experts_L: np.ndarray | None = None  # experts summed over the counted tokens, per layer
    counted: int = 0  # tokens whose experts are summed
    tokens: int = 0  # positions the model ran
    seconds: float = 0.0

    def add(self, experts_L: np.ndarray, counted: int, tokens: int, seconds: float) -> None:
        experts_L = np.asarray(experts_L, np.float64)
        self.experts_L = experts_L if self.experts_L is None else self.experts_L + experts_L
        self.counted += counted
        self.tokens += tokens
        self.seconds += seconds

    def figures(self) -> dict[str, float | int | list[float]]:
        by_layer = (self.experts_L / max(self.counted, 1)).tolist() if self.counted else []
        return {
            "experts_per_token": float(np.mean(by_layer)) if by_layer else 0.0,
            "experts_per_token_by_layer": [round(v, 4) for v in by_layer],
            "tokens_per_second": self.tokens / self.seconds if self.seconds else 0.0,
            "scored_tokens": self.counted,
        }


def with_task_figures(results: dict) -> dict:
    """``results`` (lm-eval's) with each task's figures in its entry of ``results``."""
    tasks = results.get("config", {}).get(KEY, {}).get("tasks", {})
    for task, figures in tasks.items():
        if task in results.get("results", {}):
            results["results"][task].update(figures)
    return results


def main_metric(entry: Mapping) -> tuple[str, float] | None:
    """(name, value) of the metric a task is judged by (``MAIN_METRICS`` first)."""
    metrics = {k.partition(",")[0]: v for k, v in entry.items()
               if "," in k and isinstance(v, (int, float)) and "_stderr" not in k}  # fmt: skip
    for name in MAIN_METRICS:
        if name in metrics:
            return name, float(metrics[name])
    return next(iter(metrics.items()), None)


def table(results: dict) -> str:
    """Markdown: per task, its main metric, experts per token and tokens per second."""
    tasks = results.get("config", {}).get(KEY, {}).get("tasks", {})
    lines = ["| task | metric | value | experts/token | tokens/s |", "|---|---|---|---|---|"]
    for task, figures in tasks.items():
        metric = main_metric(results.get("results", {}).get(task, {}))
        name, value = metric if metric else ("-", float("nan"))
        lines.append(f"| {task} | {name} | {value:.4f} | {figures['experts_per_token']:.3f} | "
                     f"{figures['tokens_per_second']:.1f} |")  # fmt: skip
    return "\n".join(lines)
