"""The TFDS builder of local corpora: offline builds, disjoint splits by the hash of the
record's index, shards, config names, and no trace of a failed build."""

import collections
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import corpora
from dynmoe_jax.validation import ConfigError
from tests.data.pydoc import load, split_records


def test_builder_builds_pydoc_offline_with_disjoint_splits(tmp_path):
    records = corpora.load_records("pydoc")
    built = builder_lib.prepare("pydoc", str(tmp_path))
    train = split_records(built, "train")
    validation = split_records(built, "validation")

    assert train and validation
    # Each record lands in exactly one split, chosen by the hash of its index, in corpus order.
    mask = builder_lib.validation_mask(len(records), builder_lib.DEFAULT_VALIDATION_PERCENT)
    assert train == [r for r, held_out in zip(records, mask, strict=True) if not held_out]
    assert validation == [r for r, held_out in zip(records, mask, strict=True) if held_out]
    assert collections.Counter(train) + collections.Counter(validation) == collections.Counter(
        records
    )
    assert 0.02 < len(validation) / len(records) < 0.1
    # The same data is reachable through the generic TFDS reader.
    source = tfds.data_source("dynmoe_text/pydoc", split="validation", data_dir=str(tmp_path))
    assert len(source) == len(validation)


def test_validation_mask_never_leaves_a_split_empty():
    for n in (2, 3, 10):
        mask = builder_lib.validation_mask(n, 1)
        assert mask.any() and not mask.all()
    assert builder_lib.validation_mask(10, 99).sum() < 10
    with pytest.raises(ValueError, match="at least 2 records"):
        builder_lib.validation_mask(1, 5)


def test_text_dir_config_names_differ_per_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    name_a = builder_lib.config_name(f"text_dir:{tmp_path / 'a'}")
    name_b = builder_lib.config_name(f"text_dir:{tmp_path / 'b'}")
    assert name_a.startswith("text_dir_") and name_a != name_b


def test_build_in_small_shards_keeps_records_and_order(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        text = "\n\n".join(f"File {i} paragraph {j}: " + "word " * (10 * j) for j in range(30))
        (corpus / f"{i:02d}.txt").write_text(text)
    name = f"text_dir:{corpus}"
    built = builder_lib.prepare(name, str(tmp_path / "data"), shard_bytes=5000)  # a file a shard
    records = corpora.load_records(name)
    mask = builder_lib.validation_mask(len(records), builder_lib.DEFAULT_VALIDATION_PERCENT)
    held_out = dict(zip(range(len(records)), mask, strict=True))
    train = [r for i, r in enumerate(records) if not held_out[i]]
    assert split_records(built, "train") == train
    assert split_records(built, "validation") == [r for i, r in enumerate(records) if held_out[i]]
    shards = list((tmp_path / "data").rglob("*train.array_record-*"))
    assert len(shards) == 12


@pytest.mark.parametrize("cache_exists", [False, True])
def test_a_failed_build_leaves_no_folder_behind(tmp_path, cache_exists):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    cache = tmp_path / "cache"
    if cache_exists:  # a cache holding another corpus already: only the new folders go
        builder_lib.prepare("pydoc", str(cache))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match="no non-empty .txt file"):
        builder_lib.prepare(f"text_dir:{empty}", str(cache))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_text_dir_builds_without_tfds_custom_config_warnings(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(f"Paragraph {i} of the corpus." for i in range(40)))
    with caplog.at_level(logging.DEBUG):
        data = load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=8)
        again = load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=8)
    assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]
    np.testing.assert_array_equal(again.train_stream, data.train_stream)
