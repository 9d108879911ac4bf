"""Public entry point: corpus -> tokens -> packed, shuffled ``[batch, seq_len]`` batches.

Packing: every record is tokenized and followed by EOS, the records are concatenated into one
stream, and the stream is cut into non-overlapping windows of ``seq_len + 1`` tokens; a window
gives ``inputs = window[:-1]`` and ``targets = window[1:]``. The train split drops the final
partial window; the validation split pads it with ``pad_id`` (weight 0) so every token counts.

Training batches are a pure function of ``(seed, step)``: batch ``step`` holds sequences
``step * batch_size ...`` of an endless stream made of one permutation of the train windows per
epoch, each permutation seeded by (seed, epoch). Resuming training therefore only needs the step.

Caches (all under ``data_dir``, safe to delete):

* ``dynmoe_text/<config>/<version>/``: the TFDS ArrayRecord build of a local corpus;
* ``tokenizers/<dataset key>-bpe<vocab>.model``: the SentencePiece model (train split only);
* ``packed/<dataset key>-<tokenizer fingerprint>-<split>.npy``: the token stream of a split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import corpora
from dynmoe_jax.data import tokenizer as tokenizer_lib

SPLITS = ("train", "validation")
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Everything that determines the data a run sees.

    Attributes:
      dataset: 'kjv', 'pydoc', 'text_dir:PATH' or a TFDS text dataset name.
      data_dir: folder for the TFDS build and all caches.
      seq_len: tokens per training sequence (inputs and targets each have this length).
      batch_size: sequences per batch.
      seed: seeds the per-epoch shuffles of the training sequences.
      tokenizer: 'sentencepiece' or 'bytes'.
      vocab_size: SentencePiece vocabulary size (a tiny corpus may get fewer pieces).
      validation_percent: share of a local corpus's records held out for validation.
      max_records: read at most this many records per split of a TFDS dataset (None: all).
    """

    dataset: str = corpora.PYDOC
    data_dir: str
    seq_len: int
    batch_size: int
    seed: int = 0
    tokenizer: str = "sentencepiece"
    vocab_size: int = 2048
    validation_percent: int = builder_lib.DEFAULT_VALIDATION_PERCENT
    max_records: int | None = None

    def __post_init__(self):
        _require(isinstance(self.dataset, str) and self.dataset, "dataset", self.dataset, "a name")
        _require(bool(str(self.data_dir)), "data_dir", self.data_dir, "a folder")
        for name in ("seq_len", "batch_size", "vocab_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "an integer >= 1")
        _require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(
            self.tokenizer in tokenizer_lib.TOKENIZERS,
            "tokenizer",
            self.tokenizer,
            f"one of {tokenizer_lib.TOKENIZERS}",
        )
        _require(
            _is_int(self.validation_percent) and 1 <= self.validation_percent <= 99,
            "validation_percent",
            self.validation_percent,
            "an integer in [1, 99]",
        )
        _require(
            self.max_records is None or (_is_int(self.max_records) and self.max_records >= 1),
            "max_records",
            self.max_records,
            "None or an integer >= 1",
        )

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        """A DataConfig from a DataConfig, a mapping, or an ml_collections ConfigDict.

        Fields missing from ``config`` keep their defaults; extra fields are ignored.
        """
        if isinstance(config, cls):
            return config
        names = [field.name for field in dataclasses.fields(cls)]
        if isinstance(config, Mapping):
            values = {name: config[name] for name in names if name in config}
        else:
            values = {name: getattr(config, name) for name in names if hasattr(config, name)}
        if "data_dir" in values:
            values["data_dir"] = os.fspath(values["data_dir"])
        return cls(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}.")


# ----------------------------------------------------------------------------- packing


def pack_records(token_lists: Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """One int32 stream: the tokens of each record followed by ``eos_id``."""
    pieces = []
    eos = np.array([eos_id], dtype=np.int32)
    for ids in token_lists:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def window_tokens(
    stream: np.ndarray, seq_len: int, *, pad_tail: bool, pad_id: int = tokenizer_lib.PAD_ID
) -> np.ndarray:
    """Cuts a token stream into non-overlapping ``[num_windows, seq_len + 1]`` windows.

    The final partial window is dropped, or padded with ``pad_id`` when ``pad_tail`` (a tail of
    a single token is dropped either way: it has no target).
    """
    width = seq_len + 1
    num_full, tail = divmod(len(stream), width)
    windows = stream[: num_full * width].reshape(num_full, width)
    if pad_tail and tail > 1:
        last = np.full((1, width), pad_id, dtype=stream.dtype)
        last[0, :tail] = stream[num_full * width :]
        windows = np.concatenate([windows, last])
    return windows


def windows_to_batch(windows: np.ndarray, pad_id: int = tokenizer_lib.PAD_ID) -> Batch:
    """Model inputs from ``[B, T + 1]`` windows: targets are the inputs shifted by one."""
    windows = np.asarray(windows, dtype=np.int32)
    # Contiguous copies: views into the window matrix would keep it alive and copy on transfer.
    targets = np.ascontiguousarray(windows[:, 1:])
    return {
        "inputs": np.ascontiguousarray(windows[:, :-1]),
        "targets": targets,
        # pad_id is never produced by a tokenizer, so it only marks padding.
        "weights": (targets != pad_id).astype(np.float32),
    }


def unigram_log_probs(train_stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities ``[vocab_size]`` from train token counts."""
    counts = np.bincount(train_stream, minlength=vocab_size)[:vocab_size].astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + vocab_size)).astype(np.float32)


def shuffled_batches(windows: np.ndarray, batch_size: int, seed: int) -> grain.MapDataset:
    """Endless random-access dataset of ``[batch_size, T + 1]`` window batches.

    Grain reshuffles each epoch with seed ``base + epoch``; ``base`` is a hash of ``seed`` so
    that run ``seed`` epoch 1 is not the same order as run ``seed + 1`` epoch 0.
    """
    base = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
    dataset = grain.MapDataset.source(windows).shuffle(seed=base).repeat()
    return dataset.batch(batch_size)


# ----------------------------------------------------------------------------- data


class Data:
    """Tokenized, packed train and validation splits of one corpus."""

    def __init__(
        self,
        config: DataConfig,
        tokenizer: tokenizer_lib.Tokenizer,
        train_stream: np.ndarray,
        validation_stream: np.ndarray,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.pad_id = tokenizer.pad_id
        self.eos_id = tokenizer.eos_id
        self.train_stream = train_stream
        self.validation_stream = validation_stream
        self._train_windows = window_tokens(train_stream, config.seq_len, pad_tail=False)
        if len(self._train_windows) == 0:
            raise ValueError(
                f"dataset={config.dataset!r}: the train split has {len(train_stream)} tokens, "
                f"but one sequence of seq_len={config.seq_len} needs {config.seq_len + 1} "
                "(inputs plus the shifted target); use a smaller seq_len or a larger corpus."
            )
        self._eval_windows = window_tokens(
            validation_stream, config.seq_len, pad_tail=True, pad_id=self.pad_id
        )
        self._train_batches = shuffled_batches(self._train_windows, config.batch_size, config.seed)
        self.unigram_log_probs = unigram_log_probs(train_stream, self.vocab_size)

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
        """Target tokens with weight 1 over all evaluation batches."""
        return int(sum(batch["weights"].sum() for batch in self.eval_batches()))

    @property
    def steps_per_epoch(self) -> float:
        """Training steps per pass over the train sequences (batches may straddle epochs)."""
        return self.num_train_sequences / self.config.batch_size

    def epoch(self, step: int) -> float:
        """How many passes over the train sequences ``step`` batches make."""
        return step * self.config.batch_size / self.num_train_sequences

    @property
    def num_eval_batches(self) -> int:
        """Batches yielded by ``eval_batches()`` with no limit."""
        return math.ceil(len(self._eval_windows) / self.config.batch_size)

    def train_batch(self, step: int) -> Batch:
        """Training batch number ``step``: int32 inputs/targets and float32 weights ``[B, T]``.

        A pure function of (seed, step), for any step >= 0.
        """
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}.")
        return windows_to_batch(self._train_batches[int(step)], self.pad_id)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """Validation batches in a fixed order; the last one is padded with weight-0 rows."""
        size = self.config.batch_size
        count = (
            self.num_eval_batches
            if max_batches is None
            else min(max_batches, self.num_eval_batches)
        )
        for index in range(count):
            windows = self._eval_windows[index * size : (index + 1) * size]
            if len(windows) < size:
                # Padded rows keep every batch the same shape, so a jitted eval step compiles once.
                padding = np.full((size - len(windows), windows.shape[1]), self.pad_id, np.int32)
                windows = np.concatenate([windows, padding])
            yield windows_to_batch(windows, self.pad_id)

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

    def summary(self) -> str:
        """One line describing the data, for logs."""
        return (
            f"dataset={self.config.dataset} tokenizer={self.config.tokenizer} "
            f"vocab={self.vocab_size} train_sequences={self.num_train_sequences} "
            f"train_tokens={self.num_train_tokens} steps_per_epoch={self.steps_per_epoch:.1f} "
            f"eval_batches={self.num_eval_batches} "
            f"unigram_ppl={math.exp(self.unigram_cross_entropy()):.1f}"
        )


# ----------------------------------------------------------------------------- loading


class _Corpus:
    """The records of a dataset's splits, read lazily and at most once each."""

    def __init__(self, config: DataConfig):
        self._config = config
        self._records: dict[str, list[str]] = {}
        if corpora.is_local_corpus(config.dataset):
            self._builder = builder_lib.make_builder(
                config.dataset, config.data_dir, config.validation_percent
            )
            self.key = "-".join(
                [self._builder.name, self._builder.builder_config.name, str(self._builder.version)]
            )
        else:
            self._builder = None
            # Fail fast on a misspelt name, even when every cache is already present.
            corpora.check_tfds_name(config.dataset, config.data_dir)
            self.key = "tfds-" + re.sub(r"[^A-Za-z0-9_.]+", "_", config.dataset)
            if config.max_records is not None:
                self.key += f"-first{config.max_records}"

    def records(self, split: str) -> list[str]:
        if split not in self._records:
            self._records[split] = self._read(split)
        return self._records[split]

    def _read(self, split: str) -> list[str]:
        if self._builder is not None:
            builder = builder_lib.prepare(
                self._config.dataset, self._config.data_dir, self._config.validation_percent
            )
            return builder_lib.read_split(builder, split)
        return corpora.tfds_records(
            self._config.dataset, split, self._config.data_dir, self._config.max_records
        )


def _cached_array(path: pathlib.Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``np.load(path)``, computing and saving the array first if the file is missing."""
    if path.exists():
        return np.load(path)
    array = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent or interrupted run never leaves a truncated cache.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        np.save(f, array)
    os.replace(f.name, path)
    return array


def packed_path(data_dir: str, dataset_key: str, fingerprint: str, split: str) -> pathlib.Path:
    """Where the token stream of one split is cached."""
    return pathlib.Path(data_dir) / "packed" / f"{dataset_key}-{fingerprint}-{split}.npy"


def _tokenize_split(corpus: _Corpus, tokenizer: tokenizer_lib.Tokenizer, split: str) -> np.ndarray:
    return pack_records(tokenizer.encode_batch(corpus.records(split)), tokenizer.eos_id)


def load_data_from_config(config: Any) -> Data:
    """Like :func:`load_data`, from a DataConfig, a mapping or an ml_collections ConfigDict."""
    config = DataConfig.from_config(config)
    corpus = _Corpus(config)
    tokenizer = tokenizer_lib.make_tokenizer(
        config.tokenizer,
        data_dir=config.data_dir,
        dataset_key=corpus.key,
        vocab_size=config.vocab_size,
        train_sentences=functools.partial(corpus.records, "train"),
    )
    streams = {
        split: _cached_array(
            packed_path(config.data_dir, corpus.key, tokenizer.fingerprint, split),
            functools.partial(_tokenize_split, corpus, tokenizer, split),
        )
        for split in SPLITS
    }
    return Data(config, tokenizer, streams["train"], streams["validation"])


def load_data(
    dataset: str,
    data_dir: str | os.PathLike,
    seq_len: int,
    batch_size: int,
    seed: int,
    tokenizer: str = "sentencepiece",
    vocab_size: int = 2048,
    *,
    validation_percent: int = builder_lib.DEFAULT_VALIDATION_PERCENT,
    max_records: int | None = None,
) -> Data:
    """Builds (first call) or loads (later calls) the tokenized, packed data of a corpus.

    Args:
      dataset: 'kjv', 'pydoc', 'text_dir:PATH' or a TFDS text dataset name (e.g. 'lm1b').
      data_dir: folder for the TFDS build, the tokenizer model and the packed token caches.
      seq_len: tokens per sequence.
      batch_size: sequences per batch.
      seed: seed of the training-order shuffle.
      tokenizer: 'sentencepiece' (trained on the train split and cached) or 'bytes'.
      vocab_size: SentencePiece vocabulary size; ignored for bytes.
      validation_percent: records of a local corpus held out for validation.
      max_records: cap on records read per split of a TFDS dataset.

    Raises:
      ValueError: naming the offending field for invalid arguments, an unknown dataset, or a
        corpus too short for one sequence.
      corpora.CorpusUnavailableError: when 'kjv' is requested but ``bible`` is not installed.
    """
    return load_data_from_config(
        DataConfig(
            dataset=dataset,
            data_dir=os.fspath(data_dir),
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            validation_percent=validation_percent,
            max_records=max_records,
        )
    )
