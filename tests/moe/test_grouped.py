"""The grouped mode's pieces on hand-worked groups: the budget, selection in priority (or
weight) order, the block-padded layout, dispatch and combine."""

import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax.moe import grouped
from dynmoe_jax.moe import rows as rows_lib
from dynmoe_jax.moe.config import DropOrder

MASK = jnp.asarray([[1, 0], [1, 1], [1, 0]], bool)


RANK = jnp.asarray([[0, 1], [1, 0], [0, 1]], jnp.int32)


WEIGHTS = jnp.asarray([[0.5, 0.0], [0.25, 0.75], [1.0, 0.0]])


def test_grouped_buffer_rows():
    assert grouped.num_rows(13, 3, 4) == 24  # 4 * ceil((13 + 3*3) / 4)


def test_grouped_select_and_layout_hand_worked():
    # Priority list (rank 0: t0->e0, t1->e1, t2->e0; rank 1: t1->e0). Budget 3: t1's second
    # choice is the lowest priority and is dropped.
    sel = grouped.select(MASK, RANK, WEIGHTS, budget=3, num_ranks=2)
    np.testing.assert_array_equal(sel.expert_P, [0, 1, 0, 2, 2, 2])
    np.testing.assert_allclose(sel.weight_P, [0.5, 0.75, 1.0, 0.0, 0.25, 0.0])
    rows = grouped.num_rows(3, 2, 2)
    lay = grouped.layout(jax.tree.map(lambda a: a[None], sel), 3, 2, 2, rows)
    # Expert 0: t0, t2; expert 1: t1 and one padding row; then unused rows.
    np.testing.assert_array_equal(lay.group_sizes_E, [2, 2])
    np.testing.assert_array_equal(lay.token_R[:3], [0, 2, 1])
    np.testing.assert_array_equal(lay.valid_R, [1, 1, 1, 0, 0, 0])
    x = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    x_RD = rows_lib.gather(x, lay.token_R, lay.valid_R)
    np.testing.assert_array_equal(x_RD, [[1, 0], [3, 3], [0, 2], [0, 0], [0, 0], [0, 0]])
    y_RD = x_RD * jnp.asarray([10.0, 10, 100, 7, 7, 7])[:, None] + 1  # padding is ignored
    y = rows_lib.scatter_add(y_RD, lay.token_R, lay.weight_R, lay.valid_R, 3)
    np.testing.assert_allclose(y, [[5.5, 0.5], [0.75, 150.75], [31.0, 31.0]])


def test_grouped_drop_orders_differ_as_worked():
    # Budget 2. By rank: t0->e0 and t1->e1 (the first two entries). By weight: t2->e0 (1.0)
    # and t1->e1 (0.75).
    by_rank = grouped.select(MASK, RANK, WEIGHTS, budget=2, num_ranks=2)
    by_weight = grouped.select(MASK, RANK, WEIGHTS, 2, 2, DropOrder.WEIGHT)
    np.testing.assert_array_equal(by_rank.expert_P, [0, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(by_weight.expert_P, [2, 1, 0, 2, 2, 2])


def test_grouped_layout_flattens_groups_and_skips_other_experts():
    # Two groups; ids >= E (here 2, as another device's expert would be) are left out.
    sel = grouped.Selections(
        jnp.asarray([[1, 0, 2, 2], [0, 3, 1, 2]], jnp.int32),
        jnp.asarray([[0, 1, 0, 1], [0, 1, 0, 1]], jnp.int32),
        jnp.ones((2, 4)),
    )
    lay = grouped.layout(sel, 2, 2, 1, 6)
    np.testing.assert_array_equal(lay.group_sizes_E, [2, 2])
    np.testing.assert_array_equal(lay.token_R[:4], [1, 2, 0, 2])  # tokens g*S + s
    np.testing.assert_array_equal(lay.valid_R, [1, 1, 1, 1, 0, 0])
