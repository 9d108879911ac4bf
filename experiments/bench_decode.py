"""Decode rate of cached sampling (``inference.generate``) at several numbers of new tokens.

Run from the repository root:

    .venv/bin/python -m experiments.bench_decode --config default --new 100,400

The config's model, freshly initialised (the rate does not depend on the weights; the
sampler's graph without capacity limits), decodes greedily after an 8-token prompt with no
stop token, so every request runs its full length. Each repeat runs every length once, in
turn, so load drifting on a shared machine hits them alike; the median rate is printed, with
each length's ratio to the first; ``--full_window`` also times the former sampler, which
recomputed the whole window for each token (``inference.generate_full_window``). The target:
the rate at 400 new tokens is at least half the rate at 100. Measured on 2 CPU cores shared
with other work (load 3-3.5), one simulated device, ``--repeats 3 --full_window``:

    config=default scan_layers=False backend=cpu
    new_tokens  tokens/s (median)  ratio to first  full-window tokens/s
           100              128.2            1.00                  15.5
           400              102.5            0.80                   4.3

and with ``--scan`` (no --full_window, load 3.8): 87.0 and 67.4 tokens/s (ratio 0.77).
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import jax
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import inference
from dynmoe_jax.model import Decoder

PROMPT = [11, 7, 300, 42, 5, 99, 1000, 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="a module of dynmoe_jax.configs")
    parser.add_argument("--new", default="100,400", help="numbers of new tokens, by commas")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan", action="store_true", help="scan_layers=True")
    parser.add_argument(
        "--full_window", action="store_true", help="also time recomputing the whole window"
    )
    args = parser.parse_args()
    config = importlib.import_module(f"dynmoe_jax.configs.{args.config}").get_config()
    config.model.scan_layers = args.scan
    model_cfg = config_lib.model_config(config, config.vocab_size)
    params = nnx.split(Decoder(model_cfg, rngs=nnx.Rngs(0)))[1]
    graphdef = inference.inference_graphdef(model_cfg)
    lengths = [int(n) for n in args.new.split(",")]
    rates: dict[int, list[float]] = {n: [] for n in lengths}
    full: dict[int, list[float]] = {n: [] for n in lengths}
    for _ in range(args.repeats):
        for n in lengths:
            rates[n].append(inference.generate(graphdef, params, PROMPT, n).tokens_per_s)
            if args.full_window:
                full[n].append(inference.generate_full_window(graphdef, params, PROMPT, n)[2])
    print(f"config={args.config} scan_layers={args.scan} backend={jax.default_backend()}")
    print("new_tokens  tokens/s (median)  ratio to first  full-window tokens/s")
    first = statistics.median(rates[lengths[0]])
    for n in lengths:
        rate = statistics.median(rates[n])
        recompute = f"{statistics.median(full[n]):>20.1f}" if full[n] else f"{'-':>20}"
        print(f"{n:>10}  {rate:>17.1f}  {rate / first:>14.2f}  {recompute}")


if __name__ == "__main__":
    main()
