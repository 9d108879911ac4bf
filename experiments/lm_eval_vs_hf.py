"""The lm-eval model against lm-eval's own ``hf`` backend (transformers and torch), request by
request, on a random tiny Mixtral with a byte-level BPE tokenizer.

    .venv/bin/python -m experiments.lm_eval_vs_hf [--out runs/lm_eval_vs_hf] [--limit 40]
        [--json experiments/results/lm_eval_vs_hf.json]

1. A peer environment, made once in ``OUT/hf-venv`` (not a dependency of the package or the
   tests): torch, transformers and lm_eval[hf] at the pinned lm-eval version.
2. A random Mixtral folder (``experiments.make_checkpoint``: 2 layers, D 64, 4 experts, top-2,
   a 512-id byte-level BPE trained on pydoc_data text, router scale 4 so that routing is far
   from ties) with a ``tokenizer_config.json`` that makes transformers read the tokenizer as
   it is.
3. The example tasks written as local JSON tasks (``task_files.write``, absolute paths, so both
   environments read the same files), each run with ``--model hf`` in the peer environment
   and with ``python -m dynmoe_jax.lm_eval`` (the checkpoint's own top-2), both in float32,
   with the same window, ``--log_samples``.
4. Per request: the largest difference of any log-likelihood and whether the is-greedy flags
   and the accuracies are identical (multiple choice), the largest relative difference of the
   rolling log-likelihoods, and how many greedy generations are identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dynmoe_jax.lm_eval import task_files
from experiments.make_checkpoint import CheckpointShape, write_checkpoint

LM_EVAL = "lm_eval==0.4.13"
PEERS = ("torch==2.13.0", "transformers==5.24.0", "accelerate", f"{LM_EVAL}")
SHAPE = CheckpointShape(d_model=64, d_ff=128, experts=4, top_k=2, layers=2, heads=4,
                        kv_heads=2, vocab=512, router_scale=4.0)  # fmt: skip
MAX_LENGTH = 256
PREFIX = "vs_hf"


def peer_python(out: Path) -> Path:
    """The peer venv's python, made on first use."""
    venv = out / "hf-venv"
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS], check=True)
        (venv / ".installed").write_text("\n".join(PEERS) + "\n")
    return python


def checkpoint(out: Path) -> Path:
    folder = write_checkpoint(out / "mixtral", SHAPE)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
              "model_max_length": MAX_LENGTH}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config) + "\n")
    return folder


def run(python: Path | str, module: list[str], model_args: str, tasks: list[str],
        task_dir: Path, out: Path, limit: int) -> None:  # fmt: skip
    command = [str(python), "-m", *module, "--model_args", model_args, "--tasks", ",".join(tasks),
               "--include_path", str(task_dir), "--batch_size", "8", "--limit", str(limit),
               "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env={**os.environ, **env})


def samples(out: Path, task: str) -> dict[int, dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}


def compare(hf: Path, ours: Path, tasks: list[str]) -> dict:
    """Request by request (lm-eval logs every answer as text)."""
    mc, gen, ppl = tasks
    a, b = samples(hf, mc), samples(ours, mc)
    pairs = [(x[0], y[0]) for d in a for x, y in zip(a[d]["resps"], b[d]["resps"], strict=True)]
    r_hf, r_ours = samples(hf, ppl), samples(ours, ppl)
    rolling = [(float(r_hf[d]["resps"][0][0]), float(r_ours[d]["resps"][0][0])) for d in r_hf]
    g_hf, g_ours = samples(hf, gen), samples(ours, gen)
    return {
        "loglikelihoods": len(pairs),
        "max_abs_loglikelihood_difference": max(abs(float(x[0]) - float(y[0])) for x, y in pairs),
        "is_greedy_identical": all(x[1] == y[1] for x, y in pairs),
        "accuracy_identical": all(a[d]["acc"] == b[d]["acc"] for d in a),
        "accuracy": {"hf": _mean(a, "acc"), "ours": _mean(b, "acc")},
        "rolling": len(rolling),
        "max_rolling_relative_difference": max(abs(x - y) / abs(x) for x, y in rolling),
        "generations": len(g_hf),
        "identical_generations": sum(g_hf[d]["resps"] == g_ours[d]["resps"] for d in g_hf),
    }


def _mean(docs: dict[int, dict], metric: str) -> float:
    return sum(float(d[metric]) for d in docs.values()) / len(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lm_eval_vs_hf"))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--json", default=None)
    parser.add_argument("--compare_only", action="store_true",
                        help="compare the samples an earlier run left in --out")  # fmt: skip
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tasks = [f"{PREFIX}_{kind}" for kind in task_files.KINDS]
    if not args.compare_only:
        python = peer_python(out)
        folder = checkpoint(out)
        docs = task_files.build(task_files.pydoc_paragraphs(), n=100, seed=1)
        task_files.write(out / "tasks", docs, PREFIX)
        common = f"pretrained={folder},max_length={MAX_LENGTH},dtype=float32"
        for name in ("hf", "ours"):
            shutil.rmtree(out / name, ignore_errors=True)  # one run's samples each
        run(python, ["lm_eval", "run", "--model", "hf"], common, tasks, out / "tasks",
            out / "hf", args.limit)  # fmt: skip
        run(sys.executable, ["dynmoe_jax.lm_eval"], common, tasks, out / "tasks", out / "ours",
            args.limit)  # fmt: skip
    result = {"shape": dataclasses.asdict(SHAPE), "max_length": MAX_LENGTH, "limit": args.limit,
              "peers": PEERS, **compare(out / "hf", out / "ours", tasks)}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
