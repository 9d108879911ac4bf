"""A model small enough for unit tests: trains a few steps in seconds on the pydoc corpus."""

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
    # Per layer: at 2 layers scanning compiled slower (20.1 s vs 16.4 s) and stepped slower
    # (fwd+bwd 7.4 vs 7.1 ms, medians of 10 alternating calls on 2 loaded CPU cores)
    # (experiments/bench_compile.py --config tiny --layers 2,16).
    c.model.scan_layers = False
    c.moe.num_experts = 4
    # The unit tests' model keeps the index mode they were written against; the grouped mode
    # has its own tests against the index mode and a per-expert loop.
    c.moe.dispatch = "index"
    c.moe.d_ff = 32
    return c
