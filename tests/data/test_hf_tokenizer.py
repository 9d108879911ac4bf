"""A pretrained checkpoint's tokenizer.json in the pipeline (dynmoe_jax.data.hf_tokenizer):
round trip, the EOS lookup, cache keys, a vocabulary where id 0 is a real token, and byte-level
tokenizers without a decoder."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dynmoe_jax import data as data_lib
from dynmoe_jax.data.hf_tokenizer import HFTokenizer
from dynmoe_jax.validation import ConfigError

SENTENCES = [
    "Hello! The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts layers route each token to a few experts!",
    "def f(x): return {x: [1, 2, 3]}  # tabs\tand  spaces",
] * 20


SENTENCES = [
    "Hello! The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts layers route each token to a few experts!",
    "def f(x): return {x: [1, 2, 3]}  # tabs\tand  spaces",
] * 20


def tokenizer_json(vocab_size: int = 300, specials=("<|endoftext|>", "<|padding|>")) -> bytes:
    """A byte-level BPE like GPT-2's: the 256 byte symbols first (id 0 is '!'), then merges,
    with the special tokens last."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.add_special_tokens(list(specials))
    return tok.to_str().encode()


def checkpoint_dir(path, config=None, tokenizer_config=None, **kwargs):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_bytes(tokenizer_json(**kwargs))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def test_round_trip_and_id_zero_is_a_real_token(tmp_path):
    tok = HFTokenizer.from_dir(checkpoint_dir(tmp_path))
    for text in SENTENCES[:3] + ["Grüße, 世界!"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode([*ids, tok.eos_id]) == text  # EOS is special: decodes to nothing
    assert tok.encode("!") == [0]  # '!' is the first byte symbol of a byte-level BPE
    assert tok.encode_batch(SENTENCES[:3]) == [tok.encode(t) for t in SENTENCES[:3]]
    vocab = json.loads(tokenizer_json())["added_tokens"]
    assert tok.eos_id == next(t["id"] for t in vocab if t["content"] == "<|endoftext|>")
    assert tok.vocab_size == tok.eos_id + 2  # the padding token is the last id
    assert tok.pad_id == tok.eos_id


def test_eos_comes_from_config_then_tokenizer_config_then_known_names(tmp_path):
    by_config = HFTokenizer.from_dir(checkpoint_dir(tmp_path / "a", {"eos_token_id": [7, 9]}))
    assert by_config.eos_id == 7
    named = checkpoint_dir(tmp_path / "b", {}, {"eos_token": {"content": "<|padding|>"}})
    padding_id = HFTokenizer.from_dir(named).vocab_size - 1
    assert HFTokenizer.from_dir(named).eos_id == padding_id
    with pytest.raises(ConfigError) as err:
        HFTokenizer.from_dir(checkpoint_dir(tmp_path / "c", specials=("<bos>",)))
    assert str(err.value).startswith("eos_token=None is invalid: allowed an id below the")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="eos_token=5000 is invalid"):
        HFTokenizer.from_dir(checkpoint_dir(tmp_path / "d", {"eos_token_id": 5000}))
    with pytest.raises(ConfigError, match="a checkpoint folder with tokenizer.json"):
        HFTokenizer.from_dir(tmp_path / "nothing")


def test_fingerprints_separate_vocabularies_and_eos(tmp_path):
    a = HFTokenizer.from_dir(checkpoint_dir(tmp_path / "a"))
    b = HFTokenizer.from_dir(checkpoint_dir(tmp_path / "b", vocab_size=290))
    c = HFTokenizer.from_dir(checkpoint_dir(tmp_path / "c", {"eos_token_id": 3}))
    again = HFTokenizer.from_dir(checkpoint_dir(tmp_path / "d"))
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert again.fingerprint == a.fingerprint
    assert a.fingerprint.startswith("hf")


def test_data_with_a_checkpoint_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    paragraphs = [f"Paragraph {i}! It says hello! to the experts." for i in range(60)]
    (corpus / "a.txt").write_text("\n\n".join(paragraphs))
    folder = checkpoint_dir(tmp_path / "ckpt", {"eos_token_id": None})
    tok = HFTokenizer.from_dir(folder)
    fields = dict(dataset=f"text_dir:{corpus}", data_dir=str(tmp_path / "cache"), seq_len=16,
                  batch_size=4, init_from=str(folder), vocab_size=512,
                  eval_batches=None)  # fmt: skip
    data = data_lib.from_config(fields)
    assert (data.vocab_size, data.eos_id, data.pad_id) == (tok.vocab_size, tok.eos_id, tok.eos_id)
    assert data.tokenizer.fingerprint == tok.fingerprint
    assert f"tokenizer={folder}/tokenizer.json vocab={tok.vocab_size}" in data.summary()
    assert 0 in data.train_stream  # '!' occurs in the text
    batches = list(data.eval_batches(None))
    weights = np.concatenate([b["weights"].ravel() for b in batches])
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    # Every validation token but the first of each window is a target, id 0 included.
    n = len(data.validation_stream)
    assert n % 17 > 1  # a padded last window
    assert weights.sum() == n - -(-n // 17)
    assert weights[targets == 0].min() == 1.0
    assert np.all(targets[weights == 0] == tok.eos_id)
    # A second tokenizer over the same corpus gets its own token cache.
    other = checkpoint_dir(tmp_path / "other", vocab_size=290)
    again = data_lib.from_config({**fields, "init_from": str(other)})
    assert len(list((tmp_path / "cache" / "packed").glob("*[nt].npy"))) == 4  # not *.counts.npy
    assert not np.array_equal(again.train_stream, data.train_stream)


# A byte-level BPE written by hand, as some checkpoints ship it: no decoder. The byte symbols
# are GPT-2's: a space is "Ġ" (U+0120), "é" is the two bytes C3 A9, spelt "Ã" and "©".
BYTE_LEVEL_VOCAB = ["H", "i", "Ġ", "Ã", "©", "!", "Hi", "Ã©", "Ġw", "w", "ĠwÃ©", "<|endoftext|>"]


def byte_level_json(decoder=None, pre_tokenizer=None) -> bytes:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}  # fmt: skip
    eos = len(BYTE_LEVEL_VOCAB) - 1
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eos, "content": "<|endoftext|>", "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None, "pre_tokenizer": pre_tokenizer or byte_level,
        "post_processor": None, "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(BYTE_LEVEL_VOCAB)},
                  "merges": ["H i", "Ã ©", "Ġ w", "Ġw Ã©"]},
    }).encode()  # fmt: skip


@pytest.mark.parametrize("nested", [False, True], ids=["byte_level", "in_a_sequence"])
def test_a_byte_level_tokenizer_without_decoder_decodes_to_bytes(nested):
    byte_level = json.loads(byte_level_json())["pre_tokenizer"]
    sequence = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
    }
    tok = HFTokenizer(byte_level_json(pre_tokenizer=sequence if nested else None))
    ids = tok.encode("Hi wé!")
    assert [BYTE_LEVEL_VOCAB[i] for i in ids] == ["Hi", "ĠwÃ©", "!"]
    assert tok.decode([*ids, tok.eos_id]) == "Hi wé!"


def test_a_tokenizer_with_its_own_decoder_keeps_it():
    # A decoder that only strips the space symbol: kept as written, so "Ã©" stays spelt.
    strip = {"type": "Replace", "pattern": {"String": "Ġ"}, "content": " "}
    tok = HFTokenizer(byte_level_json(decoder=strip))
    assert tok.decode(tok.encode("Hi wé!")) == "Hi wÃ©!"
