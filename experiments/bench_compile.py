"""Compile time and step time of a config's model, fwd+bwd, with its layers scanned or not.

Run from the repository root:

    .venv/bin/python -m experiments.bench_compile --config tiny --layers 2,16
    .venv/bin/python -m experiments.bench_compile --config default --steps 20

For each layer count and each of scan_layers = False / True: the AOT compile time (lower +
compile) of the jitted value_and_grad of the training loss (cross-entropy plus the weighted
aux losses, as ``train.forward`` computes them) on one batch of the config's shape, and the
median time of a compiled call. Calls of the two layouts alternate, so load drifting on a
shared machine hits both alike. The target: a scanned model of 16 layers compiles in at most
twice the time of 2 layers. Measured on 2 CPU cores shared with other work (load 5-7):

    config=tiny   layers  scan  compile_s  step_ms
                       2  False     16.35      7.1
                       2  True      20.11      7.4
                      16  False     76.38     41.0
                      16  True      34.97     44.4   (1.74x the scanned 2-layer compile)
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax.model.decoder import Decoder


def _loss_fn(graphdef, config):
    w = config.loss

    def loss(params, tokens_BT):
        logits_BTV, layer = nnx.merge(graphdef, params)(tokens_BT[:, :-1])
        logp = jax.nn.log_softmax(logits_BTV, axis=-1)
        nll = -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1).mean()
        aux = sum(weight * jnp.mean(layer[name]) for name, weight in (
            ("load_balance_loss", w.load_balance_weight),
            ("dynamic_loss", w.dynamic_weight),
            ("z_loss", w.z_loss_weight),
        )) if layer else 0.0  # fmt: skip
        return nll + aux

    return jax.jit(jax.value_and_grad(loss))


def _case(config, layers: int, scan: bool):
    c = config.copy_and_resolve_references()
    c.model.num_layers, c.model.scan_layers = layers, scan
    model_cfg = config_lib.model_config(c, c.vocab_size)
    graphdef, params = nnx.split(Decoder(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (c.batch_size, c.seq_len + 1), 0, c.vocab_size)
    start = time.perf_counter()
    compiled = _loss_fn(graphdef, c).lower(params, tokens).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, tokens))  # warm-up
    return compile_s, lambda: jax.block_until_ready(compiled(params, tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="a module of dynmoe_jax.configs")
    parser.add_argument("--layers", default="", help="comma-separated; '' = the config's")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per layout")
    args = parser.parse_args()
    config = importlib.import_module(f"dynmoe_jax.configs.{args.config}").get_config()
    counts = [int(n) for n in args.layers.split(",")] if args.layers else [config.model.num_layers]
    print(f"config={args.config} remat={config.model.remat} dtype={config.model.dtype} "
          f"backend={jax.default_backend()}")  # fmt: skip
    print(f"{'layers':>6} {'scan':>5} {'compile_s':>9} {'step_ms':>8}")
    for layers in counts:
        compile_s, calls = {}, {}
        for scan in (False, True):
            compile_s[scan], calls[scan] = _case(config, layers, scan)
        times = {False: [], True: []}
        for _ in range(args.steps):
            for scan in (False, True):
                start = time.perf_counter()
                calls[scan]()
                times[scan].append(time.perf_counter() - start)
        for scan in (False, True):
            ms = 1e3 * statistics.median(times[scan])
            print(f"{layers:>6} {scan!s:>5} {compile_s[scan]:>9.2f} {ms:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
