"""Faults: kills at every instant, preemption, a full disk, two launchers at once (issue #9).

The claim under test is "nothing finished is ever lost": whenever a run dies, every file a
reader can see in its directory is whole, a restart finishes it, and the result is bit for
bit the uninterrupted one.

How the trainers run. A fresh trainer process spends seconds importing ffcv and torch
before its first step, and these tests start some 30 of them. So they start from
conftest's warm python (tests/warm_python.py: a server that imported the trainer and
trained one tiny run forks one child per start). A child is a separate process: it is
SIGKILLed, SIGTERMed or limited like any trainer (signals go to its own pid), and what it
leaves on disk is what a real one would leave. Every result is compared with the reference, another child's
uninterrupted run, so a restart must reproduce another process's result bit for bit.

Where in a run a kill lands: ffcv_bias/record/faults.py's named crash points (inside every atomic
write, between training steps, after an epoch's log line) for the exact instants, plus
kills from outside at seeded random moments.

The sweep tests use test_sweep's stand-in trainer (real config, run_id, lock and exit
codes; an "epoch" is a sleep) and the real launcher.
"""
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcv_bias.record import faults, runs
from ffcv_bias.sweep import slurm
from ffcv_bias.sweep.runner import TRAIN_LOG_FILE
from ffcv_bias.sweep.spec import load_sweep, plan
from ffcv_bias.sweep.status import run_state
from ffcv_bias.common.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED
from ffcv_bias.train.config import resolve_config
from conftest import FASHION_DIR
from fixtures_datasets import make_fashion_dir
from warm_python import PID_FILE_ENV_VAR
from test_sweep import (PYTHON, REPO, epochs_logged, launch_starts, read_lines, sweep_cli,
                        write_sweep)
from test_sweep import fake_setup  # noqa: F401 (a fixture: the stand-in trainer's files)
from test_train import THREADS_ENV, read_log, run_dir_of, train_args

# Every test here kills or starves real trainer and launcher processes.
pytestmark = pytest.mark.e2e

EPOCHS = 3
TRAIN_IMAGES, VAL_IMAGES, CLASSES = 600, 200, 10  # conftest's tiny_fashion_betons
# The runs here train on a quarter of the training images (6 steps of 25 per epoch) and
# validate once, at the end: some 30 trainer starts then fit the time budget.
KEPT_TRAIN_IMAGES, BATCH = 150, 25


def wait_for(condition, process, timeout=300):
    """Poll `condition` until true; fail if `process` (a Popen or a Child) ends first."""
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited early: {process.communicate()}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------
# Trainers started from the warm python
# ----------------------------------------------------------------------------------------

TRAIN_SCRIPT = REPO / "train_imagenet.py"
WRITE_DATASETS_SCRIPT = REPO / "write_datasets.py"
PID_TIMEOUT_S = 120


class WarmTrainers:
    """Starts `python SCRIPT ARGS` from conftest's warm python, each with its output in a
    file of `workdir`; `crash_at` arms a faults crash point, `fsize_limit` sets
    RLIMIT_FSIZE (the warm child takes the caller's limits)."""

    def __init__(self, warm_python, workdir):
        self.python = warm_python
        self.workdir = Path(workdir)
        self.started = 0

    def start(self, argv, crash_at=None, fsize_limit=None, script=TRAIN_SCRIPT, code=None):
        """A Child running `script` with `argv`, or `python -c code argv...`."""
        self.started += 1
        output = self.workdir / f"child-{self.started}.log"
        pid_file = self.workdir / f"child-{self.started}.pid"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **THREADS_ENV)
        env[PID_FILE_ENV_VAR] = str(pid_file)
        env.pop(faults.ENV_VAR, None)
        if crash_at:
            env[faults.ENV_VAR] = crash_at
        limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
                 ) if fsize_limit else None
        program = ["-c", code] if code is not None else [str(script)]
        with open(output, "w") as out:
            process = subprocess.Popen([*self.python, *program, *argv], cwd=REPO, env=env,
                                       stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit)
        return Child(process, pid_file, output)

    def run(self, argv, **kwargs):
        """(exit code, output) of a child run to its end."""
        child = self.start(argv, **kwargs)
        return child.wait(), child.output()


@dataclass
class Child:
    """A trainer from the warm python: `process` is its client (exit code, forwarded
    SIGTERM); signals go to the trainer itself, the process that writes the run's files."""
    process: subprocess.Popen
    pid_file: Path
    output_path: Path

    @property
    def pid(self):
        deadline = time.time() + PID_TIMEOUT_S
        while not self.pid_file.is_file() or not self.pid_file.read_text().endswith("\n"):
            if self.process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the trainer never started:\n{self.output()}")
            time.sleep(0.01)
        return int(self.pid_file.read_text())

    def wait(self):
        return self.process.wait()

    def signal(self, signum):
        os.kill(self.pid, signum)

    def poll(self):
        """None while the child runs (wait_for's interface), else its exit code."""
        return self.process.poll()

    def communicate(self):
        return self.output(), ""

    def output(self):
        return self.output_path.read_text() if self.output_path.is_file() else ""

    def printed(self, text):
        return text in self.output()


@dataclass
class Reference:
    args: list
    run_dir: Path
    warm_epoch_seconds: float

    def args_in(self, folder):
        """The same run (same run_id) in another folder."""
        return self.args + [f"--logging.folder={folder}"]


@pytest.fixture(scope="module")
def trainers(warm_python, tmp_path_factory):
    return WarmTrainers(warm_python, tmp_path_factory.mktemp("trainers"))


@pytest.fixture(scope="module")
def reference(trainers, tiny_fashion_betons):
    """The uninterrupted 3-epoch run."""
    keep = trainers.workdir / "keep.npy"
    np.save(keep, np.arange(0, TRAIN_IMAGES, TRAIN_IMAGES // KEPT_TRAIN_IMAGES))
    args = train_args(tiny_fashion_betons, trainers.workdir / "reference",
                      f"--training.epochs={EPOCHS}", f"--training.batch_size={BATCH}",
                      f"--data.keep_indices={keep}",
                      f"--data.sparsity={1 - KEPT_TRAIN_IMAGES / TRAIN_IMAGES}",
                      "--logging.log_level=0")
    code, output = trainers.run(args)
    assert code == EXIT_OK, output[-3000:]
    run_dir = run_dir_of(args)
    # The first epoch includes compiling; the later ones are what a resumed run takes.
    warm = max(entry["epoch_seconds"] for entry in read_log(run_dir)[1:])
    return Reference(args, run_dir, warm)


# ----------------------------------------------------------------------------------------
# What a reader finds in a run directory
# ----------------------------------------------------------------------------------------

READERS = {
    runs.CONFIG_FILE: runs.read_json,
    runs.LOG_FILE: lambda path: read_log(path.parent),
    runs.CHECKPOINT_FILE: lambda path: torch.load(path, weights_only=True),
    runs.WEIGHTS_FILE: lambda path: torch.load(path, weights_only=True),
    runs.VAL_LOGITS_FILE: np.load,
    runs.VAL_PREDS_FILE: np.load,
    runs.VAL_LABELS_FILE: np.load,
    runs.SUMMARY_FILE: runs.read_json,
    runs.ERROR_FILE: lambda path: path.read_text(),
}
FINAL_FILES = (runs.WEIGHTS_FILE, runs.VAL_LOGITS_FILE, runs.VAL_PREDS_FILE,
               runs.VAL_LABELS_FILE, runs.SUMMARY_FILE)


@dataclass
class Seen:
    """A run directory as a reader sees it, every file read whole."""
    files: set             # visible names (not starting with '.')
    temporaries: list      # the record files whose temporary ('.<name>.*.tmp') is there
    checkpoint_epoch: int  # None without checkpoint.pt
    logged_epochs: list


def read_run_dir(run_dir):
    """Read every file of the record present; fail on anything half-written or unknown."""
    names = sorted(path.name for path in run_dir.iterdir())
    visible = {name for name in names if not name.startswith(".")}
    assert visible <= set(READERS), f"unexpected files: {visible - set(READERS)}"
    content = {name: READERS[name](run_dir / name) for name in visible}  # raises if cut
    hidden = set(names) - visible - {runs.LOCK_FILE}
    temporaries = sorted(record for name in hidden for record in READERS
                         if name.startswith(f".{record}.") and name.endswith(".tmp"))
    assert len(temporaries) == len(hidden), f"unexpected hidden files: {hidden}"
    if runs.CONFIG_FILE in content:
        assert content[runs.CONFIG_FILE]["meta"]["run_id"] == run_dir.name
    logged = [entry["epoch"] for entry in content.get(runs.LOG_FILE, [])]
    checkpoint = content.get(runs.CHECKPOINT_FILE)
    if checkpoint is not None:
        assert checkpoint["run_id"] == run_dir.name
        assert set(checkpoint) >= {"model", "optimizer", "rng", "epoch"}
    if runs.WEIGHTS_FILE in content:
        assert content[runs.WEIGHTS_FILE] and all(
            isinstance(tensor, torch.Tensor) for tensor in content[runs.WEIGHTS_FILE].values())
    if runs.VAL_LOGITS_FILE in content:
        logits = content[runs.VAL_LOGITS_FILE]
        assert logits.shape == (VAL_IMAGES, CLASSES) and logits.dtype == np.float16
    if runs.VAL_PREDS_FILE in content:
        predictions = content[runs.VAL_PREDS_FILE]
        assert predictions.shape == (VAL_IMAGES,) and predictions.dtype == np.int16
    if runs.VAL_LABELS_FILE in content:
        labels = content[runs.VAL_LABELS_FILE]
        assert labels.shape == (VAL_IMAGES,) and labels.dtype == np.int64
    if runs.SUMMARY_FILE in content:
        assert content[runs.SUMMARY_FILE]["run_id"] == run_dir.name
    assert runs.is_complete(run_dir) == (runs.SUMMARY_FILE in visible)
    return Seen(visible, temporaries, None if checkpoint is None else checkpoint["epoch"],
                logged)


def assert_consistent_after_a_kill(seen):
    """What must hold wherever the kill landed: the log runs from epoch 0 without gaps or
    repeats and is at most one epoch ahead of the checkpoint; the record files come in
    their order, summary.json last."""
    assert seen.logged_epochs == list(range(len(seen.logged_epochs)))
    saved = seen.checkpoint_epoch or 0
    assert saved <= len(seen.logged_epochs) <= saved + 1
    present = [name in seen.files for name in FINAL_FILES]
    assert present == sorted(present, reverse=True), f"record written out of order: {seen.files}"
    assert not any(present) or seen.checkpoint_epoch == EPOCHS
    assert runs.SUMMARY_FILE not in seen.files


def assert_same_result_as(reference, run_dir):
    """Bit-identical logits, the same log numbers (timings aside) and the same summary."""
    assert (run_dir / runs.VAL_LOGITS_FILE).read_bytes() == \
        (reference.run_dir / runs.VAL_LOGITS_FILE).read_bytes()
    timing = {"epoch_seconds", "images_per_second"}
    strip = lambda log: [{k: v for k, v in entry.items() if k not in timing} for entry in log]
    assert strip(read_log(run_dir)) == strip(read_log(reference.run_dir))
    summary, expected = (runs.read_json(path / runs.SUMMARY_FILE)
                         for path in (run_dir, reference.run_dir))
    summary.pop("train_seconds"), expected.pop("train_seconds")
    assert summary == expected


# ----------------------------------------------------------------------------------------
# SIGKILL at every instant of a run
# ----------------------------------------------------------------------------------------

# (crash point, then what a reader must find: the checkpoint's epoch, the epochs in
# log.jsonl, the final record files, the file whose temporary the kill left).
# Each row restarts the run the previous row killed; the counts (":N") are per process.
CHAIN = [
    ("train-step:5", None, 0, (), None),                            # epoch 1, mid-way
    ("atomic-partial/checkpoint.pt:1", None, 1, (), runs.CHECKPOINT_FILE),
    ("atomic-renamed/checkpoint.pt:1", 1, 1, (), None),             # restarted from scratch
    ("train-step:3", 1, 1, (), None),                               # epoch 2, resumed
    ("epoch-logged:1", 1, 2, (), None),                             # log ahead of checkpoint
    ("atomic-partial/log.jsonl:2", 1, 1, (), runs.LOG_FILE),        # pass 1: the cut-back
    ("atomic-partial/checkpoint.pt:1", 1, 2, (), runs.CHECKPOINT_FILE),  # epoch 1's stays
    ("atomic-unrenamed/checkpoint.pt:1", 1, 2, (), runs.CHECKPOINT_FILE),
    ("atomic-renamed/checkpoint.pt:1", 2, 2, (), None),
    ("atomic-renamed/checkpoint.pt:1", 3, 3, (), None),             # trained, no record yet
    ("atomic-partial/weights.pt:1", 3, 3, (), runs.WEIGHTS_FILE),
    ("atomic-renamed/weights.pt:1", 3, 3, FINAL_FILES[:1], None),
    ("atomic-renamed/val_logits.npy:1", 3, 3, FINAL_FILES[:2], None),
    ("atomic-renamed/val_preds.npy:1", 3, 3, FINAL_FILES[:3], None),
    ("atomic-renamed/val_labels.npy:1", 3, 3, FINAL_FILES[:4], None),
    ("atomic-partial/summary.json:1", 3, 3, FINAL_FILES[:4], runs.SUMMARY_FILE),
    ("atomic-unrenamed/summary.json:1", 3, 3, FINAL_FILES[:4], runs.SUMMARY_FILE),
]


def test_sigkill_at_each_crash_point_loses_nothing(trainers, reference, tmp_path):
    """17 kills in a row, one at each instant of CHAIN; after each, every file present is
    whole and says what it should; the last restart gives the uninterrupted result."""
    args = reference.args_in(tmp_path)
    run_dir = tmp_path / reference.run_dir.name
    for crash_at, checkpoint_epoch, logged, final_files, temporary in CHAIN:
        code, output = trainers.run(args, crash_at=crash_at)
        assert code == -signal.SIGKILL, f"{crash_at}: not reached (exit {code})\n{output}"
        seen = read_run_dir(run_dir)
        assert (seen.checkpoint_epoch, seen.logged_epochs) == (
            checkpoint_epoch, list(range(logged))), crash_at
        assert seen.files == {runs.CONFIG_FILE} | ({runs.LOG_FILE} if logged else set()) | (
            {runs.CHECKPOINT_FILE} if checkpoint_epoch else set()) | set(final_files), crash_at
        # Only this kill's temporary: the restart removed the previous one.
        assert seen.temporaries == ([temporary] if temporary else []), crash_at
        assert_consistent_after_a_kill(seen)

    code, output = trainers.run(args)
    assert code == EXIT_OK, output
    seen = read_run_dir(run_dir)
    assert seen.temporaries == [] and seen.files == set(READERS) - {runs.ERROR_FILE}
    assert_same_result_as(reference, run_dir)


def test_sigkill_mid_epoch_and_at_random_moments_then_restart_gives_the_same_logits(
        trainers, reference, tmp_path):
    """Kills from outside: once in epoch 2 (checkpoint.pt has just appeared), then twice at
    a seeded random time after a restart resumed; the last restart gives the uninterrupted
    result."""
    args = reference.args_in(tmp_path)
    run_dir = tmp_path / reference.run_dir.name
    child = trainers.start(args)
    # checkpoint.pt appears once epoch 1 of 3 is done: the run is then in epoch 2.
    wait_for(lambda: (run_dir / runs.CHECKPOINT_FILE).exists(), child)
    child.signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not runs.is_complete(run_dir), "the run ended before it could be killed"
    assert read_run_dir(run_dir).checkpoint_epoch == 1

    rng = random.Random(9)
    for _ in range(2):
        child = trainers.start(args)
        # Once it has resumed, a restart has at least one epoch and the validation (with
        # its pipeline compile) left: a kill within 1.5 epochs' time lands before the end.
        wait_for(lambda: child.printed(f"resuming {run_dir.name} after epoch "), child)
        time.sleep(rng.uniform(0.0, 1.5) * reference.warm_epoch_seconds)
        child.signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL, "the run finished before the kill"
        seen = read_run_dir(run_dir)
        assert_consistent_after_a_kill(seen)
        assert seen.checkpoint_epoch in (1, 2)

    code, output = trainers.run(args)
    assert code == EXIT_OK, output
    assert "resuming" in output
    assert read_run_dir(run_dir).temporaries == []
    assert_same_result_as(reference, run_dir)


def test_crash_point_spec_is_checked():
    from ffcv_bias.record import faults
    assert faults.parse("atomic-renamed/checkpoint.pt:2") == ("atomic-renamed/checkpoint.pt", 2)
    for bad in ("train-step", "train-step:0", ":3", "train-step:x"):
        with pytest.raises(faults.CrashSpecError, match="expected 'point:N'"):
            faults.parse(bad)


# ----------------------------------------------------------------------------------------
# SIGTERM (SLURM preemption) and the run lock
# ----------------------------------------------------------------------------------------

def test_sigterm_stops_after_a_step_and_the_rerun_resumes(trainers, reference, tmp_path):
    args = reference.args_in(tmp_path)
    run_dir = tmp_path / reference.run_dir.name
    child = trainers.start(args)
    wait_for(lambda: (run_dir / runs.CHECKPOINT_FILE).exists(), child)
    child.signal(signal.SIGTERM)
    assert child.wait() == EXIT_PREEMPTED
    assert child.output().strip().splitlines()[-1] == \
        f"stopped by SIGTERM; resume from {run_dir / runs.CHECKPOINT_FILE}"
    assert not runs.is_complete(run_dir) and not (run_dir / runs.ERROR_FILE).exists()
    seen = read_run_dir(run_dir)
    assert seen.checkpoint_epoch in (1, 2) and seen.temporaries == []
    assert seen.logged_epochs[:seen.checkpoint_epoch] == list(range(seen.checkpoint_epoch))

    code, output = trainers.run(args)
    assert code == EXIT_OK, output
    assert f"resuming {run_dir.name} after epoch {seen.checkpoint_epoch}" in output
    assert_same_result_as(reference, run_dir)


def test_a_second_trainer_on_the_same_run_is_refused(trainers, reference, tmp_path):
    args = reference.args_in(tmp_path)
    run_dir = tmp_path / reference.run_dir.name
    with runs.run_lock(run_dir):
        code, output = trainers.run(args)
    assert code == EXIT_FAILURE
    assert output.strip().splitlines()[-1] == \
        f"error: run {run_dir} is being trained by another process"
    assert not (run_dir / runs.ERROR_FILE).exists()  # not our run to mark as failed
    assert sorted(path.name for path in run_dir.iterdir()) == [runs.LOCK_FILE]


def test_a_run_completed_while_the_trainer_took_its_lock_is_left_alone(trainers, reference,
                                                                      tmp_path):
    """run() checks for summary.json before taking the lock; a second launcher's trainer
    can finish the run in between. The lock holder checks again and touches nothing."""
    run_dir = tmp_path / reference.run_dir.name
    shutil.copytree(reference.run_dir, run_dir)

    def record_times():
        return {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir()
                if path.name != runs.LOCK_FILE}
    before = record_times()
    nested = resolve_config(reference.args_in(tmp_path))
    # train_worker is what run() calls once it has found no summary.json.
    code, output = trainers.run(
        [json.dumps(nested), str(run_dir)],
        code="import json, sys\nfrom ffcv_bias.train.launch import train_worker\n"
             "sys.exit(train_worker(0, json.loads(sys.argv[1]), sys.argv[2], ['test'], True))")
    assert code == EXIT_OK, output
    assert f"run {run_dir.name} was completed by another process meanwhile" in output
    assert "resuming" not in output
    assert record_times() == before


# ----------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------

class ScarceRoom:
    """Where writing runs out of room: a small tmpfs filled up (ENOSPC; needs root), or a
    per-process file-size limit (RLIMIT_FSIZE -> EFBIG; works anywhere)."""

    def __init__(self, kind, tmp_path):
        self.kind = kind
        self.folder = tmp_path / "disk"
        self.folder.mkdir()
        self.filler = self.folder / "filler"
        self.mounted = False
        if kind == "tmpfs":
            self.mount()

    def mount(self):
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                     str(self.folder)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no `mount` command: the rlimit variant covers this path")
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); "
                        f"the rlimit variant covers this path")
        self.mounted = True

    @property
    def message(self):
        return "no space left on device" if self.kind == "tmpfs" else "file too large"

    def limit_below(self, size, leave=48 * 1024):
        """Make a write of `size` more bytes fail (small files still fit): the kwargs for
        WarmTrainers.start."""
        if self.kind == "rlimit":
            return {"fsize_limit": size // 2}
        stats = os.statvfs(self.folder)
        with open(self.filler, "wb") as handle:
            handle.truncate(0)
            handle.write(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
        return {}

    def release(self):
        self.filler.unlink(missing_ok=True)

    def close(self):
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


@pytest.fixture(params=["tmpfs", "rlimit"])
def scarce_room(request, tmp_path):
    room = ScarceRoom(request.param, tmp_path)
    yield room
    room.close()


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(trainers, reference,
                                                                    scarce_room):
    args = reference.args_in(scarce_room.folder)
    run_dir = scarce_room.folder / reference.run_dir.name
    checkpoint = run_dir / runs.CHECKPOINT_FILE
    code, _ = trainers.run(args, crash_at="atomic-renamed/checkpoint.pt:1")
    assert code == -signal.SIGKILL
    saved = checkpoint.read_bytes()

    code, output = trainers.run(args, **scarce_room.limit_below(len(saved)))
    assert code == EXIT_FAILURE, output
    message = f"{scarce_room.message} while writing {checkpoint}"
    assert output.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in output
    assert checkpoint.read_bytes() == saved  # epoch 1's, whole
    assert read_run_dir(run_dir).temporaries == []
    assert (run_dir / runs.ERROR_FILE).read_text().splitlines()[0] == message
    assert runs.run_state(run_dir) == "failed"

    scarce_room.release()
    code, output = trainers.run(args)
    assert code == EXIT_OK, output
    assert_same_result_as(reference, run_dir)


def test_full_disk_while_writing_a_beton_leaves_nothing(trainers, scarce_room, tmp_path):
    make_fashion_dir(tmp_path / "fashion", train_per_class=6)
    beton = scarce_room.folder / "fashion_train.beton"
    code, output = trainers.run(
        ["--cfg.dataset=fashion-mnist", "--cfg.split=train",
         f"--cfg.data_dir={tmp_path / 'fashion'}", f"--cfg.write_path={beton}"],
        script=WRITE_DATASETS_SCRIPT, **scarce_room.limit_below(8 << 20))  # 8 MiB: a page
    assert code == 1, output
    assert output.strip().splitlines()[-1] == \
        f"write_datasets.py: error: {scarce_room.message}: {beton}"
    assert "Traceback" not in output
    assert sorted(path.name for path in scarce_room.folder.iterdir()) == (
        ["filler"] if scarce_room.kind == "tmpfs" else [])


@pytest.mark.e2e
def test_ctrl_c_while_writing_a_beton_exits_130_and_leaves_nothing(tmp_path):
    """SIGINT to the process group (a terminal's Ctrl-C) while ffcv's workers write the
    60,000 Fashion-MNIST training images: one line, exit 130, no beton, no temporary file,
    and no hang at exit. ffcv's writer queues every chunk of indices up front; when its
    workers die first, the queue's feeder thread can block on a full pipe, and the
    interpreter's shutdown then waited for it forever. That hang was reproduced by hand
    (gdb: the main thread joining the feeder, blocked in write()); it depends on timing
    and this test does not force it, so here it guards the exit code and the clean-up."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"needs Debian's dataset-fashion-mnist in {FASHION_DIR}")
    out = tmp_path / "out"
    out.mkdir()
    stderr_file = tmp_path / "stderr.txt"
    with open(stderr_file, "w") as stderr:
        writer = subprocess.Popen(
            [PYTHON, str(REPO / "write_datasets.py"), "--cfg.dataset=fashion-mnist",
             "--cfg.split=train", "--cfg.write_mode=jpg",
             f"--cfg.write_path={out / 'fashion_train.beton'}"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: "writing 60000 images" in stderr_file.read_text(), writer, timeout=120)
    time.sleep(0.5)  # the workers are encoding now (the write takes ~2 s here)
    os.killpg(writer.pid, signal.SIGINT)
    try:
        code = writer.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(writer.pid, signal.SIGKILL)
        raise AssertionError("write_datasets.py hung after Ctrl-C") from None
    text = stderr_file.read_text()
    assert code == 130, text[-2000:]
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1] == \
        "write_datasets.py: interrupted; nothing left at the write path"
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------------------
# The sweep launcher (stand-in trainer)
# ----------------------------------------------------------------------------------------

def start_launcher(sweep_file, script, epoch_s, *flags, **popen):
    return subprocess.Popen(
        [PYTHON, "-m", "ffcv_bias.sweep", "launch", str(sweep_file), "--gpus", "none",
         "--train-script", str(script), *flags],
        cwd=REPO, env=dict(os.environ, FAKE_EPOCH_S=str(epoch_s)), **popen)


def test_interrupted_launch_resumes_exactly_the_unfinished_runs(fake_setup, tmp_path):
    folder = tmp_path / "runs"
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(folder),
                             overrides={"training.epochs": 4},
                             grid={"augment.min_scale": [1.0, 0.6, 0.3]}, seeds=2)
    planned = plan(load_sweep(sweep_file))
    # Epochs long against the 50 ms polling, so a run seen mid-way is still mid-way at the kill.
    launcher = start_launcher(sweep_file, fake_setup["script"], 1.0, "--max-parallel", "2",
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        states = [run_state(run) for run in planned]
        started = [run for run in planned if (run.run_dir / runs.CHECKPOINT_FILE).is_file()
                   and not runs.is_complete(run.run_dir)]
        if states.count("complete") >= 2 and started:
            break
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its trainers, mid-epoch
    launcher.wait()
    complete_at_kill = {run.run_id for run in planned if runs.is_complete(run.run_dir)}
    checkpointed_at_kill = {run.run_id for run in planned
                            if (run.run_dir / runs.CHECKPOINT_FILE).is_file()} - complete_at_kill
    assert len(complete_at_kill) >= 2 and checkpointed_at_kill
    assert len(complete_at_kill) < len(planned)

    result = sweep_cli("launch", sweep_file, "--max-parallel", "2", "--gpus", "none",
                       "--train-script", fake_setup["script"])
    assert result.returncode == 0, result.stderr
    assert f"{len(planned) - len(complete_at_kill)} to launch" in result.stdout
    for run in planned:
        assert runs.is_complete(run.run_dir)
        assert epochs_logged(run.run_dir) == [0, 1, 2, 3]  # every epoch once, in order
        trainings = read_lines(run.run_dir / "trainings.txt")
        assert trainings.count("complete") == 1
        if run.run_id in complete_at_kill:
            assert launch_starts(run.run_dir) == 1  # never relaunched
        else:
            assert launch_starts(run.run_dir) in (1, 2)
        if run.run_id in checkpointed_at_kill:
            assert launch_starts(run.run_dir) == 2
            assert trainings[-2] != "start 0"  # resumed from its checkpoint
    status = sweep_cli("status", sweep_file)
    assert f"{len(planned)} runs: {len(planned)} complete" in status.stdout


def test_sigkill_of_one_trainer_fails_its_run_only_and_a_relaunch_resumes_it(fake_setup,
                                                                            tmp_path):
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(tmp_path / "r"),
                             overrides={"training.epochs": 5},
                             grid={"augment.min_scale": [1.0, 0.5]}, seeds=1)
    victim, other = plan(load_sweep(sweep_file))
    launcher = start_launcher(sweep_file, fake_setup["script"], 0.4, "--max-parallel", "2",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Killed once it holds a checkpoint (the stand-in, like the trainer, logs an epoch and
    # then checkpoints it: a kill in between would rightly restart it from epoch 0).
    wait_for(lambda: (victim.run_dir / runs.CHECKPOINT_FILE).is_file(), launcher)
    # The lock file holds its holder's pid: the trainer of this run, not the launcher.
    trainer_pid = int((victim.run_dir / runs.LOCK_FILE).read_text())
    assert trainer_pid != launcher.pid
    os.kill(trainer_pid, signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, stdout + stderr
    assert f"FAILED {victim.run_id}" in stderr and "killed by signal SIGKILL" in stderr
    assert [run_state(victim), run_state(other)] == ["failed", "complete"]
    assert not runs.is_locked(victim.run_dir)  # the kernel dropped the dead holder's lock

    result = sweep_cli("launch", sweep_file, "--gpus", "none",
                       "--train-script", fake_setup["script"])
    assert result.returncode == 0, result.stderr
    assert "1 to launch" in result.stdout
    assert run_state(victim) == "complete" and not (victim.run_dir / runs.ERROR_FILE).exists()
    assert epochs_logged(victim.run_dir) == [0, 1, 2, 3, 4]
    assert read_lines(victim.run_dir / "trainings.txt")[-2] != "start 0"  # resumed
    assert launch_starts(other.run_dir) == 1


def test_two_launchers_on_one_sweep_train_each_run_exactly_once(fake_setup, tmp_path):
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(tmp_path / "r"),
                             overrides={"training.epochs": 3},
                             grid={"augment.min_scale": [1.0, 0.5]}, seeds=2)
    planned = plan(load_sweep(sweep_file))
    launchers = [start_launcher(sweep_file, fake_setup["script"], 0.5, "--max-parallel", "2",
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = []
    for launcher in launchers:
        stdout, stderr = launcher.communicate(timeout=180)
        assert launcher.returncode == 0, stdout + stderr  # "running elsewhere" is no failure
        outputs.append(stdout + stderr)
    for run in planned:
        assert runs.is_complete(run.run_dir)
        # One training: one start (from epoch 0), one completion, every epoch logged once.
        assert read_lines(run.run_dir / "trainings.txt") == ["start 0", "complete"]
        assert epochs_logged(run.run_dir) == [0, 1, 2]
    # The launchers did overlap: one found a run locked by the other's trainer, when
    # planning ("N running") or when starting it ("running elsewhere").
    assert any(" running" in output for output in outputs), outputs


def test_sigterm_to_the_launcher_stops_trainers_cleanly(fake_setup, tmp_path):
    """SIGTERM (or Ctrl-C) to the launcher: trainers save and exit, no run is marked failed."""
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(tmp_path / "r"),
                             overrides={"training.epochs": 20}, seeds=2)
    planned = plan(load_sweep(sweep_file))
    launcher = start_launcher(sweep_file, fake_setup["script"], 0.2, "--max-parallel", "2",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all((run.run_dir / runs.CHECKPOINT_FILE).is_file() for run in planned):
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, stdout + stderr
    assert "launch again to resume" in stderr
    assert [run_state(run) for run in planned] == ["started", "started"]
    for run in planned:
        assert f"exit code {EXIT_PREEMPTED}" in (run.run_dir / TRAIN_LOG_FILE).read_text()
        assert not (run.run_dir / runs.ERROR_FILE).exists()


def test_run_locked_elsewhere_is_not_a_failure(fake_setup, tmp_path):
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(tmp_path / "r"),
                             seeds=1)
    run = plan(load_sweep(sweep_file))[0]
    with runs.run_lock(run.run_dir):
        result = sweep_cli("plan", sweep_file)
        assert f"{run.run_id}  0     running" in result.stdout
        result = sweep_cli("launch", sweep_file, "--gpus", "none", "--train-script",
                           fake_setup["script"])
    assert result.returncode == 0
    assert "1 running" in result.stdout and "0 to launch" in result.stdout
    assert run_state(run) == "missing"
    # The lock taken between the launcher's check and the trainer's: the trainer says so
    # and exits non-zero; the launcher counts it as running elsewhere, not as a failure.
    racing = tmp_path / "racing.py"
    racing.write_text("import sys\nsys.exit('error: run r is being trained by another process')\n")
    result = sweep_cli("launch", sweep_file, "--gpus", "none", "--train-script", racing)
    assert result.returncode == 0, result.stderr
    assert "running elsewhere" in result.stderr + result.stdout
    assert run_state(run) == "missing"


def test_submitit_local_jobs_requeue_and_resume(fake_setup, tmp_path, monkeypatch):
    """The real submitit path: array jobs, checkpoint() on the time-limit signal, requeue."""
    folder = tmp_path / "runs"
    sweep_file = write_sweep(
        tmp_path / "s.yaml", base="base.yaml", folder=str(folder),
        overrides={"training.epochs": 16}, grid={"augment.min_scale": [1.0, 0.5, 0.2]},
        seeds=1,
        # submitit signals (SIGUSR2) signal_delay_s before the 1-minute limit: 5 s after
        # each (re)start; a run takes 8 s plus start-up (~1 s), so the signal lands
        # mid-run and each restart makes progress from the checkpoint.
        slurm={"mode": "pack", "gpus_per_node": 0, "runs_per_node": 2, "time": 1,
               "signal_delay_s": 55})
    monkeypatch.setenv("FAKE_EPOCH_S", "0.5")
    monkeypatch.chdir(REPO)
    sweep = load_sweep(sweep_file)
    planned = plan(sweep)
    submitted = slurm.submit(planned, sweep=sweep, settings=sweep.slurm, folder=folder,
                             max_parallel=None, train_script=fake_setup["script"],
                             cwd=REPO, cluster="local")
    assert [len(job_runs) for _, job_runs in submitted] == [2, 1]
    results = [job.result() for job, _ in submitted]  # raises if a job failed
    assert results[0] == {planned[0].run_id: "complete", planned[1].run_id: "complete"}

    resumed = 0
    for run in planned:
        assert runs.is_complete(run.run_dir)
        assert epochs_logged(run.run_dir) == list(range(16))
        starts = [line for line in read_lines(run.run_dir / "trainings.txt")
                  if line.startswith("start")]
        resumed += any(line != "start 0" for line in starts)
    assert resumed >= 1  # at least one run was stopped by the signal and resumed
    job_log = "".join(Path(p).read_text() for p in folder.glob(".sweep/submitit/*/*_log.*"))
    assert "Calling checkpoint method" in job_log and "Requeued job" in job_log

    record = json.loads((folder / ".sweep" / "jobs.json").read_text())
    jobs = record["submissions"][-1]["jobs"]
    assert [job["runs"] for job in jobs] == [[r.run_id for r in planned[:2]],
                                             [planned[2].run_id]]
    assert [job["job_id"] for job in jobs] == [str(job.job_id) for job, _ in submitted]
