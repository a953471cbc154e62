"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Every file of the run record, every checkpoint and every beton goes through here. The
pattern is: write to a temporary name in the same directory, flush and fsync, then
`os.replace` onto the final name (atomic on POSIX within one file system).
"""
import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path beside `final_path`; rename it onto `final_path` on success.

    On any exception the temporary file is removed and `final_path` is left untouched.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp",
                                        dir=final_path.parent)
    os.close(handle)
    try:
        yield Path(tmp_name)
        os.chmod(tmp_name, _default_file_mode())  # mkstemp's 0600 would hide results from the group
        _fsync_file(tmp_name)
        os.replace(tmp_name, final_path)
        _fsync_dir(final_path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _default_file_mode():
    """The permissions open() gives a new file: 0666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    # Makes the rename itself durable; not all file systems allow opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent=2):
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def save_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))


def torch_save(path, obj):
    import torch  # local import: analysis code uses this module without torch loaded
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
