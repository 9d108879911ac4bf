"""Tokenizers with one small interface: a byte-level one and a cached SentencePiece model
(``hf_tokenizer.py`` adds a pretrained checkpoint's tokenizer.json).

Both reserve id 0 for padding (never produced by ``encode``) and have an end-of-sequence id that
the pipeline appends after every record.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm

from dynmoe_jax.validation import check, invalid

PAD_ID = 0
EOS_ID = 1
TOKENIZERS = ("sentencepiece", "bytes")
SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram")


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline and the training loop need from a tokenizer."""

    vocab_size: int
    eos_id: int
    # The id padded positions carry; the pipeline masks padding by position (weight 0), so this
    # may be a real token of the vocabulary.
    pad_id: int
    # Identifies the exact vocabulary, so caches of token ids are never reused across tokenizers.
    fingerprint: str

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``special_tokens=False`` leaves out any the tokenizer adds
        (a BOS), as lm-eval scores text."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the two special ids: pad=0, eos=1, byte b -> b + 2."""

    pad_id = PAD_ID
    eos_id = EOS_ID
    offset = 2
    vocab_size = 256 + offset
    fingerprint = "bytes258"

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids of the UTF-8 bytes of ``text`` (no special token is ever added)."""
        return (
            np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset
        ).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text."""
        return [self.encode(text) for text in texts]

    def encode_packed(self, texts: Sequence[str]) -> np.ndarray:
        """int32 ids of every text, each followed by ``eos_id`` (what the pipeline packs).

        The texts are joined by the byte 0xFF, which UTF-8 never contains, and that byte's id
        is then replaced by EOS: one vectorised pass instead of a list of ints per text.
        """
        if not texts:
            return np.zeros(0, np.int32)
        joined = b"\xff".join(text.encode("utf-8") for text in texts) + b"\xff"
        ids = np.frombuffer(joined, np.uint8).astype(np.int32)
        ids += self.offset
        ids[ids == 0xFF + self.offset] = self.eos_id
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in ``ids``; special ids are dropped, broken UTF-8 is replaced."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
        return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained SentencePiece model; pad=0, eos=1, unk=2, no BOS, unknown text -> bytes."""

    def __init__(self, model_proto: bytes):
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = int(self._processor.vocab_size())
        self.eos_id = int(self._processor.eos_id())
        self.pad_id = int(self._processor.pad_id())
        digest = hashlib.sha256(model_proto).hexdigest()[:12]
        self.fingerprint = f"spm{self.vocab_size}-{digest}"
        check(self.pad_id == PAD_ID, "SentencePiece pad_id", self.pad_id, f"{PAD_ID} (padding)")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Loads a ``.model`` file."""
        return cls(pathlib.Path(path).read_bytes())

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (whitespace runs are normalised to one space; no BOS is ever
        added)."""
        return list(self._processor.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text, using SentencePiece's multi-threaded batch path."""
        return self._processor.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; pad and eos decode to nothing."""
        return self._processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def train_sentencepiece(
    sentences: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
) -> bytes:
    """Trains a SentencePiece model in memory and returns its serialized proto.

    The whole input is used (no sentence sampling), which keeps training deterministic. The
    vocabulary is a soft limit: a tiny corpus gets fewer pieces instead of an error.
    """
    allowed_types = " | ".join(map(repr, SENTENCEPIECE_MODEL_TYPES))
    check(model_type in SENTENCEPIECE_MODEL_TYPES, "model_type", model_type, allowed_types)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=2,
            bos_id=-1,
            # Every character seen in training gets a piece, and anything else falls back to
            # bytes, so decode(encode(s)) == s for any whitespace-normalised text.
            character_coverage=1.0,
            byte_fallback=True,
            hard_vocab_limit=False,
            input_sentence_size=0,
            max_sentence_length=1 << 16,
            # A fixed count, not cpu_count(): unigram EM sums per-thread statistics, so the
            # model could otherwise differ between machines.
            num_threads=4,
            minloglevel=2,
        )
    except RuntimeError as error:
        reason = " ".join(str(error).split())  # one line
        allowed = "at least 259 ids plus one per distinct character (byte fallback)"
        invalid("vocab_size", vocab_size, f"{allowed}; SentencePiece: {reason}")
    return writer.getvalue()


def sentencepiece_model_path(
    data_dir: str | os.PathLike, dataset_key: str, vocab_size: int, model_type: str = "bpe"
) -> pathlib.Path:
    """Where the SentencePiece model of a dataset is cached: ``data_dir/tokenizers/...``."""
    return pathlib.Path(data_dir) / "tokenizers" / f"{dataset_key}-{model_type}{vocab_size}.model"


def atomic_write_bytes(path: pathlib.Path, payload: bytes) -> None:
    """Writes a file so that readers never see a half-written one (e.g. two jobs racing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(payload)
    os.replace(f.name, path)


def load_or_train_sentencepiece(
    model_path: pathlib.Path,
    train_sentences: Callable[[], Iterable[str]],
    vocab_size: int,
    model_type: str = "bpe",
) -> SentencePieceTokenizer:
    """Loads the cached model at ``model_path``, or trains one on ``train_sentences()``.

    ``train_sentences`` is a callable so that the corpus is not even read on a cache hit; it
    may give an iterator, which training reads once.
    """
    if not model_path.exists():
        sentences = train_sentences()
        n = len(sentences) if isinstance(sentences, Sized) else None
        count = "" if n is None else f" ({n} record{'' if n == 1 else 's'})"
        print(f"data: training a {vocab_size}-piece SentencePiece tokenizer on the train split"
              f"{count}", flush=True)  # fmt: skip
        atomic_write_bytes(model_path, train_sentencepiece(sentences, vocab_size, model_type))
    return SentencePieceTokenizer.from_file(model_path)


def make_tokenizer(
    kind: str,
    *,
    data_dir: str | os.PathLike,
    dataset_key: str,
    vocab_size: int,
    train_sentences: Callable[[], Iterable[str]],
    model_type: str = "bpe",
) -> Tokenizer:
    """The tokenizer named by ``kind`` ('sentencepiece' or 'bytes').

    The SentencePiece model is trained on ``train_sentences()`` (the train split only) the first
    time and cached in ``data_dir/tokenizers``; ``vocab_size`` is ignored for bytes.
    """
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        path = sentencepiece_model_path(data_dir, dataset_key, vocab_size, model_type)
        return load_or_train_sentencepiece(path, train_sentences, vocab_size, model_type)
    invalid("tokenizer", kind, " | ".join(map(repr, TOKENIZERS)))
