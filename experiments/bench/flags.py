"""Command-line pieces the benchmark scripts share: checked number types, and the flags of
the benchmarked layer's shape.

A bad value ends in argparse's one line, which names the flag (``argument --reps: 0 is not >
0``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import pkgutil
from collections.abc import Callable

from dynmoe_jax import configs
from experiments.bench.layers import LayerShape


def positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` above 0."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not > 0")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" message uses this name
    return parse


def unit_interval(text: str) -> float:
    """An argparse type: a threshold in (0, 1], as top-p's."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


unit_interval.__name__ = "float"


def shipped_config(name: str) -> str:
    """An argparse type: the name of a module of ``dynmoe_jax.configs`` (default, tiny, ...)."""
    if name not in {m.name for m in pkgutil.iter_modules(configs.__path__)}:
        raise argparse.ArgumentTypeError(f"{name} is not a module of dynmoe_jax.configs")
    return name


def add_layer_shape(p: argparse.ArgumentParser) -> None:
    """The flags of ``LayerShape``, with the layer benchmark's defaults."""
    p.add_argument("--tokens", type=positive(int), default=8192, help="T = batch * seq_len")
    p.add_argument("--seq-len", type=positive(int), default=1024,
                   help="one routing group per sequence")  # fmt: skip
    p.add_argument("--d-model", type=positive(int), default=512)
    p.add_argument("--d-ff", type=positive(int), default=1024)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threshold", type=unit_interval, default=0.4, help="top-p threshold")
    p.add_argument("--capacity-factor", type=positive(float), default=1.25)


def check_layer_shape(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One argparse line unless the tokens split into whole sequences."""
    if args.tokens % args.seq_len:
        p.error(f"argument --tokens: {args.tokens} is not a multiple of --seq-len {args.seq_len}")


def layer_shape(args: argparse.Namespace) -> LayerShape:
    """The shape the layer-shape flags describe."""
    return LayerShape(args.tokens, args.seq_len, args.d_model, args.d_ff, args.dtype,
                      args.threshold, args.capacity_factor)  # fmt: skip
