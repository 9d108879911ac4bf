"""Tests of the input pipeline (dynmoe_jax.data): corpora, TFDS builder, tokenizers, packing."""

import collections
import json
import logging
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dynmoe_jax import data as data_lib
from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import corpora, loading, pipeline
from dynmoe_jax.data import tokenizer as tokenizer_lib
from dynmoe_jax.data.pipeline import DataConfig
from dynmoe_jax.validation import ConfigError

SEQ_LEN = 16
BATCH = 4
VOCAB = 512


@pytest.fixture(scope="module")
def pydoc_dir(tmp_path_factory):
    """A data_dir holding the pydoc build, tokenizer and caches, shared by this module."""
    return tmp_path_factory.mktemp("pydoc_data")


@pytest.fixture(scope="module")
def pydoc_data(pydoc_dir):
    return _load(pydoc_dir)


def _load(data_dir, **overrides):
    fields = dict(
        dataset="pydoc",
        data_dir=str(data_dir),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        seed=0,
        vocab_size=VOCAB,
        eval_batches=None,  # all of them
        fallback_dataset="",  # a missing corpus is an error
    )
    fields.update(overrides)
    return data_lib.from_config(fields)


# ----------------------------------------------------------------------------- builder


def _split_records(built, split: str) -> list[str]:
    """Every record of a prepared split, through the public reader the pipeline uses."""
    source = builder_lib.split_source(built, split)
    return list(corpora.records_from_source(source, built.builder_config.corpus))


def test_builder_builds_pydoc_offline_with_disjoint_splits(tmp_path):
    records = corpora.load_records("pydoc")
    built = builder_lib.prepare("pydoc", str(tmp_path))
    train = _split_records(built, "train")
    validation = _split_records(built, "validation")

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


# ----------------------------------------------------------------------------- corpora


def test_pydoc_records_are_normalised_paragraphs():
    records = corpora.load_records("pydoc")
    assert len(records) > 1000
    assert all(r and r == " ".join(r.split()) for r in records)


def test_text_dir_reads_txt_files_recursively_and_replaces_bad_utf8(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Second file.\n\nIts second paragraph.\n")
    (tmp_path / "sub" / "a.txt").write_bytes(b"Caf\xe9 in Latin-1.\n")
    (tmp_path / "ignored.md").write_text("Not a txt file.")
    records = corpora.load_records(f"text_dir:{tmp_path}")
    assert records == ["Second file.", "Its second paragraph.", "Caf\ufffd in Latin-1."]


def test_text_dir_pipeline_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_bytes(
            f"Paragraph {i} is here.\n\n\xff{i}\n".encode("latin-1")
        )
    data = _load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=8)
    batch = data.train_batch(0)
    assert batch["inputs"].shape == (BATCH, 8)
    streams = np.concatenate([data.train_stream, data.validation_stream])
    assert "\ufffd" in data.tokenizer.decode(streams)


def test_kjv_missing_command_gives_install_hint():
    with pytest.raises(corpora.CorpusUnavailableError) as err:
        corpora.kjv_verses(bible_command="no-such-bible-program-xyz")
    assert str(err.value) == (
        "dataset='kjv' is invalid: allowed a corpus present on this machine (the "
        "`no-such-bible-program-xyz` command is not installed); install it with `make bible` or "
        "`apt-get install -y bible-kjv` (Debian/Ubuntu), or set --config.fallback_dataset=pydoc "
        "to train on Python's own documentation instead"
    )
    assert issubclass(corpora.CorpusUnavailableError, ConfigError)


def _without_bible(monkeypatch, tmp_path_factory):
    """A PATH on which no `bible` program is found."""
    monkeypatch.setenv("PATH", str(tmp_path_factory.mktemp("empty_path")))


def test_missing_corpus_without_fallback_is_an_error(tmp_path, monkeypatch, tmp_path_factory):
    _without_bible(monkeypatch, tmp_path_factory)
    with pytest.raises(corpora.CorpusUnavailableError) as err:
        _load(tmp_path, dataset="kjv")
    assert str(err.value).startswith(
        "dataset='kjv' is invalid: allowed a corpus present on this machine (the `bible` command "
        "is not installed); install it with `make bible`"
    )
    assert "\n" not in str(err.value)


def test_fallback_is_used_only_when_configured(
    pydoc_dir, pydoc_data, monkeypatch, capsys, tmp_path_factory
):
    _without_bible(monkeypatch, tmp_path_factory)
    data = _load(pydoc_dir, dataset="kjv", fallback_dataset="pydoc")
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


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv is not installed")
def test_kjv_yields_all_verses_without_references():
    verses = corpora.load_records("kjv")
    assert len(verses) == 31102
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert not any(corpora._VERSE_REFERENCE.match(v) for v in verses)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_is_exact():
    tok = tokenizer_lib.ByteTokenizer()
    text = "Grüße, 世界! \x00 tabs\tand\nnewlines"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert min(ids) >= 2 and max(ids) < tok.vocab_size == 258
    assert tok.decode([*ids, tok.eos_id, tok.pad_id]) == text


def test_sentencepiece_round_trip_and_special_ids(pydoc_data):
    tok = pydoc_data.tokenizer
    assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, VOCAB)
    text = 'The "yield" statement, x = {1: [2]} ~ 3.14 and `backticks`!'
    ids = tok.encode(text)
    assert tok.pad_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text


def test_sentencepiece_training_is_deterministic():
    sentences = corpora.load_records("pydoc")[:300]
    first = tokenizer_lib.train_sentencepiece(sentences, 400)
    assert first == tokenizer_lib.train_sentencepiece(sentences, 400)


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
    again = _load(pydoc_dir)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    np.testing.assert_array_equal(again.train_stream, pydoc_data.train_stream)


# ----------------------------------------------------------------------------- packing


def test_packing_matches_a_hand_built_example():
    stream = pipeline.pack_records([[5, 6, 7], [8, 9]], eos_id=1)
    np.testing.assert_array_equal(stream, [5, 6, 7, 1, 8, 9, 1])

    np.testing.assert_array_equal(pipeline.window_tokens(stream, 3, pad_tail=False), [[5, 6, 7, 1]])
    windows = pipeline.window_tokens(stream, 3, pad_tail=True)
    np.testing.assert_array_equal(windows, [[5, 6, 7, 1], [8, 9, 1, pipeline.PADDING]])

    batch = pipeline.windows_to_batch(windows)
    np.testing.assert_array_equal(batch["inputs"], [[5, 6, 7], [8, 9, 1]])
    np.testing.assert_array_equal(batch["targets"], [[6, 7, 1], [9, 1, 0]])
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 1], [1, 1, 0]])
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32


def test_train_batches_are_windows_of_the_record_stream(pydoc_data):
    tok = pydoc_data.tokenizer
    records = _split_records(builder_lib.make_builder("pydoc", pydoc_data.config.data_dir), "train")
    expected = pipeline.pack_records((tok.encode(r) for r in records), tok.eos_id)
    np.testing.assert_array_equal(pydoc_data.train_stream, expected)

    width = SEQ_LEN + 1
    batch = pydoc_data.train_batch(3)
    assert batch["inputs"].shape == batch["targets"].shape == (BATCH, SEQ_LEN)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert np.all(batch["weights"] == 1)
    starts = {i * width for i in range(pydoc_data.num_train_sequences)}
    for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
        window = np.concatenate([inputs, targets[-1:]])
        offsets = np.flatnonzero(np.all(_rolling(pydoc_data.train_stream, width) == window, 1))
        assert set(offsets.tolist()) & starts


def _rolling(stream, width):
    return np.lib.stride_tricks.sliding_window_view(stream, width)


def test_train_batch_is_a_pure_function_of_seed_and_step(pydoc_data, tmp_path):
    fresh = _load(tmp_path)  # a new data_dir: rebuilds, retrains the tokenizer, repacks
    for step in (0, 1, 1000):
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(
                fresh.train_batch(step)[key], pydoc_data.train_batch(step)[key]
            )
    assert not np.array_equal(
        pydoc_data.train_batch(0)["inputs"], pydoc_data.train_batch(1)["inputs"]
    )
    other_seed = _load(pydoc_data.config.data_dir, seed=1)
    assert not np.array_equal(
        other_seed.train_batch(0)["inputs"], pydoc_data.train_batch(0)["inputs"]
    )


def test_each_epoch_is_a_different_permutation():
    windows = np.arange(12)[:, None] * np.ones((1, 3), np.int32)
    dataset = pipeline.shuffled_sequences(windows, seed=7)
    epochs = [np.array([dataset[i][0] for i in range(e * 12, e * 12 + 12)]) for e in (0, 1, 2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(12))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    again = pipeline.shuffled_sequences(windows, seed=7)
    np.testing.assert_array_equal(again[21], dataset[21])


def test_eval_batches_are_fixed_padded_and_cover_validation(pydoc_data):
    first = list(pydoc_data.eval_batches())
    second = list(pydoc_data.eval_batches())
    assert len(first) == pydoc_data.num_eval_batches > 1
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        assert a["inputs"].shape == (BATCH, SEQ_LEN)
    # Every token of each validation window except its first is a weighted target exactly once.
    full, tail = divmod(len(pydoc_data.validation_stream), SEQ_LEN + 1)
    assert pydoc_data.num_validation_tokens == full * SEQ_LEN + max(tail - 1, 0)
    num_windows = full + (tail > 1)
    if num_windows % BATCH:  # the last batch is topped up with weight-0 rows
        assert np.all(first[-1]["weights"][num_windows % BATCH :] == 0)
    assert len(list(pydoc_data.eval_batches(max_batches=1))) == 1


def test_summary_labels_numbers_of_the_batches_evaluation_uses(pydoc_dir, pydoc_data):
    data = _load(pydoc_dir, eval_batches=2)
    assert data.num_eval_batches == 2 < data.num_validation_batches
    assert len(list(data.eval_batches())) == 2
    # Independent reference: float64 unigram NLL over the targets of the first 2 x BATCH
    # validation windows, straight from the token stream.
    width = SEQ_LEN + 1
    windows = data.validation_stream[: 2 * BATCH * width].reshape(2 * BATCH, width)
    expected = -np.mean(data.unigram_log_probs[windows[:, 1:]].astype(np.float64))
    assert data.unigram_cross_entropy() == pytest.approx(expected, rel=1e-6)
    assert data.num_validation_tokens == 2 * BATCH * SEQ_LEN
    lines = data.summary().splitlines()
    assert lines[0] == f"data: corpus=pydoc tokenizer=sentencepiece vocab={VOCAB}"
    assert lines[2] == (
        f"data: validation split: 2 of {data.num_validation_batches} batches used "
        f"({2 * BATCH * SEQ_LEN} tokens), unigram perplexity on them {np.exp(expected):.1f}"
    )


def test_unigram_baseline(pydoc_data):
    log_probs = pydoc_data.unigram_log_probs
    assert log_probs.shape == (pydoc_data.vocab_size,)
    np.testing.assert_allclose(np.exp(log_probs.astype(np.float64)).sum(), 1.0, rtol=1e-4)
    cross_entropy = pydoc_data.unigram_cross_entropy()
    assert 2.0 < cross_entropy < np.log(pydoc_data.vocab_size)


# ----------------------------------------------------------------------------- TFDS + configs


def test_mock_tfds_dataset_drives_the_pipeline(tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        data = data_lib.from_config(
            dict(dataset="lm1b", data_dir=str(tmp_path), seq_len=8, batch_size=3, tokenizer="bytes")
        )
    batch = data.train_batch(0)
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (3, 8)
    assert batch["inputs"].dtype == np.int32
    assert next(data.eval_batches())["inputs"].shape == (3, 8)


def test_config_from_configdict_and_mapping(pydoc_dir, pydoc_data):
    config = ml_collections.ConfigDict(
        dict(
            dataset="pydoc",
            data_dir=str(pydoc_dir),
            seq_len=SEQ_LEN,
            batch_size=BATCH,
            vocab_size=VOCAB,
            seed=0,
            learning_rate=1e-3,
        )
    )
    data = data_lib.from_config(config)
    np.testing.assert_array_equal(
        data.train_batch(2)["inputs"], pydoc_data.train_batch(2)["inputs"]
    )
    assert DataConfig.from_config(config.to_dict()) == data.config


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=0), "seq_len"),
        (dict(tokenizer="words"), "tokenizer"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(validation_percent=0), "validation_percent"),
    ],
)
def test_invalid_fields_are_named(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}=.* is invalid: allowed "):
        _load(tmp_path, **overrides)


def test_corpus_shorter_than_one_sequence(tmp_path):
    corpus = tmp_path / "tiny"
    corpus.mkdir()
    (corpus / "a.txt").write_text("One.\n\nTwo.\n\nThree.\n")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=1000)
    # 3 records of 4-6 bytes, each followed by EOS; 5% validation leaves 2 or 3 in train.
    assert str(err.value).startswith(
        f"dataset='text_dir:{corpus}' is invalid: allowed a corpus whose train split holds at "
        "least seq_len + 1 = 1001 tokens (it holds "
    )
    assert str(err.value).endswith("); or a smaller seq_len")


def test_unknown_dataset_lists_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="kjv.*pydoc.*text_dir:PATH.*TFDS"):
        _load(tmp_path, dataset="no_such_corpus_xyz")


def test_text_dir_errors_name_the_path_once(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, dataset=f"text_dir:{missing}")
    assert str(err.value) == (
        f"dataset='text_dir:{missing}' is invalid: allowed text_dir:PATH naming a folder "
        f"({missing} does not exist)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, dataset=f"text_dir:{empty}")
    assert str(err.value) == (
        f"dataset='text_dir:{empty}' is invalid: allowed a folder of text (there is no "
        "non-empty .txt file under it)"
    )


# ----------------------------------------------------------------------------- streaming


def test_lazy_windows_match_the_window_matrix(pydoc_data):
    for stream, pad_tail in (
        (pydoc_data.train_stream, False),
        (pydoc_data.validation_stream, True),
    ):
        expected = pipeline.window_tokens(np.asarray(stream), SEQ_LEN, pad_tail=pad_tail)
        windows = pipeline.Windows(stream, SEQ_LEN, pad_tail=pad_tail)
        assert len(windows) == len(expected)
        np.testing.assert_array_equal(np.stack([windows[i] for i in range(len(windows))]), expected)
        with pytest.raises(IndexError):
            windows[len(windows)]


class _CountingStream:
    """A token stream that records the spans read from it (the pipeline slices its stream)."""

    def __init__(self, stream):
        self._stream, self.reads = np.asarray(stream), []

    def view(self, _):
        return self  # stands in for the plain view the pipeline takes of a memory map

    def __len__(self):
        return len(self._stream)

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self._stream[key]


def test_rows_of_a_batch_read_only_those_windows(pydoc_dir):
    data = _load(pydoc_dir)
    full = data.train_batch(7)
    counted = _CountingStream(data.train_stream)
    counting = pipeline.Data(data.config, data.tokenizer, counted, data.validation_stream,
                             train_counts=np.zeros(data.vocab_size, np.int64))  # fmt: skip
    part = counting.train_batch(7, rows=[3, 1])
    width = SEQ_LEN + 1
    assert len(counted.reads) == 2 and all(stop - start == width for start, stop in counted.reads)
    for key in ("inputs", "targets", "weights"):
        np.testing.assert_array_equal(part[key], full[key][[3, 1]])
    last = list(data.eval_batches())[-1]
    last_rows = list(data.eval_batches(rows=np.array([2, 3])))[-1]
    np.testing.assert_array_equal(last_rows["weights"], last["weights"][2:])
    with pytest.raises(ConfigError, match=r"^rows=\[0, 4\] is invalid: allowed .*0\.\.3"):
        data.train_batch(0, rows=[0, 4])


def test_byte_tokenizer_packed_encoding_matches_packing():
    tok = tokenizer_lib.ByteTokenizer()
    texts = ["Caf\u00e9 \u00ff\u00fe", "", "\U0001f600 end"]
    np.testing.assert_array_equal(
        pipeline.encode_packed(tok, texts), pipeline.pack_records(tok.encode_batch(texts), 1)
    )
    assert pipeline.encode_packed(tok, []).shape == (0,)


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
    assert _split_records(built, "train") == train
    assert _split_records(built, "validation") == [r for i, r in enumerate(records) if held_out[i]]
    shards = list((tmp_path / "data").rglob("*train.array_record-*"))
    assert len(shards) == 12


def test_tokenizer_trains_on_every_kth_record_of_a_large_split(pydoc_dir):
    config = DataConfig(dataset="pydoc", data_dir=str(pydoc_dir), seq_len=SEQ_LEN, batch_size=4)
    sample = loading._Corpus(config).tokenizer_sample(max_records=100)
    records = _split_records(builder_lib.make_builder("pydoc", str(pydoc_dir)), "train")
    stride = -(-len(records) // 100)
    assert stride > 1 and list(sample) == records[::stride] and len(sample) <= 100


def write_corpus(folder: pathlib.Path, megabytes: int, seed: int = 0) -> None:
    """``megabytes`` files of 1 MiB: random letters and spaces, a blank line every 4 KiB."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      ", np.uint8)
    folder.mkdir(parents=True)
    for index in range(megabytes):
        chars = alphabet[rng.integers(0, len(alphabet), 1 << 20)]
        chars[4094::4096] = chars[4095::4096] = ord("\n")
        (folder / f"{index:04d}.txt").write_bytes(chars.tobytes())


def _probe(tmp_path: pathlib.Path, megabytes: int) -> dict:
    corpus, out = tmp_path / f"corpus{megabytes}", tmp_path / f"memory{megabytes}.json"
    write_corpus(corpus, megabytes)
    root = pathlib.Path(__file__).parent.parent
    data_dir = tmp_path / f"data{megabytes}"
    probe = [sys.executable, "-m", "tests.memory_probe", *map(str, (corpus, data_dir, out))]
    result = subprocess.run(probe, cwd=root, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shutil.rmtree(corpus)  # the build, the token streams and the numbers stay
    return json.loads(out.read_text())


@pytest.mark.slow
def test_pipeline_memory_does_not_grow_with_the_corpus(tmp_path):
    """A 20 MiB and a 200 MiB text_dir corpus, each built, tokenized (bytes: 1 token per byte)
    and batched in a fresh process: the peaks of anonymous memory and of tracemalloc stay
    within a few MiB of each other, far below the corpus (or its 800 MB token stream)."""
    small, large = _probe(tmp_path, 20), _probe(tmp_path, 200)
    mib = 1 << 20
    assert large["train_tokens"] > 9 * small["train_tokens"] > 9 * 18 * mib
    # Measured: tracemalloc 14.1 and 14.2 MiB, RssAnon +32.8 and +32.4 MiB.
    assert large["tracemalloc_peak"] < min(small["tracemalloc_peak"] + 2 * mib, 32 * mib)
    growth = large["rss_anon_peak_above_baseline"] - small["rss_anon_peak_above_baseline"]
    assert growth < 8 * mib, (small, large)
    assert large["rss_anon_peak_above_baseline"] < 64 * mib, large


def test_text_dir_that_is_a_file_is_not_a_folder(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("A file, not a folder.\n")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path / "data", dataset=f"text_dir:{readme}")
    assert str(err.value) == (
        f"dataset='text_dir:{readme}' is invalid: allowed text_dir:PATH naming a folder "
        f"({readme} is not a folder)"
    )


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
        data = _load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=8)
        again = _load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=8)
    assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]
    np.testing.assert_array_equal(again.train_stream, data.train_stream)


def test_summary_counts_one_in_the_singular(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(f"Line {i:03d} here." for i in range(60)))
    data = _load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=8,
                 batch_size=64, eval_batches=1)  # fmt: skip
    assert data.num_validation_batches == data.num_eval_batches == 1
    lines = data.summary().splitlines()
    assert " of 8 tokens (" in lines[1]
    assert lines[2].startswith("data: validation split: 1 of 1 batch used (")
