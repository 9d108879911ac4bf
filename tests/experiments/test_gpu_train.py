"""experiments/gpu_train.sh's dry run: the plan, training and MFU pipeline on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_train_dry_run(tmp_path):
    """experiments/gpu_train.sh's pipeline on CPU at a tiny size (about 1-3 minutes)."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "gpu_train.json"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "WORKDIR": str(tmp_path / "w"),
           "PYTHONPATH": str(root)}  # fmt: skip
    proc = subprocess.run(["bash", "experiments/gpu_train.sh", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    tokens_per_step = 4 * 64
    assert result["tokens_per_step"] == tokens_per_step
    achieved = result["tokens_per_sec"] / tokens_per_step * result["plan"]["flops_per_step"]
    assert result["mfu"] == pytest.approx(achieved / 1e12)
    model_work = result["tokens_per_sec"] / tokens_per_step * result["analytic_flops_per_step"]
    assert result["mfu_analytic"] == pytest.approx(model_work / 1e12)
    # The paper shape scans its layers: cost analysis would count the loop body once, so the
    # plan takes the analytic count.
    assert result["plan"]["flops_source"].startswith("analytic")
    assert result["plan"]["flops_per_step"] == pytest.approx(result["analytic_flops_per_step"])
    assert proc.stdout.strip().splitlines()[-1].startswith("cpu: ")
