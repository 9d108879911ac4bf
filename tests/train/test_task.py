"""The task of a run: the learning-rate schedule and the weight decay's mask by hand, and a
checkpoint of the state's older dict form restoring as a TrainState."""

import math

import jax
import numpy as np
import pytest

from dynmoe_jax import train
from dynmoe_jax.moe import balance
from dynmoe_jax.train import checkpoint as ckpt_lib
from dynmoe_jax.train import task as task_lib


def test_learning_rate_warms_up_then_decays_to_its_floor_hand_worked(tiny_run):
    # tiny: peak 1e-2, 2 warm-up steps, 6 steps, floor 0.1 of the peak.
    schedule = task_lib.learning_rate_schedule(tiny_run())
    cosine = [1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    want = [0.0, 5e-3, *cosine]  # steps 0..6: linear to the peak, then cosine to the floor
    np.testing.assert_allclose([float(schedule(s)) for s in range(7)], want, rtol=1e-5)
    assert float(schedule(100)) == pytest.approx(1e-3)


def _leaves(tree) -> dict[str, tuple[str, np.ndarray]]:
    """Each leaf by its path: (the last key, the value)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): (p[-1].key, np.asarray(v)) for p, v in flat}


def test_weight_decay_spares_norm_scales_and_the_routing_state(tiny_run):
    # With zero gradients AdamW's step is the decay alone: -lr * weight_decay * p.
    config = tiny_run(**{"warmup_steps": 0, "moe.target_k": 1.5})
    task = train.build_task(config, 64)
    params = jax.device_get(train.init_state(task).params)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = task.optimizer.update(zeros, task.optimizer.init(params), params)
    values, updates = _leaves(params), _leaves(updates)
    spared = {n for n, (key, _) in values.items() if "scale" in n or key in balance.FROZEN}
    assert any("scale" in n for n in spared) and any("threshold" in n for n in spared)
    assert len(spared) < len(values)
    for name, (_, value) in values.items():
        want = np.zeros_like(value) if name in spared else -1e-2 * 0.1 * value
        np.testing.assert_allclose(updates[name][1], want, rtol=1e-6, atol=1e-12, err_msg=name)


def test_checkpoint_of_a_dict_state_restores_as_a_train_state(tiny_run, tmp_path):
    # Before TrainState, the loop saved the state as a dict of the same fields.
    task = train.build_task(tiny_run(), 512)
    state = train.init_state(task)
    old = {"step": state.step + 7, "params": state.params, "opt_state": state.opt_state,
           "nonfinite_steps": state.nonfinite_steps,
           "first_nonfinite_step": state.first_nonfinite_step}  # fmt: skip
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    ckpt.save(7, old)
    ckpt.wait()
    step, restored = train.restore_state(task, ckpt)
    ckpt.close()
    assert step == 7 and isinstance(restored, train.TrainState) and int(restored.step) == 7
    jax.tree.map(np.testing.assert_array_equal, restored.params, jax.device_get(state.params))
