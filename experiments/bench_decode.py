"""Decode rate of batched generation (``generate.generate``), against what memory allows.

Run from the repository root, in one of two modes:

    .venv/bin/python -m experiments.bench_decode --config default --new 100,400 [--full_window]
    .venv/bin/python -m experiments.bench_decode --checkpoint PATH [--thresholds 0.3 0.5 ...]
        [--batch 1 8] [--new 64] [--repeats 3] [--dtype float32 bfloat16 bfloat16-experts]
        [--kernel on off] [--json PATH]

**Config mode** (the default, ``--config default``): the config's model, freshly initialised
(the rate does not depend on the weights), in the decode layout (``generate.decode_layout``),
decodes greedily after an 8-token prompt with no stop token, so every request runs its full
length, at each of several numbers of new tokens. Each repeat runs every length once, in turn,
so load drifting on a shared machine hits them alike; the median rate is printed, with each
length's ratio to the first; ``--full_window`` also times recomputing the whole window for each
token (``generate.generate_full_window``); ``--kernel on off`` times every length with the CPU
decode kernel on and off in the same repeats. ``--scan`` initialises the model with scanned
layers; the decode layout unstacks them, so decoding runs the same graph. Measured figures:
experiments/RESULTS.md.

**Checkpoint mode** (``--checkpoint PATH``, a Hugging Face folder, e.g. one written by
``experiments.make_checkpoint``): the folder is loaded once (``pretrained.from_hf``) and put in
the decode layout once per ``--dtype`` (several are timed in the same rounds;
``bfloat16-experts`` is the float32 model with bfloat16 expert weights,
``decode_layout(expert_dtype=bfloat16)``); every routing setting (the checkpoint's own top-k,
then top-p at each of ``--thresholds``, each with the CPU decode kernel on and/or off as
``--kernel`` says) reuses those parameters with its own graph (``generate.decode_graphdef`` of
the model's config with that router). For each setting and each batch size in ``--batch``,
``generate`` decodes ``--new`` tokens greedily after fixed 8-token prompts (a different one per
row, no stop token); one untimed round over every (setting, batch) compiles and warms up, then
the ``--repeats`` timed rounds alternate over them likewise, so load drift hits all alike.
Reported per row: the median decode rate (rows x steps per second, compile and prefill
excluded), the mean experts per new token (over the MoE layers, the rows and the decode steps),
and the rate memory bandwidth allows:

* the bytes one decode step reads: every weight read whole (attention, norms, routers, the
  head, any dense layer), the embedding row of each batch row, the key/value cache (the
  attention reads all of its positions, masked), and the experts the step computed. The
  decode path reads each expert some row of the step selected, once: per MoE layer the union
  of the rows' selections. At B = 1 that union is the token's own experts, so the mean experts
  per token gives the expected bytes exactly. At B > 1 ``generate`` reports only how many
  experts each token used, not which, so the union is estimated as if each row picked its k
  (the measured mean) of the E experts independently and uniformly: E * (1 - (1 - k/E)^B).
  Correlated routing (rows sharing experts) makes the true union smaller, so the bound at
  B > 1 is then a lower estimate of what memory allows;
* two bandwidths, measured in the same process after every timed round (the medians are
  used): the copy bandwidth, bytes read plus written per second by a jitted elementwise copy
  (``x + 1``, in place) of a ``--copy-mib`` MiB array; and the read bandwidth, bytes read per
  second by a jitted matrix-vector product of a ``--copy-mib`` MiB matrix. A decode step only
  reads, and where each core keeps only so many reads in flight (a few cores), reading alone
  moves fewer bytes per second than a copy's reads and writes together;
* the bounds: B rows / (step bytes / bandwidth) tokens/s over each bandwidth, and the
  fraction of each reached.

Writes the table to standard output and, with ``--json PATH``, every figure to PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import generate as generate_lib
from dynmoe_jax import model as model_lib
from dynmoe_jax import pretrained
from dynmoe_jax.moe.config import MoEConfig, Router
from dynmoe_jax.validation import ConfigError
from experiments import report
from experiments.bench import flags, harness
from experiments.bench.decode_bytes import (
    PROBE_MIB,
    copy_bandwidth,
    expected_step,
    read_bandwidth,
    weight_bytes,
)

PROMPT = [11, 7, 300, 42, 5, 99, 1000, 3]
DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.8)
CHECKPOINT_ONLY = ("thresholds", "batch", "copy_mib", "dtype")
# --dtype: (the model's compute dtype, the expert weights' dtype in the decode layout)
DTYPES = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
          "bfloat16-experts": ("float32", "bfloat16")}  # fmt: skip
CONFIG_ONLY = ("scan", "full_window")


def _lengths(text: str) -> list[int]:
    """Numbers of new tokens, by commas: at least 2 each, so that some decode step is timed."""
    try:
        lengths = [int(n) for n in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"{text} is not integers >= 2 by commas")
    return lengths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, each checked against its mode; a bad one ends in one argparse line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--config", type=flags.shipped_config, default=None,
                      help="config mode: a module of dynmoe_jax.configs")  # fmt: skip
    mode.add_argument("--checkpoint", type=Path, default=None, help="a Hugging Face model folder")
    p.add_argument("--new", type=_lengths, default=None,
                   help="new tokens per request (config mode: several, by commas; default "
                        "100,400; checkpoint mode: one, default 64)")  # fmt: skip
    p.add_argument("--repeats", type=flags.positive(int), default=3)
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--scan", action="store_true", help="config mode: initialise scanned")
    p.add_argument("--full_window", action="store_true",
                   help="config mode: also time recomputing the whole window")  # fmt: skip
    p.add_argument(
        "--thresholds",
        type=flags.unit_interval,
        nargs="+",
        default=None,
        help=f"checkpoint mode: top-p thresholds (default {DEFAULT_THRESHOLDS})",
    )
    p.add_argument("--batch", type=flags.positive(int), nargs="+", default=None,
                   help="checkpoint mode: batch sizes (default 1 8)")  # fmt: skip
    p.add_argument(
        "--copy-mib",
        type=flags.positive(int),
        default=None,
        help=f"checkpoint mode: size of the bandwidth probes (default {PROBE_MIB})",
    )
    p.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=None,
                   help="checkpoint mode: compute dtypes, each its own decode layout, timed "
                        "in the same rounds (default float32); bfloat16-experts: float32 "
                        "with bfloat16 expert weights")  # fmt: skip
    p.add_argument(
        "--kernel",
        choices=["on", "off"],
        nargs="+",
        default=None,
        help="moe.decode_kernel, each timed in the same rounds (default on)",
    )
    args = p.parse_args(argv)
    args.kernel = list(dict.fromkeys(args.kernel or ["on"]))
    if args.checkpoint is None:
        _check_config_mode(p, args)
    else:
        _check_checkpoint_mode(p, args)
    return args


def _flag(name: str) -> str:
    return f"--{name}" if name == "full_window" else f"--{name.replace('_', '-')}"


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return [n for n in names if getattr(args, n) not in (None, False)]


def _check_config_mode(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in _given(args, CHECKPOINT_ONLY):
        p.error(f"argument {_flag(name)}: only with --checkpoint")
    args.config = args.config or "default"
    args.new = args.new or [100, 400]


def _check_checkpoint_mode(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in _given(args, CONFIG_ONLY):
        p.error(f"argument {_flag(name)}: only in config mode (without --checkpoint)")
    args.new = args.new or [64]
    if len(args.new) != 1:
        p.error(f"argument --new: {','.join(map(str, args.new))} is not one number "
                "(checkpoint mode decodes one length)")  # fmt: skip
    args.new = args.new[0]
    args.thresholds = sorted(set(args.thresholds or DEFAULT_THRESHOLDS))
    args.batch = sorted(set(args.batch or [1, 8]))
    args.copy_mib = args.copy_mib or PROBE_MIB
    args.dtype = list(dict.fromkeys(args.dtype or ["float32"]))
    try:
        pretrained.hf_model_config(args.checkpoint)
    except ConfigError as e:
        p.error(f"argument --checkpoint: {e}")


# ----------------------------------------------------------------------------- config mode


def run_config(args: argparse.Namespace) -> dict:
    """The rate at each number of new tokens for the config's fresh model, at B = 1."""
    config = importlib.import_module(f"dynmoe_jax.configs.{args.config}").get_config()
    config.model.scan_layers = args.scan
    model_cfg = config_lib.resolve(config).model
    params = nnx.split(model_lib.Decoder(model_cfg, rngs=nnx.Rngs(0)))[1]
    _, params = generate_lib.decode_layout(model_cfg, params)
    graphdefs = {
        k: generate_lib.decode_graphdef(
            dataclasses.replace(model_cfg, moe=with_kernel(model_cfg.moe, k))
        )
        for k in args.kernel
    }
    prompt = prompts(1, model_cfg.vocab_size)[0]
    cases = [(k, n) for k in args.kernel for n in args.new]
    rates: dict[tuple, list[float]] = {case: [] for case in cases}
    full: dict[tuple, list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for k, n in cases:
            gen = generate_lib.generate(graphdefs[k], params, [prompt], n)
            rates[k, n].append(gen.tokens_per_s)
            if args.full_window:
                rate = generate_lib.generate_full_window(graphdefs[k], params, prompt, n)[2]
                full[k, n].append(rate)
    first = statistics.median(rates[cases[0]])
    rows = [
        {"kernel": k, "new_tokens": n, "tokens_per_s": statistics.median(rates[k, n]),
         "all_tokens_per_s": rates[k, n], "ratio_to_first": statistics.median(rates[k, n]) / first,
         "full_window_tokens_per_s": statistics.median(full[k, n]) if full[k, n] else None}
        for k, n in cases
    ]  # fmt: skip
    return {"mode": "config", "config": args.config, "scan_layers": args.scan, "rows": rows}


def with_kernel(moe: MoEConfig | None, kernel: str) -> MoEConfig | None:
    """``moe`` with the CPU decode kernel ``on`` or ``off`` (``moe.decode_kernel``)."""
    return None if moe is None else dataclasses.replace(moe, decode_kernel=kernel == "on")


def config_table(out: dict) -> str:
    header = ["kernel", "new tokens", "tokens/s (median)", "ratio to first",
              "full-window tokens/s"]  # fmt: skip
    body = [
        [r["kernel"], r["new_tokens"], f"{r['tokens_per_s']:.1f}", f"{r['ratio_to_first']:.2f}",
         "-" if r["full_window_tokens_per_s"] is None else f"{r['full_window_tokens_per_s']:.1f}"]
        for r in out["rows"]
    ]  # fmt: skip
    return report.markdown_table(header, body)


# ----------------------------------------------------------------------------- checkpoint mode


def prompts(batch: int, vocab: int) -> list[list[int]]:
    """``batch`` fixed prompts of 8 tokens, each row its own (so rows may route apart)."""
    return [[(t + 31 * b) % vocab for t in PROMPT] for b in range(batch)]


def routing_settings(
    moe: Any, thresholds: Sequence[float], kernels: Sequence[str] = ("on",)
) -> list[tuple[str, Any]]:
    """(label, MoEConfig): the checkpoint's own router, then top-p at each threshold, each
    with the CPU decode kernel on and/or off (labelled only when both are timed)."""
    own = f"top-{moe.top_k} (own)" if moe.router is Router.TOP_K else f"own ({moe.router.value})"
    out = [(own, moe)]
    for p in thresholds:
        variant = dataclasses.replace(moe, router=Router.TOP_P, threshold=p)
        out.append((f"top-p {p:g}", variant))
    return [
        (label if len(kernels) == 1 else f"{label}, kernel {k}", with_kernel(m, k))
        for label, m in out
        for k in kernels
    ]


def load(path: Path, dtype: str) -> tuple[model_lib.ModelConfig, nnx.State]:
    """The checkpoint's config and its parameters in the decode layout; the imported layout
    is dropped once that is made."""
    compute, experts = DTYPES[dtype]
    model = pretrained.from_hf(path, dtype=compute)
    _, params = generate_lib.decode_layout(model.cfg, nnx.split(model)[1], expert_dtype=experts)
    return model.cfg, params


def run_checkpoint(args: argparse.Namespace) -> dict:
    """Every (setting, batch) row of the checkpoint mode (the module docstring)."""
    loaded = {dtype: load(args.checkpoint, dtype) for dtype in args.dtype}
    model_cfg = loaded[args.dtype[0]][0]
    cases = [
        (label, moe, generate_lib.decode_graphdef(dataclasses.replace(cfg, moe=moe)), b, dtype)
        for dtype, (cfg, _) in loaded.items()
        for label, moe in routing_settings(cfg.moe, args.thresholds, args.kernel)
        for b in args.batch
    ]
    rates: list[list[float]] = [[] for _ in cases]
    experts_per_token = [0.0] * len(cases)
    copies, reads = [], []
    for repeat in range(args.repeats + 1):  # the first round compiles and warms up, untimed
        for i, (_, _, graphdef, b, dtype) in enumerate(cases):
            prompts_B = prompts(b, model_cfg.vocab_size)
            gen = generate_lib.generate(graphdef, loaded[dtype][1], prompts_B, args.new)
            if repeat:
                rates[i].append(gen.tokens_per_s)
            # Each row's first new token came from the prefill: the steps made the rest.
            experts_per_token[i] = float(np.mean([row[1:] for row in gen.experts]))
        if repeat:
            copies.append(copy_bandwidth(args.copy_mib))
            reads.append(read_bandwidth(args.copy_mib))
    bandwidth, read = statistics.median(copies), statistics.median(reads)
    rows = []
    for (label, moe, _, b, dtype), rate, k in zip(cases, rates, experts_per_token, strict=True):
        cfg, params = loaded[dtype]
        union, step = expected_step(cfg, params, b, k, len(PROMPT) + args.new)
        bound, read_bound = b * bandwidth / step, b * read / step
        median = statistics.median(rate)
        rows.append({"setting": label, "router": moe.router.value, "top_k": moe.top_k,
                     "threshold": moe.threshold if moe.router is Router.TOP_P else None,
                     "decode_kernel": moe.decode_kernel, "dtype": dtype, "batch": b,
                     "tokens_per_s": median, "all_tokens_per_s": rate,
                     "experts_per_token": k, "union_experts": union, "step_mib": step / 2**20,
                     "bound_tokens_per_s": bound, "of_bound": median / bound,
                     "read_bound_tokens_per_s": read_bound,
                     "of_read_bound": median / read_bound})  # fmt: skip
    weights = weight_bytes(loaded[args.dtype[0]][1])
    return {"mode": "checkpoint", "checkpoint": str(args.checkpoint), "dtype": " ".join(args.dtype),
            "new_tokens": args.new, "prompt_tokens": len(PROMPT), "repeats": args.repeats,
            "copy_gib_per_s": bandwidth / 2**30, "copy_mib": args.copy_mib,
            "read_gib_per_s": read / 2**30,
            "copy_gib_per_s_by_round": [c / 2**30 for c in copies],
            "read_gib_per_s_by_round": [r / 2**30 for r in reads],
            "weights_mib": {f.name: getattr(weights, f.name) / 2**20
                            for f in dataclasses.fields(weights) if f.name != "num_experts"},
            "num_experts": weights.num_experts, "moe_layers": model_cfg.num_moe_layers,
            "rows": rows}  # fmt: skip


def checkpoint_table(out: dict) -> str:
    header = ["setting", "dtype", "B", "tokens/s (median)", "experts / token",
              "experts read / layer", "MiB / step", "bound tokens/s", "of bound",
              "read bound tokens/s", "of read bound"]  # fmt: skip
    body = [
        [r["setting"], r["dtype"], r["batch"], f"{r['tokens_per_s']:.1f}",
         f"{r['experts_per_token']:.2f}", f"{r['union_experts']:.2f}", f"{r['step_mib']:.1f}",
         f"{r['bound_tokens_per_s']:.1f}", f"{r['of_bound']:.0%}",
         f"{r['read_bound_tokens_per_s']:.1f}", f"{r['of_read_bound']:.0%}"]
        for r in out["rows"]
    ]  # fmt: skip
    return report.markdown_table(header, body)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    where = f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}"
    try:
        out = run_config(args) if args.checkpoint is None else run_checkpoint(args)
    except ConfigError as e:  # a checkpoint whose tensors do not fit its config
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out |= {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "load_average": harness.load_average()}  # fmt: skip
    if out["mode"] == "config":
        print(f"config={args.config} scan_layers={args.scan} {where}")
        print(config_table(out))
    else:
        print(f"checkpoint={args.checkpoint} dtype={' '.join(args.dtype)} new={args.new} {where} "
              f"copy bandwidth {out['copy_gib_per_s']:.1f} GiB/s, "
              f"read bandwidth {out['read_gib_per_s']:.1f} GiB/s")  # fmt: skip
        print(checkpoint_table(out))
    harness.write_json(args.json, report.jsonable(out))
    return out


if __name__ == "__main__":
    main()
