"""Extra test protocols: the trainer's files and summary entry, and `python -m
ffcv_bias.evaluate` giving a finished run the same files without retraining."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ffcv_bias.record import runs
from ffcv_bias.record.protocols import (ProtocolError, logits_file, parse_protocols,
                                        preds_file)
from ffcv_bias.common.errors import EXIT_OK
from ffcv_bias.common.errors import EXIT_USAGE as EXIT_CONFIG
from ffcv_bias.train.config import resolve_config
from tests.test_train import REPO, THREADS_ENV, run_dir_of, train_args, train_in_process

EXTRA = "28@1.0,36@0.875"   # the main protocol again, and another one


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    for name, value in THREADS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def two_runs(tiny_fashion_betons, tmp_path_factory):
    """The same 2-epoch run twice: once with EXTRA protocols, once without."""
    os.environ.update(THREADS_ENV)
    with_args = train_args(tiny_fashion_betons, tmp_path_factory.mktemp("with"),
                           f"--validation.protocols={EXTRA}")
    without_args = train_args(tiny_fashion_betons, tmp_path_factory.mktemp("without"))
    assert train_in_process(with_args) == EXIT_OK
    assert train_in_process(without_args) == EXIT_OK
    return run_dir_of(with_args), run_dir_of(without_args)


def test_protocol_syntax_is_read_alike_from_a_string_and_a_list():
    assert [p.name for p in parse_protocols("32@1.0, 40@1,32@0.875,32@1.0")] == \
        ["32@1.0", "40@1.0", "32@0.875"]
    assert parse_protocols(["40@1.0", "32@0.875"]) == parse_protocols("40@1.0,32@0.875")
    assert parse_protocols("") == ()
    for bad in ("40", "40@", "x@1.0", "40@1.5", "0@1.0", "40@0"):
        with pytest.raises(ProtocolError):
            parse_protocols(bad)


def test_extra_protocols_do_not_change_the_run_id(tiny_fashion_betons, tmp_path):
    plain = resolve_config(train_args(tiny_fashion_betons, tmp_path))
    extra = resolve_config(train_args(tiny_fashion_betons, tmp_path,
                                      f"--validation.protocols={EXTRA}"))
    assert extra["validation"]["protocols"] == EXTRA
    assert runs.run_id(plain) == runs.run_id(extra)


def test_a_bad_protocol_is_refused_in_one_line(tiny_fashion_betons, tmp_path):
    args = train_args(tiny_fashion_betons, tmp_path, "--validation.protocols=40x1.0")
    result = subprocess.run([sys.executable, str(REPO / "train_imagenet.py"), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip().startswith("error: bad value for 'validation.protocols'")
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_extra_protocols_write_their_files_and_summary_entry(two_runs):
    run_dir, _ = two_runs
    summary = json.loads((run_dir / runs.SUMMARY_FILE).read_text())
    labels = np.load(run_dir / runs.VAL_LABELS_FILE)
    assert sorted(summary["protocols"]) == sorted(EXTRA.split(","))
    for name, entry in summary["protocols"].items():
        logits = np.load(run_dir / logits_file(name))
        preds = np.load(run_dir / preds_file(name))
        assert logits.dtype == np.float16 and logits.shape == (len(labels), 10)
        assert preds.dtype == np.int16 and preds.shape == (len(labels),)
        assert entry["top1"] == pytest.approx(float((preds == labels).mean()))
        per_class = [float((preds[labels == c] == c).mean()) for c in range(10)]
        assert entry["per_class_acc"] == pytest.approx(per_class)
        assert entry["n_val"] == len(labels) and entry["logits_file"] == logits_file(name)
    # The main protocol repeated as an extra one gives the main logits exactly, and the
    # main files stay as they were.
    assert np.array_equal(np.load(run_dir / logits_file("28@1.0")),
                          np.load(run_dir / runs.VAL_LOGITS_FILE))
    assert summary["protocols"]["36@0.875"]["resolution"] == 36


def test_a_finished_run_gains_a_protocol_without_retraining(two_runs):
    with_dir, run_dir = two_runs
    untouched = {name: (run_dir / name).stat().st_mtime_ns
                 for name in (runs.WEIGHTS_FILE, runs.CHECKPOINT_FILE, runs.VAL_LOGITS_FILE,
                              runs.LOG_FILE)}
    before = json.loads((run_dir / runs.SUMMARY_FILE).read_text())
    assert "protocols" not in before
    from ffcv_bias.evaluate import main as evaluate_main
    assert evaluate_main([str(run_dir), "--protocols", "36@0.875"]) == 0
    after = json.loads((run_dir / runs.SUMMARY_FILE).read_text())
    assert {k: v for k, v in after.items() if k != "protocols"} == before
    assert {name: (run_dir / name).stat().st_mtime_ns for name in untouched} == untouched
    # weights.pt evaluated later = the trainer's own evaluation of its final model.
    assert np.array_equal(np.load(run_dir / logits_file("36@0.875")),
                          np.load(with_dir / logits_file("36@0.875")))
    trained = json.loads((with_dir / runs.SUMMARY_FILE).read_text())
    assert after["protocols"]["36@0.875"] == trained["protocols"]["36@0.875"]
    # A second call has nothing to do; a second protocol adds to the entry.
    assert evaluate_main([str(run_dir), "--protocols", "36@0.875"]) == 0
    assert evaluate_main([str(run_dir), "--protocols", "24@1.0"]) == 0
    final = json.loads((run_dir / runs.SUMMARY_FILE).read_text())
    assert sorted(final["protocols"]) == ["24@1.0", "36@0.875"]


def test_a_complete_run_asked_for_new_protocols_names_the_command(two_runs, capsys):
    _, run_dir = two_runs
    config = json.loads((run_dir / runs.CONFIG_FILE).read_text())
    betons = config["data"]["train_dataset"], config["data"]["val_dataset"]
    args = train_args(betons, run_dir.parent, "--validation.protocols=44@1.0")
    capsys.readouterr()
    assert train_in_process(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "already complete" in out
    assert f"python -m ffcv_bias.evaluate {run_dir} --protocols 44@1.0" in out


def test_evaluate_refuses_an_unfinished_run_and_a_bad_protocol(tmp_path, capsys):
    from ffcv_bias.evaluate import main as evaluate_main
    (tmp_path / runs.CONFIG_FILE).write_text("{}")
    assert evaluate_main([str(tmp_path), "--protocols", "32@1.0"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} is not finished")
    assert evaluate_main([str(tmp_path), "--protocols", "32@2.0"]) == 2
    assert "crop ratio" in capsys.readouterr().err
