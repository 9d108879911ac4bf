"""A learnable synthetic batch for the train tests that need no corpus."""

import numpy as np

V = 64  # vocabulary of the synthetic batches


def counting_batch(step: int, batch: int = 8, length: int = 32) -> dict[str, np.ndarray]:
    """Sequences counting up mod V from a random start by a stride of 1 or 2: learnable."""
    rng = np.random.default_rng(step)
    start = rng.integers(0, V, (batch, 1))
    stride = rng.integers(1, 3, (batch, 1))
    tokens = (start + stride * np.arange(length + 1)) % V
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": np.ones((batch, length), np.float32),
    }
