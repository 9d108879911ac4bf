"""Corpus lookup: the one constructor :func:`from_config`, from a config to a ready ``Data``.

It finds the cache folder, reads the configured corpus (or, only when the config names one,
its ``fallback_dataset`` when the corpus is not installed), trains or loads the tokenizer and
packs both splits. Each slow stage prints one line, so a first run never sits silent.

Caches (all under the cache folder, safe to delete; see :func:`cache_dir`):

* ``dynmoe_text/<config>/<version>/``: the TFDS ArrayRecord build of a local corpus;
* ``tokenizers/<dataset key>-bpe<vocab>.model``: the SentencePiece model (train split only);
* ``packed/<dataset key>-<tokenizer fingerprint>-<split>.npy``: the token stream of a split
  (a checkpoint's tokenizer.json is fingerprinted by its bytes and EOS id).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import corpora
from dynmoe_jax.data import tokenizer as tokenizer_lib
from dynmoe_jax.data.hf_tokenizer import HFTokenizer
from dynmoe_jax.data.pipeline import SPLITS, Data, DataConfig, pack_records

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


def _load(config: DataConfig, requested_dataset: str | None = None) -> Data:
    corpus = _Corpus(config)
    tokenizer = _tokenizer(config, corpus)
    streams = {
        split: _cached_array(
            packed_path(config.data_dir, corpus.key, tokenizer.fingerprint, split),
            functools.partial(_tokenize_split, corpus, tokenizer, split),
        )
        for split in SPLITS
    }
    return Data(config, tokenizer, streams["train"], streams["validation"], requested_dataset)


def _tokenizer(config: DataConfig, corpus: _Corpus) -> tokenizer_lib.Tokenizer:
    """A pretrained checkpoint's own tokenizer, or the configured one."""
    if config.init_from:
        return HFTokenizer.from_dir(config.init_from)
    return tokenizer_lib.make_tokenizer(
        config.tokenizer,
        data_dir=config.data_dir,
        dataset_key=corpus.key,
        vocab_size=config.vocab_size,
        train_sentences=functools.partial(corpus.records, "train"),
    )


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
        print(f"data: reading the {split} split of {self._config.dataset} through TFDS")
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
    records = corpus.records(split)
    print(f"data: tokenizing the {split} split ({len(records)} records)", flush=True)
    return pack_records(tokenizer.encode_batch(records), tokenizer.eos_id)
