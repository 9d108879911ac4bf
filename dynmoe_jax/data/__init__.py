"""Input pipeline: local or TFDS text corpora, tokenized, packed and batched.

Typical use (``config`` a DataConfig, a mapping or the training ConfigDict)::

    from dynmoe_jax import data

    ds = data.from_config(dict(dataset="pydoc", seq_len=128, batch_size=32))
    batch = ds.train_batch(step)  # inputs/targets int32 [B, T], weights float32 [B, T]
"""

from dynmoe_jax.data.corpora import CorpusUnavailableError
from dynmoe_jax.data.hf_tokenizer import HFTokenizer
from dynmoe_jax.data.loading import CACHE_ENV, cache_dir, from_config
from dynmoe_jax.data.pipeline import Data, DataConfig
from dynmoe_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = [
    "CACHE_ENV",
    "ByteTokenizer",
    "CorpusUnavailableError",
    "Data",
    "DataConfig",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "cache_dir",
    "from_config",
]
