"""Runs that start from a pretrained checkpoint: ``--config.init_from=PATH``.

PATH is a Hugging Face model folder (config.json, *.safetensors, tokenizer.json; see
``load.py``). The checkpoint gives the architecture (widths, layers, experts, vocabulary)
and the weights; the config gives the training, the data and the routing: its ``moe`` fields
named in ``MOE_OVERRIDES`` replace the checkpoint's router, and ``model.dtype`` and
``model.remat`` apply as for any run. ``moe.top_k`` and ``moe.renormalize`` set to None keep the
checkpoint's own ``num_experts_per_tok`` and ``norm_topk_prob``.

Training from PATH starts from the imported weights unless the workdir already holds
checkpoints (then it resumes as usual); eval and sample use the imported weights directly when
the workdir holds none.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_collections import ConfigDict

from dynmoe_jax.validation import check, invalid

if TYPE_CHECKING:  # the command line imports this module before JAX is needed
    from dynmoe_jax.model.config import ModelConfig
    from dynmoe_jax.train import Task

FIELD = "init_from"
CHECKPOINT_CONFIG = "config.json"
MOE_OVERRIDES = (
    "router", "threshold", "top_k", "max_k", "capacity_factor", "expected_k", "group_size",
    "dispatch", "block_size", "matmul_backend", "drop_order", "renormalize",
)  # fmt: skip
# None in these config fields means "as the checkpoint has it".
CHECKPOINT_DEFAULTS = ("top_k", "renormalize")
ALLOWED = f"a Hugging Face model folder holding {CHECKPOINT_CONFIG}, *.safetensors, tokenizer.json"


def path_of(config: ConfigDict) -> str:
    """The checkpoint folder the config starts from ('' = none: a run of its own model)."""
    value = config.get(FIELD, "")
    return value if isinstance(value, str) else ""


def check_path(config: ConfigDict) -> str:
    """One-line error unless ``init_from`` is '' or a folder with config.json; returns the
    folder as an absolute path ('' when unset). None (what a config that needs a checkpoint
    sets) asks for one."""
    value = config.get(FIELD, "")
    if value is None:
        invalid(FIELD, value, f"{ALLOWED}: this config needs --config.{FIELD}=PATH")
    check(isinstance(value, str), FIELD, value, f"'' (none) or {ALLOWED}")
    if not value:
        return ""
    folder = Path(value).expanduser()
    check((folder / CHECKPOINT_CONFIG).is_file(), FIELD, value, ALLOWED)
    return str(folder.resolve())


def moe_overrides(config: ConfigDict) -> dict[str, Any]:
    """The config's router fields that replace the checkpoint's."""
    moe = config.moe
    out = {name: moe[name] for name in MOE_OVERRIDES if name in moe}
    return {k: v for k, v in out.items() if not (k in CHECKPOINT_DEFAULTS and v is None)}


def overrides(config: ConfigDict) -> dict[str, Any]:
    """What ``pretrained.from_hf`` takes from the config: the router, dtype and remat."""
    return {**moe_overrides(config), "dtype": config.model.dtype, "remat": config.model.remat}


def model_config(config: ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """The checkpoint's ModelConfig with the config's routing, dtype and remat. ``vocab_size``:
    the tokenizer's vocabulary, which the checkpoint's embedding must cover."""
    from dynmoe_jax import pretrained

    folder = path_of(config)
    model_cfg = pretrained.hf_model_config(folder, **overrides(config))
    if vocab_size is not None and vocab_size > model_cfg.vocab_size:
        allowed = (f"a checkpoint whose vocab_size ({model_cfg.vocab_size}) covers the "
                   f"{vocab_size} ids of its tokenizer.json")  # fmt: skip
        invalid(FIELD, folder, allowed)
    return model_cfg


def check_config(config: ConfigDict, devices=None) -> None:
    """Every check of a run's config that needs no data, before anything is compiled.

    Without ``init_from``: ``config.check_config``. With it, the config's own model fields are
    not read; instead: the training fields, the folder, the checkpoint's architecture, the
    router fields against it and the mesh against its sizes."""
    from dynmoe_jax import config as config_lib

    if not check_path(config):
        config_lib.check_config(config, devices)
        return
    config_lib.check_top_level(config)  # the training fields' rules, shared with any run
    config_lib.mesh_for(config, model_config(config), devices)


def load_params(task: Task) -> Any:
    """The checkpoint's weights as the pure dict of ``task``'s params, each on its sharding."""
    import jax
    from flax import nnx

    from dynmoe_jax import pretrained

    config = task.config
    model = pretrained.from_hf(path_of(config), mesh=task.mesh, **overrides(config))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    wanted = task.state_shardings.params
    if jax.tree.structure(params) != jax.tree.structure(wanted):
        raise pretrained.PretrainedError(
            f"{FIELD}={path_of(config)!r}: the imported parameters do not form the tree of "
            "the configured model"
        )
    print(f"initialised from {path_of(config)} (imported weights)")
    return jax.device_put(params, wanted)
