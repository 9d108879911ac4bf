"""The byte and SentencePiece tokenizers: exact round trips, special ids, deterministic
training."""

from dynmoe_jax.data import corpora
from dynmoe_jax.data import tokenizer as tokenizer_lib
from tests.data.pydoc import VOCAB


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
