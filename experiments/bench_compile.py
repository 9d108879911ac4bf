"""Compile time and step time of a config's model, fwd+bwd, with its layers scanned or not.

Run from the repository root:

    .venv/bin/python -m experiments.bench_compile --config tiny --layers 2,16
    .venv/bin/python -m experiments.bench_compile --config default --steps 20

For each layer count and each of scan_layers = False / True: the AOT compile time (lower +
compile) of the jitted value_and_grad of the training loss (cross-entropy plus the weighted
aux losses, as ``train.forward`` computes them) on one batch of the config's shape, and the
median time of a compiled call. Calls of the two layouts alternate, so load drifting on a
shared machine hits both alike. The target: a scanned model of 16 layers compiles in at most
twice the time of 2 layers. Measured figures: experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib
from dynmoe_jax.model.decoder import Decoder
from experiments.bench import flags
from experiments.bench.harness import Bench, Program

LAYOUTS = (False, True)  # scan_layers


def _layer_counts(text: str) -> list[int]:
    """Layer counts by commas, each >= 1; '' means the config's own."""
    try:
        counts = [int(n) for n in text.split(",")] if text else []
    except ValueError:
        counts = [0]
    if min(counts, default=1) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not integers >= 1 by commas")
    return counts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=flags.shipped_config, default="tiny",
                   help="a module of dynmoe_jax.configs")  # fmt: skip
    p.add_argument("--layers", type=_layer_counts, default=[],
                   help="comma-separated; '' = the config's")  # fmt: skip
    p.add_argument("--steps", type=flags.positive(int), default=5, help="timed calls per layout")
    return p.parse_args(argv)


def _loss_fn(graphdef, config: ConfigDict):
    """The training loss of ``train.forward``: cross-entropy plus the weighted aux losses."""
    w = config.loss

    def loss(params, tokens_BT):
        logits_BTV, layer = nnx.merge(graphdef, params)(tokens_BT[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()
        aux = sum(weight * jnp.mean(layer[name]) for name, weight in (
            ("load_balance_loss", w.load_balance_weight),
            ("dynamic_loss", w.dynamic_weight),
            ("z_loss", w.z_loss_weight),
        )) if layer else 0.0  # fmt: skip
        return nll + aux

    return jax.value_and_grad(loss)


def case(bench: Bench, config: ConfigDict, layers: int, scan: bool) -> Program:
    """The loss's value and gradients at ``layers`` layers, scanned or not, compiled."""
    c = config.copy_and_resolve_references()
    c.model.num_layers, c.model.scan_layers = layers, scan
    model_cfg = config_lib.resolve(c).model
    graphdef, params = nnx.split(Decoder(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens_BT = jax.random.randint(jax.random.key(1), (c.batch_size, c.seq_len + 1), 0,
                                   c.vocab_size)  # fmt: skip
    return bench.compile(_loss_fn(graphdef, c), (params, tokens_BT))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = importlib.import_module(f"dynmoe_jax.configs.{args.config}").get_config()
    counts = args.layers or [config.model.num_layers]
    bench = Bench(args.steps)
    print(f"config={args.config} remat={config.model.remat} dtype={config.model.dtype} "
          f"backend={jax.default_backend()}")  # fmt: skip
    print(f"{'layers':>6} {'scan':>5} {'compile_s':>9} {'step_ms':>8}")
    for layers in counts:
        programs = {str(scan): case(bench, config, layers, scan) for scan in LAYOUTS}
        medians = bench.time(programs).medians
        for scan, program in programs.items():
            print(f"{layers:>6} {scan:>5} {program.compile_s:>9.2f} {medians[scan]:>8.1f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
