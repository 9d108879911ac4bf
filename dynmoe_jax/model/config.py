"""ModelConfig: the decoder's shape and the optional features of imported checkpoints, each
field declared once (``validation.declared``) and validated on construction."""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

from dynmoe_jax.moe.config import DTYPE, MoEConfig
from dynmoe_jax.validation import (
    BOOL,
    OrNone,
    Range,
    Site,
    check_declared,
    check_field,
    declared,
    field_path,
)


class FFN(str, enum.Enum):
    MOE = "moe"  # an MoE layer every moe_every-th layer, dense ones between
    DENSE = "dense"  # the dense baseline: no MoE layer


class Remat(enum.Enum):
    """What the backward pass recomputes (``layer_stack`` maps each to a policy)."""

    NONE = "none"  # keep every activation for the backward pass
    FULL = "full"  # keep only each block's input; recompute the rest
    DOTS = "dots"  # keep the outputs of matmuls without batch dimensions


_POSITIVE = Range(0, integer=False, open_low=True)
_AT_LEAST_1 = Range(1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The decoder. ``override``: the fields an imported checkpoint takes from the config (the
    checkpoint gives the rest)."""

    SECTION: ClassVar[str] = "model"
    vocab_size: int = declared(2048, "the embedding's rows (from the tokenizer)", Range(2),
                               cli=False)  # fmt: skip
    d_model: int = declared(256, "model width", _AT_LEAST_1)
    num_layers: int = declared(4, "decoder blocks", _AT_LEAST_1)
    num_heads: int = declared(4, "attention heads", _AT_LEAST_1)
    d_ff: int = declared(1024, "hidden width of the dense feed-forward layers", _AT_LEAST_1)
    ffn: FFN = declared(FFN.MOE, "moe | dense (the dense baseline: no MoE layer)")
    moe: MoEConfig | None = declared(None, "the MoE layers' config (None: a dense model)",
                                     cli=False)  # fmt: skip
    moe_every: int = declared(
        1, "every n-th layer is an MoE layer (the last of each run of n)",
        Range(1, "num_layers"),
    )  # fmt: skip
    rope_theta: float = declared(10_000.0, "RoPE base", _POSITIVE, cli=False)
    norm_eps: float = declared(1e-6, "RMSNorm epsilon", _POSITIVE, cli=False)
    dtype: str = declared("float32", "activations and matmuls (the router and losses stay "
                          "float32)", DTYPE, override=True)  # fmt: skip
    remat: Remat = declared(Remat.NONE, "recompute each block in the backward pass: none | "
                            "full | dots (keep the matmul outputs)", override=True)  # fmt: skip
    scan_layers: bool = declared(False, "run the blocks under one lax.scan over stacked "
                                 "parameters", BOOL)  # fmt: skip
    num_kv_heads: int | None = declared(
        None, "key/value heads of grouped-query attention (None: num_heads)",
        OrNone(Range(1, divides="num_heads"), "model.num_heads"), cli=False,
    )  # fmt: skip
    head_dim: int | None = declared(
        None, "width of one head (None: d_model // num_heads)",
        OrNone(Range(2, even=True), "model.d_model // model.num_heads"), cli=False,
    )  # fmt: skip
    qkv_bias: bool = declared(False, "biases on the q, k, v projections (Qwen2-MoE)", BOOL,
                              cli=False)  # fmt: skip
    qk_norm: bool = declared(False, "RMSNorm over the whole q and k projections (OLMoE)",
                             BOOL, cli=False)  # fmt: skip
    tie_embeddings: bool = declared(False, "logits from the embedding (no separate head)",
                                    BOOL, cli=False)  # fmt: skip
    shared_d_ff: int | None = declared(
        None, "width of a shared SwiGLU expert in every MoE layer (Qwen2-MoE)",
        OrNone(_AT_LEAST_1, "no shared expert"), cli=False,
    )  # fmt: skip
    shared_gate: bool = declared(False, "scale the shared expert by a sigmoid gate", BOOL,
                                 cli=False)  # fmt: skip

    def __post_init__(self):
        check_declared(self)
        if self.moe is None:  # a model built without an MoE config is the dense baseline
            object.__setattr__(self, "ffn", FFN.DENSE)
        if self.ffn is FFN.DENSE:
            object.__setattr__(self, "moe", None)
        for ok, field, allowed in self._cross_rules():
            check_field(self, field, ok, allowed)
        if self.moe is not None:
            same = self.moe.d_model == self.d_model
            check_field(self.moe, "d_model", same, Site(ModelConfig, "", self).show("d_model"))
            self._check_per_layer()

    def _check_per_layer(self) -> None:
        """One k per MoE layer: as many as there are, and no scan (its layers share a k)."""
        if not self.moe.per_layer:
            return
        n = self.num_moe_layers
        layers = Site(ModelConfig, "", self)
        check_field(self.moe, "top_k", len(self.moe.top_k) == n,
                    f"one k, or {n} (one per MoE layer of {layers.show('num_layers')} with "
                    f"{layers.show('moe_every')})")  # fmt: skip
        check_field(self, "scan_layers", not self.scan_layers,
                    f"False with one {field_path(self.moe, 'top_k')} per layer (the scanned "
                    "layers share one static k)")  # fmt: skip

    def _cross_rules(self) -> list[tuple[bool, str, str]]:
        """(ok, field, allowed) between fields, checked in order."""
        d, n = self.d_model, self.num_heads
        d_model = Site(ModelConfig, "", self).show("d_model")  # model.d_model=<its value>
        rules = [
            (self.shared_d_ff is None or self.moe is not None, "shared_d_ff",
             "None in a dense model (it adds to MoE layers)"),
            (not self.shared_gate or self.shared_d_ff is not None, "shared_gate",
             f"False when {field_path(self, 'shared_d_ff')} is None (it gates the shared "
             "expert)"),
        ]  # fmt: skip
        if self.head_dim is None:  # RoPE rotates pairs of a head's features: an even width
            rules += [
                (d % n == 0, "num_heads", f"an integer >= 1 dividing {d_model}"),
                (d // n % 2 == 0, "num_heads", f"a divisor of {d_model} giving an even head "
                 "width"),
            ]  # fmt: skip
        return rules

    @property
    def kv_heads(self) -> int:
        """J, the key/value heads (num_kv_heads resolved)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_width(self) -> int:
        """H, the width of one head (head_dim resolved)."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def moe_layer(self, layer: int) -> MoEConfig:
        """The config of the MoE layer at decoder layer ``layer`` (its own k where
        ``moe.top_k`` holds one per MoE layer)."""
        return self.moe.layer(layer // self.moe_every)
