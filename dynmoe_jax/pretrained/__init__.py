"""Hugging Face MoE checkpoints: ``hf_config`` (config.json to ModelConfig), ``hf_layout``
(tensor layouts), ``safetensors_io`` (reading and writing) and ``load`` (``from_hf``, and
the checks of a folder that a run starts from, ``--config.init_from``)."""

from dynmoe_jax.pretrained.hf_config import (
    FAMILIES,
    Family,
    PretrainedError,
    allowed_overrides,
    hf_model_config,
)
from dynmoe_jax.pretrained.load import from_hf

__all__ = ["FAMILIES", "Family", "PretrainedError", "allowed_overrides", "from_hf",
           "hf_model_config"]  # fmt: skip
