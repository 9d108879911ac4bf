"""Run outputs: metrics.jsonl, TensorBoard events and the end-of-run experts-per-layer plot."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "experts_per_layer.png"


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash ends the readable log
    return records


def _to_json(value):
    if isinstance(value, np.ndarray) or hasattr(value, "tolist"):
        value = np.asarray(value).tolist()
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard.

    On resume from step N the log is first cut back to the records with step <= N, written to a
    temporary file and renamed over the old one, so a crash never leaves a half-rewritten log and
    a resumed run has no duplicated steps. The TensorBoard event file is opened at the first
    record, so a rerun of a finished run (nothing left to train) adds none.
    """

    def __init__(
        self, workdir: str | Path, resume_step: int, tensorboard: bool = True, enabled: bool = True
    ):
        self.enabled = enabled
        self.workdir = Path(workdir)
        if not enabled:  # a non-lead process of a multi-host run: nothing to write
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / METRICS_FILE
        kept = [r for r in read_metrics(self.workdir) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")
        self._tensorboard = tensorboard
        self._tb = None

    def write(self, record: Mapping) -> dict:
        record = {k: _to_json(v) for k, v in record.items()}
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard:
            self._write_tensorboard(record)
        return record

    def _open_tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        return self._tb

    def _write_tensorboard(self, record: dict) -> None:
        tb = self._open_tensorboard()
        step, split = record["step"], record.get("split", "train")
        for key, value in record.items():
            if key in ("step", "split"):
                continue
            if isinstance(value, (int, float)):
                tb.add_scalar(f"{split}/{key}", value, step)
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                for i, v in enumerate(value):
                    tb.add_scalar(f"{split}/{key}/{i}", v, step)
        tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_experts_per_layer(workdir: str | Path) -> Path | None:
    """Experts per token of every MoE layer over training (train and validation)."""
    records = [r for r in read_metrics(workdir) if r.get("experts_per_layer")]
    if not records:
        return None
    # A bare Figure renders with Agg without switching the process-wide backend (notebooks
    # keep showing their own plots).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for split, style in (("train", "-"), ("validation", "o--")):
        rows = [r for r in records if r.get("split") == split]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        per_layer = np.asarray([r["experts_per_layer"] for r in rows])
        for layer in range(per_layer.shape[1]):
            ax.plot(
                steps,
                per_layer[:, layer],
                style,
                color=f"C{layer}",
                label=f"{split} layer {layer}",
                ms=3,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("experts per token")
    ax.set_title("Experts activated per token, by MoE layer")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    path = Path(workdir) / PLOT_FILE
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
