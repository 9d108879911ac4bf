"""Validation of a training config, run before any data is read or anything is compiled.

Each rule names the field, the value and what is allowed, in one line.
"""

from __future__ import annotations

import jax.numpy as jnp
from ml_collections import ConfigDict

from dynmoe_jax import sharding
from dynmoe_jax.model import ModelConfig
from dynmoe_jax.moe import MoEConfig


class ConfigError(ValueError):
    """A config field holds a value outside its allowed range."""


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _non_negative(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


# field -> (predicate, allowed): one table holds the top-level rules.
RULES = {
    "seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "seq_len": (_positive_int, "an integer >= 1"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "num_train_steps": (_positive_int, "an integer >= 1"),
    "warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "learning_rate": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
    "min_learning_rate_ratio": (lambda v: 0 <= v <= 1, "0 <= ratio <= 1"),
    "weight_decay": (_non_negative, "a number >= 0"),
    "adam_b1": (lambda v: 0 <= v < 1, "0 <= b1 < 1"),
    "adam_b2": (lambda v: 0 <= v < 1, "0 <= b2 < 1"),
    "grad_clip_norm": (_non_negative, "a number >= 0 (0 = no clipping)"),
    "grad_accum_steps": (_positive_int, "an integer >= 1 dividing batch_size"),
    "log_every_steps": (_positive_int, "an integer >= 1"),
    "eval_every_steps": (_positive_int, "an integer >= 1"),
    "eval_batches": (_positive_int, "an integer >= 1"),
    "checkpoint_every_steps": (_positive_int, "an integer >= 1"),
    "keep_checkpoints": (_positive_int, "an integer >= 1"),
    "vocab_size": (lambda v: isinstance(v, int) and 16 <= v <= 1_000_000, "16..1000000"),
    "tokenizer": (lambda v: v in ("sentencepiece", "bytes"), "'sentencepiece' | 'bytes'"),
    "nonfinite": (lambda v: v in ("skip", "stop"), "'skip' | 'stop'"),
    "inject_nan_at_step": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = off)"),
    "mesh_shape": (lambda v: isinstance(v, str), "a string such as 'data=2,expert=4'"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FFN_KINDS = ("moe", "dense")


def _fail(field: str, value, allowed: str):
    raise ConfigError(f"{field}={value!r} is invalid: allowed {allowed}")


def check_top_level(config: ConfigDict) -> None:
    for field, (ok, allowed) in RULES.items():
        value = config[field]
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            _fail(field, value, allowed)
    if config.batch_size % config.grad_accum_steps:
        _fail("grad_accum_steps", config.grad_accum_steps, f"a divisor of {config.batch_size}")
    if not isinstance(config.dataset, str) or not config.dataset:
        _fail("dataset", config.dataset, "kjv | pydoc | text_dir:PATH | a TFDS dataset name")


def model_config(config: ConfigDict, vocab_size: int) -> ModelConfig:
    """Builds (and so validates) the model and MoE configs from the ml_collections config."""
    m = config.model
    if m.ffn not in FFN_KINDS:
        _fail("model.ffn", m.ffn, " | ".join(map(repr, FFN_KINDS)))
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, " | ".join(map(repr, DTYPES)))
    dtype = DTYPES[m.dtype]
    moe = None
    if m.ffn == "moe":
        moe = MoEConfig(d_model=m.d_model, dtype=dtype, **config.moe.to_dict())
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=m.d_model,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            d_ff=m.d_ff,
            moe=moe,
            moe_every=m.moe_every,
            dtype=dtype,
            remat=m.remat,
        )
    except TypeError as e:
        raise ConfigError(f"model config has a value of the wrong type: {e}") from None


def mesh_for(config: ConfigDict, model_cfg: ModelConfig, devices=None):
    """The configured mesh, checked against the devices present and the model's sizes."""
    moe = model_cfg.moe
    try:
        mesh = sharding.make_mesh(config.mesh_shape, devices)
        sharding.check_fits(
            mesh,
            batch_size=config.batch_size,
            grad_accum_steps=config.grad_accum_steps,
            num_experts=moe.num_experts if moe else None,
            num_heads=model_cfg.num_heads,
            d_ff=model_cfg.d_ff,
            expert_d_ff=moe.d_ff if moe else None,
        )
    except sharding.MeshError as e:
        raise ConfigError(str(e)) from None
    return mesh


def check_config(config: ConfigDict) -> ModelConfig:
    """Every check that needs no data (the vocabulary size is checked as configured)."""
    check_top_level(config)
    try:
        model_cfg = model_config(config, config.vocab_size)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    mesh_for(config, model_cfg)
    return model_cfg
