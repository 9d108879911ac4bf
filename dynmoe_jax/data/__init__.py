"""Input pipeline: local or TFDS text corpora, tokenized, packed and batched.

Typical use::

    from dynmoe_jax import data

    ds = data.load_data("pydoc", "/tmp/dynmoe_data", seq_len=128, batch_size=32, seed=0)
    batch = ds.train_batch(step)  # inputs/targets int32 [B, T], weights float32 [B, T]
"""

from dynmoe_jax.data.corpora import CorpusUnavailableError
from dynmoe_jax.data.pipeline import Data, DataConfig, load_data, load_data_from_config
from dynmoe_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = [
    "ByteTokenizer",
    "CorpusUnavailableError",
    "Data",
    "DataConfig",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_data",
    "load_data_from_config",
]
