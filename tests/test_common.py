"""ffcv_bias.common and ffcv_bias.record: the plumbing the trainer and the studies share."""
import os
import platform
import subprocess

import pytest

from ffcv_bias.common import env, errors, plots, tables


def test_usable_cpus_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert env.usable_cpu_count() == 3
    monkeypatch.delattr(os, "sched_getaffinity")  # not Linux
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert env.usable_cpu_count() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one CPU, never zero
    assert env.usable_cpu_count() == 1


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode,
                    reason="no git")
def test_git_commit_says_when_tracked_files_changed(tmp_path):
    assert env.git_commit(tmp_path) == (None, None)   # not a repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert env.git_commit(tmp_path) == (head, False)
    (tmp_path / "untracked.txt").write_text("not part of the code")
    assert env.git_commit(tmp_path) == (head, False)
    (tmp_path / "code.py").write_text("x = 2\n")
    assert env.git_commit(tmp_path) == (head, True)


def test_package_versions_come_from_metadata():
    versions = env.package_versions(("numpy", "no-such-package-here"))
    import numpy
    assert versions == {"python": platform.python_version(), "numpy": numpy.__version__,
                        "no-such-package-here": None}
    assert set(env.package_versions()) == {"python", *env.RECORDED_PACKAGES}


def test_cpu_description_never_empty():
    assert env.cpu_model().strip()
    assert isinstance(env.cpu_flags(), set)


# --------------------------------------------------------------------------------------
# errors: one family, one CLI wrapper
# --------------------------------------------------------------------------------------

class RunFailed(errors.UserError):
    exit_code = errors.EXIT_FAILURE


@errors.main_guard(KeyError, failures=(TimeoutError,))
def toy_main(argv=None):
    kind = argv[0]
    if kind == "usage":
        raise errors.UserError("--x: must be positive, not -1")
    if kind == "failed":
        raise RunFailed("run abc failed:\nsecond line of a traceback-free message")
    if kind == "foreign":
        raise KeyError("no-such-key")
    if kind == "timeout":
        raise TimeoutError("waited 10 s")
    if kind == "bug":
        raise ZeroDivisionError("a bug keeps its traceback")
    return 7


@pytest.mark.parametrize("kind, code, line", [
    ("usage", 2, "error: --x: must be positive, not -1"),
    ("failed", 1, "error: run abc failed:"),
    ("foreign", 2, "error: 'no-such-key'"),
    ("timeout", 1, "error: waited 10 s"),
])
def test_main_guard_prints_one_error_line_and_exits_with_the_class_code(kind, code, line,
                                                                        capsys):
    assert toy_main([kind]) == code
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[0] == line and "Traceback" not in err


def test_main_guard_passes_results_and_bugs_through():
    assert toy_main(["ok"]) == 7
    assert toy_main.__name__ == "toy_main"
    with pytest.raises(ZeroDivisionError):
        toy_main(["bug"])


def test_the_project_errors_are_one_family():
    from ffcv_bias.train.fastargs_strict import ConfigError
    from ffcv_bias.evaluate import EvaluateError
    from ffcv_bias.studies.class_bounds import BoundsError
    from ffcv_bias.studies.diet.common import DietError, TrainingFailed
    from ffcv_bias.studies.preservation.cli import StudyError
    from ffcv_bias.sweep.spec import SweepError
    usage = (ConfigError, BoundsError, DietError, StudyError, SweepError)
    assert all(issubclass(cls, errors.UserError) and cls.exit_code == errors.EXIT_USAGE
               for cls in usage)
    assert TrainingFailed.exit_code == EvaluateError.exit_code == errors.EXIT_FAILURE
    # Callers that caught the old bases still catch them.
    assert issubclass(ConfigError, ValueError) and issubclass(EvaluateError, RuntimeError)


# --------------------------------------------------------------------------------------
# plots and tables
# --------------------------------------------------------------------------------------

def test_write_csv_is_atomic_and_keeps_the_float_format(tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"class": [0, 1], "acc": [1 / 3, 2 / 3]})
    tables.write_csv(frame, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines() == [
        "class,acc", f"0,{1 / 3!r}", f"1,{2 / 3!r}"]
    tables.write_csv(frame, tmp_path / "t.csv", float_format="%.3f")
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "0,0.333"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no temporary left


def test_save_png_writes_a_png_and_closes_the_figure(tmp_path):
    plt = plots.pyplot()
    import matplotlib
    assert matplotlib.get_backend().lower() == "agg"
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    plots.save_png(figure, tmp_path / "f.png", dpi=50, bbox_inches="tight")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(figure.number)


# --------------------------------------------------------------------------------------
# record: one writer for the trainer's and the probe's records
# --------------------------------------------------------------------------------------

def test_record_writer_writes_every_file_and_scores_what_it_wrote(tmp_path):
    import numpy as np
    import torch
    from ffcv_bias import record
    from ffcv_bias.record import runs
    logits = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4],
                       [1.0, 1.0, 0.0]], dtype=np.float32)   # the last row: a tie, class 0
    labels = np.array([2, 0, 1, 0], dtype=np.int64)
    weight = torch.arange(6.0).reshape(2, 3).t()             # not contiguous
    record.write_config(tmp_path, {"model": {"arch": "resnet8"}, "meta": {"run_id": "x"}})
    record.write_log(tmp_path, [{"epoch": 0, "lr": 0.1}, {"epoch": 1, "lr": 0.0}])
    final = record.write_final(tmp_path, {"fc.weight": weight}, logits, labels, num_classes=3)
    assert not runs.is_complete(tmp_path)                    # no summary yet
    assert final.accuracy == {"top1": 0.75, "per_class_acc": [1.0, 0.0, 1.0], "top5": 1.0}
    assert final.logits.dtype == np.float16 and final.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(np.load(tmp_path / runs.VAL_PREDS_FILE), [2, 0, 2, 0])
    saved = torch.load(tmp_path / runs.WEIGHTS_FILE, weights_only=True)["fc.weight"]
    assert torch.equal(saved, weight) and saved.is_contiguous()
    assert runs.read_json(tmp_path / runs.CONFIG_FILE)["meta"] == {"run_id": "x"}
    assert [line for line in (tmp_path / runs.LOG_FILE).read_text().splitlines()] == [
        '{"epoch": 0, "lr": 0.1}', '{"epoch": 1, "lr": 0.0}']
    record.write_summary(tmp_path, {"run_id": "x", **final.accuracy})
    assert runs.is_complete(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
