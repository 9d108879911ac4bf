"""Corpus lookup: the one constructor :func:`from_config`, from a config to a ready ``Data``.

It finds the cache folder, reads the configured corpus (or, only when the config names one,
its ``fallback_dataset`` when the corpus is not installed), trains or loads the tokenizer and
packs both splits. Each slow stage prints one line, so a first run never sits silent.

Caches (all under the cache folder, safe to delete; see :func:`cache_dir`):

* ``dynmoe_text/<config>/<version>/``: the TFDS ArrayRecord build of a local corpus;
* ``tokenizers/<dataset key>-bpe<vocab>.model``: the SentencePiece model (train split only);
* ``packed/<dataset key>-<tokenizer fingerprint>-<split>.npy``: the token stream of a split
  (a checkpoint's tokenizer.json is fingerprinted by its bytes and EOS id), and beside the
  train stream ``...-train.counts.npy``, its token counts (the unigram baseline).

Streaming: records are read by index from the split's random-access source (the ArrayRecord
build, or ``tfds.data_source``) one at a time, tokenized a chunk at a time and appended to
the stream file; streams are then memory-mapped. Memory stays bounded by a chunk, not by the
corpus; the tokenizer trains on at most ``TOKENIZER_RECORDS`` records spread evenly over the
train split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np

from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import corpora
from dynmoe_jax.data import tokenizer as tokenizer_lib
from dynmoe_jax.data.hf_tokenizer import HFTokenizer
from dynmoe_jax.data.pipeline import SPLITS, Data, DataConfig, encode_packed, token_counts

CACHE_ENV = "DYNMOE_DATA_DIR"
DEFAULT_CACHE = pathlib.Path("~/.cache/dynmoe_jax")


def cache_dir(configured: str | os.PathLike = "") -> pathlib.Path:
    """The cache folder: ``configured`` if set, else ``$DYNMOE_DATA_DIR``, else
    ``~/.cache/dynmoe_jax`` (shared by every run, since building a corpus takes minutes)."""
    chosen = os.fspath(configured) or os.environ.get(CACHE_ENV) or str(DEFAULT_CACHE)
    return pathlib.Path(chosen).expanduser()


def from_config(config: Any) -> Data:
    """The tokenized, packed splits of the configured corpus.

    ``config``: a DataConfig, a mapping or the training ConfigDict (the fields of DataConfig
    are read from it; others are ignored).

    Raises:
      ConfigError: naming the field at fault (unknown corpus, empty folder, a corpus shorter
        than one sequence, ...).
      CorpusUnavailableError: the corpus is not installed and the config names no
        ``fallback_dataset``; the message says how to install it.
    """
    config = DataConfig.from_config(config)
    config = dataclasses.replace(config, data_dir=str(cache_dir(config.data_dir)))
    print(f"data: cache {config.data_dir} (set with --config.data_dir or ${CACHE_ENV})")
    try:
        return _load(config)
    except corpora.CorpusUnavailableError as e:
        if not config.fallback_dataset:
            raise
        fallback = config.fallback_dataset
        print(
            f"warning: dataset={e.dataset} is not available ({e.reason}); training on "
            f"fallback_dataset={fallback} instead, as the workdir's config.json records. "
            f"To train on {e.dataset}: {e.install_hint}."
        )
        used = dataclasses.replace(config, dataset=fallback, fallback_dataset="")
        return _load(used, requested_dataset=config.dataset)


# SentencePiece holds its training text in memory: a larger train split trains the tokenizer
# on every k-th record. Smaller corpora (kjv, pydoc) use every record, as before the bound.
TOKENIZER_RECORDS = 1 << 20
# Text tokenized per chunk: the chunk's records and ids are the tokenizer's working memory.
CHUNK_CHARS = 1 << 20


def _load(config: DataConfig, requested_dataset: str | None = None) -> Data:
    corpus = _Corpus(config)
    tokenizer = _tokenizer(config, corpus)
    paths = {s: packed_path(config.data_dir, corpus.key, tokenizer.fingerprint, s) for s in SPLITS}
    streams = {}
    for split, path in paths.items():
        if not path.exists():
            _write_stream(path, corpus, tokenizer, split)
        streams[split] = np.load(path, mmap_mode="r")
    counts = _cached_array(
        paths["train"].with_suffix(".counts.npy"),
        lambda: token_counts(streams["train"], tokenizer.vocab_size),
    )
    return Data(
        config, tokenizer, streams["train"], streams["validation"], requested_dataset, counts
    )


def _tokenizer(config: DataConfig, corpus: _Corpus) -> tokenizer_lib.Tokenizer:
    """A pretrained checkpoint's own tokenizer, or the configured one."""
    if config.init_from:
        return HFTokenizer.from_dir(config.init_from)
    return tokenizer_lib.make_tokenizer(
        config.tokenizer,
        data_dir=config.data_dir,
        dataset_key=corpus.key,
        vocab_size=config.vocab_size,
        train_sentences=corpus.tokenizer_sample,
    )


class _Records:
    """Records read on iteration, with a length for the log line."""

    def __init__(self, read: Callable[[], Iterator[str]], count: int):
        self._read, self._count = read, count

    def __iter__(self) -> Iterator[str]:
        return self._read()

    def __len__(self) -> int:
        return self._count


class _Corpus:
    """Random-access sources of a dataset's splits, opened lazily and at most once each."""

    def __init__(self, config: DataConfig):
        self._config = config
        self.dataset = config.dataset
        self._sources: dict[str, Sequence[dict]] = {}
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

    def source(self, split: str) -> Sequence[dict]:
        if split not in self._sources:
            self._sources[split] = self._open(split)
        return self._sources[split]

    def _open(self, split: str) -> Sequence[dict]:
        if self._builder is not None:
            builder = builder_lib.prepare(
                self._config.dataset, self._config.data_dir, self._config.validation_percent
            )
            return builder_lib.split_source(builder, split)
        print(f"data: reading the {split} split of {self._config.dataset} through TFDS")
        return corpora.tfds_source(self._config.dataset, split, self._config.data_dir)

    def num_records(self, split: str) -> int:
        """Examples of the split that are read (at most ``max_records``)."""
        count = len(self.source(split))
        limit = self._config.max_records if self._builder is None else None
        return count if limit is None else min(limit, count)

    def records(self, split: str, stride: int = 1) -> Iterator[str]:
        """The split's records in order (every ``stride``-th), read one at a time."""
        return corpora.records_from_source(
            self.source(split), self._config.dataset, self.num_records(split), stride
        )

    def tokenizer_sample(self, max_records: int = TOKENIZER_RECORDS) -> _Records:
        """At most ``max_records`` train records, evenly spread over the split."""
        count = self.num_records("train")
        stride = max(1, math.ceil(count / max_records))
        keys = range(0, count, stride)
        return _Records(functools.partial(self.records, "train", stride), len(keys))


def _cached_array(path: pathlib.Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``np.load(path)``, computing and saving the array first if the file is missing."""
    if path.exists():
        return np.load(path)
    array = compute()
    with _atomic_file(path) as f:
        np.save(f, array)
    return array


@contextlib.contextmanager
def _atomic_file(path: pathlib.Path) -> Iterator[IO[bytes]]:
    """A temporary file renamed to ``path`` once written (removed on error), so a concurrent or
    interrupted run never leaves a truncated cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            yield f
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def packed_path(data_dir: str, dataset_key: str, fingerprint: str, split: str) -> pathlib.Path:
    """Where the token stream of one split is cached."""
    return pathlib.Path(data_dir) / "packed" / f"{dataset_key}-{fingerprint}-{split}.npy"


def _write_stream(
    path: pathlib.Path, corpus: _Corpus, tokenizer: tokenizer_lib.Tokenizer, split: str
) -> None:
    """Tokenizes a split chunk by chunk into an int32 ``.npy`` file (the ``np.save`` format:
    its header is written first for length 0, then rewritten for the final length)."""
    n = corpus.num_records(split)
    print(f"data: tokenizing the {split} split ({n} record{'' if n == 1 else 's'})", flush=True)
    header = {"descr": "<i4", "fortran_order": False, "shape": (0,)}
    with _atomic_file(path) as f:
        np.lib.format.write_array_header_1_0(f, header)
        data_start = f.tell()
        length = 0
        for texts in _chunks(corpus.records(split), CHUNK_CHARS):
            ids = encode_packed(tokenizer, texts)
            f.write(ids.astype("<i4", copy=False).tobytes())
            length += len(ids)
        if length == 0:
            corpora.no_records(corpus.dataset, split)
        f.seek(0)
        # numpy pads the header so a length of up to 21 digits fits the same size.
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (length,)})
        assert f.tell() == data_start, "the .npy header changed size"


def _chunks(records: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive lists of records of about ``max_chars`` characters each."""
    chunk, chars = [], 0
    for text in records:
        chunk.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk
