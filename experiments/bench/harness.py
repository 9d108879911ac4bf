"""Timing: ahead-of-time compiled programs, timed in alternation, reported as medians.

Every figure is the median of repeated calls of an AOT-compiled function: its compile time is
measured apart and one warm-up call precedes the timed ones, so neither compilation nor
first-call costs enter it. Programs that are compared are timed in alternation, one call of
each per round, so that load drifting on a shared machine hits them alike and the ratios of
their medians are fair. The 1-minute load average goes beside every timing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Program:
    """An AOT-compiled function and the arguments it is called with."""

    compiled: Any
    args: tuple
    compile_s: float  # lower + compile, seconds

    @property
    def temp_bytes(self) -> int:
        """Scratch memory XLA allocates for one call (outputs and arguments not included)."""
        return int(self.compiled.memory_analysis().temp_size_in_bytes)

    def __call__(self) -> Any:
        return jax.block_until_ready(self.compiled(*self.args))


def compile_program(fn: Callable, args: tuple) -> Program:
    """``jit(fn)`` lowered and compiled for ``args``, timed."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return Program(compiled, tuple(args), time.perf_counter() - start)


def signature(fn: Callable, args: tuple) -> tuple:
    """A key under which programs compile alike: the function, and the tree structure, shapes
    and dtypes of its arguments."""
    leaves = tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
    return fn, jax.tree.structure(args), leaves


def time_interleaved(programs: Sequence[Program], reps: int,
                     slow_s: float = math.inf) -> tuple[list[list[float]], Any]:  # fmt: skip
    """(call times in ms per program, the first program's last output) of ``reps`` rounds of
    one call each, after one warm-up call each; a single round when the first program's
    warm-up took longer than ``slow_s`` (keeps a grid of large cases within minutes)."""
    start = time.perf_counter()
    out = programs[0]()
    if time.perf_counter() - start > slow_s:
        reps = 1
    for program in programs[1:]:
        program()
    times: list[list[float]] = [[] for _ in programs]
    for _ in range(reps):
        for i, program in enumerate(programs):
            start = time.perf_counter()
            result = program()
            times[i].append((time.perf_counter() - start) * 1e3)
            out = result if i == 0 else out
    return times, out


@dataclasses.dataclass(frozen=True)
class Timings:
    """Call times (ms) of named programs timed in one alternating set, the first program's
    last output, and the load average when the set finished."""

    all_ms: dict[str, list[float]]
    first_out: Any
    load: float

    def median(self, name: str) -> float:
        return statistics.median(self.all_ms[name])

    @property
    def medians(self) -> dict[str, float]:
        return {name: self.median(name) for name in self.all_ms}


class Bench:
    """Compiles programs (once per key, where one is given) and times sets of them in
    alternation: ``reps`` rounds, or a single one where the first program's warm-up took
    longer than ``slow_s``."""

    def __init__(self, reps: int, slow_s: float = math.inf):
        self.reps, self.slow_s = reps, slow_s
        self._compiled: dict[Hashable, Program] = {}

    def compile(self, fn: Callable, args: tuple, key: Hashable | None = None) -> Program:
        """``fn`` compiled for ``args``. With a ``key``, a program compiled before under it is
        reused (with these ``args``, which must match its shapes; its ``compile_s`` is the
        first compilation's)."""
        if key is None:
            return compile_program(fn, args)
        if key not in self._compiled:
            self._compiled[key] = compile_program(fn, args)
        return dataclasses.replace(self._compiled[key], args=tuple(args))

    def time(self, programs: Mapping[str, Program], reps: int | None = None) -> Timings:
        """The named programs timed in alternation (``reps`` overrides the bench's)."""
        reps = self.reps if reps is None else reps
        times, out = time_interleaved(list(programs.values()), reps, self.slow_s)
        return Timings(dict(zip(programs, times, strict=True)), out, load_average())


def load_average() -> float:
    """1-minute load average (the machine may be shared: note it beside every timing)."""
    return round(os.getloadavg()[0], 2)


def log(*parts: Any) -> None:
    """Progress on standard error, so that standard output holds the tables alone."""
    print(*parts, file=sys.stderr, flush=True)


def write_json(path: Path | None, out: dict) -> None:
    """Writes a benchmark's figures to ``path`` (nothing when it is None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
