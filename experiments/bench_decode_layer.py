"""The MoE layer at decode size (x [B, 1, D]) in each dispatch, against a bandwidth ideal.

Run from the repository root:

    .venv/bin/python -m experiments.bench_decode_layer
    .venv/bin/python -m experiments.bench_decode_layer --dtype bfloat16 --stacked [--kernel off]

With one token per row a decode step is bound by reading expert weights, so its floor is the
cost of reading exactly the experts the batch selected. The ideal here is that floor as XLA
can reach it: a jitted dense SwiGLU (``experts.expert_swiglu``) of all B tokens through each of
the U experts that some token selected (found from the layer's own routing of x), every expert's
weights their own arrays, outputs summed: no router, no combine weights, no gathering. Every
figure is a ratio to it, measured in the same process, in alternation with it.

Programs, per (B, router), all AOT compiled and timed in alternation (one call of each per
round, median of --reps after one warm-up call each, ``bench.harness.Bench``); every
router of one B shares one round, so cross-router ratios are as fair as those to the ideal:

* default: the layer as sampling runs it: grouped dispatch, ``decode_tokens`` None (the rule
  of ``MoEConfig.auto_decode_tokens``), the per-expert decode layout (``split_experts``);
* decode: the decode path. Where the rule sends the default there, this is the default's own
  time; where the rule sends it to the grouped buffer (large B at small k), the layer forced
  onto the decode path (``decode_tokens = B``) is timed as well;
* grouped, index: the forced buffer (``decode_tokens=0``) of either dispatch;
* with --stacked: default, grouped and index again in the stacked (training) layout;
* ideal, and one expert: expert 0's dense SwiGLU of the [B, D] input, also with its weights
  as trained ([in, out]; the decode layout holds them transposed, [out, in]).

Routers: top-k for each of --ks, and top-p (--threshold) at each of --top-p-means. A fresh
router's flat probabilities make top-p select many experts, so each top-p router's weights
are scaled (one factor, found by bisection) so that its mean experts per token on a random
calibration batch of --calib-tokens tokens hits the target; its layer sizes capacity for that
mean (``expected_k``), which only moves the rule's token limit. Every router and variant reads
the same expert arrays (one layer, seed 0), and all variants of a router the same scaled
router weights, so they route alike and share one union.

Per row: the mean k and union U on the timed batch, ms and ratio to the ideal of each
variant, the bytes of the U experts' weights over the decode path's time (and the ideal's),
and each variant's largest output difference from the decode path. Per B: the default's
time at top-8 and top-2 over top-1, and at top-1 over one expert. The 1-minute load average
is noted before and after (the machine may be shared).

Axis letters: B batch, N tokens of a call (B here), D model width, F expert hidden width,
E experts, U experts in the union.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynmoe_jax import MoEConfig, MoELayer
from dynmoe_jax.moe import experts
from experiments import report
from experiments.bench import flags, harness
from experiments.bench.harness import Bench, Program
from experiments.bench.layers import calibrate, mean_top_p_k

SEED = 0
VARIANTS = {  # config changes of each layer variant (decode: added where needed, see below)
    "default": {},
    "grouped": {"dispatch": "grouped", "decode_tokens": 0},
    "index": {"dispatch": "index", "decode_tokens": 0},
}
RATIOS = {"top8_over_top1": ("top-8", "top-1"), "top2_over_top1": ("top-2", "top-1")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    positive_int = flags.positive(int)
    p.add_argument("--d-model", type=positive_int, default=1024)
    p.add_argument("--d-ff", type=positive_int, default=3584)
    p.add_argument("--experts", type=positive_int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8, 64])
    p.add_argument("--ks", type=positive_int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--top-p-means", type=flags.positive(float), nargs="*", default=[1.3, 1.8])
    p.add_argument("--threshold", type=flags.unit_interval, default=0.5, help="top-p threshold")
    p.add_argument("--calib-tokens", type=positive_int, default=4096)
    p.add_argument("--reps", type=positive_int, default=20)
    p.add_argument("--stacked", action="store_true", help="also time the stacked layout")
    p.add_argument(
        "--kernel",
        choices=["on", "off"],
        default="on",
        help="moe.decode_kernel (the CPU decode kernel) for the layer's programs",
    )
    p.add_argument("--json", type=Path, default=report.RESULTS_DIR / "bench_decode_layer.json")
    a = p.parse_args(argv)
    e = a.experts
    for k in a.ks:
        if k > e:
            p.error(f"argument --ks: top-{k} needs more than --experts {e}")
    for m in a.top_p_means:
        if not 1.0 <= m <= e:
            p.error(f"argument --top-p-means: {m} is outside [1, --experts {e}]")
    if not a.ks and not a.top_p_means:
        p.error("argument --ks: no router to time (--ks and --top-p-means both empty)")
    return a


@dataclasses.dataclass(frozen=True)
class Router:
    """One routing setting: its config changes and router-weight scale (shared by every
    variant), and for top-p the mean k it reached on the calibration batch."""

    label: str
    changes: dict[str, Any]
    scale: float = 1.0
    calib_k: float | None = None


def routers(a: argparse.Namespace, router_DE: jax.Array) -> list[Router]:
    """Top-k routers as they are; top-p routers scaled to their target mean k."""
    out = [Router(f"top-{k}", {"router": "top_k", "top_k": k}) for k in a.ks]
    x_calib = jax.random.normal(jax.random.key(2), (a.calib_tokens, a.d_model), jnp.float32)
    x_calib = x_calib.astype(a.dtype)
    for target in a.top_p_means:
        scale = calibrate(router_DE, x_calib, a.threshold, target)
        k = mean_top_p_k(router_DE * scale, x_calib, a.threshold)
        if abs(k - target) > 0.05:  # out of reach at this threshold: the row reports k
            harness.log(f"top-p {target}: mean k {k:.3f} at best with --threshold {a.threshold}")
        changes = {"router": "top_p", "expected_k": target}
        out.append(Router(f"top-p {target:g}", changes, scale, round(k, 4)))
    return out


def layouts(a: argparse.Namespace) -> tuple[MoEConfig, dict[str, dict]]:
    """(the base config, pure-dict parameters per layout name): one layer's weights, split
    into the decode layout, and stacked as trained with --stacked."""
    cfg = MoEConfig(num_experts=a.experts, d_model=a.d_model, d_ff=a.d_ff, capacity_factor=None,
                    threshold=a.threshold, dtype=jnp.dtype(a.dtype),
                    decode_kernel=a.kernel == "on")  # fmt: skip
    layer = MoELayer(cfg, rngs=nnx.Rngs(SEED))
    out = {"stacked": nnx.to_pure_dict(nnx.state(layer))} if a.stacked else {}
    layer.split_experts()
    return cfg, {"split": nnx.to_pure_dict(nnx.state(layer)), **out}


def layer_fn(cfg: MoEConfig) -> Callable:
    """(params, x_BTD) -> (y_BTD, aux) of a layer with config ``cfg`` and the given weights."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoELayer(cfg, rngs=nnx.Rngs(SEED))))
    return lambda params, x_BTD: nnx.merge(graphdef, params)(x_BTD)


def output_only(fn: Callable) -> Callable:
    """The layer's output alone: what a decode step keeps (XLA drops the unused metrics)."""
    return lambda params, x_BTD: fn(params, x_BTD)[0]


def with_router(params: dict, scale: float) -> dict:
    """``params`` with the router weights times ``scale``; the expert arrays are shared."""
    return {**params, "router_DE": params["router_DE"] * scale}


def each_expert(x_ND: jax.Array, weights_U: tuple) -> list[jax.Array]:
    """The ideal: every token through each given expert (per-expert layout). The outputs are
    returned apart: XLA on CPU folds several products and a plain sum of their outputs into one
    fusion that ran many times slower than the products alone (docs/decoding.md)."""
    return [experts.expert_swiglu(x_ND, weights_U, u) for u in range(len(weights_U[0]))]


def union(cfg: MoEConfig, params: dict, x_BTD: jax.Array) -> tuple[float, list[int]]:
    """(mean experts per token, ids of the experts some token selected) from the layer's own
    routing of x (its per-expert load is non-zero exactly on the union)."""
    _, aux = jax.jit(layer_fn(cfg))(params, x_BTD)
    ids = np.flatnonzero(np.asarray(aux["expert_load"]) > 0)
    return float(aux["experts_per_token"]), [int(i) for i in ids]


def expert_weights(params: dict, ids: list[int]) -> experts.ExpertWeights:
    """The experts ``ids``' (gate, up, down) arrays, in the decode layout."""
    return tuple(tuple(params[name][e] for e in ids) for name in experts.NAMES)


def batch_cases(a, bench: Bench, cfg: MoEConfig, params: dict, rts: list[Router],
                b: int) -> tuple[dict[str, Program], list[dict]]:  # fmt: skip
    """(programs by name, rows without timings) for batch size ``b``."""
    x_BTD = jax.random.normal(jax.random.key(1), (b, 1, a.d_model), jnp.float32).astype(a.dtype)
    x_ND = x_BTD.reshape(b, a.d_model)
    split = params["split"]
    one = expert_weights(split, [0])
    as_trained = tuple(w[0].T for w in one)  # [in, out], the stacked layout's
    programs = {"one expert": (each_expert, (x_ND, one)),
                "one expert, [in, out]": (experts.swiglu, (x_ND, *as_trained))}  # fmt: skip
    rows = []
    for rt in rts:
        rcfg = dataclasses.replace(cfg, **rt.changes)
        k, ids = union(rcfg, with_router(split, rt.scale), x_BTD)
        on_decode = rcfg.takes_decode_path(b, 1)
        variants = {name: (changes, "split") for name, changes in VARIANTS.items()}
        if not on_decode:
            variants["decode"] = ({"decode_tokens": b}, "split")
        if a.stacked:
            variants.update({f"stacked {n}": (c, "stacked") for n, c in VARIANTS.items()})
        for name, (changes, layout) in variants.items():
            fn = output_only(layer_fn(dataclasses.replace(rcfg, **changes)))
            programs[f"{rt.label}/{name}"] = (fn, (with_router(params[layout], rt.scale), x_BTD))
        weights_U = expert_weights(split, ids)
        programs[f"{rt.label}/ideal"] = (each_expert, (x_ND, weights_U))
        path = "decode" if on_decode else "grouped"
        rows.append({"batch": b, "router": rt.label, "scale": round(rt.scale, 4),
                     "k_calib": rt.calib_k, "k_mean": round(k, 4), "union": len(ids),
                     "union_ids": ids, "default_path": path})  # fmt: skip
    # One program per function and argument shapes: the ideals of unions of one size (and one
    # expert, a union of one) compile once.
    compiled = {n: bench.compile(fn, args, harness.signature(fn, args))
                for n, (fn, args) in programs.items()}  # fmt: skip
    return compiled, rows


def max_diffs(programs: dict[str, Program], label: str, names: list[str]) -> dict[str, float]:
    """Each variant's largest absolute output difference from the decode path's output."""
    ref = label + ("/decode" if f"{label}/decode" in programs else "/default")
    ys = {n: np.asarray(program(), np.float32) for n, program in programs.items() if n in names}
    y_ref = np.asarray(programs[ref](), np.float32)
    return {n.split("/", 1)[1]: float(np.max(np.abs(y - y_ref))) for n, y in ys.items()}


def columns(names) -> list[str]:
    """The layer variants among ``names``, in table order."""
    order = ["default", "decode", "grouped", "index"]
    return [n for n in order + [f"stacked {v}" for v in VARIANTS] if n in names]


def fill_row(row: dict, ms: dict[str, float], diffs: dict, expert_bytes: int) -> dict:
    """Adds a row's times, ratios to the ideal, bandwidths and output differences."""
    mine = {n.split("/", 1)[1]: v for n, v in ms.items() if n.startswith(row["router"] + "/")}
    mine.setdefault("decode", mine["default"])  # the default took the decode path
    mine["one expert"] = ms["one expert"]
    mine["one expert, [in, out]"] = ms["one expert, [in, out]"]
    ideal = mine["ideal"]
    gbytes = row["union"] * expert_bytes / 1e9
    ones = ["one expert", "one expert, [in, out]"]
    row["ms"] = {n: round(mine[n], 4) for n in [*columns(mine), "ideal", *ones]}
    row["x_ideal"] = {n: round(mine[n] / ideal, 3) for n in columns(mine)}
    row["decode_gbps"] = float(f"{gbytes / (mine['decode'] * 1e-3):.3g}")
    row["ideal_gbps"] = float(f"{gbytes / (ideal * 1e-3):.3g}")  # 3 figures: tiny layers too
    row["max_abs_diff_to_decode"] = diffs
    return row


def time_batch(a, bench: Bench, cfg: MoEConfig, params: dict, rts: list[Router],
               b: int) -> list[dict]:  # fmt: skip
    """Every router's programs at batch size ``b``, timed in one interleaved set."""
    programs, rows = batch_cases(a, bench, cfg, params, rts, b)
    timings = bench.time(programs)
    expert_bytes = 3 * a.d_model * a.d_ff * jnp.dtype(a.dtype).itemsize
    for row in rows:
        label = row["router"]
        layer_names = [n for n in programs if n.startswith(label + "/") and "ideal" not in n]
        fill_row(row, timings.medians, max_diffs(programs, label, layer_names), expert_bytes)
        row.update(reps=a.reps, load=timings.load)
        harness.log(f"  {row}")
    return rows


def scaling(rows: list[dict]) -> dict[str, float | None]:
    """The default's time at top-8 and top-2 over top-1, and at top-1 over one expert, for one
    B (None where a router was not timed)."""
    default = {r["router"]: r["ms"]["default"] for r in rows}
    out = {key: (round(default[hi] / default[lo], 3) if hi in default and lo in default else None)
           for key, (hi, lo) in RATIOS.items()}  # fmt: skip
    one = rows[0]["ms"]["one expert"]
    out["in_out_over_out_in"] = round(rows[0]["ms"]["one expert, [in, out]"] / one, 3)
    out["top1_over_one_expert"] = round(default["top-1"] / one, 3) if "top-1" in default else None
    return out


def tables(rows: list[dict], scale_by_b: dict[int, dict]) -> str:
    """The rows as one markdown table (ratios to the ideal), and the per-B ratios."""
    names = columns(rows[0]["x_ideal"])
    header = ["B", "router", "scale", "k", "U", "default path", "ideal ms", "one expert ms"]
    header += [f"{n} x ideal" for n in names] + ["decode GB/s", "ideal GB/s"]
    body = [[r["batch"], r["router"], f"{r['scale']:.3g}", f"{r['k_mean']:.2f}", r["union"],
             r["default_path"], f"{r['ms']['ideal']:.3f}", f"{r['ms']['one expert']:.3f}",
             *(f"{r['x_ideal'][n]:.2f}" for n in names),
             f"{r['decode_gbps']:.1f}", f"{r['ideal_gbps']:.1f}"] for r in rows]  # fmt: skip
    keys = ["top8_over_top1", "top2_over_top1", "top1_over_one_expert", "in_out_over_out_in"]
    per_b = [[b, *("-" if s[k] is None else f"{s[k]:.2f}" for k in keys)]
             for b, s in scale_by_b.items()]  # fmt: skip
    head_b = ["B", "top-8 / top-1", "top-2 / top-1", "top-1 / one expert",
              "one expert, [in, out] / [out, in]"]  # fmt: skip
    ratios = report.markdown_table(head_b, per_b)
    return report.markdown_table(header, body) + "\nThe default's times:\n\n" + ratios


def command(argv: list[str] | None) -> str:
    """How this benchmark was invoked (``argv`` when called from Python, as the tests do)."""
    if argv is None:
        return report.command_line("experiments.bench_decode_layer")
    return " ".join([".venv/bin/python -m experiments.bench_decode_layer", *argv])


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    load_before = harness.load_average()
    bench = Bench(a.reps)
    cfg, params = layouts(a)
    rts = routers(a, params["split"]["router_DE"])
    rows, scale_by_b = [], {}
    for b in a.batch:
        harness.log(f"B={b}")
        batch_rows = time_batch(a, bench, cfg, params, rts, b)
        rows += batch_rows
        scale_by_b[b] = scaling(batch_rows)
    out = {"shape": {"d_model": a.d_model, "d_ff": a.d_ff, "experts": a.experts,
                     "dtype": a.dtype, "threshold": a.threshold},
           "rows": rows, "scaling": {str(b): s for b, s in scale_by_b.items()},
           "load_before": load_before, "load_after": harness.load_average(),
           "jax": jax.__version__, "device": str(jax.devices()[0]),
           "command": command(argv)}  # fmt: skip
    print(tables(rows, scale_by_b), flush=True)
    print(f"load average (1 min): {out['load_before']} before, {out['load_after']} after")
    harness.write_json(a.json, report.jsonable(out))
    return out


if __name__ == "__main__":
    main()
