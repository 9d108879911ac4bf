"""Our MoE layer beside MaxText's RoutedMoE and the dense ideal, same shapes, one process.

Shapes: B=8 sequences of S=1024 tokens (T=8192), D=512, F=1024 per expert, E=16, top-2,
capacity factor 1.25 (one routing group per sequence in both libraries), float32 on CPU.
Every row is the median of the compiled forward+backward (gradients of sum(y) w.r.t. the
parameters and x), AOT compile and one warm-up call excluded; the rows' calls alternate (one
call of each per round) so that load drifts on a shared machine hit them alike.

Run with the MaxText venv, which the MaxText harness's setup script builds (the harness is
found at ``../shared/peers/maxtext`` from the repository root, or wherever ``--harness`` says):

    bash ../shared/peers/maxtext/setup.sh .venv-maxtext

    .venv-maxtext/bin/python -m experiments.compare_maxtext --json \
        experiments/results/compare_maxtext.json

Under any other interpreter (e.g. ``.venv``) the MaxText rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the MaxText venv lacks ours
from dynmoe_jax import MoEConfig, MoELayer  # noqa: E402
from experiments.bench.dense import dense_swiglu  # noqa: E402
from experiments.bench.flags import positive  # noqa: E402
from experiments.bench.harness import (  # noqa: E402
    Bench,
    compile_program,
    load_average,
    log,
    write_json,
)
from experiments.bench.layers import DISPATCHES  # noqa: E402

B, S, D, F, E, K, CF = 8, 1024, 512, 1024, 16, 2, 1.25
MAXTEXT_MODES = {  # MaxText's names: sparse_matmul=False is its one-hot capacity path
    "capacity": {"sparse_matmul": False, "megablox": False, "capacity_factor": CF},
    "dropless": {
        "sparse_matmul": True,
        "megablox": False,
        "use_tokamax_gmm": False,
        "capacity_factor": -1.0,
    },
}


DEFAULT_HARNESS = Path(__file__).resolve().parents[1] / ".." / "shared" / "peers" / "maxtext"


def import_maxtext(harness: Path = DEFAULT_HARNESS) -> SimpleNamespace | None:
    """MaxText's modules, or None (with the reason and the set-up command logged) when it is
    not importable."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints banners on import
            import jax.experimental.xla_metadata as xla_metadata

            # maxtext 0.2.5 imports this (jax >= 0.11) for a kernel the MoE layer never runs.
            if not hasattr(xla_metadata, "must_fuse_call"):
                xla_metadata.must_fuse_call = lambda *a, **k: lambda f: f
            import maxtext
            from maxtext.configs import pyconfig
            from maxtext.layers import initializers, moe
            from maxtext.utils import maxtext_utils
    except Exception as e:  # noqa: BLE001 - any import failure means: skip MaxText
        setup = Path(harness) / "setup.sh"
        how = f"bash {setup} .venv-maxtext" if setup.exists() else f"no {setup}: see --harness"
        log(f"MaxText not importable ({type(e).__name__}: {e}); skipping its rows. Its venv: {how}")
        return None
    return SimpleNamespace(
        root=Path(maxtext.__file__).parent,
        pyconfig=pyconfig,
        moe=moe,
        init=initializers.nd_dense_init,
        utils=maxtext_utils,
    )


def maxtext_case(mt: SimpleNamespace, mode: dict, x_BSD: jax.Array, workdir: str):
    """(fn, args) of MaxText's RoutedMoE fwd+bwd in one of its modes."""
    with contextlib.redirect_stdout(sys.stderr):
        cfg = mt.pyconfig.initialize(
            [None, str(mt.root / "configs" / "base.yml")],
            run_name="compare_maxtext",
            base_output_directory=workdir,
            enable_checkpointing=False,
            hardware="cpu",
            skip_jax_distributed_system=True,
            base_emb_dim=D,
            base_mlp_dim=F,
            base_moe_mlp_dim=F,
            num_experts=E,
            num_experts_per_tok=K,
            mlp_activations=["silu", "linear"],
            dtype="float32",
            weight_dtype="float32",
            per_device_batch_size=B,
            max_target_length=S,
            **mode,
        )
        mesh = jax.sharding.Mesh(mt.utils.create_device_mesh(cfg), cfg.mesh_axes)
        layer = mt.moe.RoutedMoE(
            config=cfg,
            num_experts=E,
            num_experts_per_tok=K,
            mesh=mesh,
            kernel_init=mt.init(1.0, "fan_in", "truncated_normal"),
            kernel_axes=("embed", None),
            intermediate_dim=F,
            dtype=jnp.float32,
            weight_dtype=jnp.float32,
            rngs=nnx.Rngs(params=0),
        )
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p, x):
        y, _, _ = nnx.merge(graphdef, p, rest)(x)
        return jnp.sum(y)

    return jax.grad(loss, argnums=(0, 1)), (params, x_BSD)


def our_case(dispatch: str, x_BSD: jax.Array):
    """(fn, args) of our layer's fwd+bwd, top-2 at the same capacity factor."""
    cfg = MoEConfig(num_experts=E, d_model=D, d_ff=F, router="top_k", top_k=K,
                    capacity_factor=CF, dispatch=dispatch)  # fmt: skip
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def loss(p, x):
        y, _ = nnx.merge(graphdef, p)(x)
        return jnp.sum(y)

    return jax.grad(loss, argnums=(0, 1)), (params, x_BSD)


def build(name: str, case) -> dict:
    """Compiles one case; a failure is reported as a row, never hides the others."""
    try:
        program = compile_program(*case())
    except Exception as e:  # noqa: BLE001
        log(f"[{name}] failed: {type(e).__name__}: {str(e)[:300]}")
        return {"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    temp = round(program.temp_bytes / 2**20, 1)
    return {"name": name, "program": program, "compile_s": round(program.compile_s, 2),
            "temp_mib": temp}  # fmt: skip


def time_rows(rows: list[dict], reps: int) -> None:
    """Calls every case once per round, so load drifts hit all rows alike."""
    ok = [r for r in rows if "program" in r]
    timings = Bench(reps).time({str(i): r.pop("program") for i, r in enumerate(ok)})
    for i, row in enumerate(ok):
        t = timings.all_ms[str(i)]
        row.update(ms=round(timings.median(str(i)), 1), all_ms=[round(v, 1) for v in t])
        log(f"  {row}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=positive(int), default=3,
                   help="rounds; every case is called once each")  # fmt: skip
    p.add_argument("--ours", nargs="*", default=["index", "einsum", "grouped"], choices=DISPATCHES)
    p.add_argument("--maxtext", nargs="*", default=list(MAXTEXT_MODES), choices=MAXTEXT_MODES)
    p.add_argument("--json", type=Path, default=None)
    harness_help = "folder of the MaxText harness (its setup.sh builds the MaxText venv)"
    p.add_argument("--harness", type=Path, default=DEFAULT_HARNESS, help=harness_help)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    x_BSD = jax.random.normal(jax.random.key(1), (B, S, D), jnp.float32)
    mt = import_maxtext(args.harness) if args.maxtext else None
    dense = lambda: dense_swiglu(B * S, D, K * F, jnp.float32)  # noqa: E731
    rows = [build(f"dense SwiGLU hidden {K * F}", dense)]
    rows += [build(f"ours {d}", lambda d=d: our_case(d, x_BSD)) for d in args.ours]
    with tempfile.TemporaryDirectory() as workdir:
        for mode in args.maxtext if mt else []:
            case = lambda m=MAXTEXT_MODES[mode]: maxtext_case(mt, m, x_BSD, workdir)  # noqa: E731
            rows.append(build(f"maxtext {mode}", case))
        time_rows(rows, args.reps)
    load = load_average()
    for row in rows:
        if "ms" in row and "ms" in rows[0]:
            row.update(x_dense=round(row["ms"] / rows[0]["ms"], 3), load=load)
    print_table(rows)
    out = {"shapes": dict(B=B, S=S, D=D, F=F, E=E, K=K, capacity_factor=CF), "rows": rows}
    out["maxtext"] = "skipped: not importable" if args.maxtext and mt is None else "ran"
    write_json(args.json, out)
    return out


def print_table(rows: list[dict]) -> None:
    print("| layer (fwd+bwd, T=8192, E=16, top-2, cf 1.25) | ms | x dense | temp MiB | load |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][:80]} | | | |")
            continue
        print(f"| {r['name']} | {r['ms']:.1f} | {r.get('x_dense', 0):.2f} | {r['temp_mib']:.0f} "
              f"| {r['load']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
