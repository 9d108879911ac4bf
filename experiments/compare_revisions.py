"""The MoE layer of an earlier git revision against the working tree's, timed in one process.

The earlier revision's layer modules (moe, dispatch, routing, sharding) are read with
``git show REV:path`` into a temporary package, so both versions run side by side on the same
input with the same weights. Calls of the two versions alternate, so load drifts on this shared
machine hit both alike. Each figure: median fwd+bwd ms of the compiled function, one warm-up.

    .venv/bin/python -m experiments.compare_revisions --rev 3808593 --experts 16 64
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import moe_timing as timing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("moe", "dispatch", "routing", "sharding")
ROUTERS = {"top2": {"router": "top_k", "top_k": 2}, "topp": {"router": "top_p"}}


def load_revision(rev: str, into: Path):
    """Writes the revision's modules as package ``dynmoe_rev`` under ``into``; returns its moe."""
    pkg = into / "dynmoe_rev"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in MODULES:
        src = subprocess.run(
            ["git", "show", f"{rev}:dynmoe_jax/{name}.py"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        (pkg / f"{name}.py").write_text(src.replace("from dynmoe_jax", "from dynmoe_rev"))
    sys.path.insert(0, str(into))
    return importlib.import_module("dynmoe_rev.moe")


def compiled_case(moe_module, x, **kw):
    layer = moe_module.MoELayer(rngs=nnx.Rngs(0), **kw)
    graphdef, params = nnx.split(layer)

    def loss(p, v):
        return jnp.sum(nnx.merge(graphdef, p)(v)[0])

    compiled, _ = timing.compile_fn(jax.grad(loss, argnums=(0, 1)), (params, x))
    return compiled, (params, x)


def alternate(cases: dict, reps: int) -> dict[str, list[float]]:
    """One warm-up each, then ``reps`` rounds calling every case once per round."""
    for compiled, args in cases.values():
        jax.block_until_ready(compiled(*args))
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, (compiled, args) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default="3808593", help="the revision before issue 5")
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--routers", nargs="+", default=["top2"], choices=list(ROUTERS))
    p.add_argument("--dispatch", nargs="+", default=["index", "einsum"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from dynmoe_jax import moe as current

    x = jax.random.normal(jax.random.key(1), (8, 1024, 512), jnp.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = load_revision(args.rev, Path(tmp))
        for e in args.experts:
            for router in args.routers:
                for dispatch in args.dispatch:
                    kw = dict(num_experts=e, d_model=512, d_ff=1024, dispatch=dispatch)
                    kw.update(ROUTERS[router])
                    cases = {v: compiled_case(m, x, **kw) for v, m in
                             (("before", before), ("after", current))}  # fmt: skip
                    ms = {k: statistics.median(v) for k, v in alternate(cases, args.reps).items()}
                    row = dict(experts=e, router=router, dispatch=dispatch, load=0.0)
                    row.update({f"{k}_ms": round(v, 1) for k, v in ms.items()})
                    row["speedup"] = round(ms["before"] / ms["after"], 2)
                    row["load"] = timing.load_average()
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
