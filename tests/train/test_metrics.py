"""Run outputs: metrics.jsonl written as rounded JSON, cut back on resume and read up to a torn
line; TensorBoard events; the plot of experts per layer."""

import json

import numpy as np

from dynmoe_jax.train import metrics


def test_records_are_json_lines_with_arrays_as_rounded_lists(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, resume_step=0, tensorboard=False)
    written = writer.write({"step": 1, "split": "train", "loss": np.float32(2.5),
                            "experts_per_layer": np.asarray([1.25, 1.0 / 3.0])})  # fmt: skip
    writer.close()
    want = {"step": 1, "split": "train", "loss": 2.5, "experts_per_layer": [1.25, 0.333333]}
    assert written == want
    assert metrics.read_metrics(tmp_path) == [want]
    assert json.loads((tmp_path / metrics.METRICS_FILE).read_text()) == want


def test_resume_cuts_the_log_back_and_a_torn_line_ends_it(tmp_path):
    kept = [{"step": s, "split": "train", "loss": float(s)} for s in (2, 4, 6)]
    text = "".join(json.dumps(r) + "\n" for r in kept) + '{"step": 8, "spl'  # a crash mid-line
    (tmp_path / metrics.METRICS_FILE).write_text(text)
    assert metrics.read_metrics(tmp_path) == kept
    writer = metrics.MetricsWriter(tmp_path, resume_step=4, tensorboard=False)
    writer.write({"step": 6, "split": "train", "loss": 5.5})
    writer.close()
    assert metrics.read_metrics(tmp_path) == [*kept[:2], {"step": 6, "split": "train", "loss": 5.5}]
    assert metrics.read_metrics(tmp_path / "absent") == []


def test_tensorboard_events_and_the_plot_of_experts_per_layer(tmp_path):
    assert metrics.plot_experts_per_layer(tmp_path) is None  # nothing logged: no plot
    writer = metrics.MetricsWriter(tmp_path, resume_step=0)
    for step in (1, 2):
        writer.write({"step": step, "split": "train", "experts_per_layer": [1.5, 2.0]})
    writer.write({"step": 2, "split": "validation", "experts_per_layer": [1.4, 1.9]})
    writer.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    path = metrics.plot_experts_per_layer(tmp_path)
    assert path == tmp_path / metrics.PLOT_FILE and path.stat().st_size > 1000
    disabled = metrics.MetricsWriter(tmp_path / "other_process", resume_step=0, enabled=False)
    assert disabled.write({"step": 1, "loss": np.float32(1.0)}) == {"step": 1, "loss": 1.0}
    assert not (tmp_path / "other_process").exists()  # a non-lead process writes nothing


def test_a_writer_with_nothing_to_write_opens_no_tensorboard_file(tmp_path):
    metrics.MetricsWriter(tmp_path, resume_step=6).close()  # a rerun of a finished run
    assert not (tmp_path / "tensorboard").exists()
    writer = metrics.MetricsWriter(tmp_path, resume_step=6)
    writer.write({"step": 7, "split": "train", "loss": 1.0})
    writer.write({"step": 8, "split": "train", "loss": 0.5})
    writer.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
