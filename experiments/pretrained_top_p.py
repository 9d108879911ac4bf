"""Top-p against top-k on an imported checkpoint: how many experts does each token need?

    .venv/bin/python -m experiments.pretrained_top_p PATH [--dataset pydoc] [--name NAME]

PATH is a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) of a
Mixtral, OLMoE or Qwen2-MoE checkpoint. Its weights are loaded once and evaluated unchanged,
without fine-tuning, on the validation split of the corpus (tokenized by its own
tokenizer.json) under each router setting:

* top-k for k = 1, 2, the checkpoint's own k and twice it (at most the expert count);
* top-p for p = 0.3 ... 0.9 and 1.0 (every expert, weighted: the dense mixture).

Combine weights follow the checkpoint's ``norm_topk_prob``. No token is dropped (the grouped
dispatch with no budget), so the experts counted are the router's own choice.

Each setting's decode rate at batch size 1 comes beside its perplexity: the weights are put in
the decode layout once (``generate.decode_layout``, after every setting is evaluated, so the
two layouts of the experts are not held together for long), and each setting decodes with its
own graph over them (``generate.decode_graphdef``): ``--decode-tokens`` new tokens, greedy,
after the first 16 tokens of the first validation sequence. One untimed round over the
settings compiles and warms up; the next is timed (tokens per second of the decode steps,
compile and prefill excluded).

Writes ``experiments/results/NAME.{md,json}``, ``NAME.png`` (perplexity against mean experts
per token, and experts per token by layer) and ``NAME_frontier.png`` (perplexity against
decode tokens/s: the speed-quality frontier), printing a line per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import generate as generate_lib
from dynmoe_jax import train as train_lib
from dynmoe_jax.configs import pretrained as pretrained_config
from dynmoe_jax.validation import ConfigError
from experiments import plots, report

MODULE = "experiments.pretrained_top_p"
DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DECODE_PROMPT_TOKENS = 16


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", help="a Hugging Face model folder")
    p.add_argument("--dataset", default="pydoc", help="pydoc | kjv | text_dir:PATH | TFDS name")
    p.add_argument("--data-dir", default="", help="data cache ('' = the default)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=None,
        help="top-k values (default: 1, 2, the checkpoint's k and twice it)",
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per setting")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh-shape", default="", help="e.g. 'data=2,expert=4' ('' = one device)")
    p.add_argument("--name", default=None, help="results file stem (default: from PATH)")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=32,
        help="new tokens of each setting's timed greedy decode (B=1), >= 2",
    )
    args = p.parse_args(argv)
    if args.decode_tokens < 2:  # the first token comes from the prefill: no step to time
        p.error(f"argument --decode-tokens: {args.decode_tokens} is not >= 2")
    return args


def base_config(args: argparse.Namespace) -> ConfigDict:
    """The fine-tuning config with this evaluation's corpus, sizes and a drop-free router."""
    c = pretrained_config.get_config()
    c.init_from = config_lib.check_init_from(args.path)
    c.dataset, c.data_dir = args.dataset, args.data_dir
    c.seq_len, c.batch_size, c.eval_batches = args.seq_len, args.batch_size, args.eval_batches
    c.mesh_shape = args.mesh_shape
    c.model.dtype = args.dtype
    c.model.remat = "none"  # no backward pass here
    c.moe.dispatch, c.moe.capacity_factor = "grouped", None
    return c


def settings(ks: Sequence[int] | None, thresholds: Sequence[float], native_k: int,
             num_experts: int) -> list[dict]:  # fmt: skip
    """Router settings, top-k first (ascending k), then top-p (ascending p)."""
    if ks is None:
        ks = (1, 2, native_k, 2 * native_k)
    out = [{"router": "top_k", "top_k": k} for k in sorted({k for k in ks if k <= num_experts})]
    out += [{"router": "top_p", "threshold": p} for p in sorted(set(thresholds))]
    return out


def label(setting: dict, native_k: int | None = None) -> str:
    if setting["router"] == "top_k":
        own = " (checkpoint's own)" if setting["top_k"] == native_k else ""
        return f"top-{setting['top_k']}{own}"
    return f"top-p {setting['threshold']:g}"


def with_setting(config: ConfigDict, setting: dict) -> ConfigDict:
    c = config.copy_and_resolve_references()
    for field, value in setting.items():
        c.moe[field] = value
    return c


def evaluate_setting(config: ConfigDict, setting: dict, data, params) -> dict:
    """Validation loss, perplexity and experts per token (per layer) under ``setting``."""
    c = with_setting(config, setting)
    task = train_lib.build_task(config_lib.resolve(c), data.vocab_size)
    eval_step = train_lib.make_eval_step(task)
    with jax.set_mesh(task.mesh):
        return train_lib.evaluate(eval_step, params, data.eval_batches(c.eval_batches))


def decode_rates(config: ConfigDict, todo: Sequence[dict], task, decode_params,
                 prompt: list[int], new_tokens: int) -> list[tuple[float, float]]:  # fmt: skip
    """(decode tokens/s, experts per new token) of each setting at B=1 over one decode layout
    (``decode_params``), with a graph per setting: an untimed round, then a timed one."""
    graphdefs = [
        generate_lib.decode_graphdef(config_lib.resolve(with_setting(config, setting)).model)
        for setting in todo
    ]
    out = []
    with jax.set_mesh(task.mesh):
        for timed in (False, True):
            for graphdef in graphdefs:
                gen = generate_lib.generate(graphdef, decode_params, [prompt], new_tokens)
                if timed:
                    # Its first token came from the prefill: the decode steps made the rest.
                    out.append((gen.tokens_per_s, float(np.mean(gen.experts[0][1:]))))
    return out


def decode_prompt(data) -> list[int]:
    """The first tokens of the first validation sequence: text the tokenizer produced."""
    inputs_BT = next(iter(data.eval_batches(1)))["inputs"]
    return inputs_BT[0, :DECODE_PROMPT_TOKENS].tolist()


def run(args: argparse.Namespace) -> dict:
    config = base_config(args)
    resolved = config_lib.check_config(config)  # every one-line error before the corpus is read
    native_cfg = resolved.model.moe
    native_k, experts = native_cfg.top_k, native_cfg.num_experts
    todo = settings(args.ks, args.thresholds, native_k, experts)
    for setting in todo:  # a bad threshold or k fails here, before anything is loaded
        config_lib.resolve(with_setting(config, setting))
    data = data_lib.from_config(resolved.data)
    print(data.summary())
    task = train_lib.build_task(resolved, data.vocab_size)
    params = train_lib.imported_params(task)
    rows = []
    for i, setting in enumerate(todo, 1):
        start = time.perf_counter()
        result = evaluate_setting(config, setting, data, params)
        wall = time.perf_counter() - start
        rows.append({**setting, "label": label(setting, native_k), "wall_s": wall, **result})
        print(f"[{i}/{len(todo)}] {label(setting, native_k)}: perplexity "
              f"{result['perplexity']:.3f}, experts per token {result['experts_per_token']:.2f} "
              f"({wall:.1f} s)", flush=True)  # fmt: skip
    _, decode_params = generate_lib.decode_layout(task.config.model, params)
    del params  # nothing reads the imported layout again: its experts are freed
    prompt = decode_prompt(data)
    rates = decode_rates(config, todo, task, decode_params, prompt, args.decode_tokens)
    for i, (row, (rate, k)) in enumerate(zip(rows, rates, strict=True), 1):
        row["decode_tokens_per_s"], row["decode_experts_per_token"] = rate, k
        print(f"[{i}/{len(todo)}] {row['label']}: decode {rate:.1f} tokens/s at B=1 "
              f"({k:.2f} experts per new token)", flush=True)  # fmt: skip
    architecture = json.loads((Path(args.path) / "config.json").read_text())["architectures"][0]
    return {"checkpoint": args.path, "architecture": architecture, "num_experts": experts,
            "native_top_k": native_k, "dataset": data.config.dataset,
            "tokens": rows[0]["tokens"], "decode_tokens": args.decode_tokens,
            "settings": rows}  # fmt: skip


def tables(raw: dict) -> dict:
    header = ["router", "experts / token", "perplexity", "loss", "decode tokens/s (B=1)",
              "experts / token by layer"]  # fmt: skip
    body = [
        [r["label"], f"{r['experts_per_token']:.2f}", f"{r['perplexity']:.3f}",
         f"{r['loss']:.4f}", _rate(r.get("decode_tokens_per_s")),
         ", ".join(f"{x:.2f}" for x in r["experts_per_layer"])]
        for r in raw["settings"]
    ]  # fmt: skip
    title = (f"{raw['architecture']}, {raw['num_experts']} experts, own top-{raw['native_top_k']};"
             f" {raw['tokens']:,.0f} validation tokens of {raw['dataset']}")  # fmt: skip
    return {title: (header, body)}


def _rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:.1f}"


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (tokens/s, perplexity) points no other point beats on both (faster and
    no worse, or as fast and better), slowest first: the frontier."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    frontier, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            frontier.append(i)
            best = points[i][1]
    return frontier[::-1]


def plot_frontier(raw: dict, path: Path) -> Path:
    """Perplexity against decode tokens/s (B=1), each setting labelled; the settings no other
    beats on both joined by a line."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    timed = [s for s in raw["settings"] if s.get("decode_tokens_per_s")]
    for router, marker, color in (("top_k", "s", "tab:orange"), ("top_p", "o", "tab:green")):
        x = [s["decode_tokens_per_s"] for s in timed if s["router"] == router]
        y = [s["perplexity"] for s in timed if s["router"] == router]
        ax.scatter(x, y, marker=marker, color=color, label=router.replace("_", "-"), zorder=3)
    for s in timed:
        ax.annotate(s["label"], (s["decode_tokens_per_s"], s["perplexity"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    front = [timed[i] for i in pareto([(s["decode_tokens_per_s"], s["perplexity"]) for s in timed])]
    ax.plot([s["decode_tokens_per_s"] for s in front], [s["perplexity"] for s in front], "--",
            color="gray", alpha=0.7, label="frontier", zorder=2)  # fmt: skip
    ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    ax.set_xlabel("decode tokens/s (batch 1, greedy)")
    ax.set_ylabel("perplexity (validation)")
    ax.set_title("Speed against quality: each router setting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{raw['architecture']} ({raw['checkpoint']})", fontsize=9)
    return plots.save_figure(fig, path)


def plot(raw: dict, path: Path) -> Path:
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    by_router = {r: [s for s in raw["settings"] if s["router"] == r] for r in ("top_k", "top_p")}
    for router, style, color in (("top_k", "s--", "tab:orange"), ("top_p", "o-", "tab:green")):
        points = by_router[router]
        if not points:
            continue
        x = [s["experts_per_token"] for s in points]
        left.plot(x, [s["perplexity"] for s in points], style, color=color,
                  label=router.replace("_", "-"))  # fmt: skip
        for s, xi in zip(points, x, strict=True):
            tag = f"k={s['top_k']}" if router == "top_k" else f"p={s['threshold']:g}"
            left.annotate(tag, (xi, s["perplexity"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")  # fmt: skip
    left.set_xlabel("mean experts per token (validation)")
    left.set_ylabel("perplexity (validation)")
    left.set_title("Perplexity against experts per token")
    left.legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    for i, s in enumerate(raw["settings"]):
        layers = np.arange(len(s["experts_per_layer"]))
        style = "--" if s["router"] == "top_k" else "-"
        right.plot(layers, s["experts_per_layer"], style, marker=".", label=s["label"],
                   color=cmap(i / max(1, len(raw["settings"]) - 1)))  # fmt: skip
    right.set_xticks(np.arange(len(raw["settings"][0]["experts_per_layer"])))
    right.set_xlabel("MoE layer (0 = lowest)")
    right.set_ylabel("experts per token")
    right.set_title("Experts per token by layer")
    right.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{raw['architecture']} ({raw['checkpoint']})", fontsize=9)
    return plots.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    name = args.name or f"pretrained_top_p_{Path(args.path).resolve().name}"
    try:
        raw = run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    raw["plot"] = plot(raw, args.results_dir / f"{name}.png").name
    raw["frontier_plot"] = plot_frontier(raw, args.results_dir / f"{name}_frontier.png").name
    title = "Top-p against top-k on an imported checkpoint (no fine-tuning)"
    command = " ".join([".venv/bin/python", "-m", MODULE, *argv])
    md, _ = report.write_results(name, title, tables(raw), raw, command, args.results_dir)
    print(md.read_text())
    return raw


if __name__ == "__main__":
    main()
