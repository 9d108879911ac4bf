"""The shared selection sort: the rank-major priority list and its order by expert."""

import jax.numpy as jnp
import numpy as np

from dynmoe_jax.moe import priority


def test_sort_by_expert_keeps_priority_order():
    # Priority list of 3 tokens x 2 ranks, rank-major: entries (rank 0: t0 t1 t2, rank 1: ...).
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0], [0, 1, 1]], bool)
    rank = jnp.asarray([[1, 0, 2], [0, 1, 2], [2, 0, 1]], jnp.int32)
    key = priority.priority_list(mask, rank, num_ranks=2)
    np.testing.assert_array_equal(key, [1, 0, 1, 0, 3, 2])  # 3 = no rank-1 choice for t1
    by = priority.sort_by_expert(key, num_experts=3)
    np.testing.assert_array_equal(by.counts_E, [2, 2, 1])
    np.testing.assert_array_equal(by.starts_E, [0, 2, 4])
    # Expert 0: t1 (rank 0) then t0 (rank 1); expert 1: t0, t2 (rank 0); expert 2: t2 (rank 1).
    np.testing.assert_array_equal(by.selection_P % 3, [1, 0, 0, 2, 2, 1])
    np.testing.assert_array_equal(by.expert_P, [0, 0, 1, 1, 2, 3])
