"""Packing and batching: token streams -> packed, shuffled ``[batch, seq_len]`` batches.

Packing: every record is tokenized and followed by EOS, the records are concatenated into one
stream, and the stream is cut into non-overlapping windows of ``seq_len + 1`` tokens; a window
gives ``inputs = window[:-1]`` and ``targets = window[1:]``. The train split drops the final
partial window; the validation split pads it so every token counts.

Padding is marked by position, never by a token id: windows hold ``PADDING`` (-1, below every
id) there, and a batch gives those positions weight 0 and the tokenizer's ``pad_id`` as their
id. A checkpoint's vocabulary uses every id, 0 included, so no id could mark padding itself.

Nothing holds a split in memory: the token streams are memory-mapped ``.npy`` files, a window
is read from the stream when a batch needs it, and a process may read only the rows of the
global batch its devices hold (``train_batch(step, rows)``).

Training batches are a pure function of ``(seed, step)``: batch ``step`` holds sequences
``step * batch_size ...`` of an endless stream made of one permutation of the train windows per
epoch, each permutation seeded by (seed, epoch). Resuming training therefore only needs the step.

``loading.from_config`` reads the corpus and builds a :class:`Data` from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import corpora
from dynmoe_jax.data import tokenizer as tokenizer_lib
from dynmoe_jax.validation import (
    Choice,
    OrNone,
    Range,
    Text,
    check,
    check_declared,
    counted,
    declared,
    invalid,
    is_int,
)

SPLITS = ("train", "validation")
PADDING = -1  # a padded window position (no tokenizer produces a negative id)
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything that determines the data a run sees; each field declared once
    (``validation.declared``)."""

    dataset: str = declared(
        corpora.KJV, "kjv (the Bible), pydoc, text_dir:PATH (your .txt files) or a TFDS text "
        "dataset name (needs internet)", Text(corpora.VALID_CHOICES, nonempty=True),
    )  # fmt: skip
    fallback_dataset: str = declared(
        corpora.PYDOC, "trained on instead when dataset is not installed, said at start-up "
        "and recorded ('' = a missing corpus is an error)",
        Text("'' (none) or a corpus name such as 'pydoc'"),
    )  # fmt: skip
    data_dir: str = declared(
        "", "cache of corpora, tokenizers and tokens ('' = $DYNMOE_DATA_DIR or "
        "~/.cache/dynmoe_jax)", Text("'' (the default cache) or a folder"),
    )  # fmt: skip
    seq_len: int = declared(128, "tokens per sequence", Range(1))
    batch_size: int = declared(16, "sequences per step", Range(1))
    seed: int = declared(0, "parameter initialisation and data order", Range(0))
    tokenizer: str = declared(
        "sentencepiece", "sentencepiece | bytes (not read with init_from: the checkpoint's "
        "tokenizer.json)", Choice(tokenizer_lib.TOKENIZERS),
    )  # fmt: skip
    vocab_size: int = declared(
        2048, "SentencePiece vocabulary (a tiny corpus may get fewer)", Range(16, 1_000_000)
    )
    eval_batches: int | None = declared(
        16, "validation batches per evaluation (None: all)", OrNone(Range(1))
    )
    init_from: str = declared(
        "", "a Hugging Face MoE folder to start from; its tokenizer.json tokenizes the corpus "
        "('' = this config's own model)",
        Text("'' (none) or a Hugging Face model folder holding config.json"),
    )  # fmt: skip
    validation_percent: int = declared(
        builder_lib.DEFAULT_VALIDATION_PERCENT, "share of a local corpus held out",
        Range(1, 99, note="both splits non-empty"), cli=False,
    )  # fmt: skip
    max_records: int | None = declared(
        None, "read at most this many records per split of a TFDS dataset (None: all)",
        OrNone(Range(1)), cli=False,
    )  # fmt: skip

    def __post_init__(self):
        check_declared(self)

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        """A DataConfig from a DataConfig, a mapping, or an ml_collections ConfigDict.

        Fields missing from ``config`` keep their defaults; extra fields are ignored.
        """
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            config = config.to_dict()  # a ConfigDict; anything else fails here, not silently
        names = [field.name for field in dataclasses.fields(cls)]
        values = {name: config[name] for name in names if name in config}
        for name in ("data_dir", "init_from"):
            if isinstance(values.get(name), os.PathLike):
                values[name] = os.fspath(values[name])
        return cls(**values)


# ----------------------------------------------------------------------------- packing


def pack_records(token_lists: Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """One int32 stream: the tokens of each record followed by ``eos_id``."""
    pieces = []
    eos = np.array([eos_id], dtype=np.int32)
    for ids in token_lists:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def encode_packed(tokenizer: tokenizer_lib.Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """``pack_records`` of the tokens of ``texts``, through the tokenizer's own packed encoder
    when it has one (the byte tokenizer: no Python int per byte)."""
    packed = getattr(tokenizer, "encode_packed", None)
    if packed is not None:
        return packed(texts)
    return pack_records(tokenizer.encode_batch(texts), tokenizer.eos_id)


def window_tokens(stream: np.ndarray, seq_len: int, *, pad_tail: bool) -> np.ndarray:
    """Cuts a token stream into non-overlapping ``[num_windows, seq_len + 1]`` windows.

    The final partial window is dropped, or filled up with ``PADDING`` when ``pad_tail`` (a
    tail of a single token is dropped either way: it has no target).
    """
    width = seq_len + 1
    num_full, tail = divmod(len(stream), width)
    windows = stream[: num_full * width].reshape(num_full, width)
    if pad_tail and tail > 1:
        last = np.full((1, width), PADDING, dtype=stream.dtype)
        last[0, :tail] = stream[num_full * width :]
        windows = np.concatenate([windows, last])
    return windows


def windows_to_batch(windows: np.ndarray, pad_id: int = tokenizer_lib.PAD_ID) -> Batch:
    """Model inputs from ``[B, T + 1]`` windows: targets are the inputs shifted by one.
    ``PADDING`` positions get weight 0 and the id ``pad_id``; ``valid`` marks the inputs that
    are not padding (a real input whose target is padding has weight 0 and is valid)."""
    windows = np.asarray(windows, dtype=np.int32)
    padded = windows == PADDING
    # New arrays, not views into the window matrix (which would keep it alive).
    ids = np.where(padded, np.int32(pad_id), windows)
    return {
        "inputs": np.ascontiguousarray(ids[:, :-1]),
        "targets": np.ascontiguousarray(ids[:, 1:]),
        "weights": (~padded[:, 1:]).astype(np.float32),
        "valid": ~padded[:, :-1],  # inputs that are not padding (the MoE layers route these)
    }


def token_counts(stream: np.ndarray, vocab_size: int, chunk: int = 1 << 20) -> np.ndarray:
    """int64 ``[vocab_size]`` occurrences of each id, read ``chunk`` tokens at a time so that a
    memory-mapped stream is never loaded whole (bincount copies a chunk to int64)."""
    counts = np.zeros(vocab_size, np.int64)
    for start in range(0, len(stream), chunk):
        counts += np.bincount(stream[start : start + chunk], minlength=vocab_size)[:vocab_size]
    return counts


def log_probs_from_counts(counts: np.ndarray) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities ``[vocab_size]`` from token counts."""
    counts = np.asarray(counts).astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + len(counts))).astype(np.float32)


class Windows:
    """The ``[seq_len + 1]`` windows of a token stream, read on access (what ``window_tokens``
    gives, without materialising it): window ``i`` is ``stream[i * (T + 1) : (i + 1) * (T + 1)]``,
    so a memory-mapped stream is only read where a batch looks.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, *, pad_tail: bool):
        # A plain view of a memory map: slicing an np.memmap builds a memmap object each time.
        self._stream = stream.view(np.ndarray)
        self._width = seq_len + 1
        self._num_full, self._tail = divmod(len(stream), self._width)
        self._padded_tail = pad_tail and self._tail > 1  # a 1-token tail has no target

    def __len__(self) -> int:
        return self._num_full + int(self._padded_tail)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        start = index * self._width
        if index < self._num_full:
            return np.array(self._stream[start : start + self._width], dtype=np.int32)
        window = np.full(self._width, PADDING, np.int32)
        window[: self._tail] = self._stream[start:]
        return window

    def num_targets(self, num_windows: int) -> int:
        """Tokens with a target (weight 1) in the first ``num_windows`` windows."""
        full = min(num_windows, self._num_full)
        tail = self._tail - 1 if self._padded_tail and num_windows > self._num_full else 0
        return full * (self._width - 1) + tail


def shuffled_sequences(windows: Sequence, seed: int) -> grain.MapDataset:
    """Endless random-access dataset of windows: one permutation of ``windows`` per epoch.

    Grain reshuffles each epoch with seed ``base + epoch``; ``base`` is a hash of ``seed`` so
    that run ``seed`` epoch 1 is not the same order as run ``seed + 1`` epoch 0.
    """
    base = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
    return grain.MapDataset.source(windows).shuffle(seed=base).repeat()


# ----------------------------------------------------------------------------- data


class Data:
    """Tokenized, packed train and validation splits of one corpus.

    The streams may be memory-mapped (``loading`` opens them so); batches read only the
    windows they hold. ``train_counts``: the train split's token counts, if already known
    (otherwise counted from the stream, chunk by chunk).
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: tokenizer_lib.Tokenizer,
        train_stream: np.ndarray,
        validation_stream: np.ndarray,
        requested_dataset: str | None = None,
        train_counts: np.ndarray | None = None,
    ):
        self.config = config
        # The corpus the config named; differs from config.dataset after a fallback.
        self.requested_dataset = requested_dataset or config.dataset
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.pad_id = tokenizer.pad_id
        self.eos_id = tokenizer.eos_id
        self.train_stream = train_stream
        self.validation_stream = validation_stream
        self._train_windows = Windows(train_stream, config.seq_len, pad_tail=False)
        if len(self._train_windows) == 0:
            # One sequence needs seq_len + 1 tokens: the inputs plus the shifted target.
            allowed = (
                f"a corpus whose train split holds at least seq_len + 1 = {config.seq_len + 1} "
                f"tokens (it holds {len(train_stream)}); or a smaller seq_len"
            )
            invalid("dataset", config.dataset, allowed)
        self._eval_windows = Windows(validation_stream, config.seq_len, pad_tail=True)
        self._train_sequences = shuffled_sequences(self._train_windows, config.seed)
        if train_counts is None:
            train_counts = token_counts(train_stream, self.vocab_size)
        self.unigram_log_probs = log_probs_from_counts(train_counts)

    @property
    def num_train_sequences(self) -> int:
        """Training sequences per epoch."""
        return len(self._train_windows)

    @property
    def num_train_tokens(self) -> int:
        """Target tokens per epoch (sequences x seq_len)."""
        return self.num_train_sequences * self.config.seq_len

    @property
    def num_validation_tokens(self) -> int:
        """Target tokens with weight 1 in the batches ``eval_batches()`` yields."""
        return self._eval_windows.num_targets(self.num_eval_batches * self.config.batch_size)

    @property
    def steps_per_epoch(self) -> float:
        """Training steps per pass over the train sequences (batches may straddle epochs)."""
        return self.num_train_sequences / self.config.batch_size

    @property
    def num_validation_batches(self) -> int:
        """Batches the whole validation split makes."""
        return math.ceil(len(self._eval_windows) / self.config.batch_size)

    @property
    def num_eval_batches(self) -> int:
        """Batches ``eval_batches()`` yields: ``config.eval_batches`` of them, at most all."""
        return self._eval_count(None)

    def _eval_count(self, max_batches: int | None) -> int:
        limit = self.config.eval_batches if max_batches is None else max_batches
        return (
            self.num_validation_batches
            if limit is None
            else min(limit, self.num_validation_batches)
        )

    def _rows(self, rows: Sequence[int] | None) -> list[int]:
        size = self.config.batch_size
        if rows is None:
            return list(range(size))
        picked = np.asarray(rows)
        ok = (
            picked.ndim == 1
            and picked.dtype.kind in "iu"
            and np.all((picked >= 0) & (picked < size))
        )
        check(ok, "rows", rows, f"a list of batch rows in 0..{size - 1} (batch_size={size})")
        return picked.tolist()

    def train_batch(self, step: int, rows: Sequence[int] | None = None) -> Batch:
        """Training batch number ``step``: int32 inputs/targets and float32 weights ``[B, T]``.

        A pure function of (seed, step), for any step >= 0. ``rows``: only these rows of the
        global batch, in this order (a process reads the rows its devices hold); None: all.
        """
        check(is_int(step) and step >= 0, "step", step, "an integer >= 0")
        start = int(step) * self.config.batch_size
        windows = [self._train_sequences[start + row] for row in self._rows(rows)]
        return windows_to_batch(np.stack(windows), self.pad_id)

    def eval_batches(
        self, max_batches: int | None = None, rows: Sequence[int] | None = None
    ) -> Iterator[Batch]:
        """Validation batches in a fixed order; the last one is padded with weight-0 rows.

        ``max_batches``: how many (None: ``config.eval_batches``, itself None for all).
        ``rows``: only these rows of each batch, as in ``train_batch``.
        """
        size, width = self.config.batch_size, self.config.seq_len + 1
        padding = np.full(width, PADDING, np.int32)
        picked = self._rows(rows)
        for index in range(self._eval_count(max_batches)):
            # Padded rows keep every batch the same shape, so a jitted eval step compiles once.
            windows = [
                self._eval_windows[index * size + row]
                if index * size + row < len(self._eval_windows)
                else padding
                for row in picked
            ]
            yield windows_to_batch(np.stack(windows), self.pad_id)

    def unigram_cross_entropy(self, max_batches: int | None = None) -> float:
        """Validation cross-entropy (nats/token) of the smoothed unigram model of the train split.

        Computed over exactly the tokens of ``eval_batches(max_batches)``, so that
        ``exp(model_loss - unigram_cross_entropy())`` compares like with like.
        """
        total, count = 0.0, 0.0
        for batch in self.eval_batches(max_batches):
            total -= float((self.unigram_log_probs[batch["targets"]] * batch["weights"]).sum())
            count += float(batch["weights"].sum())
        return total / max(count, 1.0)

    def _tokenizer_name(self) -> str:
        if self.config.init_from:
            return f"{self.config.init_from}/tokenizer.json"
        return self.config.tokenizer

    def summary(self) -> str:
        """What the run trains and validates on, each number labelled, for the start-up log."""
        corpus = f"corpus={self.config.dataset}"
        if self.requested_dataset != self.config.dataset:
            corpus += f" (fallback_dataset: dataset={self.requested_dataset} is not installed)"
        unigram = math.exp(self.unigram_cross_entropy())
        sequences = counted(self.num_train_sequences, "sequence", "sequences")
        return "\n".join([
            f"data: {corpus} tokenizer={self._tokenizer_name()} vocab={self.vocab_size}",
            f"data: train split: {sequences} of {counted(self.config.seq_len, 'token', 'tokens')} "
            f"({counted(self.num_train_tokens, 'token', 'tokens')}), "
            f"{self.steps_per_epoch:.1f} steps/epoch",
            f"data: validation split: {self.num_eval_batches} of "
            f"{counted(self.num_validation_batches, 'batch', 'batches')} used "
            f"({counted(self.num_validation_tokens, 'token', 'tokens')}), unigram perplexity on "
            f"them {unigram:.1f}",
        ])  # fmt: skip
