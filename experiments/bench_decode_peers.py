"""This project's batched decoding against Hugging Face transformers on the same checkpoint,
round by round, at B = 1 and 8.

Run from the repository root on a Hugging Face folder (``experiments.make_checkpoint``):

    .venv/bin/python -m experiments.bench_decode_peers --checkpoint PATH [--batch 1 8]
        [--new 64] [--rounds 3] [--json PATH]

transformers runs in its own virtual environment, which the script creates on first use in
``runs/peers/venv`` (``--venv``): a CPU torch from the machine's find-links alone where they
have one (PyPI's default torch pulls CUDA wheels), then transformers, safetensors and numpy.

Each round times, for every batch size, this project's ``generate`` and then transformers'
``generate`` in a subprocess of that environment (the model loaded once per round, one
untimed call to warm up, then the timed calls): greedy, float32, ``--new`` new tokens after
the same fixed 8-token prompts as ``bench_decode`` (a different one per row, all the same
length, no stop token), the checkpoint's own router (top-2). Rates are rows x new tokens per
second of the decode alone: for transformers, the time of generating ``--new`` tokens minus
that of generating one (its prefill), over ``--new - 1`` steps; for this project,
``Generation.tokens_per_s``. Rounds alternate the two so load drift hits them alike; the
1-minute load average is noted per round. torch runs at each of ``--torch-threads`` (default 1
and 2: on a loaded machine its spinning OpenMP threads made 2 threads several times slower
than 1). llama.cpp is not part of it (its build on this
machine's cores did not fit the time this was written in).

Axis letters: B rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path

from dynmoe_jax import generate as generate_lib
from experiments import bench_decode, report
from experiments.bench import flags, harness

PEER_PACKAGES = ["torch", "transformers", "safetensors", "numpy"]
# torch first from the machine's find-links alone, without its dependencies (PyPI's default
# torch pulls CUDA wheels); the second install then adds only what is missing.
TORCH_FIRST = ["--no-index", "--no-deps", "torch"]

# Runs inside the peers' environment: argv = checkpoint, new, batches (JSON), prompts (JSON).
TRANSFORMERS_WORKER = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
path, new, prompts_by_batch = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
out = {}
def run(ids, n):
    began = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - began
for b, prompts in prompts_by_batch.items():
    ids = torch.tensor(prompts)
    run(ids, 4)  # warm-up
    whole, first = run(ids, new), run(ids, 1)
    out[b] = len(prompts) * (new - 1) / max(whole - first, 1e-9)
print(json.dumps({"tokens_per_s": out, "threads": torch.get_num_threads()}))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face model folder")
    p.add_argument("--batch", type=flags.positive(int), nargs="+", default=[1, 8])
    p.add_argument("--new", type=flags.positive(int), default=64)
    p.add_argument("--rounds", type=flags.positive(int), default=3)
    p.add_argument("--venv", type=Path, default=Path("runs/peers/venv"))
    p.add_argument("--torch-threads", type=flags.positive(int), nargs="+", default=[1, 2],
                   help="torch's thread counts, each timed in every round")  # fmt: skip
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.new < 2:
        p.error(f"argument --new: {args.new} is below 2 (the rate needs a decode step)")
    return args


def peer_python(folder: Path) -> Path:
    """The peers' interpreter, the environment created and filled on first use."""
    python = folder / "bin" / "python"
    if not python.exists():
        harness.log(f"creating {folder} with {' '.join(PEER_PACKAGES)} (once)")
        venv.create(folder, with_pip=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    if subprocess.run([str(python), "-c", "import transformers"], capture_output=True).returncode:
        subprocess.run(pip + TORCH_FIRST)  # may find no wheel: torch then comes from the index
        subprocess.run(pip + PEER_PACKAGES, check=True)
    return python


def transformers_rates(python: Path, checkpoint: Path, new: int, batches: list[int],
                       vocab: int, threads: int) -> dict[int, float]:  # fmt: skip
    """Decode tokens/s of transformers' greedy ``generate`` per batch size (one subprocess),
    torch on ``threads`` threads."""
    prompts = {b: bench_decode.prompts(b, vocab) for b in batches}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    done = subprocess.run([str(python), "-c", TRANSFORMERS_WORKER, str(checkpoint), str(new),
                           json.dumps(prompts), str(threads)], check=True, capture_output=True,
                          text=True, env=env)  # fmt: skip
    rates = json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]
    return {int(b): r for b, r in rates.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    python = peer_python(args.venv)
    model_cfg, params = bench_decode.load(args.checkpoint, "float32")
    graphdef = generate_lib.decode_graphdef(model_cfg)
    for b in args.batch:  # compiles and warms up, untimed
        generate_lib.generate(graphdef, params, bench_decode.prompts(b, model_cfg.vocab_size), 4)
    rounds = []
    for i in range(args.rounds):
        ours = {}
        for b in args.batch:
            prompts = bench_decode.prompts(b, model_cfg.vocab_size)
            ours[b] = generate_lib.generate(graphdef, params, prompts, args.new).tokens_per_s
        peer = functools.partial(transformers_rates, python, args.checkpoint, args.new,
                                 args.batch, model_cfg.vocab_size)  # fmt: skip
        theirs = {t: peer(t) for t in args.torch_threads}
        rounds.append({"round": i, "dynmoe_jax": ours, "transformers": theirs,
                       "load": harness.load_average()})  # fmt: skip
        harness.log(f"round {i}: {rounds[-1]}")
    rows = []
    for b in args.batch:
        for t in args.torch_threads:
            mine = [r["dynmoe_jax"][b] for r in rounds]
            theirs = [r["transformers"][t][b] for r in rounds]
            ratios = [m / p for m, p in zip(mine, theirs, strict=True)]
            rows.append({"batch": b, "torch_threads": t, "dynmoe_jax": statistics.median(mine),
                         "transformers": statistics.median(theirs), "ratio_by_round": ratios,
                         "ratio_median": statistics.median(ratios)})  # fmt: skip
    header = ["B", "torch threads", "dynmoe_jax tokens/s", "transformers tokens/s",
              "ratio (median of rounds)"]  # fmt: skip
    body = [[r["batch"], r["torch_threads"], f"{r['dynmoe_jax']:.1f}", f"{r['transformers']:.1f}",
             f"{r['ratio_median']:.2f}"] for r in rows]  # fmt: skip
    loads = [r["load"] for r in rounds]
    print(f"checkpoint={args.checkpoint} new={args.new} rounds={args.rounds} load {loads}")
    print(report.markdown_table(header, body))
    out = {"checkpoint": str(args.checkpoint), "new": args.new, "rounds": rounds, "rows": rows}
    harness.write_json(args.json, report.jsonable(out))
    return out


if __name__ == "__main__":
    main()
