"""Where one batched decode step spends its time: each piece timed alone at the step's shapes.

Run from the repository root on a Hugging Face folder (``experiments.make_checkpoint``):

    .venv/bin/python -m experiments.bench_decode_step --checkpoint PATH [--batch 1 8]
        [--threshold P] [--dtype float32] [--kernel on] [--reps 20] [--json PATH]

The checkpoint is put in the decode layout once (``--dtype``, as ``bench_decode``'s) and its
own router (or top-p at ``--threshold``) routes; ``--kernel off`` turns the CPU decode kernel
(``moe.decode_kernel``) off. For each batch size B, B fixed 8-token prompts are run into the
key/value cache, and the next step's real inputs are captured: the tokens, every block's
input, and every MoE layer's normed input and selected experts. Then these pieces of that one
step are compiled ahead of time and timed in alternation (``bench.harness.Bench``), so load
drift hits them alike:

* step: the whole step, ``Decoder.decode`` of one token per row and the greedy choice;
  step (matmul): the same with every expert product a plain matmul, as before the decode
  forms of ``experts.times_out_in``;
* attention: every block's norm, q/k/v/o projections, cache write and attention;
* moe: every MoE layer as sampling runs it (routing, the decode path, combine);
* experts: only the expert products of every MoE layer: each expert some row selected, run
  on all B rows, summed (no router, no switch, no combine weights);
* experts (matmul): the same with every product a plain matmul, as before the decode forms
  of ``experts.times_out_in``;
* head: final norm and logits; sampling: the greedy choice over the logits;
* copy: a jitted in-place copy of 256 MiB (read plus write counted), and read: a jitted
  matrix-vector product of a 256 MiB matrix (bytes read), ``bench_decode``'s two bandwidth
  probes, here timed with the pieces.

And the ideals: the step's bytes (``bench.decode_bytes``, the union of the rows' experts
counted exactly from the captured selections) over the copy bandwidth, likewise the experts'
bytes alone, and the step's bytes over the read bandwidth. The loop, ``generate``'s compiled
on-device loop of --new - 1 steps from the captured state, is timed in the same rounds: its
time per step against the step piece's is the loop's own share (carry updates, the stop test,
per-step writes; it runs no host work).

Axis letters: B rows, D model width, L MoE layers, U experts some row selected, V vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynmoe_jax import generate as generate_lib
from dynmoe_jax.moe import experts as experts_lib
from dynmoe_jax.moe.config import Router
from experiments import bench_decode, report
from experiments.bench import flags, harness
from experiments.bench.decode_bytes import (
    PROBE_MIB,
    cache_bytes,
    copy_program,
    read_program,
    weight_bytes,
)

PROMPT_TOKENS = 8


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face model folder")
    p.add_argument("--batch", type=flags.positive(int), nargs="+", default=[1, 8])
    p.add_argument("--threshold", type=flags.unit_interval, default=None,
                   help="top-p at this threshold (default: the checkpoint's router)")  # fmt: skip
    p.add_argument("--dtype", choices=list(bench_decode.DTYPES), default="float32")
    p.add_argument("--kernel", choices=["on", "off"], default="on",
                   help="moe.decode_kernel for the step, moe and loop pieces (the experts "
                        "pieces always run XLA's forms)")  # fmt: skip
    p.add_argument("--reps", type=flags.positive(int), default=20)
    p.add_argument("--new", type=flags.positive(int), default=16,
                   help="new tokens (at least 2): the cache holds the prompt and these; the "
                        "loop runs new - 1 steps")  # fmt: skip
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.new < 2:
        p.error(f"argument --new: {args.new} is below 2 (the loop needs a step)")
    return args


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The real inputs of one decode step after the prompts, and what it routed."""

    token_B1: jax.Array
    position_B: jax.Array
    cache: Any
    blocks_in: list[jax.Array]  # each block's input x [B, 1, D]
    moe_in: list[jax.Array]  # each MoE layer's normed input [B, 1, D]
    used: list[list[int]]  # per MoE layer: the experts some row selected


def capture(model, batch: int, positions: int) -> StepInputs:
    """Prefill B prompts into a cache of ``positions``, choose each row's next token, and
    record that step's inputs."""
    prompts = np.asarray(bench_decode.prompts(batch, model.cfg.vocab_size), np.int32)
    cache = model.init_cache(batch, positions)
    logits_BPV, _, cache = jax.jit(lambda m, t, c: m.decode(t, c, 0))(model, prompts, cache)
    token_B1 = jnp.argmax(logits_BPV[:, -1], axis=-1).astype(jnp.int32)[:, None]
    position_B = jnp.full((batch,), PROMPT_TOKENS, jnp.int32)
    blocks_in, moe_in, used = _trace_blocks(model, token_B1, cache, position_B)
    return StepInputs(token_B1, position_B, cache, blocks_in, moe_in, used)


def _trace_blocks(model, token_B1, cache, position_B):
    x_B1D = model.embed_VD[...].astype(model.cfg.dtype)[token_B1]
    blocks_in, moe_in, used = [], [], []
    for i, block in enumerate(model.blocks):
        blocks_in.append(x_B1D)
        a_B1D, _, _ = block.attn.decode(block.attn_norm(x_B1D), cache[0][i], cache[1][i],
                                        position_B)  # fmt: skip
        h_B1D = x_B1D + a_B1D
        normed_B1D = block.ffn_norm(h_B1D)
        if hasattr(block.ffn, "route"):
            moe_in.append(normed_B1D)
            _, _, r = block.ffn.route(normed_B1D.reshape(1, -1, normed_B1D.shape[-1]))
            used.append(np.flatnonzero(np.asarray(r.mask).any(axis=(0, 1))).tolist())
        x_B1D, _ = block._feed_forward(h_B1D)
    return blocks_in, moe_in, used


def _expert_outputs(layers: list, xs: list, used: list[list[int]]) -> list[jax.Array]:
    """Every MoE layer's selected experts on all its rows: products only. Each output is
    returned, not summed: XLA's CPU backend would fold the sum and every expert into one
    YNNPACK fusion, which the decode path (each output weighted apart) never forms."""
    outs = []
    for layer, x_B1D, ids in zip(layers, xs, used, strict=True):
        x_ND = x_B1D.reshape(-1, x_B1D.shape[-1])
        weights = layer.expert_weights()
        outs += [experts_lib.expert_swiglu(x_ND, weights, e) for e in ids]
    return outs


def pieces(model, inputs: StepInputs) -> dict[str, tuple[Callable, tuple]]:
    """name -> (function, arguments) of each piece of the step (the module docstring). The
    model travels as its state, merged inside each function."""
    graphdef, state = nnx.split(model)
    merged = lambda state: nnx.merge(graphdef, state)  # noqa: E731

    def moe_layers(m):
        return [b.ffn for b in m.blocks if hasattr(b.ffn, "route")]

    def step(state, token_B1, cache, position_B):
        logits_B1V, _, _ = merged(state).decode(token_B1, cache, position_B)
        return jnp.argmax(logits_B1V[:, 0], axis=-1)

    def attention(state, xs, cache, position_B):
        outs = []
        for i, (block, x_B1D) in enumerate(zip(merged(state).blocks, xs, strict=True)):
            k, v = cache[0][i], cache[1][i]
            outs.append(block.attn.decode(block.attn_norm(x_B1D), k, v, position_B)[0])
        return outs

    def moe(state, xs):
        layers = moe_layers(merged(state))
        return [layer(x_B1D)[0] for layer, x_B1D in zip(layers, xs, strict=True)]

    def products(state, xs):
        return _expert_outputs(moe_layers(merged(state)), xs, inputs.used)

    def head(state, x_B1D):
        m = merged(state)
        return m.logits(m.final_norm(x_B1D))

    logits_BV = jnp.zeros((inputs.token_B1.shape[0], model.cfg.vocab_size), jnp.float32)
    step_args = (state, inputs.token_B1, inputs.cache, inputs.position_B)
    return {
        "step": (step, step_args),
        "step (matmul)": (_as_matmul(step), step_args),
        "attention": (attention, (state, inputs.blocks_in, inputs.cache, inputs.position_B)),
        "moe": (moe, (state, inputs.moe_in)),
        "experts": (products, (state, inputs.moe_in)),
        "experts (matmul)": (_as_matmul(products), (state, inputs.moe_in)),
        "head": (head, (state, inputs.blocks_in[-1])),
        "sampling": (lambda lg: jnp.argmax(lg, axis=-1), (logits_BV,)),
    }


def _as_matmul(fn: Callable) -> Callable:
    """``fn`` traced with every product a plain matmul (``experts.REDUCE_ROWS`` = 0)."""

    def traced(*args):
        saved, experts_lib.REDUCE_ROWS = experts_lib.REDUCE_ROWS, 0
        try:
            return fn(*args)
        finally:
            experts_lib.REDUCE_ROWS = saved

    return traced


def loop_program(graphdef, params, inputs: StepInputs, steps: int) -> Callable[[], Any]:
    """``generate``'s on-device loop of ``steps`` greedy steps from the captured state (no
    stop id), compiled once: its time per step against the step piece's is the loop's own."""
    b = inputs.token_B1.shape[0]
    layers, vocab = len(inputs.moe_in), nnx.merge(graphdef, params).cfg.vocab_size
    args = (graphdef, params, inputs.cache, inputs.token_B1[:, 0], inputs.position_B,
            jnp.zeros((b, layers), jnp.float32), jnp.zeros((b, vocab), jnp.float32),
            jnp.asarray([-1], jnp.int32), jnp.float32(0.0), jax.random.key(0))  # fmt: skip
    loop = generate_lib._decode_loop.lower(*args, steps=steps, keep_logits=False).compile()
    return lambda: jax.block_until_ready(loop(*args[1:]))


def measure(model_cfg, params, graphdef, batch: int, args) -> dict:
    model = nnx.merge(graphdef, params)
    positions = PROMPT_TOKENS + args.new
    inputs = capture(model, batch, positions)
    bench = harness.Bench(args.reps)
    programs = {name: bench.compile(fn, a) for name, (fn, a) in pieces(model, inputs).items()}
    programs["loop"] = loop_program(graphdef, params, inputs, args.new - 1)
    weights = weight_bytes(params)
    union = float(np.mean([len(u) for u in inputs.used]))
    expert_bytes = union * weights.expert
    (copy_call, copied), (read_call, read) = copy_program(PROBE_MIB), read_program(PROBE_MIB)
    programs |= {"copy": copy_call, "read": read_call}
    timings = bench.time(programs)
    ms = timings.medians
    loop_ms = ms["loop"] / (args.new - 1)
    bandwidth, read_bandwidth = copied / (ms["copy"] / 1e3), read / (ms["read"] / 1e3)
    step_bytes = weights.step(batch, union, cache_bytes(model_cfg, batch, positions))
    return {"batch": batch, "union_per_layer": union, "ms": ms, "all_ms": timings.all_ms,
            "loop_ms_per_step": loop_ms, "copy_gb_per_s": bandwidth / 1e9,
            "read_gb_per_s": read_bandwidth / 1e9,
            "ideal_step_ms": step_bytes / bandwidth * 1e3,
            "ideal_experts_ms": expert_bytes / bandwidth * 1e3,
            "read_ideal_step_ms": step_bytes / read_bandwidth * 1e3,
            "load": timings.load}  # fmt: skip


def table(rows: list[dict]) -> str:
    names = ["step", "step (matmul)", "attention", "moe", "experts", "experts (matmul)", "head",
             "sampling"]  # fmt: skip
    header = ["B", "U / layer", *[f"{n} ms" for n in names], "loop ms / step", "ideal step ms",
              "ideal experts ms", "experts x ideal", "step x ideal", "read ideal step ms",
              "step x read ideal", "load"]  # fmt: skip
    body = []
    for r in rows:
        ms = r["ms"]
        body.append([r["batch"], f"{r['union_per_layer']:.2f}",
                     *[f"{ms[n]:.2f}" for n in names], f"{r['loop_ms_per_step']:.2f}",
                     f"{r['ideal_step_ms']:.2f}", f"{r['ideal_experts_ms']:.2f}",
                     f"{ms['experts'] / r['ideal_experts_ms']:.2f}",
                     f"{ms['step'] / r['ideal_step_ms']:.2f}",
                     f"{r['read_ideal_step_ms']:.2f}",
                     f"{ms['step'] / r['read_ideal_step_ms']:.2f}", r["load"]])  # fmt: skip
    return report.markdown_table(header, body)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model_cfg, params = bench_decode.load(args.checkpoint, args.dtype)
    moe = bench_decode.with_kernel(model_cfg.moe, args.kernel)
    if args.threshold is not None:
        moe = dataclasses.replace(moe, router=Router.TOP_P, threshold=args.threshold)
    model_cfg = dataclasses.replace(model_cfg, moe=moe)
    graphdef = generate_lib.decode_graphdef(model_cfg)
    load_before = harness.load_average()
    rows = [measure(model_cfg, params, graphdef, b, args) for b in args.batch]
    out = {"checkpoint": str(args.checkpoint), "dtype": args.dtype, "kernel": args.kernel,
           "router": moe.router.value, "threshold": args.threshold, "load_before": load_before,
           "rows": rows, "median_of": args.reps}  # fmt: skip
    print(
        f"checkpoint={args.checkpoint} dtype={args.dtype} kernel={args.kernel} "
        f"router={moe.router.value} threshold={args.threshold} load before {load_before}"
    )
    print(table(rows))
    harness.write_json(args.json, report.jsonable(out))
    return out


if __name__ == "__main__":
    main()
