"""Imports Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen2-MoE) as a Decoder.

``from_hf(path, cfg=None, mesh=None, **overrides)`` builds the Decoder of ``cfg``, the resolved
ModelConfig (default: config.json's, ``hf_config.hf_model_config``), abstractly (no weights
allocated), checks every tensor's presence and shape from the file headers, then streams the
tensors one at a time: read, convert (``hf_layout``), put on the parameter's device or
sharding, drop the host copy. The host holds at most one converted tensor besides what the
devices hold.

Every failure is a one-line ``PretrainedError`` naming the file and the field or tensor.

Runs that start from a checkpoint (``--config.init_from=PATH``) take the architecture
(widths, layers, experts, vocabulary) and the weights from it, and the training, the data and
the routing from the config (``config.import_overrides``). ``check_folder`` checks such a
folder before any corpus is read; ``train.task`` imports its weights when the workdir holds no
checkpoint.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dynmoe_jax import sharding
from dynmoe_jax.data.hf_tokenizer import HFTokenizer
from dynmoe_jax.model.config import ModelConfig
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
    "check_folder",
    "check_vocabulary",
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


def check_checkpoint(path: str | Path, cfg: ModelConfig | None = None) -> None:
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


def from_hf(path: str | Path, cfg: ModelConfig | None = None, *, mesh: Mesh | None = None,
            **overrides: Any) -> Decoder:  # fmt: skip
    """The checkpoint at ``path`` as a Decoder of ``cfg``, the resolved model (default:
    ``hf_model_config(path, **overrides)``, e.g. ``router='top_p', threshold=0.5`` or
    ``dtype='bfloat16'``, the compute dtype; parameters keep the Decoder's own storage dtype),
    each parameter placed on ``mesh`` by its logical axes (default: the default device)."""
    directory = Path(path)
    if cfg is None:
        cfg = hf_model_config(directory, **overrides)
    elif overrides:
        raise TypeError(f"from_hf takes a resolved cfg or overrides, not both: {overrides}")
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


# ----------------------------------------------------------------------------- init_from

FIELD = "init_from"

# HF checkpoints pad the embedding past their tokenizer's ids (to a multiple of 64 or 128, for
# the matmuls: OLMoE 50280 -> 50304, Qwen1.5-MoE 151646 -> 151936). Twice the ids, or the next
# multiple of PAD_MULTIPLE for a tiny vocabulary, is far past any such padding: there the
# tokenizer belongs to another model.
PAD_MULTIPLE = 128


def most_rows(tokenizer_ids: int) -> int:
    """The most embedding rows a checkpoint may have for a tokenizer of ``tokenizer_ids``."""
    return max(2 * tokenizer_ids, -(-tokenizer_ids // PAD_MULTIPLE) * PAD_MULTIPLE)


def check_vocabulary(folder: str, model_cfg: ModelConfig, vocab_size: int) -> None:
    """The checkpoint's embedding must cover the ``vocab_size`` ids of its tokenizer, with at
    most ``most_rows`` rows (padding, not another model's vocabulary)."""
    rows = model_cfg.vocab_size
    if vocab_size > rows:
        allowed = (f"a checkpoint whose vocab_size ({rows}) covers the "
                   f"{vocab_size} ids of its tokenizer.json")  # fmt: skip
        invalid(FIELD, folder, allowed)
    if rows > most_rows(vocab_size):
        most = most_rows(vocab_size)
        allowed = (f"a tokenizer.json of the checkpoint's own vocabulary: config.json's "
                   f"vocab_size ({rows}) is more than {most}, the padding of its "
                   f"tokenizer's {vocab_size} ids (a tokenizer of another model?)")  # fmt: skip
        invalid(FIELD, folder, allowed)


def check_folder(folder: str, model_cfg: ModelConfig) -> None:
    """Everything about an ``init_from`` folder that needs no tensor data, before any corpus
    is read: the index and its shards, every tensor's presence and shape
    (``check_checkpoint``) and the tokenizer against the embedding (``check_vocabulary``).
    One line on standard error when the embedding has padding rows. Repeated calls on an
    unchanged folder are free."""
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                         for p in Path(folder).iterdir() if p.is_file()))  # fmt: skip
    _check_folder(folder, model_cfg, stamp)


@functools.lru_cache(maxsize=8)
def _check_folder(folder: str, model_cfg: ModelConfig, stamp: tuple) -> None:
    del stamp  # part of the cache key only: a changed file is checked again
    check_checkpoint(folder, model_cfg)
    ids = HFTokenizer.from_dir(folder).vocab_size
    check_vocabulary(folder, model_cfg, ids)
    if model_cfg.vocab_size > ids:
        print(f"note: {FIELD}={folder}: the embedding has {model_cfg.vocab_size} rows, the "
              f"tokenizer {ids} ids; the other {model_cfg.vocab_size - ids} rows are padding "
              "that no text encodes to", file=sys.stderr)  # fmt: skip
