"""Writes a random Mixtral-shaped Hugging Face checkpoint folder, for decode benchmarks.

    .venv/bin/python -m experiments.make_checkpoint OUT_DIR [--d-model 1024 --d-ff 3584
        --experts 8 --top-k 2 --layers 4 --heads 16 --kv-heads 8 --vocab 1024
        --router-scale 1.0 --seed 0 --dtype float32]

OUT_DIR receives ``config.json`` (``MixtralForCausalLM``, every field ``hf_config`` reads),
``model.safetensors`` under the tensor names ``pretrained.from_hf`` imports and, for
``--vocab`` >= 257, ``tokenizer.json``: a byte-level BPE of exactly ``--vocab`` ids trained on
the English text of Python's ``pydoc_data`` (``write_tokenizer``), whose ``</s>`` (id 0) is
config.json's ``eos_token_id``. So README's ``from_hf`` example and the command line's
fine-tuning run on the folder as on a downloaded one.
The tensors are written one at a time (``safetensors_io.write_safetensors``), so a checkpoint
of several GB never sits in memory whole. The defaults make one decode step read mostly expert
weights: a small vocabulary keeps the head and the embedding row small beside the experts.

The weights are random but fixed by ``--seed``: each tensor draws from its own generator,
seeded with the seed and its name, so it does not depend on the order or on the other tensors.
Linear weights have standard deviation 1/sqrt(fan-in) and the embedding 1, so activations stay
near unit size through the layers; norm scales are 1. The router's rows are drawn the same way
and multiplied by ``--router-scale``: a normalised hidden state then gives router logits of
standard deviation about ``router_scale``, whatever the width, so a larger scale routes more
sharply (top-p reaches its threshold with fewer experts) and a smaller one more flatly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from dynmoe_jax.pretrained.safetensors_io import SINGLE_FILE, Spec, write_safetensors

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
EOS_TOKEN = "</s>"
EOS_ID = 0  # the BPE trainer numbers the special tokens first
# A byte-level tokenizer needs its 256 byte tokens and the EOS token before any merge.
MIN_TOKENIZER_VOCAB = 257
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class CheckpointShape:
    """The sizes and the randomness of a generated checkpoint (defaults: the benchmark's)."""

    d_model: int = 1024
    d_ff: int = 3584
    experts: int = 8
    top_k: int = 2
    layers: int = 4
    heads: int = 16
    kv_heads: int = 8
    vocab: int = 1024
    router_scale: float = 1.0
    seed: int = 0
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


COUNTS = ("d_model", "d_ff", "experts", "top_k", "layers", "heads", "kv_heads", "vocab")


def problems(shape: CheckpointShape) -> list[tuple[str, str]]:
    """(flag, what is wrong) for each value the checkpoint cannot have; empty when it is fine."""
    small = [name for name in COUNTS if getattr(shape, name) < 1]
    if small:  # the checks below divide by these
        return [(_flag(name), f"{getattr(shape, name)} is not >= 1") for name in small]
    out = []
    if shape.seed < 0:
        out.append(("--seed", f"{shape.seed} is not >= 0"))
    if not 0 < shape.router_scale < math.inf:
        out.append(("--router-scale", f"{shape.router_scale} is not a finite number > 0"))
    if shape.top_k > shape.experts:
        out.append(("--top-k", f"{shape.top_k} is more than --experts {shape.experts}"))
    if shape.d_model % shape.heads or shape.head_dim % 2:
        out.append(("--d-model", f"{shape.d_model} is not --heads {shape.heads} times an even "
                    "head width (rotary embeddings turn pairs of features)"))  # fmt: skip
    if shape.heads % shape.kv_heads:
        out.append(("--kv-heads", f"{shape.kv_heads} does not divide --heads {shape.heads}"))
    if shape.dtype not in DTYPES:
        out.append(("--dtype", f"{shape.dtype} is not one of {', '.join(DTYPES)}"))
    return out


def _flag(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def hf_config(shape: CheckpointShape) -> dict:
    """config.json of the checkpoint, as transformers writes one for Mixtral."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": "silu",
        "hidden_size": shape.d_model,
        "intermediate_size": shape.d_ff,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "num_local_experts": shape.experts,
        "num_experts_per_tok": shape.top_k,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "router_aux_loss_coef": 0.0,
        "bos_token_id": None,
        "eos_token_id": EOS_ID if shape.vocab >= MIN_TOKENIZER_VOCAB else None,
        "torch_dtype": shape.dtype,
    }


def tensor_specs(shape: CheckpointShape) -> dict[str, Spec]:
    """Every tensor's name and (shape, dtype), torch Linear weights as [out, in]."""
    d, f, v = shape.d_model, shape.d_ff, shape.vocab
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    dims: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(shape.layers):
        layer, moe = f"model.layers.{i}", f"model.layers.{i}.block_sparse_moe"
        dims |= {
            f"{layer}.input_layernorm.weight": (d,),
            f"{layer}.self_attn.q_proj.weight": (q, d),
            f"{layer}.self_attn.k_proj.weight": (kv, d),
            f"{layer}.self_attn.v_proj.weight": (kv, d),
            f"{layer}.self_attn.o_proj.weight": (d, q),
            f"{layer}.post_attention_layernorm.weight": (d,),
            f"{moe}.gate.weight": (shape.experts, d),
        }
        for j in range(shape.experts):
            expert = f"{moe}.experts.{j}"
            dims |= {f"{expert}.w1.weight": (f, d), f"{expert}.w3.weight": (f, d),
                     f"{expert}.w2.weight": (d, f)}  # fmt: skip
    dims |= {"model.norm.weight": (d,), "lm_head.weight": (v, d)}
    dtype = np.dtype(DTYPES[shape.dtype])
    return {name: (dim, dtype) for name, dim in dims.items()}


def producer(shape: CheckpointShape) -> Callable[[str], np.ndarray]:
    """The values of the tensor ``name``: the same for the same seed, whatever else is made."""
    specs = tensor_specs(shape)

    def produce(name: str) -> np.ndarray:
        dims, dtype = specs[name]
        if name.endswith("norm.weight"):
            return np.ones(dims, dtype)
        rng = np.random.default_rng([shape.seed, zlib.crc32(name.encode())])
        values = rng.standard_normal(dims, np.float32)
        if name != "model.embed_tokens.weight":
            values *= np.float32(1 / np.sqrt(dims[1]))  # torch Linear: [out, in]
        if name.endswith("block_sparse_moe.gate.weight"):
            values *= np.float32(shape.router_scale)
        return values.astype(dtype, copy=False)

    return produce


def write_tokenizer(folder: str | Path, vocab_size: int) -> None:
    """Writes ``folder/tokenizer.json``: a byte-level BPE of exactly ``vocab_size`` ids (>=
    ``MIN_TOKENIZER_VOCAB``) trained on the English text of Python's ``pydoc_data``, with
    ``EOS_TOKEN`` at ``EOS_ID``. The text holds fewer merges than a large vocabulary asks for;
    the ids past them are unused special tokens, so the ids still match the embedding's rows.
    The same call always writes the same file."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_TOKENIZER_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs >= "
                         f"{MIN_TOKENIZER_VOCAB} ids (256 bytes and {EOS_TOKEN})")  # fmt: skip
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    unused = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<unused{i}>" for i in range(unused)])
    assert tokenizer.get_vocab_size() == vocab_size and tokenizer.token_to_id(EOS_TOKEN) == EOS_ID
    tokenizer.save(str(Path(folder) / TOKENIZER_FILE))


def write_checkpoint(out_dir: str | Path, shape: CheckpointShape) -> Path:
    """Writes the checkpoint folder ``out_dir``: the weights and the tokenizer (when
    ``shape.vocab`` allows one) first, then config.json, so a folder with a config.json is
    complete. Returns the folder."""
    wrong = problems(shape)
    if wrong:
        raise ValueError("; ".join(f"{flag}: {why}" for flag, why in wrong))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / SINGLE_FILE, tensor_specs(shape), producer(shape),
                      {"format": "pt", "made_by": "experiments.make_checkpoint"})  # fmt: skip
    if shape.vocab >= MIN_TOKENIZER_VOCAB:
        write_tokenizer(out, shape.vocab)
    (out / "config.json").write_text(json.dumps(hf_config(shape), indent=2) + "\n")
    return out


def checkpoint_bytes(shape: CheckpointShape) -> int:
    """The size of the tensors' data."""
    return sum(
        int(np.prod(dims)) * np.dtype(dtype).itemsize
        for dims, dtype in tensor_specs(shape).values()
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path, CheckpointShape]:
    default = CheckpointShape()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="the folder to write (created if absent)")
    for field in dataclasses.fields(CheckpointShape):
        flag = _flag(field.name)
        value = getattr(default, field.name)
        if field.name == "dtype":
            p.add_argument(flag, default=value, choices=list(DTYPES))
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    args = p.parse_args(argv)
    fields = dataclasses.fields(CheckpointShape)
    shape = CheckpointShape(**{f.name: getattr(args, f.name) for f in fields})
    for flag, why in problems(shape)[:1]:
        p.error(f"argument {flag}: {why}")
    return args.out_dir, shape


def main(argv: Sequence[str] | None = None) -> Path:
    out_dir, shape = parse_args(sys.argv[1:] if argv is None else argv)
    print(f"writing {checkpoint_bytes(shape) / 2**20:,.1f} MiB of {shape.dtype} tensors to "
          f"{out_dir / SINGLE_FILE}", flush=True)  # fmt: skip
    if shape.vocab < MIN_TOKENIZER_VOCAB:
        print(f"no {TOKENIZER_FILE}: a byte-level tokenizer needs --vocab >= "
              f"{MIN_TOKENIZER_VOCAB}", flush=True)  # fmt: skip
    return write_checkpoint(out_dir, shape)


if __name__ == "__main__":
    main()
