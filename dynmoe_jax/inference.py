"""Evaluate a trained workdir and sample text from it, reporting how tokens are routed."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dynmoe_jax import checkpoint as ckpt_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import train as train_lib
from dynmoe_jax.config import check_config, with_recorded_corpus


def _restore(config: ConfigDict, workdir: str | Path):
    check_config(config)
    data = data_lib.from_config(with_recorded_corpus(config, workdir))
    dataset = data.config.dataset
    task = train_lib.build_task(config, data.vocab_size)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    restored = checkpointer.restore_latest(train_lib.abstract_state(task))
    checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {Path(workdir) / 'checkpoints'}: train first")
    step, state = restored
    return data, dataset, task, step, state["params"]


def evaluate_workdir(config: ConfigDict, workdir: str | Path) -> dict:
    """Validation loss, perplexity and experts per token per layer of the latest checkpoint."""
    data, dataset, task, step, params = _restore(config, workdir)
    eval_step = train_lib.make_eval_step(task)
    result = train_lib.evaluate(eval_step, params, data.eval_batches(config.eval_batches))
    unigram = data.unigram_cross_entropy(config.eval_batches)
    print(f"checkpoint step {step} on {dataset}: validation loss {result['loss']:.4f}, "
          f"perplexity {result['perplexity']:.2f} (unigram {math.exp(unigram):.2f})")  # fmt: skip
    if "experts_per_layer" in result:
        layers = ", ".join(f"{v:.2f}" for v in result["experts_per_layer"])
        print(f"experts per token by layer: {layers} (mean {result['experts_per_token']:.2f})")
    return {"step": step, **result}


def sample_workdir(
    config: ConfigDict,
    workdir: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """Generates text after ``prompt`` (greedy when temperature is 0) and reports the mean
    number of experts each generated token used, over the MoE layers.

    Decoding runs without capacity limits (every selected expert computes), so the count is
    the router's own choice, as at inference in the paper.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: allowed >= 0 (0 = greedy)")
    data, _, task, _, params = _restore(config, workdir)
    model_cfg = task.model_cfg
    if model_cfg.moe is not None:
        no_drops = dataclasses.replace(model_cfg.moe, capacity_factor=None, group_size=None)
        model_cfg = dataclasses.replace(model_cfg, moe=no_drops)
    graphdef = nnx.graphdef(train_lib.abstract_decoder(model_cfg))
    window = config.seq_len

    @jax.jit
    def next_token(params, tokens_1T, length, key):
        # A fixed window keeps one compiled shape; the model is causal, so positions after
        # `length` do not change the logits at `length - 1`.
        logits, layer = nnx.merge(graphdef, params)(tokens_1T)
        last = logits[0, length - 1]
        greedy = jnp.argmax(last)
        sampled = jax.random.categorical(key, last / jnp.maximum(temperature, 1e-6))
        experts = layer["token_experts"][:, 0, length - 1] if layer else jnp.zeros((1,))
        return jnp.where(temperature > 0, sampled, greedy), jnp.mean(experts.astype(jnp.float32))

    tokens = data.tokenizer.encode(prompt) or [data.tokenizer.eos_id]
    generated, experts = [], []
    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        context = tokens[-window:]
        padded = np.zeros((1, window), np.int32)
        padded[0, : len(context)] = context
        key, sub = jax.random.split(key)
        tok, used = next_token(params, padded, len(context), sub)
        tok = int(tok)
        if tok == data.tokenizer.eos_id:
            break
        tokens.append(tok)
        generated.append(tok)
        experts.append(float(used))
    text = data.tokenizer.decode(generated)
    mean = float(np.mean(experts)) if experts else 0.0
    print(f"{prompt}{text}")
    if model_cfg.moe is not None:
        print(f"[{len(generated)} tokens, {mean:.2f} experts per token on average]")
    return {"text": text, "tokens": generated, "experts_per_token": experts, "mean_experts": mean}
