"""Metric writer (JSONL + TensorBoard), progress line and the final report."""

import glob
import json
import math
import os
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from t2s_jax import reporting


def _write_run(workdir):
    with reporting.MetricWriter(str(workdir), enabled=True) as writer:
        for step in range(0, 101, 10):
            losses = {"train/loss_src": 2.0 / (1 + step), "train/loss_mix": np.float32(1.0 - step / 200)}
            writer.write_scalars(step, {**losses, "train/lr": 6e-5})
        writer.write_scalars(50, {"eval/miou": 0.41, "eval/miou16": 0.45})
        writer.write_scalars(100, {"eval/miou": 0.37, "eval/miou16": 0.39, "train/quality": math.nan})


def test_jsonl_round_trip(tmp_path):
    _write_run(tmp_path)
    lines = (tmp_path / reporting.METRICS_FILE).read_text().splitlines()
    assert len(lines) == 13
    first = json.loads(lines[0])
    assert first["step"] == 0 and first["train/loss_src"] == 2.0 and first["train/lr"] == 6e-5
    assert json.loads(lines[-1])["train/quality"] is None  # nan is written as null (strict JSON)

    series = reporting.read_metrics(str(tmp_path))
    steps, values = series["train/loss_mix"]
    np.testing.assert_array_equal(steps, np.arange(0, 101, 10))
    np.testing.assert_allclose(values, 1.0 - steps / 200, rtol=1e-6)
    np.testing.assert_array_equal(series["eval/miou"][0], [50, 100])
    np.testing.assert_allclose(series["eval/miou"][1], [0.41, 0.37])
    assert np.isnan(series["train/quality"][1][0])


def test_a_resumed_run_appends_and_its_later_values_win(tmp_path):
    _write_run(tmp_path)
    with reporting.MetricWriter(str(tmp_path)) as writer:  # resumed from step 90
        writer.write_scalars(100, {"train/loss_src": 0.5})
    steps, values = reporting.read_metrics(str(tmp_path))["train/loss_src"]
    assert steps[-1] == 100 and values[-1] == 0.5 and len(steps) == 11


def _read_events(path):
    """TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc."""
    data, events, offset = open(path, "rb").read(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
        offset += 12 + length + 4
    return events


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    _write_run(tmp_path)
    (event_file,) = glob.glob(str(tmp_path / reporting.TENSORBOARD_DIR / "events.out.tfevents.*"))
    mious = [(event.step, value.simple_value) for event in _read_events(event_file)
             for value in event.summary.value if value.tag == "eval/miou"]  # fmt: skip
    assert [step for step, _ in mious] == [50, 100]
    assert mious[0][1] == pytest.approx(0.41)


def test_disabled_writer_writes_nothing(tmp_path):
    writer = reporting.MetricWriter(str(tmp_path / "run"), enabled=False)
    writer.write_scalars(1, {"train/loss": 1.0})
    writer.close()
    assert not os.path.exists(tmp_path / "run")


def test_reserved_names_are_rejected(tmp_path):
    with reporting.MetricWriter(str(tmp_path)) as writer, pytest.raises(ValueError, match="'step'"):
        writer.write_scalars(1, {"step": 3})


def test_read_metrics_names_the_bad_line(tmp_path):
    (tmp_path / reporting.METRICS_FILE).write_text('{"step": 1, "a": 2}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        reporting.read_metrics(str(tmp_path))


def test_progress_line():
    line = reporting.format_progress(1000, 41000, 2.0, {"loss_src": 0.123456, "lr": 6e-5})
    assert line == "step 1000/41000 (2.4%) | 2.00 steps/s | ETA 5:33:20 | loss_src 0.1235 lr 6e-05"
    assert "? steps/s | ETA ?" in reporting.format_progress(0, 10, math.nan, {})


def test_final_report_holds_the_numbers_and_a_plot(tmp_path):
    _write_run(tmp_path)
    report_path, plot_path = reporting.write_final_report(str(tmp_path), config_summary={"method": "daformer"})
    report = open(report_path).read()
    assert "| final | 100 | 37.00 | 39.00 |" in report
    assert "| best | 50 | 41.00 | 45.00 |" in report
    assert "| train/loss_src | 100 | 0.0198 |" in report  # 2 / 101
    assert "| train/loss_mix | 100 | 0.5 |" in report
    assert "train/lr" not in report.split("## Last losses")[1].split("## Config")[0]
    assert "last step logged: 100" in report and "method: daformer" in report
    with Image.open(plot_path) as plot:
        assert plot.format == "PNG" and plot.size[0] > 500


def test_final_report_without_evaluation(tmp_path):
    with reporting.MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"train/loss": 1.5})
    report_path, plot_path = reporting.write_final_report(str(tmp_path))
    assert "No `eval/miou` logged." in open(report_path).read()
    assert os.path.getsize(plot_path) > 0


def test_a_report_that_cannot_be_written_leaves_no_part(tmp_path, monkeypatch):
    _write_run(tmp_path)
    reporting.write_final_report(str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in (reporting.REPORT_FILE, reporting.PLOT_FILE)}

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reporting, "_plot", full_disk)
    with pytest.raises(OSError, match="No space left"):
        reporting.write_final_report(str(tmp_path), status="again")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the old report, whole
    assert not glob.glob(str(tmp_path / "*.tmp"))
