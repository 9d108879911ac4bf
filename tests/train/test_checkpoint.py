"""Checkpoints: fingerprints (exact, position-sensitive, independent of the mesh), round trips,
every kind of damage falling back to the previous step or refused in one line, layouts
(scanned, per layer, another mesh), and the tiny run's own checkpoints damaged."""

import asyncio
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dynmoe_jax import train
from dynmoe_jax.train import checkpoint as ckpt_lib
from dynmoe_jax.train import storage
from tests.disk_full import full_disk_at
from tests.sharding_steps import task_and_data

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


def test_a_per_layer_checkpoint_restores_into_scanned_layers_stacked(tmp_path):
    from dynmoe_jax.model import layer_stack

    state = _model_state(scan=False)
    ckpt, _ = _saved(tmp_path, state, 4)
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


def _two_steps(workdir):
    """Steps 1 and 2 of a dozen arrays (one value each in the step's database), and the
    abstract tree; the Checkpointer is closed."""
    rng = np.random.default_rng(6)
    tree = {f"w{i}": rng.standard_normal((64, 256)).astype(np.float32) for i in range(12)}
    ckpt, abstract = _saved(workdir, tree, 1)
    ckpt.save(2, jax.tree.map(lambda x: x + 1, tree))
    ckpt.close()
    return tree, abstract


def _data_files(step_dir):
    return sorted(step_dir.rglob("d/*"), key=lambda p: p.stat().st_size)


# A failed Orbax restore leaves reads in flight; they must not report into a closed loop.
@pytest.mark.parametrize("cut", ["every_file_to_a_third", "the_largest_to_a_half"])
def test_truncated_files_fall_back_to_the_previous_step(tmp_path, capsys, monkeypatch, cut):
    import gc

    unraisable = []  # what Python could only print ("Exception ignored in ...")
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(str(u.exc_value)))
    tree, abstract = _two_steps(tmp_path)
    files = _data_files(tmp_path / "checkpoints" / "2")
    for blob in files if cut == "every_file_to_a_third" else files[-1:]:
        size = blob.stat().st_size
        os.truncate(blob, size // 3 if cut == "every_file_to_a_third" else size // 2)
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    step, got = ckpt.restore_latest(abstract)
    ckpt.close()
    gc.collect()
    time.sleep(0.5)  # reads still in flight would complete (and report) by now
    assert step == 1 and unraisable == []
    jax.tree.map(np.testing.assert_array_equal, got, tree)
    out = capsys.readouterr()
    assert "checkpoint at step 2 is unreadable (ValueError: OUT_OF_RANGE" in out.out
    assert "Event loop is closed" not in out.out + out.err
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_unreadable").iterdir()] == ["2"]


def _restores_step_2_without_a_log_warning(tmp_path, tree, abstract, caplog) -> None:
    """``_two_steps``' newest checkpoint restores, and nothing is logged at WARNING or above."""
    with caplog.at_level(logging.DEBUG):
        ckpt = ckpt_lib.Checkpointer(tmp_path)
        step, got = ckpt.restore_latest(abstract)
        ckpt.close()
    assert step == 2
    np.testing.assert_array_equal(got["w0"], tree["w0"] + 1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("content", [b"{garbled", b"", b"\xff\xfe", b"[1, 2]"])
def test_an_unreadable_orbax_step_record_is_set_aside_without_an_error_log(
    tmp_path, capsys, caplog, content
):
    tree, abstract = _two_steps(tmp_path)
    record = tmp_path / "checkpoints" / "2" / ckpt_lib.STEP_RECORD
    record.write_bytes(content)
    _restores_step_2_without_a_log_warning(tmp_path, tree, abstract, caplog)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"warning: checkpoint at step 2: Orbax's step record {ckpt_lib.STEP_RECORD} is unreadable"
    )
    kept = list((tmp_path / "checkpoints_unreadable").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == content  # nothing is deleted
    assert record.read_text() == "{}"


def test_restores_inside_a_running_event_loop(tmp_path):
    # As in a notebook, whose kernel runs each cell inside its event loop.
    tree, abstract = _two_steps(tmp_path)

    async def restore():
        ckpt = ckpt_lib.Checkpointer(tmp_path)
        try:
            return ckpt.restore_latest(abstract)
        finally:
            ckpt.close()

    step, got = asyncio.run(restore())
    assert step == 2
    np.testing.assert_array_equal(got["w3"], tree["w3"] + 1)


# ----------------------------------------------------------------------------- a run's own


def _copy_of(run, tmp_path: Path) -> Path:
    """A copy of a trained run's workdir that a test may damage."""
    workdir = tmp_path / "run"
    shutil.copytree(run.workdir, workdir)
    return workdir


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(trained, tmp_path, capsys):
    run = trained("grouped")
    workdir = _copy_of(run, tmp_path)
    blobs = sorted((workdir / "checkpoints" / "6").rglob("d/*"), key=lambda p: p.stat().st_size)
    with open(blobs[-1], "r+b") as f:  # overwrite bytes in the largest data file
        f.seek(blobs[-1].stat().st_size // 2)
        f.write(b"\xff" * 64)
    task = train.build_task(run.config, 512)
    ckpt = ckpt_lib.Checkpointer(workdir)
    step, _ = train.restore_state(task, ckpt)
    ckpt.close()
    assert step == 3
    assert "checkpoint at step 6 is unreadable" in capsys.readouterr().out
    assert list((workdir / "checkpoints_unreadable").iterdir())  # kept, not deleted
    train.train_and_evaluate(run.config, workdir)  # resumes from 3 and finishes
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


# Orbax leaves reads in flight when one array fails; they must not report into a closed loop.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_truncated_checkpoint_of_a_run_falls_back(trained, tmp_path):
    run = trained("grouped")
    workdir = _copy_of(run, tmp_path)
    for blob in (workdir / "checkpoints" / "6").rglob("d/*"):
        os.truncate(blob, blob.stat().st_size // 3)
    task = train.build_task(run.config, 512)
    ckpt = ckpt_lib.Checkpointer(workdir)
    assert train.restore_state(task, ckpt)[0] == 3
    ckpt.close()


def test_checkpoint_of_another_config_is_refused_not_moved(trained, tiny_run, tmp_path):
    workdir = _copy_of(trained("grouped"), tmp_path)
    other = tiny_run(**{"moe.d_ff": 48})  # experts of another width
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"step 6 .* another model"):
        train.train_and_evaluate(other, workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    assert not (workdir / "checkpoints_unreadable").exists()


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes(data_dir, tmp_path):
    task, _ = task_and_data("data=2,expert=4", data_dir)
    state = train.init_state(task)
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    ckpt.save(1, state)
    ckpt.wait()
    expected = jax.device_get(state)
    for mesh_shape, devices in [("data=4,expert=2", None), ("", jax.devices()[:1])]:
        other, _ = task_and_data(mesh_shape, data_dir, devices)
        step, restored = ckpt.restore_latest(train.abstract_state(other))
        assert step == 1
        w = restored.params["blocks"][1]["ffn"]["w_up_EDF"]
        assert w.sharding.mesh.shape == other.mesh.shape
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    ckpt.close()


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_save_that_runs_out_of_space_keeps_every_complete_checkpoint(tmp_path):
    tree = _tree(np.random.default_rng(3))
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    ckpt.save(1, tree)
    before = _file_bytes(tmp_path / "checkpoints")
    with pytest.raises(ckpt_lib.CheckpointSpaceError) as failed, full_disk_at(2):
        ckpt.save(2, jax.tree.map(lambda x: x + 1, tree))
    ckpt.close()  # returns at once: the failed write is not waited for again
    assert str(failed.value) == (
        f"no space left in {tmp_path} for the checkpoint of step 2 (about "
        f"{storage.tree_bytes(tmp_path / 'checkpoints' / '1') / 1e6:.1f} MB needed); free some "
        "space: rerunning the same command resumes from the checkpoint of step 1"
    )
    # The unfinished step's temporary files are gone and nothing complete was touched.
    assert _file_bytes(tmp_path / "checkpoints") == before
    step, got = ckpt_lib.Checkpointer(tmp_path).restore_latest(jax.tree.map(np.asarray, tree))
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, got, tree)


def test_a_missing_orbax_step_record_is_replaced_with_one_line(tmp_path, capsys, caplog):
    tree, abstract = _two_steps(tmp_path)
    (tmp_path / "checkpoints" / "2" / ckpt_lib.STEP_RECORD).unlink()
    _restores_step_2_without_a_log_warning(tmp_path, tree, abstract, caplog)
    assert capsys.readouterr().out == (
        f"warning: checkpoint at step 2: Orbax's step record {ckpt_lib.STEP_RECORD} was missing; "
        "wrote an empty one (the checkpoint itself is read as usual)\n"
    )
    assert (tmp_path / "checkpoints" / "2" / ckpt_lib.STEP_RECORD).read_text() == "{}"
