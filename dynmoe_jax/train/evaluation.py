"""Validation: token-weighted loss, perplexity and experts per token over batches."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from dynmoe_jax.train.batches import Batch
from dynmoe_jax.validation import counted


def evaluate(eval_step, params, batches: Iterable[Batch]) -> dict:
    """Token-weighted validation loss, perplexity and experts per token per layer, with the
    number of batches and weighted tokens they cover."""
    total: dict[str, Any] = {}
    num_batches = 0
    for batch in batches:
        out = jax.device_get(eval_step(params, batch))
        total = {k: total.get(k, 0) + np.asarray(v, np.float64) for k, v in out.items()}
        num_batches += 1
    if not total:
        raise ValueError("the validation split produced no batch")
    tokens = float(total.pop("tokens"))
    result = {"loss": float(total.pop("nll")) / tokens}
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    result.update({k: v / tokens for k, v in total.items()})
    if "experts_per_layer" in result:
        result["experts_per_token"] = float(np.mean(result["experts_per_layer"]))
    result["tokens"] = tokens
    result["batches"] = num_batches
    return result


def describe_validation(result: dict, unigram_cross_entropy: float | None = None) -> str:
    """One labelled line: the split, how much of it was read, and the numbers."""
    batches = counted(result["batches"], "batch", "batches")
    line = (f"validation split, {batches} ({result['tokens']:,.0f} tokens): "
            f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")  # fmt: skip
    if unigram_cross_entropy is not None:
        line += f" (unigram baseline on these tokens: {math.exp(unigram_cross_entropy):.2f})"
    if "experts_per_token" in result:
        line += f", experts per token {result['experts_per_token']:.2f}"
    return line
