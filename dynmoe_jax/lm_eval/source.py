"""What lm-eval's ``pretrained=PATH`` names, checked and then loaded for scoring and
generation: a training workdir (its newest checkpoint, its recorded config and its own
tokenizer) or a Hugging Face MoE folder (Mixtral, OLMoE, Qwen2-MoE).

``check`` resolves the model and the routing without reading a weight, so that a bad path or a
routing value out of range is one line before anything compiles; ``load`` then reads the
weights and puts them in the decode layout (``generate.decode_layout``), which serves both the
scoring of whole sequences and the cached decode loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import inference
from dynmoe_jax.data import HFTokenizer
from dynmoe_jax.generate import decode_graphdef, decode_layout
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.pretrained import from_hf, hf_model_config
from dynmoe_jax.train import run_record
from dynmoe_jax.validation import check, invalid

# The routing a user may change at inference: every other field is the model's.
ROUTING_ARGS = ("router", "threshold", "top_k", "max_k", "renormalize", "dispatch",
                "decode_tokens")  # fmt: skip
PRETRAINED = "pretrained"
ALLOWED_PATH = (
    "a training workdir (its config.json and checkpoints/) or a Hugging Face MoE folder "
    "(config.json with architectures, *.safetensors, tokenizer.json)"
)
# Hugging Face folders name their context in config.json; a window this long is what lm-eval's
# own backend falls back to, and it keeps a rolling window affordable on a CPU.
DEFAULT_HF_LENGTH = 2048


class Kind(enum.Enum):
    WORKDIR = "workdir"
    HF = "hf"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked ``pretrained`` with its routing: what ``load`` reads."""

    path: Path
    kind: Kind
    model_cfg: ModelConfig
    run: config_lib.RunConfig | None  # the workdir's resolved config (None: an HF folder)
    max_length: int

    @property
    def routing(self) -> dict[str, Any]:
        """The routing in effect, as results record it."""
        moe = self.model_cfg.moe
        if moe is None:
            return {}
        fields = {k: getattr(moe, k) for k in (*ROUTING_ARGS, "target_k", "num_experts")}
        return {k: v.value if isinstance(v, enum.Enum) else v for k, v in fields.items()}


@dataclasses.dataclass(frozen=True)
class Source:
    """A loaded model in the decode layout, with its tokenizer."""

    plan: Plan
    tokenizer: Any
    graphdef: Any
    params: Any
    mesh: Any  # the workdir's mesh, or None (one device)
    description: str
    model_cfg: ModelConfig  # the graph's (a workdir's vocabulary is its tokenizer's)


def kind_of(path: str | Path) -> Kind:
    """Whether ``path`` is a training workdir or a Hugging Face folder; one line otherwise."""
    folder = Path(path).expanduser()
    record = _json(folder / run_record.RUN_CONFIG_FILE)
    if (folder / "checkpoints").is_dir() or "corpus" in record:
        return Kind.WORKDIR
    if record.get("architectures"):
        return Kind.HF
    invalid(PRETRAINED, str(path), ALLOWED_PATH)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def none_from_text(value: Any) -> Any:
    """lm-eval passes every model argument as parsed text: 'None' means None."""
    return None if value == "None" else value


def _with_router(routing: Mapping[str, Any]) -> dict[str, Any]:
    """``routing`` with 'None' read as None, and the router a threshold or a k implies."""
    routing = {k: none_from_text(v) for k, v in routing.items()}
    implied = [r for name, r in (("threshold", "top_p"), ("top_k", "top_k")) if name in routing]
    if implied and "router" not in routing:  # a threshold asks for top-p, a k for top-k
        routing["router"] = implied[-1]
    return routing


def check_plan(pretrained: str, routing: Mapping[str, Any], dtype: str | None = None,
               max_length: int | None = None) -> Plan:  # fmt: skip
    """``pretrained`` resolved with ``routing`` (a subset of ``ROUTING_ARGS``) and ``dtype``,
    every value checked, no weight read."""
    check(bool(pretrained), PRETRAINED, pretrained, ALLOWED_PATH)
    for name in routing:
        check(name in ROUTING_ARGS, name, routing[name],
              f"a model argument among pretrained, {', '.join(ROUTING_ARGS)}, dtype, "
              "batch_size, max_length, max_gen_toks, seed")  # fmt: skip
    routing = _with_router(routing)
    path = Path(pretrained).expanduser().resolve()
    kind = kind_of(path)
    if kind is Kind.WORKDIR:
        run = _workdir_config(path, routing, dtype)
        model_cfg, default_length = run.model, run.data.seq_len
    else:
        run = None
        overrides = {**routing, "capacity_factor": None, **({"dtype": dtype} if dtype else {})}
        model_cfg = hf_model_config(path, **overrides)
        default_length = int(_json(path / "config.json").get("max_position_embeddings")
                             or DEFAULT_HF_LENGTH)  # fmt: skip
        default_length = min(default_length, DEFAULT_HF_LENGTH)
    length = max_length or default_length
    check(isinstance(length, int) and length >= 2, "max_length", max_length, "an integer >= 2")
    return Plan(path, kind, model_cfg, run, length)


def _check_threshold_settable(routing: Mapping[str, Any], target_k: float | None) -> None:
    """A run trained with ``moe.target_k`` keeps its thresholds: they are the controller's
    state, which a config threshold would not replace."""
    if "threshold" in routing and target_k is not None:
        allowed = (f"not settable for this run: its thresholds are the trained controller's "
                   f"state (moe.target_k={target_k}); evaluate them as trained, or pass "
                   "router=top_k")  # fmt: skip
        invalid("threshold", routing["threshold"], allowed)


def _workdir_config(path: Path, routing: dict, dtype: str | None) -> config_lib.RunConfig:
    """The run's recorded config with the routing set as ``--config.moe.FIELD`` would."""
    record = run_record.load(path)
    if record is None:
        invalid(PRETRAINED, str(path), f"{ALLOWED_PATH}: the workdir has no config.json")
    _check_threshold_settable(routing, record.config.moe.get("target_k"))
    overrides = {f"moe.{k}": str(v) for k, v in routing.items()}
    if dtype:
        overrides["model.dtype"] = str(dtype)
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval's table owns standard output
        config = run_record.config_for(path, record.config, overrides)
    return config_lib.check_config(config)


def load(plan: Plan) -> Source:
    """The plan's weights in the decode layout, and its tokenizer."""
    with contextlib.redirect_stdout(sys.stderr):
        if plan.kind is Kind.WORKDIR:
            restored = inference.restore(plan.run, plan.path)
            tokenizer, mesh = restored.data.tokenizer, restored.task.mesh
            params, description = restored.params, f"{plan.path} ({restored.source})"
            model_cfg = restored.task.config.model  # its vocabulary is the tokenizer's
        else:
            tokenizer, mesh = HFTokenizer.from_dir(plan.path), None
            model = from_hf(plan.path, plan.model_cfg)
            params, description = nnx.state(model), f"{plan.path} (imported weights)"
            model_cfg = plan.model_cfg
        graphdef, params = decode_layout(model_cfg, params)
    return Source(plan, tokenizer, graphdef, params, mesh, description, model_cfg)


def reroute(src: Source, routing: Mapping[str, Any]) -> Source:
    """``src`` routed otherwise: the same parameters (the decode layout serves every routing,
    ``generate.decode_graphdef``), a new graph; values checked as ``check_plan`` does."""
    for name in routing:
        check(name in ROUTING_ARGS, name, routing[name], f"one of {', '.join(ROUTING_ARGS)}")
    check(src.model_cfg.moe is not None, "routing", dict(routing), "a model with MoE layers")
    _check_threshold_settable(routing, src.model_cfg.moe.target_k)
    moe = dataclasses.replace(src.model_cfg.moe, **_with_router(routing))
    model_cfg = dataclasses.replace(src.model_cfg, moe=moe)
    plan = dataclasses.replace(src.plan, model_cfg=model_cfg)
    return dataclasses.replace(src, plan=plan, graphdef=decode_graphdef(model_cfg),
                               model_cfg=model_cfg)  # fmt: skip
