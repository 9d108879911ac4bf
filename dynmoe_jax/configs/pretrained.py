"""Fine-tuning an imported MoE checkpoint (Mixtral, OLMoE, Qwen2-MoE) with top-p routing:

    python -m dynmoe_jax.main --config=dynmoe_jax/configs/pretrained.py \\
        --config.init_from=PATH --workdir=DIR [--config.dataset=text_dir:CORPUS]

The checkpoint folder gives the architecture, the weights and the tokenizer; ``model.*`` other
than ``dtype`` and ``remat``, ``vocab_size`` and ``tokenizer`` are not read. ``init_from`` has no
default: a run without it stops with a one-line error.
"""

from ml_collections import ConfigDict

from dynmoe_jax.configs import default


def get_config() -> ConfigDict:
    c = default.get_config()
    c.init_from = None  # required: a Hugging Face model folder
    c.dataset = "pydoc"  # always installed; point it at your own text with text_dir:PATH
    c.fallback_dataset = ""
    c.seq_len = 1024
    c.batch_size = 8
    c.num_train_steps = 500
    # A short warm-up: Adam's moment estimates start at zero, and the first full-size updates
    # would otherwise land on a router that has not yet seen top-p.
    c.warmup_steps = 25
    # Small enough that a pretrained model is adapted, not retrained: well over an order of
    # magnitude below the peak rates such models are pretrained with.
    c.learning_rate = 1e-5
    c.min_learning_rate_ratio = 0.1
    # No decay: with so few steps it would only pull the pretrained weights towards zero.
    c.weight_decay = 0.0
    c.log_every_steps = 10
    c.eval_every_steps = 100
    c.eval_batches = 16
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2

    c.model.dtype = "bfloat16"  # activations; parameters and the router stay float32
    c.model.remat = "full"  # these models are wide: recompute activations in the backward pass

    # The router the fine-tune adapts to. The paper's p = 0.4 is for models trained from
    # scratch with top-p; a router pretrained for top-k spreads its mass differently, so start
    # at 0.5 and choose p with experiments/pretrained_top_p.py on the checkpoint first.
    c.moe.router = "top_p"
    c.moe.threshold = 0.5
    c.moe.top_k = None  # the checkpoint's num_experts_per_tok
    c.moe.renormalize = None  # the checkpoint's norm_topk_prob
    # No token is dropped: the pretrained experts never saw drops, and a fine-tune should not
    # learn to work around them. The grouped dispatch keeps that affordable: its buffer holds
    # S * K rows, K = min(max_k, ceil(E * p)), where the index dispatch would hold E * S. On a
    # many-expert checkpoint (OLMoE: 64) set max_k, e.g. to twice its top-k, to bound K.
    c.moe.dispatch = "grouped"
    c.moe.capacity_factor = None

    c.loss.load_balance_weight = 1e-2
    c.loss.dynamic_weight = 1e-4  # the paper's dynamic loss: fewer experts where they suffice
    return c
