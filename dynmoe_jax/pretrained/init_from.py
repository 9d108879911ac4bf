"""Runs that start from a pretrained checkpoint: ``--config.init_from=PATH``.

PATH is a Hugging Face model folder (config.json, *.safetensors, tokenizer.json; see
``load.py``). The checkpoint gives the architecture (widths, layers, experts, vocabulary) and
the weights; the config gives the training, the data and the routing: its ``moe`` fields
declared as overrides (``config.routing_overrides``) replace the checkpoint's router, and
``model.dtype`` and ``model.remat`` apply as for any run. ``moe.top_k`` and
``moe.renormalize`` set to None keep the checkpoint's own ``num_experts_per_tok`` and
``norm_topk_prob``.

Training from PATH starts from the imported weights unless the workdir already holds
checkpoints (then it resumes as usual); eval and sample use the imported weights directly when
the workdir holds none.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynmoe_jax.validation import check, invalid

if TYPE_CHECKING:  # the command line imports this module before JAX is needed
    from dynmoe_jax.model.config import ModelConfig
    from dynmoe_jax.train.task import Task

FIELD = "init_from"
CHECKPOINT_CONFIG = "config.json"
ALLOWED = f"a Hugging Face model folder holding {CHECKPOINT_CONFIG}, *.safetensors, tokenizer.json"


def check_path(value: Any) -> str:
    """One-line error unless ``value`` is '' or a folder with config.json; returns the folder
    as an absolute path ('' when unset). None (what a config that needs a checkpoint sets)
    asks for one."""
    if value is None:
        invalid(FIELD, value, f"{ALLOWED}: this config needs --config.{FIELD}=PATH")
    check(isinstance(value, str), FIELD, value, f"'' (none) or {ALLOWED}")
    if not value:
        return ""
    folder = Path(value).expanduser()
    check((folder / CHECKPOINT_CONFIG).is_file(), FIELD, value, ALLOWED)
    return str(folder.resolve())


def model_config(folder: str, overrides: dict[str, Any]) -> ModelConfig:
    """The checkpoint's ModelConfig with ``overrides`` (routing fields, dtype, remat)."""
    from dynmoe_jax.pretrained.hf_config import hf_model_config

    return hf_model_config(folder, **overrides)


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
    """Everything about the folder that needs no tensor data, before any corpus is read: the
    index and its shards, every tensor's presence and shape (``load.check_checkpoint``) and
    the tokenizer against the embedding (``check_vocabulary``). One line on standard error
    when the embedding has padding rows. Repeated calls on an unchanged folder are free."""
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                         for p in Path(folder).iterdir() if p.is_file()))  # fmt: skip
    _check_folder(folder, model_cfg, stamp)


@functools.lru_cache(maxsize=8)
def _check_folder(folder: str, model_cfg: ModelConfig, stamp: tuple) -> None:
    from dynmoe_jax.data.hf_tokenizer import HFTokenizer
    from dynmoe_jax.pretrained.load import check_checkpoint

    del stamp  # part of the cache key only: a changed file is checked again
    check_checkpoint(folder, model_cfg)
    ids = HFTokenizer.from_dir(folder).vocab_size
    check_vocabulary(folder, model_cfg, ids)
    if model_cfg.vocab_size > ids:
        print(f"note: {FIELD}={folder}: the embedding has {model_cfg.vocab_size} rows, the "
              f"tokenizer {ids} ids; the other {model_cfg.vocab_size - ids} rows are padding "
              "that no text encodes to", file=sys.stderr)  # fmt: skip


def load_params(task: Task) -> Any:
    """The checkpoint's weights as the pure dict of ``task``'s params, each on its sharding."""
    import jax
    from flax import nnx

    from dynmoe_jax.pretrained.hf_config import PretrainedError, allowed_overrides
    from dynmoe_jax.pretrained.load import from_hf

    folder, cfg = task.config.init_from, task.model_cfg
    routing = {k: getattr(cfg.moe, k) for k in allowed_overrides() if hasattr(cfg.moe, k)}
    model = from_hf(folder, mesh=task.mesh, **{**routing, "dtype": cfg.dtype,
                                               "remat": cfg.remat})  # fmt: skip
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    wanted = task.state_shardings.params
    if jax.tree.structure(params) != jax.tree.structure(wanted):
        raise PretrainedError(
            f"{FIELD}={folder!r}: the imported parameters do not form the tree of the "
            "configured model"
        )
    print(f"initialised from {folder} (imported weights)")
    return jax.device_put(params, wanted)
