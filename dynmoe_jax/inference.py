"""Use a trained workdir: restore it, evaluate it, sample text from it and measure how each
token is routed.

``restore(config, workdir)`` gives the data, the task and the newest checkpoint's parameters
(or, with ``init_from`` and no checkpoint, the imported ones);
``token_statistics`` gives per-token loss, entropy and experts of any batches. The notebooks
and the experiments use these two. ``sample_workdir`` and ``sample_file`` generate text in the
decode layout (``generate.py``, whose ``generate`` and ``generate_full_window`` are
re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dynmoe_jax import data as data_lib
from dynmoe_jax import model as model_lib
from dynmoe_jax import train as train_lib
from dynmoe_jax.config import RunConfig, check_config
from dynmoe_jax.generate import (  # noqa: F401 (generate_full_window: re-exported)
    Generation,
    decode_graphdef,
    decode_layout,
    generate,
    generate_full_window,
    no_capacity_config,
)
from dynmoe_jax.sample_checks import check_max_new_tokens, check_temperature, read_prompt_file
from dynmoe_jax.train import checkpoint as ckpt_lib
from dynmoe_jax.train import run_record
from dynmoe_jax.train.task import imported_params, restore_params


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
        return inference_graphdef(self.task.config.model)


def restore(config: RunConfig, workdir: str | Path) -> Restored:
    """The newest checkpoint of ``workdir``, trained with ``config`` (a workdir's record,
    its routing and its corpus, is applied once, by ``run_record.config_for``; a config that
    reads another corpus is a one-line error). A workdir without checkpoints is a
    FileNotFoundError, and nothing is created in it, unless the config has ``init_from``:
    then the checkpoint's imported weights stand in (step 0)."""
    config = check_config(config)
    data = data_lib.from_config(config.data)
    dataset = data.config.dataset
    run_record.check_corpus(workdir, dataset)
    task = train_lib.build_task(config, data.vocab_size)
    try:
        step, params = _latest_params(task, workdir)
    except FileNotFoundError:
        if not config.data.init_from:
            raise
        params = imported_params(task)
        return Restored(data, dataset, task, 0, params, config.data.init_from)
    return Restored(data, dataset, task, step, params)


def _latest_params(task: train_lib.Task, workdir: str | Path) -> tuple[int, Any]:
    """(step, params) of the newest checkpoint, the parameters alone read (not the optimizer's
    moments); FileNotFoundError when there is none."""
    keep = task.config.train.keep_checkpoints
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=keep, create=False)
    try:
        restored = restore_params(task, checkpointer)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {checkpointer.directory}: train first")
    return restored


def inference_graphdef(model_cfg: model_lib.ModelConfig):
    """``model_cfg``'s graph without capacity limits, so the experts counted are the router's
    own choice, as at inference in the paper."""
    return nnx.graphdef(model_lib.abstract_decoder(no_capacity_config(model_cfg)))


def evaluate_workdir(config: RunConfig, workdir: str | Path) -> dict:
    """Validation loss, perplexity and experts per token per layer of the latest checkpoint."""
    run = restore(config, workdir)
    eval_step = train_lib.make_eval_step(run.task)
    with jax.set_mesh(run.task.mesh):
        result = train_lib.evaluate(
            eval_step, run.params, run.data.eval_batches(config.data.eval_batches)
        )
    unigram = run.data.unigram_cross_entropy(config.data.eval_batches)
    print(f"{run.source} on {run.dataset}: "
          f"{train_lib.describe_validation(result, unigram)}")  # fmt: skip
    if "experts_per_layer" in result:
        layers = ", ".join(f"{v:.2f}" for v in result["experts_per_layer"])
        print(f"experts per token by layer: {layers}")
    return {"step": run.step, **result}


@functools.partial(jax.jit, static_argnums=0)
def _token_arrays(graphdef, params, inputs_BT, targets_BT, valid_BT):
    logits_BTV, layer = nnx.merge(graphdef, params)(inputs_BT, valid_BT)
    loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
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
        arrays = _token_arrays(graphdef, params, batch["inputs"], batch["targets"],
                               batch.get("valid"))  # fmt: skip
        arrays = jax.device_get(arrays)
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


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A workdir's model in the decode layout, with its tokenizer and mesh."""

    tokenizer: Any
    graphdef: Any
    params: Any
    mesh: Any
    is_moe: bool
    context: int  # the trained context: a prompt's last ``context`` tokens are kept


def sampler(config: RunConfig, workdir: str | Path) -> Sampler:
    """The newest checkpoint of ``workdir`` (or its imported weights) ready to sample from; the
    trained layout is dropped once the decode layout is made."""
    run = restore(config, workdir)
    graphdef, params = decode_layout(run.task.config.model, run.params)
    return Sampler(run.data.tokenizer, graphdef, params, run.task.mesh,
                   run.task.config.model.moe is not None, config.data.seq_len)  # fmt: skip


def sample_batch(s: Sampler, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, ignore_eos: bool = False,
                 ) -> tuple[list[dict], Generation]:  # fmt: skip
    """One batch of prompts through ``generate``: per prompt a record of its text, new token
    ids, experts per new token and the batch's seconds (prefill and decode, compile excluded).
    ``ignore_eos``: no stop token, so every row gets exactly ``max_new_tokens`` (rates and
    experts per token then compare over equal lengths)."""
    ids = [s.tokenizer.encode(p) or [s.tokenizer.eos_id] for p in prompts]
    contexts = [p[-s.context :] for p in ids]
    with jax.set_mesh(s.mesh):
        gen = generate(s.graphdef, s.params, contexts, max_new_tokens, temperature=temperature,
                       seed=seed, stop_id=None if ignore_eos else s.tokenizer.eos_id)  # fmt: skip
    seconds = round(gen.prefill_seconds + gen.decode_seconds, 4)
    rows = zip(prompts, ids, contexts, gen.tokens, gen.experts, strict=True)
    records = [
        {"prompt": prompt, "text": continuation_text(s.tokenizer, p, new), "tokens": new,
         "experts_per_token": [round(e, 4) for e in experts], "seconds": seconds,
         "prompt_tokens": len(context)}
        for prompt, p, context, new, experts in rows
    ]  # fmt: skip
    return records, gen


def sample_workdir(
    config: RunConfig,
    workdir: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    ignore_eos: bool = False,
) -> dict:
    """Generates text after ``prompt`` (greedy when temperature is 0, else sampled with the
    random ``seed``) and reports the mean number of experts each generated token used, over the
    MoE layers, and the decode rate. Decoding runs in the decode layout (``generate.py``): no
    capacity limits, a key/value cache, the loop on device; the prompt's last ``seq_len``
    tokens are its context, as in training. ``ignore_eos``: generate exactly
    ``max_new_tokens``, past the end-of-text token."""
    check_temperature(temperature)
    check_max_new_tokens(max_new_tokens)
    s = sampler(config, workdir)
    (record,), gen = sample_batch(s, [prompt], max_new_tokens, temperature, seed,
                                  ignore_eos)  # fmt: skip
    print(f"{prompt}{record['text']}")
    experts = record["experts_per_token"]
    mean = float(np.mean(experts)) if experts else 0.0
    if not record["tokens"]:
        print("[0 tokens: the first token the model chose was the end-of-text token]")
    elif s.is_moe:
        print(f"[{len(record['tokens'])} tokens, {mean:.2f} experts per token on average]")
    if gen.tokens_per_s is not None:
        print(f"decode: {gen.tokens_per_s:.1f} tokens/s over {gen.decode_steps} cached steps "
              f"after a {record['prompt_tokens']}-token prefill")  # fmt: skip
    return {**record, "mean_experts": mean, "tokens_per_s": gen.tokens_per_s}


def sample_file(config: RunConfig, workdir: str | Path, path: str | Path, max_new_tokens: int,
                temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
                out: TextIO | None = None, ignore_eos: bool = False) -> list[dict]:  # fmt: skip
    """Samples every prompt of ``path`` (plain text, one per line, or JSON Lines of
    ``{"prompt": ...}``; blank lines skipped), ``batch_size`` at a time, and writes one JSON
    object per prompt to ``out`` (default: standard output). Everything else (the file's
    format, what loading the data and the model prints, each batch's decode rate) goes to
    standard error, so that ``out`` is JSON Lines alone."""
    check_temperature(temperature)
    check_max_new_tokens(max_new_tokens)
    prompts, kind = read_prompt_file(path)
    out = sys.stdout if out is None else out  # taken before stdout is redirected below
    print(f"prompts: {len(prompts)} from {path} ({kind})", file=sys.stderr)
    records = []
    with contextlib.redirect_stdout(sys.stderr):
        s = sampler(config, workdir)
        for i in range(0, len(prompts), batch_size):
            batch, gen = sample_batch(s, prompts[i : i + batch_size], max_new_tokens,
                                      temperature, seed + i, ignore_eos)  # fmt: skip
            for record in batch:
                out.write(json.dumps(record) + "\n")
            out.flush()
            rate = f"{gen.tokens_per_s:.1f} tokens/s" if gen.tokens_per_s else "no decode step"
            print(f"batch of {len(batch)}: {rate}", file=sys.stderr)
            records += batch
    return records
