"""The run record: run_id, file names, completeness, and a per-run lock.

A run lives in `<logging.folder>/<run_id>/` (see docs/DESIGN.md, "The run record"). This module
is shared by the trainer (which writes records), the sweep launcher (which decides what
is left to run) and analysis (which only reads): it imports neither torch nor ffcv.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

# File names of the record. summary.json is written last: its presence means "complete".
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "weights.pt"
VAL_LOGITS_FILE = "val_logits.npy"
# The float32 argmax of the logits (int16, int32 above 32767 classes; ties to the lowest
# class): every accuracy derives from it (ffcv_bias/record/metrics.py). Absent in older records.
VAL_PREDS_FILE = "val_preds.npy"
VAL_LABELS_FILE = "val_labels.npy"
SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.txt"
LOCK_FILE = ".lock"


def epoch_weights_file(epoch):
    """The weights after `epoch` epochs, kept when training.save_weights_at lists it."""
    return f"weights_epoch{epoch}.pt"


# Config values that do not change what a run computes, so they stay out of its run_id:
# where things are written, how many loader threads, how the processes talk, and
# bookkeeping added by the trainer.
NON_RESULT_SECTIONS = {"logging", "dist", "meta"}
NON_RESULT_KEYS = {
    ("data", "num_workers"),
    ("data", "in_memory"),
    ("training", "restart"),   # what to do with an unreadable checkpoint, not what to compute
    # Extra test protocols evaluate the final model and leave the training alone; a
    # finished run gains them later (python -m ffcv_bias.evaluate) under the same id.
    ("validation", "protocols"),
    # Extra copies of the weights at chosen epochs: read-only snapshots of a run that
    # trains exactly as without them (logits bit-identical), so the run is the same run.
    ("training", "save_weights_at"),
}
# Keys added to the trainer after runs were already being recorded, with the default that
# reproduces the behaviour from before they existed. Such a key enters the run_id (and the
# analysis' "do these runs differ?" check) only when it is set to something else: adding a
# key must never rename finished runs, or a relaunched sweep would train them all again.
# Every key added to train/config.py from now on belongs here with its default.
LATER_KEY_DEFAULTS = {
    ("lr", "warmup_epochs"): 0.0,
    ("lr", "warmup_start_factor"): 0.0,
    ("training", "adam_beta1"): 0.9,
    ("training", "adam_beta2"): 0.999,
    ("training", "adam_eps"): 1e-8,
    ("training", "grad_clip_norm"): 0.0,
    ("model", "drop_path"): 0.0,
    ("training", "wd_exempt"): "norm_bias_embed",   # every bias etc. exempt, as before
    ("training", "compile"): 0,
    ("training", "fused_optimizer"): 0,
    ("validation", "protocols"): "",  # also in NON_RESULT_KEYS: never in the run_id
    ("training", "bn_recompute_batches"): 0,
    ("augment", "decode"): "exact",   # full JPEG decode; 'fast' decodes the crop only
}
# Config values that name files: the run_id uses the file's name for datasets (moving a
# data directory must not orphan finished runs) and the content for small input files
# (two different per-class crop files must give two runs).
DATASET_KEYS = {("data", "train_dataset"), ("data", "val_dataset")}
CONTENT_KEYS = {("augment", "class_min_scale"), ("data", "keep_indices")}


def _file_identity(path_value, by_content):
    if not path_value:
        return path_value
    path = Path(path_value)
    if by_content and path.is_file():
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return path.name


def result_config(config):
    """The part of a nested config that determines the result, with paths made portable."""
    portable = {}
    world_size = config.get("dist", {}).get("world_size", 1)
    if world_size != 1:
        # The process count sets the global batch: an 8-GPU run is not a 1-GPU run.
        portable["dist"] = {"world_size": world_size}
    for section, values in sorted(config.items()):
        if section in NON_RESULT_SECTIONS or not isinstance(values, dict):
            continue
        kept = {}
        for key, value in sorted(values.items()):
            path = (section, key)
            if path in NON_RESULT_KEYS:
                continue
            if path in LATER_KEY_DEFAULTS and value == LATER_KEY_DEFAULTS[path]:
                continue
            if path in DATASET_KEYS:
                value = _file_identity(value, by_content=False)
            elif path in CONTENT_KEYS:
                value = _file_identity(value, by_content=True)
            kept[key] = value
        portable[section] = kept
    return portable


def run_id(config):
    """A deterministic, readable id: `<arch>_s<seed>_<hash of the result config>`.

    The hash covers every result-changing value, so a changed hyper-parameter gives a
    new run and a relaunched sweep finds its finished runs.
    """
    portable = result_config(config)
    digest = hashlib.sha256(json.dumps(portable, sort_keys=True, default=str).encode())
    arch = config.get("model", {}).get("arch", "model")
    seed = config.get("training", {}).get("seed", 0)
    return f"{arch}_s{seed}_{digest.hexdigest()[:12]}"


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def read_json_object(path):
    """The JSON object in `path`, or None when it is missing, cut short or not an object."""
    try:
        content = read_json(path)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def recorded_run_id(config, run_dir):
    """The id a run directory claims: config.json's meta.run_id, else the folder's name."""
    meta = config.get("meta") if isinstance(config, dict) else None
    return (meta or {}).get("run_id") or Path(run_dir).name


def completeness(run_dir, run_id=None):
    """'complete', 'corrupt' or 'incomplete': the one answer to "is this run finished?".

    Every caller (trainer, sweep launcher and status, analysis) asks here, so they agree.
    complete: summary.json parses as a JSON object naming the run's id (`run_id` when
    the caller knows it, else the one config.json records, else the folder's name), and
    config.json, when there, parses too. corrupt: summary.json is there but one of those
    fails (a truncated copy, a file from another run); the trainer moves such files aside
    and retrains. incomplete: no summary.json yet.
    """
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY_FILE).is_file():
        return "incomplete"
    summary = read_json_object(run_dir / SUMMARY_FILE)
    config = read_json_object(run_dir / CONFIG_FILE)
    if summary is None or (config is None and (run_dir / CONFIG_FILE).exists()):
        return "corrupt"
    expected = run_id or recorded_run_id(config, run_dir)
    return "complete" if summary.get("run_id") == expected else "corrupt"


def is_complete(run_dir, run_id=None):
    return completeness(run_dir, run_id) == "complete"


def corrupt_files(run_dir, run_id):
    """The record files of `run_id` in `run_dir` that cannot be trusted: config.json that
    does not parse, summary.json that does not parse or names another run. A summary
    beside a corrupt config.json goes too: the run is then redone (from its checkpoint)
    so that its record is whole again, rather than left complete without a config."""
    run_dir = Path(run_dir)
    found = []
    if (run_dir / CONFIG_FILE).is_file() and read_json_object(run_dir / CONFIG_FILE) is None:
        found.append(CONFIG_FILE)
    if (run_dir / SUMMARY_FILE).is_file():
        summary = read_json_object(run_dir / SUMMARY_FILE)
        if found or summary is None or summary.get("run_id") != run_id:
            found.append(SUMMARY_FILE)
    return found


def set_aside_corrupt(run_dir, run_id, now=None):
    """Move the corrupt record files into `<run_dir>/corrupt-<UTC time>/` (renames, so
    nothing is deleted and nothing else is touched). Returns (names, folder) or None."""
    names = corrupt_files(run_dir, run_id)
    if not names:
        return None
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = Path(run_dir) / f"corrupt-{stamp}"
    folder.mkdir()
    for name in names:
        os.replace(Path(run_dir) / name, folder / name)
    return names, folder


def run_state(run_dir, run_id=None):
    """'complete', 'corrupt' (see completeness), 'failed' (error.txt and no summary),
    'started' (checkpoint or config) or 'missing'."""
    run_dir = Path(run_dir)
    state = completeness(run_dir, run_id)
    if state != "incomplete":
        return state
    if (run_dir / ERROR_FILE).is_file():
        return "failed"
    if (run_dir / CHECKPOINT_FILE).is_file() or (run_dir / CONFIG_FILE).is_file():
        return "started"
    return "missing"


class RunLockedError(RuntimeError):
    pass


class RunDirNotWritableError(RunLockedError):
    """The run's lock cannot be taken because its directory cannot be written: one line
    (a subclass, so every caller that reports a locked run reports this one too)."""


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold an exclusive lock on a run directory while training it.

    flock() locks belong to the open file: the kernel drops them when the holder dies,
    however it dies (SIGKILL included), so a crashed holder never blocks a relaunch.
    A second process asking for a held lock gets RunLockedError at once.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(run_dir / LOCK_FILE, "a+")
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        raise RunDirNotWritableError(
            f"cannot write into run {run_dir} ({error.strerror}): its lock file and new "
            f"files go there; copy the run somewhere writable") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"run {run_dir} is being trained by another process") from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def is_locked(run_dir):
    """True while some process holds the run's lock (i.e. the run is training now)."""
    lock_path = Path(run_dir) / LOCK_FILE
    if not lock_path.exists():
        return False
    with open(lock_path) as handle:   # flock needs no write access: read-only runs too
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False
