"""The lm-eval model ``dynmoe_jax``: a training workdir or an imported Hugging Face MoE folder,
scored and decoded on device through the project's own forward pass, cache and decode path.

    lm_eval.simple_evaluate(model="dynmoe_jax", model_args="pretrained=runs/default", ...)

Model arguments: ``pretrained`` (required), the routing (``source.ROUTING_ARGS``: router,
threshold, top_k, max_k, renormalize, dispatch, decode_tokens), ``dtype``, ``batch_size``,
``max_length`` (the window; default the run's seq_len, or the checkpoint's context up to 2048),
``max_gen_toks`` (default 256) and ``seed`` (sampled generation).

Tokenisation follows lm-eval's ``hf`` backend: no special tokens are added to text, an empty
context is the end-of-text token, trailing spaces of a context move to the continuation and
the continuation's tokens are those of context + continuation past the context's. A generated
continuation is its new tokens decoded together (so byte-level pieces that are not UTF-8 alone
decode as one text), cut at the first ``until`` string.

Requests are served task by task, so that each task's experts per token and tokens per second
(``figures.py``) count its own tokens only.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dynmoe_jax.generate import generate
from dynmoe_jax.lm_eval import figures, scoring, source
from dynmoe_jax.validation import check

NAME = "dynmoe_jax"
DEFAULT_BATCH = 8


def _batch_size(value: Any) -> int:
    """lm-eval's batch size: an integer, or 'auto' (here: ``DEFAULT_BATCH``)."""
    if isinstance(value, str) and value.startswith("auto"):
        return DEFAULT_BATCH
    if isinstance(value, str) and value.isdigit():  # lm-eval's --batch_size is text
        value = int(value)
    check(isinstance(value, int) and value >= 1, "batch_size", value, "an integer >= 1 | auto")
    return value


def check_args(pretrained: str, dtype: Any, max_length: Any, max_gen_toks: Any, seed: Any,
               routing: dict[str, Any]) -> source.Plan:  # fmt: skip
    """Every model argument checked, no weight read: one line naming the first bad one."""
    check(isinstance(max_gen_toks, int) and max_gen_toks >= 1, "max_gen_toks", max_gen_toks,
          "an integer >= 1")  # fmt: skip
    check(isinstance(seed, int), "seed", seed, "an integer")
    return source.check_plan(
        pretrained, routing, source.none_from_text(dtype), source.none_from_text(max_length)
    )


@register_model(NAME)
class DynMoELM(TemplateLM):
    """lm-eval's model interface over a dynmoe_jax model (the module docstring)."""

    def __init__(self, pretrained: str = "", batch_size: int | str = DEFAULT_BATCH,
                 max_batch_size: int | None = None, device: str | None = None,
                 dtype: str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, seed: int = 0, **routing: Any):  # fmt: skip
        super().__init__()
        del max_batch_size, device  # JAX places the model on its default devices
        self._batch = _batch_size(batch_size)
        plan = check_args(pretrained, dtype, max_length, max_gen_toks, seed, routing)
        self._serve(source.load(plan), max_gen_toks, seed)

    def _serve(self, src: source.Source, max_gen_toks: int, seed: int) -> None:
        self.source, self.tok = src, src.tokenizer
        self.max_gen_toks, self.seed = max_gen_toks, seed
        self.scorer = scoring.Scorer(src.graphdef, src.params, max_length=src.plan.max_length,
                                     batch_size=self._batch)  # fmt: skip
        self.generation_shapes: set[tuple[int, int, int]] = set()  # (rows, prompt, new)
        self.counters: dict[str, figures.TaskCounter] = collections.defaultdict(figures.TaskCounter)

    def with_routing(self, **routing: Any) -> DynMoELM:
        """The same weights routed otherwise (``source.reroute``: no reload), with counters of
        its own: what a sweep over thresholds evaluates."""
        other = DynMoELM.__new__(DynMoELM)
        TemplateLM.__init__(other)
        other._batch = self._batch
        other._serve(source.reroute(self.source, routing), self.max_gen_toks, self.seed)
        return other

    # ------------------------------------------------------------------ lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def batch_size(self) -> int:
        return self._batch

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        return self.tok.encode(string, special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        scores = self._score(pairs, [r.task_name for r in requests])
        return [(s.logprob, s.greedy) for s in scores]

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        scores = self._score([(c, x) for _, c, x in requests], [None] * len(requests))
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners, tasks = [], [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            rolling = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                self.max_length, 1)  # fmt: skip
            for window in map(make_disjoint_window, rolling):
                windows.append(window)
                owners.append(i)
                tasks.append(request.task_name)
        totals = np.zeros(len(requests))
        for owner, score in zip(owners, self._score(windows, tasks), strict=True):
            totals[owner] += score.logprob
        return totals.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups = collections.defaultdict(list)
        for i, request in enumerate(requests):
            context, kwargs = request.args
            groups[(request.task_name, _settings(kwargs, self.max_gen_toks))].append(i)
        for (task, settings), members in groups.items():
            for start in range(0, len(members), self._batch):
                chosen = members[start : start + self._batch]
                texts = self._generate([requests[i].args[0] for i in chosen], settings, task)
                for i, text in zip(chosen, texts, strict=True):
                    out[i] = text
        return out

    def get_model_info(self) -> dict:
        """What lm-eval records in ``results["config"]``: the source, its routing, the
        programs compiled for scoring (one per bucket) and for generation (one per batch
        shape), and each task's figures (``figures.py``)."""
        tasks = {t: c.figures() for t, c in self.counters.items() if t is not None}
        return {figures.KEY: {
            "source": self.source.description, "routing": self.source.plan.routing,
            "max_length": self.max_length, "batch_size": self._batch,
            "scoring_programs": self.scorer.programs,
            "generation_programs": len(self.generation_shapes),
            "compile_seconds": round(self.scorer.compile_seconds, 2), "tasks": tasks,
        }}  # fmt: skip

    # ------------------------------------------------------------------ the work

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's tokenisation of a request (the module docstring)."""
        if context:
            return self._encode_pair(context, continuation)
        tokens = self.tok_encode(continuation)
        if tokens and tokens[0] == self.prefix_token_id:
            return tokens[:1], tokens[1:]
        return [self.prefix_token_id], tokens

    def _score(self, pairs: list, tasks: list[str | None]) -> list[scoring.Score]:
        """Every pair scored, task by task, each task's figures counted."""
        out: list[scoring.Score | None] = [None] * len(pairs)
        for task, members in _by_task(tasks).items():
            with self._mesh():
                scores, seconds = self.scorer.score([pairs[i] for i in members])
            experts = np.sum([s.experts_L for s in scores], axis=0)
            self.counters[task].add(experts, sum(s.scored for s in scores),
                                    sum(s.tokens for s in scores), seconds)  # fmt: skip
            for i, s in zip(members, scores, strict=True):
                out[i] = s
        return out

    def _generate(self, contexts: list[str], settings: tuple, task: str | None) -> list[str]:
        """One batch of contexts, its rows decoded together, each cut at its stop strings."""
        until, max_new, temperature = settings
        keep = max(1, self.max_length - max_new)  # as lm-eval's hf: room for the new tokens
        prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-keep:] for c in contexts]
        rows = prompts + [prompts[0]] * (self._batch - len(prompts))  # one program per size
        width = scoring.bucket(max(map(len, prompts)), max(keep, scoring.MIN_BUCKET))
        self.generation_shapes.add((len(rows), width, max_new))
        with self._mesh():
            gen = generate(self.source.graphdef, self.source.params, rows, max_new,
                           temperature=temperature, seed=self.seed, prompt_length=width,
                           stop_id=self._stop_ids(until))  # fmt: skip
        seconds = (gen.prefill_seconds + gen.decode_seconds) / len(prompts)
        texts = []
        for prompt, tokens, experts_TL in zip(prompts, gen.tokens, gen.experts_by_layer,
                                              strict=False):  # fmt: skip
            texts.append(_cut(self.tok_decode(tokens), until))
            self.counters[task].add(experts_TL.sum(0), len(tokens), len(prompt) + len(tokens),
                                    seconds)  # fmt: skip
        return texts

    def _stop_ids(self, until: tuple[str, ...]) -> list[int]:
        """The end-of-text id, and each stop string that is one token of its own: a row may
        stop as soon as it produces one (the text is cut at the strings all the same)."""
        ids = [self.eot_token_id]
        for text in until:
            tokens = self.tok_encode(text)
            if len(tokens) == 1 and text in self.tok_decode(tokens):
                ids.append(tokens[0])
        return ids

    def _mesh(self) -> contextlib.AbstractContextManager:
        mesh = self.source.mesh
        return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def check_model_args(args: dict[str, Any]) -> source.Plan:
    """``check_args`` of lm-eval's parsed ``--model_args``, with the constructor's own
    defaults (bound from its signature, so they are written once)."""
    bound = inspect.signature(DynMoELM.__init__).bind(None, **args)
    bound.apply_defaults()
    given = bound.arguments
    _batch_size(given["batch_size"])
    return check_args(given["pretrained"], given["dtype"], given["max_length"],
                      given["max_gen_toks"], given["seed"], given["routing"])  # fmt: skip


def _by_task(tasks: list[str | None]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = collections.defaultdict(list)
    for i, task in enumerate(tasks):
        groups[task].append(i)
    return groups


def _settings(kwargs: dict, default_max: int) -> tuple[tuple[str, ...], int, float]:
    """(until strings, max new tokens, temperature: 0 for greedy) of lm-eval's gen_kwargs."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    max_new = int(kwargs.get("max_gen_toks", default_max))
    check(max_new >= 1, "max_gen_toks", max_new, "an integer >= 1")
    sampled = bool(kwargs.get("do_sample", False))
    temperature = float(kwargs.get("temperature", 1.0)) if sampled else 0.0
    return until, max_new, temperature


def _cut(text: str, until: tuple[str, ...]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
