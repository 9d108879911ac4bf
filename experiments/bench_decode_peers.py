"""This project's batched decoding against Hugging Face transformers and llama.cpp on the
same checkpoint, round by round, at B = 1 and 8.

Run from the repository root on a Hugging Face folder (``experiments.make_checkpoint``):

    .venv/bin/python -m experiments.bench_decode_peers --checkpoint PATH [--llama]
        [--batch 1 8] [--new 64] [--rounds 3] [--torch-threads 1 2] [--json PATH]

The peers run in their own virtual environment, which the script creates on first use in
``runs/peers/venv`` (``--venv``): a CPU torch from the machine's find-links alone where they
have one (PyPI's default torch pulls CUDA wheels), then transformers, safetensors and numpy.
With ``--llama``, llama-cpp-python is built there from its source distribution (downloaded to
``runs/peers/src``; slow on few cores), and the checkpoint converted to a float32 GGUF file by
the converter that distribution vendors, with a placeholder vocabulary of token ids (the
benchmark feeds ids; the converter does not recognise the checkpoint's tokenizer).

Each round times, for every batch size, this project's ``generate`` and then each peer in a
subprocess of that environment (the model loaded once per round, one untimed call to warm
up, then the timed calls), at each of ``--torch-threads`` threads (default 1 and 2: on a
loaded machine torch's spinning OpenMP threads made 2 threads several times slower than 1):
greedy, float32, ``--new`` new tokens after the same fixed 8-token prompts as
``bench_decode`` (a different one per row, all the same length, no stop token), the
checkpoint's own router (top-2). Rates are rows x new tokens per second of the decode alone:
transformers, the time of generating ``--new`` tokens minus that of generating one (its
prefill), over ``--new - 1`` steps; llama.cpp, its ``--new - 1`` batched steps after the
prefill (every row its own sequence in one batch, greedy on the host from each row's
logits); this project, ``Generation.tokens_per_s``. Rounds alternate them so load drift hits
all alike; the 1-minute load average is noted per round. After each round the copy and the
read bandwidth are measured as ``bench_decode`` measures them (256 MiB probes); over their
medians, the bytes of a step (the weights, the key/value cache, and the experts the rows
select, their union estimated as ``bench_decode`` does for top-k) give each batch size's
bounds, and a second table gives every system's share of each.

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
import tarfile
import venv
from collections.abc import Sequence
from pathlib import Path

from dynmoe_jax import generate as generate_lib
from experiments import bench_decode, report
from experiments.bench import flags, harness
from experiments.bench.decode_bytes import PROBE_MIB, copy_bandwidth, expected_step, read_bandwidth

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
out, tokens = {}, {}
def run(ids, n):
    began = time.perf_counter()
    with torch.inference_mode():
        done = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - began, done[:, ids.shape[1]:].tolist()
for b, prompts in prompts_by_batch.items():
    ids = torch.tensor(prompts)
    run(ids, 4)  # warm-up
    (whole, tokens[b]), (first, _) = run(ids, new), run(ids, 1)
    out[b] = len(prompts) * (new - 1) / max(whole - first, 1e-9)
print(json.dumps({"tokens_per_s": out, "tokens": tokens, "threads": torch.get_num_threads()}))
"""

# Runs inside the peers' environment: argv = GGUF path, new, prompts by batch (JSON), threads.
# Batched greedy decoding with llama.cpp's own API: every row its own sequence in one batch.
LLAMA_WORKER = r"""
import json, sys, time
import numpy as np
import llama_cpp as L
path, new, prompts_by_batch = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
threads = int(sys.argv[4])
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
def decode(prompts, steps):
    b, p = len(prompts), len(prompts[0])
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = b * (p + steps + 8), b * p, b * p, b
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(b * p, 0, b)
    def run(tokens_by_row, start):
        batch.n_tokens = 0
        for row, tokens in enumerate(tokens_by_row):
            for j, t in enumerate(tokens):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + j, 1
                batch.seq_id[i][0], batch.logits[i] = row, j == len(tokens) - 1
                batch.n_tokens += 1
        assert L.llama_decode(ctx, batch) == 0
        return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), (vocab,))))
                for i in range(batch.n_tokens) if batch.logits[i]]
    next_tokens = run(prompts, 0)
    began = time.perf_counter()
    for step in range(steps):
        next_tokens = run([[t] for t in next_tokens], p + step)
    seconds = time.perf_counter() - began
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return b * steps / seconds
out = {}
for b, prompts in prompts_by_batch.items():
    decode(prompts, 4)  # warm-up
    out[b] = decode(prompts, new - 1)
print(json.dumps({"tokens_per_s": out}))
"""

# llama.cpp's converter with a placeholder vocabulary of token ids (the benchmark feeds ids;
# the checkpoint's tokenizer is not one the converter recognises). argv = llama.cpp folder, then
# the converter's own arguments.
CONVERT_IDS_ONLY = r"""
import runpy, sys
here = sys.argv.pop(1)
sys.path[:0] = [here, here + "/gguf-py"]
import conversion.llama as llama
def ids_only(self):
    n = self.hparams["vocab_size"]
    w = self.gguf_writer
    w.add_tokenizer_model("llama"); w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>".encode() for i in range(n)])
    w.add_token_scores([0.0] * n); w.add_token_types([1] * n); w.add_eos_token_id(0)
for cls in vars(llama).values():
    if isinstance(cls, type) and "set_vocab" in vars(cls):
        cls.set_vocab = ids_only
runpy.run_path(here + "/convert_hf_to_gguf.py", run_name="__main__")
"""
LLAMA_CMAKE = (
    "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face model folder")
    p.add_argument("--batch", type=flags.positive(int), nargs="+", default=[1, 8])
    p.add_argument("--new", type=flags.positive(int), default=64)
    p.add_argument("--rounds", type=flags.positive(int), default=3)
    p.add_argument("--venv", type=Path, default=Path("runs/peers/venv"))
    p.add_argument("--torch-threads", type=flags.positive(int), nargs="+", default=[1, 2],
                   help="the peers' thread counts, each timed in every round")  # fmt: skip
    p.add_argument("--llama", action="store_true",
                   help="llama.cpp too (built from source on first use: slow)")  # fmt: skip
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


def llama_gguf(python: Path, folder: Path, checkpoint: Path) -> Path:
    """The checkpoint as a float32 GGUF file for llama.cpp, made on first use: llama-cpp-python
    built from its source distribution into the peers' environment (``folder/src``), then
    the checkpoint converted by the converter that distribution vendors."""
    src = folder / "src"
    if subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode:
        harness.log(f"building llama-cpp-python from source in {src} (once; slow on few cores)")
        subprocess.run([str(python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                        ":all:", "llama-cpp-python", "-d", str(src)], check=True)  # fmt: skip
        env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE,
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))  # fmt: skip
        subprocess.run([str(python), "-m", "pip", "install", "-q", str(_sdist(src)), "gguf",
                        "sentencepiece"], check=True, env=env)  # fmt: skip
    gguf = folder / f"{checkpoint.resolve().name}.f32.gguf"
    if not gguf.exists():
        if not list(src.glob("*.tar.gz")):
            subprocess.run([str(python), "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary", ":all:", "llama-cpp-python", "-d", str(src)],
                           check=True)  # fmt: skip
        llama_cpp_dir = _vendored_llama_cpp(_sdist(src), src)
        subprocess.run([str(python), "-c", CONVERT_IDS_ONLY, str(llama_cpp_dir), str(checkpoint),
                        "--outtype", "f32", "--outfile", str(gguf)], check=True)  # fmt: skip
    return gguf


def _sdist(src: Path) -> Path:
    return sorted(src.glob("llama_cpp_python-*.tar.gz"))[-1]


def _vendored_llama_cpp(sdist: Path, into: Path) -> Path:
    """The sdist's vendor/llama.cpp folder (its converter, conversion package and gguf-py)."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(into, members=members, filter="data")
    return next(into.glob("llama_cpp_python-*/vendor/llama.cpp"))


def transformers_run(python: Path, checkpoint: Path, new: int, batches: list[int],
                     vocab: int, threads: int) -> dict:  # fmt: skip
    """transformers' greedy ``generate`` per batch size (one subprocess), torch on ``threads``
    threads: ``{"tokens_per_s": {B: rate}, "tokens": {B: the new tokens of each row}}``."""
    return _worker(python, TRANSFORMERS_WORKER, checkpoint, new, batches, vocab, threads)


def llama_run(python: Path, gguf: Path, new: int, batches: list[int], vocab: int,
              threads: int) -> dict:  # fmt: skip
    """llama.cpp's batched greedy decoding per batch size: ``{"tokens_per_s": {B: rate}}``."""
    return _worker(python, LLAMA_WORKER, gguf, new, batches, vocab, threads)


def _worker(python, worker, path, new, batches, vocab, threads) -> dict:
    prompts = {b: bench_decode.prompts(b, vocab) for b in batches}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    done = subprocess.run([str(python), "-c", worker, str(path), str(new), json.dumps(prompts),
                           str(threads)], check=True, capture_output=True, text=True,
                          env=env)  # fmt: skip
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {key: {int(b): v for b, v in out[key].items()} for key in ("tokens_per_s", "tokens")
            if key in out}  # fmt: skip


def agreement(ours: dict[int, list], theirs: dict[int, list]) -> dict[int, dict]:
    """Per batch size: rows whose greedy tokens are all equal, and equal tokens, of all."""
    out = {}
    for b, rows in ours.items():
        pairs = list(zip(rows, theirs[b], strict=True))
        same = [sum(int(x == y) for x, y in zip(m, t, strict=True)) for m, t in pairs]
        out[b] = {"rows_equal": sum(s == len(m) for s, (m, _) in zip(same, pairs, strict=True)),
                  "rows": len(rows), "tokens_equal": sum(same),
                  "tokens": sum(len(m) for m, _ in pairs)}  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    python = peer_python(args.venv)
    gguf = llama_gguf(python, args.venv.parent, args.checkpoint) if args.llama else None
    model_cfg, params = bench_decode.load(args.checkpoint, "float32")
    graphdef = generate_lib.decode_graphdef(model_cfg)
    vocab = model_cfg.vocab_size
    for b in args.batch:  # compiles and warms up, untimed
        generate_lib.generate(graphdef, params, bench_decode.prompts(b, vocab), 4)
    peers = {"transformers": functools.partial(transformers_run, python, args.checkpoint)}
    if gguf is not None:
        peers["llama.cpp"] = functools.partial(llama_run, python, gguf)
    rounds, agree = [], []
    for i in range(args.rounds):
        runs = {b: generate_lib.generate(graphdef, params, bench_decode.prompts(b, vocab),
                                         args.new) for b in args.batch}  # fmt: skip
        ours = {b: g.tokens_per_s for b, g in runs.items()}
        outs = {name: {t: fn(args.new, args.batch, vocab, t) for t in args.torch_threads}
                for name, fn in peers.items()}  # fmt: skip
        theirs = {name: {t: o["tokens_per_s"] for t, o in by.items()} for name, by in outs.items()}
        hf = outs["transformers"][args.torch_threads[0]]["tokens"]
        agree.append(agreement({b: g.tokens for b, g in runs.items()}, hf))
        rounds.append({"round": i, "dynmoe_jax": ours, "peers": theirs, "agreement": agree[-1],
                       "load": harness.load_average(), "copy": copy_bandwidth(PROBE_MIB),
                       "read": read_bandwidth(PROBE_MIB)})  # fmt: skip
        harness.log(f"round {i}: {rounds[-1]}")
    rows = [_row(rounds, b, name, t) for b in args.batch for name in peers
            for t in args.torch_threads]  # fmt: skip
    header = ["B", "peer", "threads", "dynmoe_jax tokens/s", "peer tokens/s",
              "ratio (median of rounds)"]  # fmt: skip
    body = [[r["batch"], r["peer"], r["threads"], f"{r['dynmoe_jax']:.1f}",
             f"{r['peer_tokens_per_s']:.1f}", f"{r['ratio_median']:.2f}"]
            for r in rows]  # fmt: skip
    loads = [r["load"] for r in rounds]
    print(f"checkpoint={args.checkpoint} new={args.new} rounds={args.rounds} load {loads}")
    print(report.markdown_table(header, body))
    for b, a in agree[-1].items():
        print(
            f"B = {b}: greedy tokens equal to transformers' on {a['rows_equal']} of {a['rows']}"
            f" rows ({a['tokens_equal']} of {a['tokens']} tokens)"
        )
    shares = bound_shares(rounds, rows, step_bytes(model_cfg, params, args.batch, args.new))
    print(report.markdown_table(
        ["B", "system", "threads", "tokens/s", "bound tokens/s (copy, read)", "of copy bound",
         "of read bound"],
        [[r["batch"], r["system"], r["threads"], f"{r['tokens_per_s']:.1f}",
          f"{r['bound_copy']:.1f}, {r['bound_read']:.1f}", f"{r['of_copy_bound']:.0%}",
          f"{r['of_read_bound']:.0%}"] for r in shares]))  # fmt: skip
    out = {"checkpoint": str(args.checkpoint), "new": args.new, "rounds": rounds, "rows": rows,
           "shares": shares}  # fmt: skip
    harness.write_json(args.json, report.jsonable(out))
    return out


def _row(rounds: list[dict], batch: int, peer: str, threads: int) -> dict:
    """One (B, peer, threads) row: medians over the rounds and the paired ratios."""
    mine = [r["dynmoe_jax"][batch] for r in rounds]
    theirs = [r["peers"][peer][threads][batch] for r in rounds]
    ratios = [m / p for m, p in zip(mine, theirs, strict=True)]
    return {"batch": batch, "peer": peer, "threads": threads,
            "dynmoe_jax": statistics.median(mine), "peer_tokens_per_s": statistics.median(theirs),
            "ratio_by_round": ratios, "ratio_median": statistics.median(ratios)}  # fmt: skip


def step_bytes(model_cfg, params, batches: list[int], new: int) -> dict[int, float]:
    """Bytes of one decode step per batch size, as ``bench_decode`` counts them, with every
    row selecting the checkpoint's top-k experts."""
    positions = len(bench_decode.PROMPT) + new
    k = model_cfg.moe.top_k
    return {b: expected_step(model_cfg, params, b, k, positions)[1] for b in batches}


def bound_shares(rounds: list[dict], rows: list[dict], step: dict[int, float]) -> list[dict]:
    """Per batch size and system: its median tokens/s and share of the bounds (B rows over a
    step's bytes at the median copy and read bandwidth of the rounds)."""
    copy = statistics.median(r["copy"] for r in rounds)
    read = statistics.median(r["read"] for r in rounds)
    out = []
    for b, bytes_ in step.items():
        bounds = {"bound_copy": b * copy / bytes_, "bound_read": b * read / bytes_}
        ours = next(r["dynmoe_jax"] for r in rows if r["batch"] == b)
        systems = [("dynmoe_jax", "-", ours)] + [
            (r["peer"], r["threads"], r["peer_tokens_per_s"]) for r in rows if r["batch"] == b
        ]
        out += [{"batch": b, "system": name, "threads": t, "tokens_per_s": rate, **bounds,
                 "of_copy_bound": rate / bounds["bound_copy"],
                 "of_read_bound": rate / bounds["bound_read"]}
                for name, t, rate in systems]  # fmt: skip
    return out


if __name__ == "__main__":
    main()
