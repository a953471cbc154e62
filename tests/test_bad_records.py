"""Malformed run files (issue 31, item 9 and the half-handled record cases): each is one
stderr line naming the file and the problem, never numpy's or the OS's traceback."""
import errno
import json

import numpy as np
import pytest

from ffcv_bias.analysis import make_synthetic_runs
from ffcv_bias.analysis.__main__ import main
from ffcv_bias.record import metrics, runs

VARY = "augment.min_scale"


def _records(root, **kwargs):
    return make_synthetic_runs(root, [1.0, 0.3], range(3), num_classes=4, n_per_class=10,
                               seed=1, with_logits=True, **kwargs)


def _analyse(capsys, root, out):
    code = main([str(root), "--vary", VARY, "--out", str(out), "--no-figures"])
    return code, capsys.readouterr()


@pytest.mark.parametrize("content, words", [
    (lambda labels: np.zeros((len(labels), 1), dtype=np.int16), "shape"),
    (lambda labels: b"\x93NUMPY garbage " + bytes(range(200)), "not a numpy array file"),
    (lambda labels: np.array([{"a": 1}] * len(labels), dtype=object), "not a numpy array file"),
])
def test_a_malformed_predictions_file_is_one_line(tmp_path, capsys, content, words):
    records = _records(tmp_path / "runs")
    target = records["run_dirs"][0] / runs.VAL_PREDS_FILE
    value = content(np.load(records["run_dirs"][0] / runs.VAL_LABELS_FILE))
    if isinstance(value, bytes):
        target.write_bytes(value)
    else:
        np.save(target, value, allow_pickle=True)
    code, captured = _analyse(capsys, tmp_path / "runs", tmp_path / "out")
    assert code == 2 and captured.err.count("\n") == 1, captured.err
    assert str(target) in captured.err and words in captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


def test_a_truncated_per_class_list_is_a_corrupt_record_not_mixed_datasets(tmp_path, capsys):
    records = _records(tmp_path / "runs")
    path = records["run_dirs"][1] / runs.SUMMARY_FILE
    summary = json.loads(path.read_text())
    summary["per_class_acc"] = summary["per_class_acc"][:2]
    path.write_text(json.dumps(summary))
    code, captured = _analyse(capsys, tmp_path / "runs", tmp_path / "out")
    assert code == 0, captured.err
    assert "mixed datasets" not in captured.out + captured.err
    assert "corrupt" in captured.out and "per_class_acc has 2 entries but num_classes is 4" \
        in captured.out


def test_an_absent_varied_key_names_the_section_of_the_run_that_lacks_it(tmp_path, capsys):
    records = _records(tmp_path / "runs")
    path = records["run_dirs"][0] / runs.CONFIG_FILE
    config = json.loads(path.read_text())
    del config["augment"]["min_scale"]
    path.write_text(json.dumps(config))
    code, captured = _analyse(capsys, tmp_path / "runs", tmp_path / "out")
    assert code == 2 and "absent from 1 of 6 run(s)" in captured.err
    section = captured.err.split("its augment section holds: ")[1]
    assert "min_scale" not in section


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """evaluate (and every run_lock user) on a read-only run: was an OSError traceback."""
    def read_only(path, mode="r", *args, **kwargs):
        if "a" in mode or "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(runs, "open", read_only, raising=False)
    with pytest.raises(runs.RunLockedError) as caught:
        with runs.run_lock(tmp_path):
            pass
    assert isinstance(caught.value, runs.RunDirNotWritableError)
    assert "cannot write into run" in str(caught.value) and "\n" not in str(caught.value)


def test_record_arrays_are_checked_for_shape_and_kind(tmp_path):
    path = tmp_path / "val_labels.npy"
    np.save(path, np.array([0.5, 1.5]))
    with pytest.raises(metrics.RecordFileError, match="float64 array of shape"):
        metrics.read_labels_file(path)
    np.save(path, np.array([0, 1, 1]))
    assert metrics.read_labels_file(path).tolist() == [0, 1, 1]
