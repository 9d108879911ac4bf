"""ModelConfig: the decoder's shape and the optional features of imported checkpoints, each
field declared once (``validation.declared``) and validated on construction."""

from __future__ import annotations

import dataclasses
import enum

from dynmoe_jax.moe.config import DTYPES, MoEConfig, dtype_name
from dynmoe_jax.validation import (
    check,
    check_declared,
    declared,
    enum_value,
    int_at_least,
    is_int,
    number,
    optional,
)


class FFN(str, enum.Enum):
    MOE = "moe"  # an MoE layer every moe_every-th layer, dense ones between
    DENSE = "dense"  # the dense baseline: no MoE layer


class Remat(enum.Enum):
    """What the backward pass recomputes (``layer_stack`` maps each to a policy)."""

    NONE = "none"  # keep every activation for the backward pass
    FULL = "full"  # keep only each block's input; recompute the rest
    DOTS = "dots"  # keep the outputs of matmuls without batch dimensions


_BOOL = ("True | False", lambda v, _: isinstance(v, bool))
_POSITIVE = ("a number > 0", lambda v, _: number(v) and v > 0)


def _kv_heads_ok(v, c) -> bool:
    return v is None or (is_int(v) and v >= 1 and c.num_heads % v == 0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = declared(2048, "the embedding's rows (from the tokenizer)",
                               "an integer >= 2", int_at_least(2), cli=False)  # fmt: skip
    d_model: int = declared(256, "model width", "an integer >= 1", int_at_least(1))
    num_layers: int = declared(4, "decoder blocks", "an integer >= 1", int_at_least(1))
    num_heads: int = declared(4, "attention heads", "an integer >= 1", int_at_least(1))
    d_ff: int = declared(1024, "hidden width of the dense feed-forward layers",
                         "an integer >= 1", int_at_least(1))  # fmt: skip
    ffn: FFN = declared(FFN.MOE, "moe | dense (the dense baseline: no MoE layer)")
    moe: MoEConfig | None = declared(None, "the MoE layers' config (None: a dense model)",
                                     cli=False)  # fmt: skip
    moe_every: int = declared(
        1, "every n-th layer is an MoE layer (the last of each run of n)",
        lambda c: f"1..model.num_layers={c.num_layers}",
        lambda v, c: is_int(v) and 1 <= v <= c.num_layers,
    )  # fmt: skip
    rope_theta: float = declared(10_000.0, "RoPE base", *_POSITIVE, cli=False)
    norm_eps: float = declared(1e-6, "RMSNorm epsilon", *_POSITIVE, cli=False)
    dtype: str = declared("float32", "activations and matmuls (the router and losses stay "
                          "float32)", " | ".join(map(repr, DTYPES)))  # fmt: skip
    remat: Remat = declared(Remat.NONE, "recompute each block in the backward pass: none | "
                            "full | dots (keep the matmul outputs)")  # fmt: skip
    scan_layers: bool = declared(False, "run the blocks under one lax.scan over stacked "
                                 "parameters", *_BOOL)  # fmt: skip
    num_kv_heads: int | None = declared(
        None, "key/value heads of grouped-query attention (None: num_heads)",
        lambda c: f"None (model.num_heads) or an integer >= 1 dividing model.num_heads="
        f"{c.num_heads}", _kv_heads_ok, cli=False,
    )  # fmt: skip
    head_dim: int | None = declared(
        None, "width of one head (None: d_model // num_heads)",
        "None (model.d_model // model.num_heads) or an even integer >= 2",
        lambda v, _: v is None or (is_int(v) and v >= 2 and v % 2 == 0), cli=False,
    )  # fmt: skip
    qkv_bias: bool = declared(False, "biases on the q, k, v projections (Qwen2-MoE)", *_BOOL,
                              cli=False)  # fmt: skip
    qk_norm: bool = declared(False, "RMSNorm over the whole q and k projections (OLMoE)",
                             *_BOOL, cli=False)  # fmt: skip
    tie_embeddings: bool = declared(False, "logits from the embedding (no separate head)",
                                    *_BOOL, cli=False)  # fmt: skip
    shared_d_ff: int | None = declared(
        None, "width of a shared SwiGLU expert in every MoE layer (Qwen2-MoE)",
        "None (no shared expert) or an integer >= 1", optional(int_at_least(1)), cli=False,
    )  # fmt: skip
    shared_gate: bool = declared(False, "scale the shared expert by a sigmoid gate", *_BOOL,
                                 cli=False)  # fmt: skip

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("remat", enum_value(Remat, "model.remat", self.remat))
        set_("ffn", enum_value(FFN, "model.ffn", self.ffn))
        set_("dtype", dtype_name("model.dtype", self.dtype))
        if self.moe is None:  # a model built without an MoE config is the dense baseline
            set_("ffn", FFN.DENSE)
        if self.ffn is FFN.DENSE:
            set_("moe", None)
        check_declared(self, "model.")
        for ok, field, allowed in self._cross_rules():
            check(ok, f"model.{field}", getattr(self, field), allowed)
        if self.moe is not None:
            d = self.d_model
            check(self.moe.d_model == d, "moe.d_model", self.moe.d_model, f"model.d_model={d}")

    def _cross_rules(self) -> list[tuple[bool, str, str]]:
        """(ok, field, allowed) between fields, checked in order."""
        d, n = self.d_model, self.num_heads
        rules = [
            (self.shared_d_ff is None or self.moe is not None, "shared_d_ff",
             "None in a dense model (it adds to MoE layers)"),
            (not self.shared_gate or self.shared_d_ff is not None, "shared_gate",
             "False when model.shared_d_ff is None (it gates the shared expert)"),
        ]  # fmt: skip
        if self.head_dim is None:  # RoPE rotates pairs of a head's features: an even width
            rules += [
                (d % n == 0, "num_heads", f"an integer >= 1 dividing model.d_model={d}"),
                (d // n % 2 == 0, "num_heads",
                 f"a divisor of model.d_model={d} giving an even head width"),
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
