"""A beton changed while a run reads it: noticed, and the run failed instead of recorded.

ffcv reads a beton's header, metadata and allocation table once, when the loader is made,
and its images by path afterwards: with data.in_memory=0 every epoch opens the file again
(ffcv's ProcessCacheContext), and the evaluation protocols open new loaders at the end. A
beton rewritten meanwhile (write_datasets renames a new file over it; `cp` rewrites it in
place) is then read through the old tables: other images, or none, under the old labels,
with no error. The record would still name the old beton (config.json meta.betons).

The trainer watches both betons: it notes each file's identity (device, inode, size,
mtime) and fingerprint (data/fingerprint.py; the run's meta.betons when config.json has
them) when it starts, and compares them at the end of every epoch, before that epoch is
logged or checkpointed, and before the final record is written. Any difference fails the
run with BetonChangedError: exit 1, one line, error.txt, no summary.json; the last
checkpoint predates the change, so once the beton is restored the same command resumes
from it. A `touch` counts as a change too: the data the run read cannot be vouched for.
"""
import os
from datetime import datetime

from ffcv_bias.data.fingerprint import DATASET_KEYS, describe, fingerprint
from ffcv_bias.data.sources import DatasetError
from ffcv_bias.train.state import RunError

REMEDY = ("the run is not recorded complete; restore the beton (then rerun to resume from "
          "the last checkpoint) or train into another folder (logging.folder)")


class BetonChangedError(RunError):
    """A beton the run reads changed while it ran; the message is one line."""


def identity(path):
    """(device, inode, size, mtime_ns) of `path`, or the OSError's words if it is gone."""
    try:
        stat = os.stat(path)
    except OSError as error:
        return error.strerror or str(error)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _safe_fingerprint(path):
    try:
        return fingerprint(path)
    except (DatasetError, OSError, ValueError) as error:
        return str(error)


def _mtime(ns):
    return datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="seconds")


def what_changed(before, after, fp_before, fp_after):
    """A few words on how the file changed (both identities and fingerprints given)."""
    if isinstance(after, str):
        return f"it is gone: {after}"
    words = []
    if isinstance(before, str):
        words.append("it appeared after the run started")
    elif before[:2] != after[:2]:
        words.append(f"replaced by another file (inode {before[1]} -> {after[1]})")
    elif before[2:] != after[2:]:
        words.append(f"rewritten in place ({before[2]} -> {after[2]} bytes, modified "
                     f"{_mtime(after[3])})")
    if fp_before != fp_after:
        if isinstance(fp_after, str):
            words.append(f"now unreadable: {fp_after}")
        elif isinstance(fp_before, dict):
            words.append(f"now: {describe(fp_after)}; the run's: {describe(fp_before)}")
    elif words:
        words.append("same header and tables, images unchecked")
    return "; ".join(words)


class BetonWatch:
    """The identities and fingerprints of a run's two betons, taken when it starts."""

    def __init__(self, paths, run_id, recorded=None):
        """`paths`: {"train_dataset": path, "val_dataset": path}; `recorded`: config.json's
        meta.betons ({} or None: the fingerprints now are the reference)."""
        self.paths = {key: str(paths[key]) for key in DATASET_KEYS}
        self.run_id = run_id
        self.identities = {key: identity(path) for key, path in self.paths.items()}
        recorded = recorded or {}
        self.fingerprints = {key: recorded.get(key) or _safe_fingerprint(path)
                             for key, path in self.paths.items()}

    def change(self):
        """The one-line message of the first beton that changed since the start, or None."""
        for key, path in self.paths.items():
            before, after = self.identities[key], identity(path)
            fp_before = self.fingerprints[key]
            # Cached by the file's stat (fingerprint.py): no read when nothing changed.
            fp_after = _safe_fingerprint(path) if not isinstance(after, str) else fp_before
            if before != after or fp_before != fp_after:
                return (f"data.{key} {path} changed while run {self.run_id} read it "
                        f"({what_changed(before, after, fp_before, fp_after)}): {REMEDY}")
        return None

    def check(self):
        """Raise BetonChangedError if a beton changed since the start."""
        message = self.change()
        if message:
            raise BetonChangedError(message)
