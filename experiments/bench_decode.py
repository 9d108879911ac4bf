"""Decode rate of batched generation (``generate.generate``), against what memory allows.

Run from the repository root, in one of two modes:

    .venv/bin/python -m experiments.bench_decode --config default --new 100,400 [--full_window]
    .venv/bin/python -m experiments.bench_decode --checkpoint PATH [--thresholds 0.3 0.5 ...]
        [--batch 1 8] [--new 64] [--repeats 3] [--json PATH]

**Config mode** (the default, ``--config default``): the config's model, freshly initialised
(the rate does not depend on the weights), in the decode layout (``generate.decode_layout``),
decodes greedily after an 8-token prompt with no stop token, so every request runs its full
length, at each of several numbers of new tokens. Each repeat runs every length once, in turn,
so load drifting on a shared machine hits them alike; the median rate is printed, with each
length's ratio to the first; ``--full_window`` also times recomputing the whole window for each
token (``generate.generate_full_window``). ``--scan`` initialises the model with scanned layers;
the decode layout unstacks them, so decoding runs the same graph. Measured figures:
experiments/RESULTS.md.

**Checkpoint mode** (``--checkpoint PATH``, a Hugging Face folder, e.g. one written by
``experiments.make_checkpoint``): the folder is loaded once (``pretrained.from_hf``) and put in
the decode layout once; every routing setting (the checkpoint's own top-k, then top-p at each
of ``--thresholds``) reuses those parameters with its own graph (``generate.decode_graphdef``
of the model's config with that router). For each setting and each batch size in ``--batch``,
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
* the copy bandwidth, measured in the same process: bytes read plus written per second by a
  jitted elementwise copy (``x + 1``, in place) of a ``--copy-mib`` MiB array;
* the bound: B rows / (step bytes / bandwidth) tokens/s, and the fraction of it reached.

Writes the table to standard output and, with ``--json PATH``, every figure to PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import generate as generate_lib
from dynmoe_jax import model as model_lib
from dynmoe_jax import pretrained
from dynmoe_jax.moe import experts as experts_lib
from dynmoe_jax.moe.routing import Router
from dynmoe_jax.validation import ConfigError
from experiments import moe_timing as timing
from experiments import report

PROMPT = [11, 7, 300, 42, 5, 99, 1000, 3]
DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.8)
CHECKPOINT_ONLY = ("thresholds", "batch", "copy_mib", "dtype")
CONFIG_ONLY = ("scan", "full_window")


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the flag in its error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _lengths(text: str) -> list[int]:
    """Numbers of new tokens, by commas: at least 2 each, so that some decode step is timed."""
    try:
        lengths = [int(n) for n in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"{text} is not integers >= 2 by commas")
    return lengths


_positive_int.__name__ = "int"  # argparse's "invalid int value" message uses this name
_threshold.__name__ = "float"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, each checked against its mode; a bad one ends in one argparse line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--config", default=None, help="config mode: a module of dynmoe_jax.configs")
    mode.add_argument("--checkpoint", type=Path, default=None, help="a Hugging Face model folder")
    p.add_argument("--new", type=_lengths, default=None,
                   help="new tokens per request (config mode: several, by commas; default "
                        "100,400; checkpoint mode: one, default 64)")  # fmt: skip
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--scan", action="store_true", help="config mode: initialise scanned")
    p.add_argument("--full_window", action="store_true",
                   help="config mode: also time recomputing the whole window")  # fmt: skip
    p.add_argument(
        "--thresholds",
        type=_threshold,
        nargs="+",
        default=None,
        help=f"checkpoint mode: top-p thresholds (default {DEFAULT_THRESHOLDS})",
    )
    p.add_argument("--batch", type=_positive_int, nargs="+", default=None,
                   help="checkpoint mode: batch sizes (default 1 8)")  # fmt: skip
    p.add_argument(
        "--copy-mib",
        type=_positive_int,
        default=None,
        help="checkpoint mode: size of the bandwidth probe (default 256)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="checkpoint mode: compute dtype (default float32)")  # fmt: skip
    args = p.parse_args(argv)
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
    try:
        importlib.import_module(f"dynmoe_jax.configs.{args.config}")
    except ModuleNotFoundError:
        p.error(f"argument --config: {args.config} is not a module of dynmoe_jax.configs")


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
    args.copy_mib = args.copy_mib or 256
    args.dtype = args.dtype or "float32"
    try:
        pretrained.hf_model_config(args.checkpoint)
    except ConfigError as e:
        p.error(f"argument --checkpoint: {e}")


# ----------------------------------------------------------------------------- config mode


def run_config(args: argparse.Namespace) -> dict:
    """The rate at each number of new tokens for the config's fresh model, at B = 1."""
    config = importlib.import_module(f"dynmoe_jax.configs.{args.config}").get_config()
    config.model.scan_layers = args.scan
    model_cfg = config_lib.model_config(config, config.vocab_size)
    params = nnx.split(model_lib.Decoder(model_cfg, rngs=nnx.Rngs(0)))[1]
    graphdef, params = generate_lib.decode_layout(model_cfg, params)
    prompt = prompts(1, model_cfg.vocab_size)[0]
    rates: dict[int, list[float]] = {n: [] for n in args.new}
    full: dict[int, list[float]] = {n: [] for n in args.new}
    for _ in range(args.repeats):
        for n in args.new:
            gen = generate_lib.generate(graphdef, params, [prompt], n)
            rates[n].append(gen.tokens_per_s)
            if args.full_window:
                rate = generate_lib.generate_full_window(graphdef, params, prompt, n)[2]
                full[n].append(rate)
    first = statistics.median(rates[args.new[0]])
    rows = [
        {"new_tokens": n, "tokens_per_s": statistics.median(rates[n]), "all_tokens_per_s": rates[n],
         "ratio_to_first": statistics.median(rates[n]) / first,
         "full_window_tokens_per_s": statistics.median(full[n]) if full[n] else None}
        for n in args.new
    ]  # fmt: skip
    return {"mode": "config", "config": args.config, "scan_layers": args.scan, "rows": rows}


def config_table(out: dict) -> str:
    header = ["new tokens", "tokens/s (median)", "ratio to first", "full-window tokens/s"]
    body = [
        [r["new_tokens"], f"{r['tokens_per_s']:.1f}", f"{r['ratio_to_first']:.2f}",
         "-" if r["full_window_tokens_per_s"] is None else f"{r['full_window_tokens_per_s']:.1f}"]
        for r in out["rows"]
    ]  # fmt: skip
    return report.markdown_table(header, body)


# ----------------------------------------------------------------------------- checkpoint mode


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    """What a decode step reads of the weights, split by how it scales (bytes)."""

    whole: int  # read whole by every step: attention, norms, routers, head, dense layers
    embed_row: int  # one row of the embedding: read once per batch row
    expert: int  # one expert's three weights, summed over the MoE layers
    num_experts: int

    def step(self, batch: int, union_experts: float, cache: int) -> float:
        """Bytes of a step of ``batch`` rows reading ``union_experts`` experts per MoE layer
        (a mean over the layers) and a key/value cache of ``cache`` bytes."""
        return self.whole + batch * self.embed_row + union_experts * self.expert + cache


def weight_bytes(params: nnx.State) -> WeightBytes:
    """The decode layout's weights, split as ``WeightBytes`` (experts in either layout)."""
    whole = embed_row = expert = 0
    num_experts = 0
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        if path[-1] in experts_lib.NAMES:
            num_experts = experts_lib.num_experts(value)
            expert += math.prod(experts_lib.expert_shape(value)) * _itemsize(value)
        elif path[-1] == "embed_VD":
            embed_row = value.shape[-1] * value.dtype.itemsize
        else:
            whole += value.size * value.dtype.itemsize
    return WeightBytes(whole, embed_row, expert, num_experts)


def _itemsize(w: Any) -> int:
    return (w[0] if experts_lib.is_split(w) else w).dtype.itemsize


def cache_bytes(model_cfg: model_lib.ModelConfig, batch: int, positions: int) -> int:
    """The key/value cache ``generate`` allocates (``Decoder.init_cache``): keys and values
    of every layer, row and position."""
    per_position = 2 * model_cfg.num_layers * model_cfg.kv_heads * model_cfg.head_width
    return per_position * batch * positions * jnp.dtype(model_cfg.dtype).itemsize


def expected_union(num_experts: int, k: float, batch: int) -> float:
    """Experts a step of ``batch`` rows reads per MoE layer if each row picked ``k`` of the
    ``num_experts`` independently and uniformly (exactly ``k`` at one row)."""
    if batch == 1:
        return k
    return num_experts * (1 - (1 - min(k, num_experts) / num_experts) ** batch)


def copy_bandwidth(mib: int, reps: int = 10) -> float:
    """Bytes read plus written per second by a jitted elementwise copy of ``mib`` MiB (STREAM's
    convention), in place: the input is donated, so no call writes into freshly mapped pages
    (a new output buffer per call measured page faults, not memory)."""
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = jax.block_until_ready(step(jnp.ones((mib * 2**20 // 4,), jnp.float32)))
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        x = jax.block_until_ready(step(x))
        times.append(time.perf_counter() - began)
    return 2 * x.nbytes / statistics.median(times)


def prompts(batch: int, vocab: int) -> list[list[int]]:
    """``batch`` fixed prompts of 8 tokens, each row its own (so rows may route apart)."""
    return [[(t + 31 * b) % vocab for t in PROMPT] for b in range(batch)]


def routing_settings(moe: Any, thresholds: Sequence[float]) -> list[tuple[str, Any]]:
    """(label, MoEConfig): the checkpoint's own router, then top-p at each threshold."""
    own = f"top-{moe.top_k} (own)" if moe.router is Router.TOP_K else f"own ({moe.router.value})"
    out = [(own, moe)]
    for p in thresholds:
        variant = dataclasses.replace(moe, router=Router.TOP_P, threshold=p)
        out.append((f"top-p {p:g}", variant))
    return out


def load(path: Path, dtype: str) -> tuple[model_lib.ModelConfig, nnx.State]:
    """The checkpoint's config and its parameters in the decode layout; the imported layout
    is dropped once that is made."""
    model = pretrained.from_hf(path, dtype=dtype)
    _, params = generate_lib.decode_layout(model.cfg, nnx.split(model)[1])
    return model.cfg, params


def run_checkpoint(args: argparse.Namespace) -> dict:
    """Every (setting, batch) row of the checkpoint mode (the module docstring)."""
    model_cfg, params = load(args.checkpoint, args.dtype)
    bandwidth = copy_bandwidth(args.copy_mib)
    weights = weight_bytes(params)
    cases = [
        (label, moe, generate_lib.decode_graphdef(dataclasses.replace(model_cfg, moe=moe)), b)
        for label, moe in routing_settings(model_cfg.moe, args.thresholds)
        for b in args.batch
    ]
    rates: list[list[float]] = [[] for _ in cases]
    experts_per_token = [0.0] * len(cases)
    for repeat in range(args.repeats + 1):  # the first round compiles and warms up, untimed
        for i, (_, _, graphdef, b) in enumerate(cases):
            prompts_B = prompts(b, model_cfg.vocab_size)
            gen = generate_lib.generate(graphdef, params, prompts_B, args.new)
            if repeat:
                rates[i].append(gen.tokens_per_s)
            # Each row's first new token came from the prefill: the steps made the rest.
            experts_per_token[i] = float(np.mean([row[1:] for row in gen.experts]))
    rows = []
    for (label, moe, _, b), rate, k in zip(cases, rates, experts_per_token, strict=True):
        union = expected_union(weights.num_experts, k, b)
        cache = cache_bytes(model_cfg, b, len(PROMPT) + args.new)
        step = weights.step(b, union, cache)
        bound = b * bandwidth / step
        median = statistics.median(rate)
        rows.append({"setting": label, "router": moe.router.value, "top_k": moe.top_k,
                     "threshold": moe.threshold if moe.router is Router.TOP_P else None,
                     "batch": b, "tokens_per_s": median, "all_tokens_per_s": rate,
                     "experts_per_token": k, "union_experts": union, "step_mib": step / 2**20,
                     "bound_tokens_per_s": bound, "of_bound": median / bound})  # fmt: skip
    return {"mode": "checkpoint", "checkpoint": str(args.checkpoint), "dtype": args.dtype,
            "new_tokens": args.new, "prompt_tokens": len(PROMPT), "repeats": args.repeats,
            "copy_gib_per_s": bandwidth / 2**30, "copy_mib": args.copy_mib,
            "weights_mib": {f.name: getattr(weights, f.name) / 2**20
                            for f in dataclasses.fields(weights) if f.name != "num_experts"},
            "num_experts": weights.num_experts, "moe_layers": model_cfg.num_moe_layers,
            "rows": rows}  # fmt: skip


def checkpoint_table(out: dict) -> str:
    header = ["setting", "B", "tokens/s (median)", "experts / token", "experts read / layer",
              "MiB / step", "bound tokens/s", "of bound"]  # fmt: skip
    body = [
        [r["setting"], r["batch"], f"{r['tokens_per_s']:.1f}", f"{r['experts_per_token']:.2f}",
         f"{r['union_experts']:.2f}", f"{r['step_mib']:.1f}", f"{r['bound_tokens_per_s']:.1f}",
         f"{r['of_bound']:.0%}"]
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
            "load_average": timing.load_average()}  # fmt: skip
    if out["mode"] == "config":
        print(f"config={args.config} scan_layers={args.scan} {where}")
        print(config_table(out))
    else:
        print(f"checkpoint={args.checkpoint} dtype={args.dtype} new={args.new} {where} "
              f"copy bandwidth {out['copy_gib_per_s']:.1f} GiB/s")  # fmt: skip
        print(checkpoint_table(out))
    timing.write_json(args.json, report.jsonable(out))
    return out


if __name__ == "__main__":
    main()
