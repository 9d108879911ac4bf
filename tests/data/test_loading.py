"""Loading a configured corpus: the cache directory and its reuse, the fallback corpus, TFDS
datasets, text_dir corpora end to end and their errors, the tokenizer's training sample."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dynmoe_jax import data as data_lib
from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import corpora, loading
from dynmoe_jax.data.pipeline import DataConfig
from dynmoe_jax.validation import ConfigError
from tests.data.pydoc import BATCH, SEQ_LEN, load, split_records


def _without_bible(monkeypatch, tmp_path_factory):
    """A PATH on which no `bible` program is found."""
    monkeypatch.setenv("PATH", str(tmp_path_factory.mktemp("empty_path")))


def test_missing_corpus_without_fallback_is_an_error(tmp_path, monkeypatch, tmp_path_factory):
    _without_bible(monkeypatch, tmp_path_factory)
    with pytest.raises(corpora.CorpusUnavailableError) as err:
        load(tmp_path, dataset="kjv")
    assert str(err.value).startswith(
        "dataset='kjv' is invalid: allowed a corpus present on this machine (the `bible` command "
        "is not installed); install it with `make bible`"
    )
    assert "\n" not in str(err.value)


def test_fallback_is_used_only_when_configured(
    pydoc_dir, pydoc_data, monkeypatch, capsys, tmp_path_factory
):
    _without_bible(monkeypatch, tmp_path_factory)
    data = load(pydoc_dir, dataset="kjv", fallback_dataset="pydoc")
    assert (data.config.dataset, data.requested_dataset) == ("pydoc", "kjv")
    out = capsys.readouterr().out
    assert (
        "warning: dataset=kjv is not available (the `bible` command is not installed); training "
        "on fallback_dataset=pydoc instead, as the workdir's config.json records. To train on "
        "kjv: install it with `make bible` or `apt-get install -y bible-kjv` (Debian/Ubuntu).\n"
    ) in out
    np.testing.assert_array_equal(data.train_stream, pydoc_data.train_stream)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(data_lib.CACHE_ENV, raising=False)
    assert data_lib.cache_dir("") == pathlib.Path.home() / ".cache" / "dynmoe_jax"
    monkeypatch.setenv(data_lib.CACHE_ENV, str(tmp_path / "env"))
    assert data_lib.cache_dir("") == tmp_path / "env"
    assert data_lib.cache_dir(tmp_path / "flag") == tmp_path / "flag"


def test_caches_are_reused_not_rebuilt(pydoc_dir, pydoc_data):
    cached = sorted((pydoc_dir / "tokenizers").glob("*.model"))
    cached += sorted((pydoc_dir / "packed").glob("*.npy"))
    # One model, train and validation token streams, the train token counts.
    assert [p.name.rsplit("-", 1)[-1] for p in cached] == [
        "bpe512.model",
        "train.counts.npy",
        "train.npy",
        "validation.npy",
    ]
    mtimes = [p.stat().st_mtime_ns for p in cached]
    again = load(pydoc_dir)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    np.testing.assert_array_equal(again.train_stream, pydoc_data.train_stream)


def test_text_dir_pipeline_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_bytes(
            f"Paragraph {i} is here.\n\n\xff{i}\n".encode("latin-1")
        )
    data = load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=8)
    batch = data.train_batch(0)
    assert batch["inputs"].shape == (BATCH, 8)
    streams = np.concatenate([data.train_stream, data.validation_stream])
    assert "\ufffd" in data.tokenizer.decode(streams)


def test_mock_tfds_dataset_drives_the_pipeline(tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        data = data_lib.from_config(
            dict(dataset="lm1b", data_dir=str(tmp_path), seq_len=8, batch_size=3, tokenizer="bytes")
        )
    batch = data.train_batch(0)
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (3, 8)
    assert batch["inputs"].dtype == np.int32
    assert next(data.eval_batches())["inputs"].shape == (3, 8)


def test_corpus_shorter_than_one_sequence(tmp_path):
    corpus = tmp_path / "tiny"
    corpus.mkdir()
    (corpus / "a.txt").write_text("One.\n\nTwo.\n\nThree.\n")
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=1000)
    # 3 records of 4-6 bytes, each followed by EOS; 5% validation leaves 2 or 3 in train.
    assert str(err.value).startswith(
        f"dataset='text_dir:{corpus}' is invalid: allowed a corpus whose train split holds at "
        "least seq_len + 1 = 1001 tokens (it holds "
    )
    assert str(err.value).endswith("); or a smaller seq_len")


def test_tokenizer_trains_on_every_kth_record_of_a_large_split(pydoc_dir):
    config = DataConfig(dataset="pydoc", data_dir=str(pydoc_dir), seq_len=SEQ_LEN, batch_size=4)
    sample = loading._Corpus(config).tokenizer_sample(max_records=100)
    records = split_records(builder_lib.make_builder("pydoc", str(pydoc_dir)), "train")
    stride = -(-len(records) // 100)
    assert stride > 1 and list(sample) == records[::stride] and len(sample) <= 100


def test_missing_bible_falls_back_to_pydoc(tiny_run, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `bible` command on it
    data = data_lib.from_config(tiny_run(dataset="kjv", fallback_dataset="pydoc").data)
    dataset = data.config.dataset
    assert dataset == "pydoc" and data.num_train_tokens > 0
    assert "apt-get install -y bible-kjv" in capsys.readouterr().out


@pytest.mark.parametrize(
    "files, overrides, message",
    [
        (None, {}, "does not exist"),
        ({}, {}, "no non-empty .txt"),
        ({"a.txt": b"one.\n\ntwo.\n\nthree."}, {"tokenizer": "bytes"}, "seq_len"),
        ({"a.txt": b"caf\xe9 \xff\xfe text.\n\n" * 400}, {"tokenizer": "bytes"}, None),
    ],
)
def test_bad_text_dir_corpora(tiny_run, tmp_path, files, overrides, message):
    folder = tmp_path / "corpus"
    if files is not None:
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
    run = tiny_run(data_dir=str(tmp_path / "data"), dataset=f"text_dir:{folder}", **overrides)
    config = run.data
    if message is None:  # bytes that are not UTF-8 are replaced, not fatal
        data = data_lib.from_config(config)
        assert data.train_batch(0)["inputs"].shape == (8, 32)
        return
    with pytest.raises(ConfigError, match=message) as err:
        data_lib.from_config(config)
    assert str(err.value).startswith(f"dataset='text_dir:{folder}'")
