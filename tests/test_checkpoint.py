"""Checkpoint fingerprints: exact, position-sensitive and independent of the mesh."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dynmoe_jax.train import checkpoint as ckpt_lib

DTYPES = [np.float32, jnp.bfloat16, np.int32, np.uint8, np.bool_]


def _tree(rng):
    return {
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "b": rng.standard_normal((8,)).astype(jnp.bfloat16),
        "count": np.int32(7),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_single_bit_flip_changes_the_fingerprint(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 5)) * 4).astype(dtype)
    base = ckpt_lib.fingerprint([x])
    raw = x.view(np.uint8).copy().reshape(-1)
    bits = 1 if dtype == np.bool_ else 8  # a bool's other bits are not valid values
    for i in range(raw.size):
        for b in range(bits):
            flipped = raw.copy()
            flipped[i] ^= np.uint8(1 << b)
            assert ckpt_lib.fingerprint([flipped.view(x.dtype).reshape(x.shape)]) != base, (i, b)


def test_swapped_values_change_the_fingerprint():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    swapped = x.copy()
    swapped[0, 1], swapped[2, 3] = x[2, 3], x[0, 1]
    assert ckpt_lib.fingerprint([swapped]) != ckpt_lib.fingerprint([x])
    assert ckpt_lib.fingerprint([x.T.copy()]) != ckpt_lib.fingerprint([x])


def test_fingerprint_is_the_same_on_every_mesh():
    tree = _tree(np.random.default_rng(1))
    expected = ckpt_lib.fingerprint(tree)
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    for spec in [PartitionSpec("a", "b"), PartitionSpec("b", "a"), PartitionSpec(None, "a")]:
        placed = dict(tree, w=jax.device_put(tree["w"], NamedSharding(mesh, spec)))
        assert ckpt_lib.fingerprint(placed) == expected, spec


def _saved(workdir, tree, step):
    """A Checkpointer holding ``tree`` at ``step``, and the tree's abstract shapes."""
    ckpt = ckpt_lib.Checkpointer(workdir)
    ckpt.save(step, tree)
    ckpt.wait()
    return ckpt, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_save_restore_round_trip_keeps_every_bit(tmp_path):
    tree = _tree(np.random.default_rng(2))
    ckpt, abstract = _saved(tmp_path, tree, 5)
    step, got = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 5
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, tree
    )


def test_another_dtype_is_a_mismatch_not_damage(tmp_path):
    ckpt, abstract = _saved(tmp_path, _tree(np.random.default_rng(3)), 1)
    abstract["w"] = jax.ShapeDtypeStruct((16, 8), jnp.bfloat16)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="w: saved .*float32.*bfloat16"):
        ckpt.restore_latest(abstract)
    ckpt.close()
    assert (tmp_path / "checkpoints" / "1").is_dir()  # left in place


def _save_format_1(workdir, step, tree, shapes):
    """A checkpoint as the first release wrote it: bare shapes and float sums, no "format"."""
    import orbax.checkpoint as ocp

    meta = {"layout": shapes, "fingerprint": [float(np.sum(x)) for x in jax.tree.leaves(tree)]}
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        manager.save(step, args=args)


def test_first_format_checkpoints_are_refused_in_one_line_and_kept(tmp_path):
    tree = _tree(np.random.default_rng(4))
    _save_format_1(tmp_path, 2, tree, {"b": [8], "count": [], "w": [16, 8]})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="step 2 .* record format 1") as e:
        ckpt.restore_latest(abstract)
    ckpt.close()
    assert "\n" not in str(e.value)
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert not (tmp_path / "checkpoints_unreadable").exists()


def test_reading_a_workdir_without_checkpoints_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        ckpt_lib.Checkpointer(tmp_path / "empty", create=False)
    assert not (tmp_path / "empty").exists()


class _Pair(NamedTuple):
    w: Any
    b: Any


def test_a_namedtuple_target_restores_a_saved_dict_in_its_own_order(tmp_path):
    # The dict flattens as (b, w), the NamedTuple as (w, b): fingerprints match by path.
    tree = {"w": np.arange(6, dtype=np.float32), "b": np.ones(3, np.int32)}
    ckpt, _ = _saved(tmp_path, tree, 4)
    target = _Pair(w=jax.ShapeDtypeStruct((6,), np.float32), b=jax.ShapeDtypeStruct((3,), np.int32))
    step, got = ckpt.restore_latest(target)
    ckpt.close()
    assert step == 4 and isinstance(got, _Pair)
    np.testing.assert_array_equal(np.asarray(got.w), tree["w"])
    np.testing.assert_array_equal(np.asarray(got.b), tree["b"])


def test_a_checkpoint_with_renamed_parameters_continues_under_the_new_names(tmp_path):
    import optax

    rng = np.random.default_rng(5)
    new = {"attn": {n: rng.normal(size=(4, 2, 3)).astype(np.float32)
                    for n in ("wk_DJH", "wo_NHD", "wq_DNH", "wv_DJH")}}  # fmt: skip
    state = {"params": new, "opt_state": optax.adam(1e-3).init(new), "step": np.int32(7)}
    old = ckpt_lib.rename_keys(state, {"wk_DJH": "wk_DNH", "wv_DJH": "wv_DNH"})
    assert set(old["opt_state"][0].mu["attn"]) == {"wk_DNH", "wo_NHD", "wq_DNH", "wv_DNH"}
    ckpt, _ = _saved(tmp_path, old, 3)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
    step, got = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 3 and set(got["params"]["attn"]) == set(new["attn"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got, state)  # fmt: skip


def _model_state(scan: bool, abstract: bool = False):
    """A train-state-like dict of a 5-layer model (moe_every=2) with an Adam state."""
    import optax
    from flax import nnx

    from dynmoe_jax.model.config import ModelConfig
    from dynmoe_jax.model.decoder import Decoder
    from dynmoe_jax.moe.config import MoEConfig

    moe = MoEConfig(num_experts=2, d_model=8, d_ff=8)
    cfg = ModelConfig(vocab_size=16, d_model=8, num_layers=5, num_heads=2, d_ff=8, moe=moe,
                      moe_every=2, scan_layers=scan)  # fmt: skip

    def make():
        params = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(3)), nnx.Param))
        opt_state = optax.adam(1e-3).init(params)
        opt_state = jax.tree.map(lambda x: x + 0.5, opt_state)  # distinct from the params
        return {"params": params, "opt_state": opt_state, "step": jnp.int32(7)}

    return jax.eval_shape(make) if abstract else make()


@pytest.mark.parametrize("old_names", [False, True], ids=["today", "with_old_kv_names"])
def test_a_per_layer_checkpoint_restores_into_scanned_layers_stacked(tmp_path, old_names):
    from dynmoe_jax.model import layer_stack

    state = _model_state(scan=False)
    renamed = {"wk_DJH": "wk_DNH", "wv_DJH": "wv_DNH"} if old_names else {}
    ckpt, _ = _saved(tmp_path, ckpt_lib.rename_keys(state, renamed), 4)
    step, got = ckpt.restore_latest(_model_state(scan=True, abstract=True))
    ckpt.close()
    want = layer_stack.stack_layers(state, moe_every=2)
    assert "blocks" not in got["params"] and "blocks" not in got["opt_state"][0].mu
    assert got["params"]["scan_blocks"]["blocks"][1]["ffn"]["w_up_EDF"].shape == (2, 2, 8, 8)
    assert step == 4 and jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got, want)  # fmt: skip
    # The stacked layout is what a scanned model of the same seed holds.
    jax.tree.map(np.testing.assert_array_equal, got["params"], _model_state(scan=True)["params"])


def test_a_scanned_checkpoint_into_per_layer_model_names_the_setting(tmp_path):
    ckpt, _ = _saved(tmp_path, _model_state(scan=True), 2)
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
        ckpt.restore_latest(_model_state(scan=False, abstract=True))
    ckpt.close()
    assert str(e.value).endswith(
        "was written with scan_layers=True; set --config.model.scan_layers=True"
    )
    assert "\n" not in str(e.value) and (tmp_path / "checkpoints" / "2").is_dir()
