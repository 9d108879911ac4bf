"""The paper's setup (Huang et al. 2024): 24 layers, width 1024, 16 heads, 16 SwiGLU experts
per layer, context 2048, 100B RedPajama tokens. For TPU/GPU slices, not for a laptop."""

from ml_collections import ConfigDict

from dynmoe_jax.configs import default


def get_config() -> ConfigDict:
    c = default.get_config()
    c.dataset = "c4/en"  # RedPajama is not in TFDS; any large TFDS text corpus works here
    c.fallback_dataset = ""  # never swap a 100B-token corpus for a small one
    c.vocab_size = 32000
    c.seq_len = 2048
    c.batch_size = 1024  # ~2M tokens per step
    # 32 micro-batches of 32 sequences: 2 per device on 16 devices, what the plan fits in an
    # 80 GB card (experiments/RESULTS.md).
    c.grad_accum_steps = 32
    c.num_train_steps = 48_000  # ~100B tokens
    c.warmup_steps = 2000
    c.learning_rate = 3e-4
    c.log_every_steps = 100
    c.eval_every_steps = 2000
    c.eval_batches = 50
    c.checkpoint_every_steps = 1000
    c.mesh_shape = "data=-1,expert=16"
    c.model.d_model = 1024
    c.model.num_layers = 24
    c.model.num_heads = 16
    c.model.d_ff = 2816
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.scan_layers = True  # one compiled block for all 24 layers
    c.moe.num_experts = 16
    c.moe.d_ff = 2816
    c.moe.group_size = 4096
    # The plan (experiments/results/plan.md) was compiled with per-expert capacity.
    c.moe.dispatch = "index"
    return c
