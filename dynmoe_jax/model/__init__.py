"""The decoder: ``config`` (ModelConfig), ``decoder`` (Decoder and its blocks), ``attention``,
``layer_stack`` (per-layer or scanned blocks, remat)."""

from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.model.decoder import Decoder, KVCache, abstract_decoder

__all__ = ["Decoder", "KVCache", "ModelConfig", "abstract_decoder"]
