"""The pydoc corpus at the sizes the data tests use, and the records of a prepared split."""

from dynmoe_jax import data as data_lib
from dynmoe_jax.data import builder as builder_lib
from dynmoe_jax.data import corpora

SEQ_LEN = 16
BATCH = 4
VOCAB = 512


def load(data_dir, **overrides):
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


def split_records(built, split: str) -> list[str]:
    """Every record of a prepared split, through the public reader the pipeline uses."""
    source = builder_lib.split_source(built, split)
    return list(corpora.records_from_source(source, built.builder_config.corpus))
