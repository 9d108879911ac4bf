"""ModelConfig: the decoder's shape and the optional features of imported checkpoints,
validated on construction.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from dynmoe_jax.model.layer_stack import Remat, remat_value
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.validation import check, is_int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 512  # dense layers' hidden width
    moe: MoEConfig | None = None  # None: a dense model
    moe_every: int = 1
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    remat: Remat | str | bool = Remat.NONE  # 'none' | 'full' | 'dots'; False/True: none/full
    scan_layers: bool = False  # blocks scanned over super-blocks of moe_every layers
    num_kv_heads: int | None = None  # None: num_heads (no grouping); must divide num_heads
    head_dim: int | None = None  # None: d_model // num_heads
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2-MoE)
    qk_norm: bool = False  # RMSNorm over the whole q and k projections before RoPE (OLMoE)
    tie_embeddings: bool = False  # logits from embed_VD transposed; no head_DV
    shared_d_ff: int | None = None  # width of a shared SwiGLU expert in every MoE layer
    shared_gate: bool = False  # scale the shared expert by sigmoid(x . shared_gate_D)

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_value(self.remat))  # frozen: normalised once
        # Types first, so that the range rules below never compare a str with an int.
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "moe_every"):
            value = getattr(self, field)
            check(is_int(value), f"model.{field}", value, "an integer")
        for field in ("num_kv_heads", "head_dim", "shared_d_ff"):
            value = getattr(self, field)
            check(value is None or is_int(value), f"model.{field}", value, "None or an integer")
        for field in ("qkv_bias", "qk_norm", "tie_embeddings", "shared_gate", "scan_layers"):
            value = getattr(self, field)
            check(isinstance(value, bool), f"model.{field}", value, "True | False")
        for field in ("rope_theta", "norm_eps"):
            value = getattr(self, field)
            check(_positive_number(value), f"model.{field}", value, "a number > 0")
        for ok, field, allowed in self._range_rules():
            check(ok, f"model.{field}", getattr(self, field), allowed)
        if self.moe is not None:
            d = self.d_model
            check(self.moe.d_model == d, "moe.d_model", self.moe.d_model, f"model.d_model={d}")

    def _range_rules(self) -> list[tuple[bool, str, str]]:
        """(ok, field, allowed), checked in order."""
        d, n, layers, kv = self.d_model, self.num_heads, self.num_layers, self.num_kv_heads
        rules = [
            (self.vocab_size >= 2, "vocab_size", "an integer >= 2"),
            (d >= 1, "d_model", "an integer >= 1"),
            (layers >= 1, "num_layers", "an integer >= 1"),
            (self.d_ff >= 1, "d_ff", "an integer >= 1"),
            (n >= 1, "num_heads", "an integer >= 1"),
            (kv is None or (kv >= 1 and n % kv == 0), "num_kv_heads",
             f"None (model.num_heads) or an integer >= 1 dividing model.num_heads={n}"),
            (1 <= self.moe_every <= layers, "moe_every", f"1..model.num_layers={layers}"),
            (self.shared_d_ff is None or self.shared_d_ff >= 1, "shared_d_ff",
             "None (no shared expert) or an integer >= 1"),
            (self.shared_d_ff is None or self.moe is not None, "shared_d_ff",
             "None in a dense model (it adds to MoE layers)"),
            (not self.shared_gate or self.shared_d_ff is not None, "shared_gate",
             "False when model.shared_d_ff is None (it gates the shared expert)"),
        ]  # fmt: skip
        # RoPE rotates pairs of a head's features, so a head's width is even.
        if self.head_dim is None:
            rules += [
                (n >= 1 and d % n == 0, "num_heads",
                 f"an integer >= 1 dividing model.d_model={d}"),
                (n >= 1 and d // n % 2 == 0, "num_heads",
                 f"a divisor of model.d_model={d} giving an even head width"),
            ]  # fmt: skip
        else:
            h = self.head_dim
            allowed = "None (model.d_model // model.num_heads) or an even integer >= 2"
            rules.append((h >= 2 and h % 2 == 0, "head_dim", allowed))
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


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
