"""Hugging Face config.json -> ModelConfig, for the MoE families this project imports.

``FAMILIES`` holds what differs between the architectures, as data: key names, tensor-name
pieces, features (q/k norm, q/k/v biases, a shared expert) and the settings we refuse. The
imported model routes as the checkpoint does (its top-k, its ``norm_topk_prob``, no capacity)
unless ``moe_overrides`` switch the router, e.g. ``router='top_p', threshold=0.5``. Every
failure is a one-line ``PretrainedError`` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.moe.config import MoEConfig, Router
from dynmoe_jax.validation import ConfigError, invalid

__all__ = [
    "CONFIG_FILE",
    "FAMILIES",
    "Family",
    "PretrainedError",
    "allowed_overrides",
    "hf_model_config",
    "read_config",
]

CONFIG_FILE = "config.json"


class PretrainedError(ConfigError):
    """A checkpoint this project cannot import as it is."""


def _is(expected: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v == expected), repr(expected)


# (config key, default when absent, test, allowed): what every family must satisfy.
_COMMON_REQUIREMENTS = (
    ("hidden_act", "silu", *_is("silu")),
    ("rope_scaling", None, *_is(None)),
)


@dataclasses.dataclass(frozen=True)
class Family:
    """What one architecture's config.json and tensor names look like."""

    num_experts_key: str
    expert_d_ff_key: str
    moe_block: str  # the MoE block's name under a layer (format field {layer})
    expert_names: tuple[str, str, str]  # gate, up, down projections of an expert
    default_rope_theta: float
    norm_topk_key: str | None = None  # None: the family always renormalises top-k
    norm_topk_default: bool = True
    qk_norm: bool = False
    qkv_bias_key: str | None = None  # None: no q/k/v biases
    qkv_bias_default: bool = False
    shared_expert: bool = False  # a shared expert with a sigmoid gate in every MoE layer
    sparse_step_key: str | None = None  # every n-th layer is MoE (and mlp_only_layers)
    requirements: tuple = ()  # (key, default, test, allowed) for features we do not have


FAMILIES: dict[str, Family] = {
    "MixtralForCausalLM": Family(
        num_experts_key="num_local_experts",
        expert_d_ff_key="intermediate_size",
        moe_block="{layer}.block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
        default_rope_theta=1e6,
        requirements=(("sliding_window", None, *_is(None)),),
    ),
    "OlmoeForCausalLM": Family(
        num_experts_key="num_experts",
        expert_d_ff_key="intermediate_size",
        moe_block="{layer}.mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        default_rope_theta=1e4,
        norm_topk_key="norm_topk_prob",
        norm_topk_default=False,
        qk_norm=True,
        requirements=(
            ("clip_qkv", None, *_is(None)),
            ("attention_bias", False, *_is(False)),
        ),
    ),
    "Qwen2MoeForCausalLM": Family(
        num_experts_key="num_experts",
        expert_d_ff_key="moe_intermediate_size",
        moe_block="{layer}.mlp",
        expert_names=("gate_proj", "up_proj", "down_proj"),
        default_rope_theta=1e4,
        norm_topk_key="norm_topk_prob",
        norm_topk_default=False,
        qkv_bias_key="qkv_bias",
        qkv_bias_default=True,
        shared_expert=True,
        sparse_step_key="decoder_sparse_step",
        requirements=(("use_sliding_window", False, *_is(False)),),
    ),
}


def _declared_overrides(owner: type) -> set[str]:
    return {f.name for f in dataclasses.fields(owner) if f.metadata.get("override")}


def allowed_overrides() -> list[str]:
    """The fields declared ``override``: MoEConfig's routing and ModelConfig's dtype and remat
    (the checkpoint fixes the rest: experts and widths)."""
    return sorted(_declared_overrides(MoEConfig) | _declared_overrides(ModelConfig))


# ----------------------------------------------------------------------------- config


def read_config(directory: Path) -> tuple[dict, Family]:
    file = directory / CONFIG_FILE
    if not file.is_file():
        invalid("path", str(directory), f"a checkpoint directory holding {CONFIG_FILE}",
                PretrainedError)  # fmt: skip
    hf = json.loads(file.read_text())
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in FAMILIES]
    if len(archs) != 1 or not known:
        invalid(f"{file}:architectures", archs, " | ".join(FAMILIES), PretrainedError)
    family = FAMILIES[known[0]]
    for key, default, ok, allowed in (*_COMMON_REQUIREMENTS, *family.requirements):
        value = hf.get(key, default)
        if not ok(value):
            invalid(f"{file}:{key}", value, f"{allowed} (not supported otherwise)",
                    PretrainedError)  # fmt: skip
    return hf, family


def _require(hf: dict, key: str, file: Path) -> Any:
    if key not in hf:
        invalid(f"{file}:{key}", None, "a value (the key is missing)", PretrainedError)
    return hf[key]


def _rope_theta(hf: dict, family: Family, file: Path) -> float:
    """v5 configs nest it in ``rope_parameters``; older ones have a top-level ``rope_theta``."""
    params = hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        invalid(f"{file}:rope_parameters.rope_type", rope_type, "'default'", PretrainedError)
    return float(params.get("rope_theta", hf.get("rope_theta", family.default_rope_theta)))


def _moe_every(hf: dict, family: Family, file: Path) -> int:
    """Our MoE layers are the last of each run of ``moe_every``; HF's are the layers i with
    ``(i + 1) % decoder_sparse_step == 0`` not in ``mlp_only_layers``. Refused unless some
    ``moe_every`` gives exactly the same layers."""
    num_layers = hf["num_hidden_layers"]
    step = hf.get(family.sparse_step_key, 1) if family.sparse_step_key else 1
    mlp_only = sorted(hf.get("mlp_only_layers") or [])
    if not isinstance(step, int) or step < 1:
        invalid(f"{file}:{family.sparse_step_key}", step, "an integer >= 1", PretrainedError)
    hf_moe = [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
    for every in range(1, num_layers + 1):
        if hf_moe == [i for i in range(num_layers) if i % every == every - 1]:
            return every
    invalid(f"{file}:mlp_only_layers", mlp_only,
            "layers leaving every n-th layer MoE for some n, as decoder_sparse_step does",
            PretrainedError)  # fmt: skip


def _moe_config(hf: dict, family: Family, file: Path, overrides: dict) -> MoEConfig:
    renormalize = (
        hf.get(family.norm_topk_key, family.norm_topk_default)
        if family.norm_topk_key
        else family.norm_topk_default
    )
    fields = {
        "num_experts": _require(hf, family.num_experts_key, file),
        "d_model": hf["hidden_size"],
        "d_ff": _require(hf, family.expert_d_ff_key, file),
        "router": Router.TOP_K,
        "top_k": _require(hf, "num_experts_per_tok", file),
        "renormalize": bool(renormalize),
        "capacity_factor": None,  # route exactly as the checkpoint does: nothing dropped
    }
    return MoEConfig(**{**fields, **overrides})


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    allowed = allowed_overrides()
    for name, value in overrides.items():
        if name not in allowed:
            invalid(name, value, f"an override among {', '.join(allowed)}", PretrainedError)
    model_fields = _declared_overrides(ModelConfig)
    model = {k: v for k, v in overrides.items() if k in model_fields}
    moe = {k: v for k, v in overrides.items() if k not in model_fields}
    if "dtype" in model:
        moe["dtype"] = model["dtype"]  # the configs name the dtype's field in their error
    return model, moe


def hf_model_config(path: str | Path, **moe_overrides: Any) -> ModelConfig:
    """The ModelConfig of the checkpoint at ``path`` (its config.json), with overrides."""
    directory = Path(path)
    file = directory / CONFIG_FILE
    hf, family = read_config(directory)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        _require(hf, key, file)
    model_overrides, moe_overrides = _split_overrides(moe_overrides)
    try:
        return _model_config(hf, family, file, model_overrides, moe_overrides)
    except PretrainedError:
        raise
    except ConfigError as e:
        overridden = {f"{scope}.{k}=" for k in moe_overrides for scope in ("moe", "model")}
        if any(str(e).startswith(prefix) for prefix in overridden):
            raise  # the caller's value, not the checkpoint's
        raise PretrainedError(f"{file}: {e}") from None


def _model_config(hf: dict, family: Family, file: Path, model_overrides: dict,
                  moe_overrides: dict) -> ModelConfig:  # fmt: skip
    qkv_bias = hf.get(family.qkv_bias_key, family.qkv_bias_default) if family.qkv_bias_key \
        else False  # fmt: skip
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        d_ff=_require(hf, "intermediate_size", file),
        moe=_moe_config(hf, family, file, moe_overrides),
        moe_every=_moe_every(hf, family, file),
        rope_theta=_rope_theta(hf, family, file),
        norm_eps=float(_require(hf, "rms_norm_eps", file)),
        qkv_bias=bool(qkv_bias),
        qk_norm=family.qk_norm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        shared_d_ff=(
            _require(hf, "shared_expert_intermediate_size", file) if family.shared_expert else None
        ),
        shared_gate=family.shared_expert,
        **model_overrides,
    )
