"""MoE-layer cases at one shape, beside the dense ideal of the width their tokens use.

Shared by ``bench_moe`` and ``grouped_breakdown``: one input x for every case, the routers of
each expert count calibrated once, the dense ideal compiled once per hidden width.
"""

from __future__ import annotations

from collections.abc import Iterable

from dynmoe_jax import MoELayer
from experiments.bench.dense import dense_swiglu
from experiments.bench.harness import Bench, Program, compile_program, log
from experiments.bench.layers import LayerShape, calibrate, fwd_bwd, make_layer, mean_top_p_k


class LayerBench:
    """Programs of the layer at ``shape``: its forward+backward on the shared input, and the
    dense ideal; ``bench`` times them."""

    def __init__(self, shape: LayerShape, bench: Bench):
        self.shape, self.bench = shape, bench
        self.x = shape.input()
        self._dense: dict[tuple[int, bool], Program] = {}

    def layer(self, layer: MoELayer) -> Program:
        """The layer's forward+backward (``layers.fwd_bwd``) compiled for the shared input."""
        fn, params = fwd_bwd(layer)
        return compile_program(fn, (params, self.x))

    def dense(self, hidden: int, fused: bool = False) -> Program:
        """The dense SwiGLU ideal of this hidden width (compiled once per width)."""
        if (hidden, fused) not in self._dense:
            s = self.shape
            fn, args = dense_swiglu(s.tokens, s.d_model, hidden, s.dtype, fused)
            self._dense[hidden, fused] = compile_program(fn, args)
        return self._dense[hidden, fused]

    def useful_k(self, layer: MoELayer) -> float:
        """Experts per token the layer's router selects on the shared input (top-k: k)."""
        cfg = layer.config
        if cfg.router.value == "top_k":
            return float(cfg.top_k)
        return mean_top_p_k(layer.router_DE[...], self.x, cfg.threshold)

    def calibrate(self, expert_counts: Iterable[int], target_k: float) -> dict[int, float]:
        """Per expert count, the router scale giving top-p a mean of ``target_k`` experts on
        the shared input (``layers.calibrate``)."""
        scales = {}
        for e in sorted(set(expert_counts)):
            router_DE = make_layer(self.shape, e, "topp", "index").router_DE[...]
            scales[e] = calibrate(router_DE, self.x, self.shape.threshold, target_k)
            log(f"E={e}: router weights x{scales[e]:.3f} -> top-p mean k {target_k}")
        return scales
