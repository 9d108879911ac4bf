"""Checkpoints on disk: the space a save needs, a full disk recognised in every form it is
reported in, and the one line it ends a run with."""

import errno

import jax
import numpy as np
import pytest

from dynmoe_jax.train import checkpoint as ckpt_lib
from dynmoe_jax.train import storage


def _tree():
    rng = np.random.default_rng(4)
    return {"w": rng.standard_normal((16, 8)).astype(np.float32), "count": np.int32(7)}


def test_the_space_a_save_needs_is_the_newest_checkpoints_size(tmp_path):
    tree, folder = _tree(), tmp_path / "checkpoints"
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    arrays = sum(x.nbytes for x in jax.tree.leaves(tree))
    assert storage.space_needed(folder, ckpt.steps(), tree) == arrays  # before the first
    ckpt.save(1, tree)
    newest = storage.tree_bytes(folder / "1")
    assert newest > arrays and storage.space_needed(folder, ckpt.steps(), tree) == newest
    ckpt.close()
    assert storage.free_bytes(tmp_path / "no" / "such" / "folder") > 0
    assert storage.no_space_message(tmp_path, 3, 2_500_000, 1_000_000, None) == (
        f"no space left in {tmp_path} for the checkpoint of step 3 (about 2.5 MB needed, 1.0 MB "
        "free); free some space: no checkpoint is complete yet, so rerunning the same command "
        "starts over"
    )


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        # TensorStore's report of a full disk, as Orbax raises it
        ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database: Failed to '
                   "write 135325 bytes to file 20: No space left on device [os_error_code='28']"),
    ],
)  # fmt: skip
def test_a_full_disk_is_recognised_in_every_form_it_is_reported(error):
    assert storage.out_of_space(error)
    assert not storage.out_of_space(ValueError("OUT_OF_RANGE: os_error_code='2'"))
    assert not storage.out_of_space(OSError(errno.EACCES, "Permission denied"))
