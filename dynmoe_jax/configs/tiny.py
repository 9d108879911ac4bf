"""A model small enough for unit tests: trains a few steps in seconds on the pydoc corpus, with
the shipped dispatch (grouped, and the decode path at sampling) like `make train`."""

from ml_collections import ConfigDict

from dynmoe_jax.configs import default


def get_config() -> ConfigDict:
    c = default.get_config()
    c.dataset = "pydoc"
    c.fallback_dataset = ""
    c.vocab_size = 512
    c.seq_len = 32
    c.batch_size = 8
    c.num_train_steps = 6
    c.warmup_steps = 2
    c.learning_rate = 1e-2
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.eval_batches = 2
    c.checkpoint_every_steps = 3
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.d_ff = 64
    c.moe.num_experts = 4
    c.moe.d_ff = 32
    return c
