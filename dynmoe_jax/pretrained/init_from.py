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


def check_vocabulary(folder: str, model_cfg: ModelConfig, vocab_size: int) -> None:
    """The checkpoint's embedding must cover the ``vocab_size`` ids of its tokenizer."""
    if vocab_size > model_cfg.vocab_size:
        allowed = (f"a checkpoint whose vocab_size ({model_cfg.vocab_size}) covers the "
                   f"{vocab_size} ids of its tokenizer.json")  # fmt: skip
        invalid(FIELD, folder, allowed)


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
