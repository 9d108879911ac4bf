"""Imports Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen2-MoE) as a Decoder.

``from_hf(path, mesh=None, dtype=None, **moe_overrides)`` maps config.json to a ModelConfig
(``hf_config``), builds the Decoder's structure abstractly (no weights allocated), checks every
tensor's presence and shape from the file headers, then streams the tensors one at a time:
read, convert (``hf_layout``), put on the parameter's device or sharding, drop the host copy.
The host holds at most one converted tensor besides what the devices hold.

Every failure is a one-line ``PretrainedError`` naming the file and the field or tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dynmoe_jax import sharding
from dynmoe_jax.model.decoder import Decoder, abstract_decoder
from dynmoe_jax.moe import balance
from dynmoe_jax.moe.balance import RoutingState
from dynmoe_jax.pretrained import hf_layout
from dynmoe_jax.pretrained.hf_config import (
    FAMILIES,
    Family,
    PretrainedError,
    allowed_overrides,
    hf_model_config,
    read_config,
)
from dynmoe_jax.pretrained.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsError,
    TensorInfo,
    checkpoint_tensors,
)
from dynmoe_jax.validation import invalid

__all__ = [
    "FAMILIES",
    "Family",
    "PretrainedError",
    "allowed_overrides",
    "check_checkpoint",
    "from_hf",
    "hf_model_config",
]

# Checkpoint tensors that carry nothing the Decoder needs (recomputed buffers).
IGNORABLE = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)


def _checkpoint_file(directory: Path, tensors: dict[str, TensorInfo], name: str) -> Path:
    """The file to name in an error about tensor ``name``."""
    if name in tensors:
        return tensors[name].file
    index = directory / INDEX_FILE
    return index if index.is_file() else directory / SINGLE_FILE


def _names(family: Family, layer: int | None) -> dict[str, str]:
    if layer is None:
        return {}
    prefix = f"model.layers.{layer}"
    gate, up, down = family.expert_names
    moe = family.moe_block.format(layer=prefix)
    return {"layer": prefix, "moe": moe, "gate": gate, "up": up, "down": down}


def _plan(abstract: Decoder, family: Family, arch: str, directory: Path,
          tensors: dict[str, TensorInfo]) -> list[tuple]:  # fmt: skip
    """(path, rule, sources, variable) for every parameter, every tensor checked from the
    headers alone; then no tensor left unused except the ignorable ones."""
    plan, used = [], set()
    imported = nnx.All(nnx.Param, nnx.Not(RoutingState))  # the routers' state starts fresh
    for path, var in nnx.to_flat_state(nnx.state(abstract, imported)):
        rule, layer = hf_layout.rule_for(path)
        where = ".".join(map(str, path))
        if rule is None:
            invalid(f"parameter {where}", arch, "an architecture with a source for it",
                    PretrainedError)  # fmt: skip
        shape = tuple(var.get_value().shape)
        sources = rule.sources(_names(family, layer), shape, tensors.keys())
        for name, expected in sources.items():
            file = _checkpoint_file(directory, tensors, name)
            if name not in tensors:
                invalid(f"{file}:{name}", "missing", f"a tensor of shape {expected} for {where}",
                        PretrainedError)  # fmt: skip
            if tensors[name].shape != expected:
                invalid(f"{file}:{name}.shape", tensors[name].shape,
                        f"{expected} (for {where})", PretrainedError)  # fmt: skip
        used.update(sources)
        plan.append((path, rule, sources, var))
    if abstract.cfg.tie_embeddings:
        used.add("lm_head.weight")  # a tied checkpoint may still store the copy
    for name in sorted(tensors.keys() - used):
        if not any(p.search(name) for p in IGNORABLE):
            invalid(f"{tensors[name].file}:{name}", "present",
                    f"only tensors {arch} uses (this one has no place in the model)",
                    PretrainedError)  # fmt: skip
    return plan


def _placement(var: nnx.Variable, mesh: Mesh | None):
    if mesh is None:
        return None
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.get_value().shape)
    return NamedSharding(mesh, sharding.logical_to_spec(axes, mesh.axis_names))


def check_checkpoint(path: str | Path, cfg: Any = None) -> None:
    """Every check of ``from_hf`` that reads no tensor data: config.json, the index and its
    shards, and every tensor's presence and shape from the file headers, for the model
    ``cfg`` (default: the checkpoint's own). A one-line ``PretrainedError`` otherwise."""
    directory = Path(path)
    cfg = hf_model_config(directory) if cfg is None else cfg
    hf, family = read_config(directory)
    arch = hf["architectures"][0]
    _plan(abstract_decoder(cfg), family, arch, directory, _tensors(directory))


def _tensors(directory: Path) -> dict[str, TensorInfo]:
    try:
        return checkpoint_tensors(directory)
    except SafetensorsError as e:
        raise PretrainedError(str(e)) from None


def from_hf(path: str | Path, *, mesh: Mesh | None = None, dtype: Any = None,
            **moe_overrides: Any) -> Decoder:  # fmt: skip
    """The checkpoint at ``path`` as a Decoder, each parameter placed on ``mesh`` by its
    logical axes (default: the default device). ``dtype``: the compute dtype (the model's
    and the MoE layers'); parameters keep the Decoder's own storage dtype."""
    directory = Path(path)
    if dtype is not None:
        moe_overrides["dtype"] = dtype
    cfg = hf_model_config(directory, **moe_overrides)
    hf, family = read_config(directory)
    arch = hf["architectures"][0]
    tensors = _tensors(directory)
    model = abstract_decoder(cfg)
    others = nnx.state(model, nnx.Not(nnx.Param))
    if jax.tree.leaves(others):
        raise PretrainedError(f"{arch}: the Decoder holds state besides parameters")
    # nnx.state hands out the module's own Variables: setting one fills the model in place.
    for _path, rule, sources, var in _plan(model, family, arch, directory, tensors):
        shape, target = tuple(var.get_value().shape), var.get_value().dtype
        try:
            host = hf_layout.cast(rule.convert(tensors, sources, shape), target)
        except SafetensorsError as e:  # a file changed or cut after its header was read
            raise PretrainedError(str(e)) from None
        var.set_value(jax.device_put(host, _placement(var, mesh)))
        del host  # the device copy is all that stays
    for path, var in nnx.to_flat_state(nnx.state(model, RoutingState)):
        value = balance.initial(path[-1], cfg.moe, var.get_value().shape)
        var.set_value(jax.device_put(value, _placement(var, mesh)))
    return model
