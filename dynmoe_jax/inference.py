"""Use a trained workdir: restore it, evaluate it, sample text from it and measure how each
token is routed.

``restore(config, workdir)`` gives the data, the task and the newest checkpoint's parameters
(or, with ``init_from`` and no checkpoint, the imported ones);
``token_statistics`` gives per-token loss, entropy and experts of any batches. The notebooks
and the experiments use these two. ``generate`` decodes from a key/value cache (the prompt
run once, then one compiled step per token); ``generate_full_window``, the former method,
is its reference.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dynmoe_jax import checkpoint as ckpt_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import init_from as init_from_lib
from dynmoe_jax import model as model_lib
from dynmoe_jax import train as train_lib
from dynmoe_jax.config import with_recorded_corpus
from dynmoe_jax.sample_checks import check_max_new_tokens, check_temperature


@dataclasses.dataclass(frozen=True)
class Restored:
    """A trained workdir's newest checkpoint with what is needed to run it."""

    data: Any  # the corpus it was trained on (tokenizer, validation batches)
    dataset: str  # the corpus's name
    task: train_lib.Task
    step: int
    params: Any
    imported_from: str = ""  # the folder of imported weights ('' = the workdir's checkpoint)

    @property
    def source(self) -> str:
        """Where the parameters come from, for the printed lines."""
        if self.imported_from:
            return f"imported weights of {self.imported_from}"
        return f"checkpoint step {self.step}"

    def inference_graphdef(self):
        """The model's graph with no capacity limit: every selected expert computes."""
        return inference_graphdef(self.task.model_cfg)


def restore(config: ConfigDict, workdir: str | Path) -> Restored:
    """The newest checkpoint of ``workdir``, trained with ``config``. A workdir without
    checkpoints is a FileNotFoundError, and nothing is created in it, unless the config has
    ``init_from``: then the checkpoint's imported weights stand in (step 0)."""
    init_from_lib.check_config(config)
    data = data_lib.from_config(with_recorded_corpus(config, workdir))
    dataset = data.config.dataset
    task = train_lib.build_task(config, data.vocab_size)
    try:
        step, params = _latest_params(task, workdir)
    except FileNotFoundError:
        if not init_from_lib.path_of(config):
            raise
        params = init_from_lib.load_params(task)
        return Restored(data, dataset, task, 0, params, init_from_lib.path_of(config))
    return Restored(data, dataset, task, step, params)


def _latest_params(task: train_lib.Task, workdir: str | Path) -> tuple[int, Any]:
    """(step, params) of the newest checkpoint; FileNotFoundError when there is none."""
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=task.config.keep_checkpoints, create=False)
    try:
        restored = train_lib.restore_state(task, checkpointer)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {checkpointer.directory}: train first")
    step, state = restored
    return step, state.params


def inference_graphdef(model_cfg: model_lib.ModelConfig):
    """``model_cfg``'s graph without capacity limits, so the experts counted are the router's
    own choice, as at inference in the paper."""
    if model_cfg.moe is not None:
        no_drops = dataclasses.replace(model_cfg.moe, capacity_factor=None, group_size=None)
        model_cfg = dataclasses.replace(model_cfg, moe=no_drops)
    return nnx.graphdef(model_lib.abstract_decoder(model_cfg))


def evaluate_workdir(config: ConfigDict, workdir: str | Path) -> dict:
    """Validation loss, perplexity and experts per token per layer of the latest checkpoint."""
    run = restore(config, workdir)
    eval_step = train_lib.make_eval_step(run.task)
    with jax.set_mesh(run.task.mesh):
        result = train_lib.evaluate(
            eval_step, run.params, run.data.eval_batches(config.eval_batches)
        )
    unigram = run.data.unigram_cross_entropy(config.eval_batches)
    print(f"{run.source} on {run.dataset}: "
          f"{train_lib.describe_validation(result, unigram)}")  # fmt: skip
    if "experts_per_layer" in result:
        layers = ", ".join(f"{v:.2f}" for v in result["experts_per_layer"])
        print(f"experts per token by layer: {layers}")
    return {"step": run.step, **result}


@functools.partial(jax.jit, static_argnums=0)
def _token_arrays(graphdef, params, inputs_BT, targets_BT):
    logits_BTV, layer = nnx.merge(graphdef, params)(inputs_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    loss_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    experts_LBT = layer["token_experts"] if layer else jnp.zeros((0, *inputs_BT.shape), jnp.int32)
    return loss_BT, entropy_BT, correct_BT, experts_LBT


def token_statistics(graphdef, params, batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Per-token statistics of the model ``graphdef`` with ``params`` on ``batches`` (dicts of
    inputs, targets and weights [B, T]), as flat arrays over the positions with weight > 0, in
    batch, row and position order:

    * ``loss``: nats of the target; ``entropy``: nats of the predictive distribution;
      ``correct``: whether the most likely token is the target;
    * ``surprisal``: the loss of the input token itself, as predicted one position earlier
      (NaN at position 0);
    * ``inputs``: the input token ids; ``row``: the row across all batches (0, 1, ...);
    * ``experts`` [L_moe, M]: experts the router selected at that position in each MoE layer,
      before any capacity drop.
    """
    parts: dict[str, list] = {k: [] for k in STATISTICS}
    rows_seen = 0
    for batch in batches:
        arrays = jax.device_get(_token_arrays(graphdef, params, batch["inputs"], batch["targets"]))
        loss_BT, entropy_BT, correct_BT, experts_LBT = arrays
        keep_BT = np.asarray(batch["weights"]) > 0
        # The input at position t was the target at position t - 1.
        surprisal_BT = np.concatenate([np.full((len(loss_BT), 1), np.nan), loss_BT[:, :-1]], 1)
        rows_BT = np.broadcast_to(rows_seen + np.arange(len(loss_BT))[:, None], keep_BT.shape)
        rows_seen += len(loss_BT)
        values = {"loss": loss_BT, "entropy": entropy_BT, "correct": correct_BT,
                  "surprisal": surprisal_BT, "inputs": np.asarray(batch["inputs"]),
                  "row": rows_BT}  # fmt: skip
        for name, value in values.items():
            parts[name].append(value[keep_BT])
        parts["experts"].append(experts_LBT[:, keep_BT])
    if not rows_seen:
        raise ValueError("token_statistics needs at least one batch")
    return {k: np.concatenate(v, axis=-1) for k, v in parts.items()}


STATISTICS = ("loss", "entropy", "correct", "surprisal", "inputs", "row", "experts")


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text ``new_ids`` add after the prompt. Decoding them alone would drop the space a
    SentencePiece piece carries in front ('▁unto' -> 'unto'), so the prompt and the
    continuation are decoded together and the decoded prompt is cut off."""
    prompt = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids)
    if full.startswith(prompt):
        return full[len(prompt) :]
    return tokenizer.decode(new_ids)  # a tokenizer whose decoding does not extend: no join


def sample_workdir(
    config: ConfigDict,
    workdir: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """Generates text after ``prompt`` (greedy when temperature is 0, else sampled with the
    random ``seed``) and reports the mean number of experts each generated token used, over the
    MoE layers, and the decode rate. Decoding runs without capacity limits
    (``inference_graphdef``) from a key/value cache (``generate``); the prompt's last
    ``seq_len`` tokens are its context, as in training."""
    check_temperature(temperature)
    check_max_new_tokens(max_new_tokens)
    run = restore(config, workdir)
    tokenizer = run.data.tokenizer
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    context = prompt_ids[-config.seq_len :]
    gen = generate(
        run.inference_graphdef(), run.params, context, max_new_tokens,
        temperature=temperature, seed=seed, stop_id=tokenizer.eos_id,
    )  # fmt: skip
    text = continuation_text(tokenizer, prompt_ids, gen.tokens)
    mean = float(np.mean(gen.experts)) if gen.experts else 0.0
    print(f"{prompt}{text}")
    if run.task.model_cfg.moe is not None:
        print(f"[{len(gen.tokens)} tokens, {mean:.2f} experts per token on average]")
    if gen.tokens_per_s is not None:
        print(f"decode: {gen.tokens_per_s:.1f} tokens/s over {gen.decode_steps} cached steps "
              f"after a {len(context)}-token prefill")  # fmt: skip
    return {"text": text, "tokens": gen.tokens, "experts_per_token": gen.experts,
            "mean_experts": mean, "tokens_per_s": gen.tokens_per_s}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Generation:
    """What ``generate`` produced."""

    tokens: list[int]  # the new tokens (the stop token excluded)
    experts: list[float]  # per new token: experts of the position that chose it, mean over MoE
    logits: list[np.ndarray]  # per new token: the float32 logits it was chosen from, if kept
    decode_steps: int  # cached one-token steps run after the prefill
    tokens_per_s: float | None  # their rate, compile excluded (None when there were none)


def generate(
    graphdef,
    params,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    stop_id: int | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after ``prompt_ids``: the prompt is run once (prefill)
    into a key/value cache of len(prompt) + max_new_tokens positions, then each new token is
    one compiled step of static shapes that writes its keys and values at its position.
    Greedy when ``temperature`` is 0, else sampled with ``seed``; stops before ``stop_id``."""
    cache = nnx.merge(graphdef, params).init_cache(1, len(prompt_ids) + max_new_tokens)
    temp, key = jnp.float32(temperature), jax.random.key(seed)
    key, sub = jax.random.split(key)
    out = _decode(graphdef, params, cache, jnp.asarray([prompt_ids], jnp.int32), 0, sub, temp)
    step = None
    if max_new_tokens > 1:
        one_11 = jnp.zeros((1, 1), jnp.int32)
        step = _decode.lower(graphdef, params, out[3], one_11, 0, sub, temp).compile()
    tokens, experts, logits = [], [], []
    position, began = len(prompt_ids), None
    for i in range(max_new_tokens):
        token, used, logits_V, cache = out
        token = int(token)
        if token == stop_id:
            break
        tokens.append(token)
        experts.append(float(used))
        if keep_logits:
            logits.append(np.asarray(logits_V))
        if i == max_new_tokens - 1:
            break
        began = time.perf_counter() if began is None else began
        key, sub = jax.random.split(key)
        out = step(params, cache, jnp.full((1, 1), token, jnp.int32), position, sub, temp)
        position += 1
    steps = position - len(prompt_ids)
    rate = steps / (time.perf_counter() - began) if steps else None
    return Generation(tokens, experts, logits, steps, rate)


def generate_full_window(
    graphdef, params, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[np.ndarray], float | None]:
    """The reference for ``generate``: greedy tokens, each computed by running the whole
    window of len(prompt) + max_new_tokens positions again (no cache), with their logits and
    the rate of the calls after the first (which compiles)."""
    window = len(prompt_ids) + max_new_tokens
    tokens, logits = list(prompt_ids), []
    began = None
    for _ in range(max_new_tokens):
        padded_1U = np.zeros((1, window), np.int32)
        padded_1U[0, : len(tokens)] = tokens
        logits.append(np.asarray(_logits_at(graphdef, params, padded_1U, len(tokens) - 1)))
        tokens.append(int(np.argmax(logits[-1])))
        began = time.perf_counter() if began is None else began
    calls = max_new_tokens - 1
    rate = calls / (time.perf_counter() - began) if calls else None
    return tokens[len(prompt_ids) :], logits, rate


@functools.partial(jax.jit, static_argnums=0)
def _logits_at(graphdef, params, tokens_1U, position):
    # The model is causal: the padding after `position` does not change its logits.
    logits_1UV, _ = nnx.merge(graphdef, params)(tokens_1U)
    return logits_1UV[0, position]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(graphdef, params, cache, tokens_1T, start, key, temperature):
    """The next token after ``tokens_1T`` (at positions start..) and the cache they extend:
    (token, mean experts of the last position over MoE layers, its logits, cache)."""
    logits_1TV, experts_L1T, cache = nnx.merge(graphdef, params).decode(tokens_1T, cache, start)
    last_V = logits_1TV[0, -1]
    greedy = jnp.argmax(last_V)
    sampled = jax.random.categorical(key, last_V / jnp.maximum(temperature, 1e-6))
    used = jnp.mean(experts_L1T[:, 0, -1].astype(jnp.float32)) if experts_L1T.shape[0] else 0.0
    return jnp.where(temperature > 0, sampled, greedy), used, last_V, cache
