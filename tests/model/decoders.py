"""Small decoder configs and the float64 references that the model tests share."""

import jax
import numpy as np
from flax import nnx

from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.moe.config import MoEConfig

V, D, T = 64, 32, 12

# Every optional feature of imported checkpoints at once.
IMPORTED = {"num_kv_heads": 2, "head_dim": 6, "qkv_bias": True, "qk_norm": True,
            "tie_embeddings": True, "shared_d_ff": 24, "shared_gate": True}  # fmt: skip


def model_config(dispatch: str = "index", **kw) -> ModelConfig:
    # The decoder tests run the index mode: a decoder with grouped layers took about twice as
    # long to compile. The grouped mode (the layer's default) has its own tests in
    # tests/moe/test_layer.py and runs here in the causality tests.
    moe = MoEConfig(num_experts=4, d_model=D, d_ff=32, capacity_factor=None, dispatch=dispatch)
    return ModelConfig(**{"vocab_size": V, "d_model": D, "num_layers": 4, "num_heads": 4,
                          "d_ff": 64, "moe": moe, **kw})  # fmt: skip


def token_ids(seed=0, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, T), 0, V)


def f64(a) -> np.ndarray:
    return np.asarray(a[...] if isinstance(a, nnx.Variable) else a, np.float64)


def rms_norm_ref(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope_ref(x_TNH, theta):
    """RoPE as Hugging Face writes it: inv_freq = theta^(-2i/H), both halves, rotate_half."""
    t, h = x_TNH.shape[0], x_TNH.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    freqs = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    rotated = np.concatenate([-x_TNH[..., h // 2 :], x_TNH[..., : h // 2]], axis=-1)
    return x_TNH * np.cos(emb) + rotated * np.sin(emb)
