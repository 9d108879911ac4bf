"""TFDS builder that turns a local corpus into ``train``/``validation`` ArrayRecord files.

One builder class serves every local corpus through its config: ``kjv`` and ``pydoc`` are
registered configs, ``text_dir:PATH`` (and non-default validation percentages) get a custom
config whose name carries a short hash of the absolute path, so two folders never share files.
Building needs no network and no TensorFlow; read the result with ``builder.as_data_source()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import pathlib
import shutil
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from dynmoe_jax.data import corpora
from dynmoe_jax.validation import check, invalid

DEFAULT_VALIDATION_PERCENT = 5


@dataclasses.dataclass
class DynmoeTextConfig(tfds.core.BuilderConfig):
    """Which corpus to build and how much of it to hold out."""

    corpus: str = corpora.PYDOC
    validation_percent: int = DEFAULT_VALIDATION_PERCENT


def check_validation_percent(validation_percent: int) -> None:
    """Rejects percentages that would leave a split empty."""
    ok = isinstance(validation_percent, int) and 1 <= validation_percent <= 99
    check(ok, "validation_percent", validation_percent, "1..99 (both splits non-empty)")


def text_dir_fingerprint(folder: pathlib.Path) -> str:
    """Short hash of a folder's absolute path and of the names, sizes and mtimes of its .txt files.

    The listing is part of the hash so that editing the folder triggers a rebuild instead of
    silently reusing stale ArrayRecord files and token caches.
    """
    digest = hashlib.sha256(str(folder).encode())
    for path in sorted(folder.rglob("*.txt")):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:10]


def config_name(corpus: str, validation_percent: int = DEFAULT_VALIDATION_PERCENT) -> str:
    """A file-system-safe, collision-free config name for a corpus.

    ``text_dir:PATH`` becomes ``text_dir_<hash>`` (see :func:`text_dir_fingerprint`) so that
    relative spellings of the same folder share a cache and different folders never do.
    """
    if corpora.is_text_dir(corpus):
        name = f"text_dir_{text_dir_fingerprint(corpora.text_dir_path(corpus))}"
    elif corpus in corpora.LOCAL_CORPORA:
        name = corpus
    else:
        invalid("dataset", corpus, corpora.LOCAL_CHOICES)
    if validation_percent != DEFAULT_VALIDATION_PERCENT:
        name += f"_val{validation_percent}"
    return name


def _stable_hash(index: int) -> int:
    """A hash of a record index that, unlike ``hash()``, is the same in every process."""
    digest = hashlib.blake2b(str(index).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def validation_mask(num_records: int, validation_percent: int) -> np.ndarray:
    """Boolean mask of the records that go to the validation split.

    A record goes to validation when the stable hash of its index, mod 100, is below
    ``validation_percent``. For tiny corpora the split is then nudged so neither side is empty.
    """
    check_validation_percent(validation_percent)
    check(
        num_records >= 2,
        "records",
        num_records,
        "at least 2 records (a train and a validation one)",
    )
    hashes = np.array([_stable_hash(i) for i in range(num_records)], dtype=np.uint64)
    mask = (hashes % np.uint64(100)) < np.uint64(validation_percent)
    if not mask.any():
        mask[int(np.argmin(hashes))] = True
    if mask.all():
        mask[int(np.argmax(hashes))] = False
    return mask


# Text per ArrayRecord shard. TFDS's shard writer keeps every example of the shard it writes
# in memory (it counts them after writing), so this bounds the memory of a build; a single file
# larger than this becomes a shard of its own.
SHARD_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Where each record of a local corpus goes, found by one counting pass over its parts."""

    parts: Sequence[Callable[[], list[str]]]  # see corpora.record_parts
    offsets: np.ndarray  # [parts + 1] global index of each part's first record, then the total
    shards: list[tuple[int, int]]  # [first, last) part of each shard
    held_out: np.ndarray  # [records] bool: the record goes to validation

    @classmethod
    def count(cls, corpus: str, validation_percent: int, shard_bytes: int) -> _Plan:
        parts = corpora.record_parts(corpus)
        if len(parts) == 1:  # kjv, pydoc: small, and kjv runs a program to read, so keep it
            records = parts[0]()
            parts = [lambda: records]
        counts, sizes = [], []
        for part in parts:
            records = part()
            counts.append(len(records))
            sizes.append(sum(len(text) for text in records))
        offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if offsets[-1] == 0:
            corpora.no_records(corpus)
        shards, first, size = [], 0, 0
        for index, part_size in enumerate(sizes):
            if index > first and size + part_size > shard_bytes:
                shards.append((first, index))
                first, size = index, 0
            size += part_size
        shards.append((first, len(parts)))
        held_out = validation_mask(int(offsets[-1]), validation_percent)
        return cls(parts, offsets, shards, held_out)

    def shard_fns(self, held_out: bool) -> list[Callable[[], Iterator]]:
        """One example generator per shard holding records of the split (none stays empty)."""
        fns = []
        for first, last in self.shards:
            span = self.held_out[self.offsets[first] : self.offsets[last]]
            if np.any(span == held_out):
                fns.append(functools.partial(self._examples, first, last, held_out))
        return fns

    def _examples(self, first: int, last: int, held_out: bool) -> Iterator:
        for part in range(first, last):
            start = int(self.offsets[part])
            for i, text in enumerate(self.parts[part]()):
                if self.held_out[start + i] == held_out:
                    yield start + i, {"text": text}


class DynmoeText(tfds.core.ShardBasedBuilder):
    """Local text corpora (kjv, pydoc, text_dir:PATH) as a TFDS dataset with a ``text`` feature.

    Written shard by shard in corpus order (``ShardBasedBuilder``): the corpus is read one part
    (file) at a time, so a build's memory is bounded by a shard (``SHARD_BYTES``), not by the
    corpus. The records and their order are those of the former whole-corpus build.
    """

    def __init__(self, *, shard_bytes: int = SHARD_BYTES, **kwargs):
        """``shard_bytes``: text per shard; the other arguments are TFDS's."""
        self._shard_bytes = shard_bytes
        super().__init__(**kwargs)

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig | None:
        """The registered configs and those ``make_builder`` made (text_dir folders, other
        validation shares), so that TFDS knows them and does not warn of a custom one."""
        return super().get_builder_config(name, version) or _MADE_CONFIGS.get(name)

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        DynmoeTextConfig(name=corpora.KJV, corpus=corpora.KJV, description="King James Bible"),
        DynmoeTextConfig(name=corpora.PYDOC, corpus=corpora.PYDOC, description="pydoc topics"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            supervised_keys=None,
            # Keep corpus order so packed windows hold consecutive verses/paragraphs; the
            # pipeline shuffles whole windows instead.
            disable_shuffling=True,
            description="One verse or paragraph of plain text per example.",
        )

    def _shard_iterators_per_split(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is local
        config = self.builder_config
        plan = _Plan.count(config.corpus, config.validation_percent, self._shard_bytes)
        num_held_out = int(plan.held_out.sum())
        print(f"data: writing {len(plan.held_out) - num_held_out} train and {num_held_out} "
              f"validation records", flush=True)  # fmt: skip
        return {"train": plan.shard_fns(False), "validation": plan.shard_fns(True)}

    # TFDS prints its own banner here ("Downloading and preparing dataset Unknown size"),
    # which misleads for a corpus built offline; these two say what happens instead.
    def _log_download_bytes(self) -> None:
        print(f"data: building {self.builder_config.corpus} into {self.data_dir} "
              "(once; later runs reuse it)", flush=True)  # fmt: skip

    def _log_download_done(self) -> None:
        print(f"data: built {self.builder_config.corpus}", flush=True)


# Configs made for corpora that are not registered, by name (the name hashes the folder).
_MADE_CONFIGS: dict[str, DynmoeTextConfig] = {}


def make_builder(
    corpus: str,
    data_dir: str,
    validation_percent: int = DEFAULT_VALIDATION_PERCENT,
    shard_bytes: int = SHARD_BYTES,
) -> DynmoeText:
    """A (not yet prepared) builder for a local corpus, writing ArrayRecord files to data_dir;
    ``shard_bytes``: text per ArrayRecord shard (it bounds a build's memory)."""
    check_validation_percent(validation_percent)
    name = config_name(corpus, validation_percent)
    config = DynmoeText.builder_configs.get(name)
    if config is None:
        config = DynmoeTextConfig(
            name=name,
            corpus=corpus,
            validation_percent=validation_percent,
            description=f"{corpus} with {validation_percent}% validation",
        )
        _MADE_CONFIGS[name] = config
    return DynmoeText(
        config=config, data_dir=data_dir, file_format="array_record", shard_bytes=shard_bytes
    )


def prepare(
    corpus: str,
    data_dir: str,
    validation_percent: int = DEFAULT_VALIDATION_PERCENT,
    shard_bytes: int = SHARD_BYTES,
) -> DynmoeText:
    """Builds the corpus into data_dir once (offline) and returns the ready builder. A build
    that fails removes the folders it created, so no empty cache is left behind."""
    builder = make_builder(corpus, data_dir, validation_percent, shard_bytes)
    created = _new_folders(data_dir, builder)
    try:
        with _no_tfds_progress_bars():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    compute_stats=tfds.download.ComputeStatsMode.SKIP,
                )
            )
    except BaseException:
        for folder in created:  # outermost first: an inner one may already be gone
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return builder


def _new_folders(data_dir: str, builder: DynmoeText) -> list[pathlib.Path]:
    """The folders a build of ``builder`` would create that do not exist yet, outermost first:
    the cache, TFDS's downloads folder, the dataset's folder and the config's."""
    root = pathlib.Path(data_dir)
    config_dir = pathlib.Path(builder.data_dir).parent  # <data_dir>/<dataset>/<config>
    folders = [root, root / "downloads", config_dir.parent, config_dir]
    return [folder for folder in folders if not folder.exists()]


@contextlib.contextmanager
def _no_tfds_progress_bars():
    """TFDS's per-split bars name temporary files; our own lines report the build instead."""
    tqdm_utils = tfds.core.utils.tqdm_utils
    was_active = tqdm_utils._active  # TFDS has a setter but no getter for this flag
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)


def split_source(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict]:
    """The random-access ArrayRecord source of a prepared split."""
    return builder.as_data_source(split=split)
