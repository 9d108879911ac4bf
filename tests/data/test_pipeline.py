"""The pipeline: packing and windows by hand, batches as windows of the record stream and a pure
function of (seed, step), epochs, padded evaluation batches, the unigram baseline, rows read
alone, DataConfig, and memory that does not grow with the corpus."""

import json
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from dynmoe_jax import data as data_lib
from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import pipeline
from dynmoe_jax.data import tokenizer as tokenizer_lib
from dynmoe_jax.data.pipeline import DataConfig
from dynmoe_jax.validation import ConfigError
from tests.data.pydoc import BATCH, SEQ_LEN, VOCAB, load, split_records


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


def test_padding_is_masked_by_position_not_by_id():
    # Id 0 is a real token here: its targets keep weight 1; the padded tail gets weight 0 and
    # the pad id (7) as its id.
    stream = pipeline.pack_records([[0, 5, 0], [6]], eos_id=7)  # 0 5 0 7 6 7
    windows = pipeline.window_tokens(stream, 3, pad_tail=True)
    np.testing.assert_array_equal(windows, [[0, 5, 0, 7], [6, 7, -1, -1]])
    batch = pipeline.windows_to_batch(windows, pad_id=7)
    np.testing.assert_array_equal(batch["inputs"], [[0, 5, 0], [6, 7, 7]])
    np.testing.assert_array_equal(batch["targets"], [[5, 0, 7], [7, 7, 7]])
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 1], [1, 0, 0]])


def test_byte_tokenizer_packed_encoding_matches_packing():
    tok = tokenizer_lib.ByteTokenizer()
    texts = ["Caf\u00e9 \u00ff\u00fe", "", "\U0001f600 end"]
    np.testing.assert_array_equal(
        pipeline.encode_packed(tok, texts), pipeline.pack_records(tok.encode_batch(texts), 1)
    )
    assert pipeline.encode_packed(tok, []).shape == (0,)


def test_train_batches_are_windows_of_the_record_stream(pydoc_data):
    tok = pydoc_data.tokenizer
    records = split_records(builder_lib.make_builder("pydoc", pydoc_data.config.data_dir), "train")
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
    fresh = load(tmp_path)  # a new data_dir: rebuilds, retrains the tokenizer, repacks
    for step in (0, 1, 1000):
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(
                fresh.train_batch(step)[key], pydoc_data.train_batch(step)[key]
            )
    assert not np.array_equal(
        pydoc_data.train_batch(0)["inputs"], pydoc_data.train_batch(1)["inputs"]
    )
    other_seed = load(pydoc_data.config.data_dir, seed=1)
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
    data = load(pydoc_dir, eval_batches=2)
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


def test_summary_counts_one_in_the_singular(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(f"Line {i:03d} here." for i in range(60)))
    data = load(tmp_path / "data", dataset=f"text_dir:{corpus}", tokenizer="bytes", seq_len=8,
                 batch_size=64, eval_batches=1)  # fmt: skip
    assert data.num_validation_batches == data.num_eval_batches == 1
    lines = data.summary().splitlines()
    assert " of 8 tokens (" in lines[1]
    assert lines[2].startswith("data: validation split: 1 of 1 batch used (")


def test_unigram_baseline(pydoc_data):
    log_probs = pydoc_data.unigram_log_probs
    assert log_probs.shape == (pydoc_data.vocab_size,)
    np.testing.assert_allclose(np.exp(log_probs.astype(np.float64)).sum(), 1.0, rtol=1e-4)
    cross_entropy = pydoc_data.unigram_cross_entropy()
    assert 2.0 < cross_entropy < np.log(pydoc_data.vocab_size)


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
    data = load(pydoc_dir)
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
        load(tmp_path, **overrides)


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
    root = pathlib.Path(__file__).parents[2]
    data_dir = tmp_path / f"data{megabytes}"
    probe = [sys.executable, "-m", "tests.memory_probe", *map(str, (corpus, data_dir, out))]
    result = subprocess.run(probe, cwd=root, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shutil.rmtree(corpus)  # the build, the token streams and the numbers stay
    return json.loads(out.read_text())


@pytest.mark.slow
def test_pipeline_memory_does_not_grow_with_the_corpus(tmp_path):
    """A 4 MiB and a 40 MiB text_dir corpus, each built, tokenized (bytes: 1 token per byte)
    and batched in a fresh process: the peaks of anonymous memory and of tracemalloc stay
    within a few MiB of each other, far below the corpus (or its 160 MB token stream)."""
    small, large = _probe(tmp_path, 4), _probe(tmp_path, 40)
    mib = 1 << 20
    assert large["train_tokens"] > 9 * small["train_tokens"] > 9 * 3.5 * mib
    assert large["tracemalloc_peak"] < min(small["tracemalloc_peak"] + 2 * mib, 32 * mib)
    growth = large["rss_anon_peak_above_baseline"] - small["rss_anon_peak_above_baseline"]
    assert growth < 8 * mib, (small, large)
    assert large["rss_anon_peak_above_baseline"] < 64 * mib, large
