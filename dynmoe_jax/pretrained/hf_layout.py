"""Where each Decoder parameter lies in a Hugging Face checkpoint, and how it is converted.

One table maps a parameter's path in the Decoder (inside a block, or at the top) to a rule.
A rule names the checkpoint tensors it reads, with the shapes it expects (known from the
parameter's own shape before anything is read), and converts them into that parameter:

* ``Copy``: same values, reshaped (norm scales, biases [N*H] -> [N, H], the shared-expert gate
  [1, D] -> [D], the embedding).
* ``Linear``: a torch Linear weight [out, in] -> ours [in..., out...] (a transpose, then the
  heads split out of N*H).
* ``Experts``: E per-expert Linear weights stacked into [E, in, out], filled one expert at a
  time into one preallocated array; or, when the checkpoint holds the fused layout
  (``experts.gate_up_proj`` [E, 2F, D], ``experts.down_proj`` [E, D, F]), sliced from it.

Templates use ``{layer}`` (``model.layers.{i}``), ``{moe}`` (the family's MoE block under the
layer), ``{gate}``/``{up}``/``{down}`` (the family's expert projection names) and ``{j}`` (the
expert).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np

from dynmoe_jax.pretrained.safetensors_io import TensorInfo, host_empty

Shape = tuple[int, ...]


def same(shape: Shape) -> Shape:
    return shape


def flat(shape: Shape) -> Shape:
    return (math.prod(shape),)


def row(shape: Shape) -> Shape:
    return (1, math.prod(shape))


@dataclasses.dataclass(frozen=True)
class Copy:
    template: str
    hf_shape: Callable[[Shape], Shape] = same

    def sources(self, names: Mapping[str, str], shape: Shape, available) -> dict[str, Shape]:
        return {self.template.format(**names): self.hf_shape(shape)}

    def convert(self, tensors: Mapping[str, TensorInfo], sources, shape: Shape) -> np.ndarray:
        (name,) = sources
        return tensors[name].read().reshape(shape)


@dataclasses.dataclass(frozen=True)
class Linear:
    """``n_in`` leading axes of our parameter are the input; the rest the output."""

    template: str
    n_in: int = 1

    def sources(self, names: Mapping[str, str], shape: Shape, available) -> dict[str, Shape]:
        hf = (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))
        return {self.template.format(**names): hf}

    def convert(self, tensors: Mapping[str, TensorInfo], sources, shape: Shape) -> np.ndarray:
        (name,) = sources
        return _copy(tensors[name].read().T, shape)


@dataclasses.dataclass(frozen=True)
class Experts:
    """Our [E, X, Y] from E Linear weights [Y, X], or from the fused layout.

    ``part``: which half of the fused ``gate_up_proj`` [E, 2F, D] this parameter is (0 gate,
    1 up); None for ``down_proj`` [E, D, F], which is whole.
    """

    template: str
    fused: str
    part: int | None

    def _fused_shape(self, shape: Shape) -> Shape:
        e, x, y = shape
        return (e, 2 * y, x) if self.part is not None else (e, y, x)

    def sources(self, names: Mapping[str, str], shape: Shape, available) -> dict[str, Shape]:
        fused = self.fused.format(**names)
        first = self.template.format(**names, j=0)
        if first not in available and fused in available:
            return {fused: self._fused_shape(shape)}
        e, x, y = shape
        return {self.template.format(**names, j=j): (y, x) for j in range(e)}

    def convert(self, tensors: Mapping[str, TensorInfo], sources, shape: Shape) -> np.ndarray:
        first = tensors[next(iter(sources))]
        if len(first.shape) == 3:  # the fused layout (sources() checked the shape)
            return self._from_fused(first.read(), shape)
        out = host_empty(shape, first.dtype)
        for j, name in enumerate(sources):
            out[j] = tensors[name].read().T
        return out

    def _from_fused(self, w: np.ndarray, shape: Shape) -> np.ndarray:
        y = shape[2]
        if self.part is not None:
            w = w[:, self.part * y : (self.part + 1) * y, :]
        return _copy(w.transpose(0, 2, 1), shape)


def _copy(x: np.ndarray, shape: Shape, dtype=None) -> np.ndarray:
    """``x`` (e.g. a transposed view) copied into a fresh host array, reshaped to ``shape``."""
    out = host_empty(x.shape, dtype or x.dtype)
    np.copyto(out, x, casting="unsafe")
    return out.reshape(shape)


def cast(x: np.ndarray, dtype) -> np.ndarray:
    return x if x.dtype == dtype else _copy(x, x.shape, dtype)


Rule = Copy | Linear | Experts

# Parameters at the top of the Decoder.
TOP_RULES: dict[str, Rule] = {
    "embed_VD": Copy("model.embed_tokens.weight"),
    "final_norm.scale_D": Copy("model.norm.weight"),
    "head_DV": Linear("lm_head.weight"),
}

# Parameters of block i (the path below ``blocks.i``).
BLOCK_RULES: dict[str, Rule] = {
    "attn_norm.scale_D": Copy("{layer}.input_layernorm.weight"),
    "ffn_norm.scale_D": Copy("{layer}.post_attention_layernorm.weight"),
    "attn.wq_DNH": Linear("{layer}.self_attn.q_proj.weight"),
    "attn.wk_DJH": Linear("{layer}.self_attn.k_proj.weight"),
    "attn.wv_DJH": Linear("{layer}.self_attn.v_proj.weight"),
    "attn.wo_NHD": Linear("{layer}.self_attn.o_proj.weight", n_in=2),
    "attn.bq_NH": Copy("{layer}.self_attn.q_proj.bias", flat),
    "attn.bk_JH": Copy("{layer}.self_attn.k_proj.bias", flat),
    "attn.bv_JH": Copy("{layer}.self_attn.v_proj.bias", flat),
    "attn.q_norm.scale_D": Copy("{layer}.self_attn.q_norm.weight"),
    "attn.k_norm.scale_D": Copy("{layer}.self_attn.k_norm.weight"),
    "ffn.router_DE": Linear("{moe}.gate.weight"),
    "ffn.w_gate_EDF": Experts("{moe}.experts.{j}.{gate}.weight", "{moe}.experts.gate_up_proj", 0),
    "ffn.w_up_EDF": Experts("{moe}.experts.{j}.{up}.weight", "{moe}.experts.gate_up_proj", 1),
    "ffn.w_down_EFD": Experts("{moe}.experts.{j}.{down}.weight", "{moe}.experts.down_proj", None),
    "ffn.w_gate_DF": Linear("{layer}.mlp.gate_proj.weight"),
    "ffn.w_up_DF": Linear("{layer}.mlp.up_proj.weight"),
    "ffn.w_down_FD": Linear("{layer}.mlp.down_proj.weight"),
    "shared.w_gate_DF": Linear("{moe}.shared_expert.gate_proj.weight"),
    "shared.w_up_DF": Linear("{moe}.shared_expert.up_proj.weight"),
    "shared.w_down_FD": Linear("{moe}.shared_expert.down_proj.weight"),
    "shared_gate_D": Copy("{moe}.shared_expert_gate.weight", row),
}


def rule_for(path: tuple) -> tuple[Rule | None, int | None]:
    """The rule of a parameter path (``('blocks', 3, 'attn', 'wq_DNH')``) and its layer."""
    if path and path[0] == "blocks":
        return BLOCK_RULES.get(".".join(map(str, path[2:]))), int(path[1])
    return TOP_RULES.get(".".join(map(str, path))), None
