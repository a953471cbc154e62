"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Every file of the run record, every checkpoint and every beton goes through here. The
pattern is: write to a temporary name in the same directory, flush and fsync, then
`os.replace` onto the final name (atomic on POSIX within one file system). A full disk is
a NoRoomError, one line naming the file. tests/test_faults.py kills writers at each step
(the crash points of ffcv_bias/record/faults.py).
"""
import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np

from ffcv_bias.record.faults import crash_point

# Temporary files are hidden and end in .tmp, so no reader takes one for a result:
# `.checkpoint.pt.<random>.tmp`.
TEMP_SUFFIX = ".tmp"


def temp_prefix(name):
    return f".{name}."


# A temporary that a writer without a lock leaves when it is killed (a beton, a prune's
# staging folder) carries its writer's PID and host: `.<name>.pid<PID>@<host>.<random>.tmp`.
# A later writer of the same name removes those whose writer is gone (remove_orphaned_temps).
_OWNED = re.compile(r"pid(\d+)@([A-Za-z0-9_-]+)\.")


def _host():
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def owned_temp_prefix(name):
    """`.<name>.pid<PID>@<host>.`: the prefix of this process's temporaries of `name`."""
    return f"{temp_prefix(name)}pid{os.getpid()}@{_host()}."


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_temps(directory, name):
    """Remove the temporaries of `name` in `directory` (files, or folders such as a prune's
    staging folder) whose writer on this host is no longer running (killed mid-write:
    SIGKILL, the OOM killer). A live writer's temporary, another host's (a shared file
    system: its PIDs mean nothing here) and an unnamed one are left alone.
    Returns the paths removed."""
    removed = []
    prefix = temp_prefix(name)
    for path in Path(directory).glob(f"{glob.escape(prefix)}pid*"):
        owner = _OWNED.match(path.name[len(prefix):])
        if not owner or TEMP_SUFFIX not in path.name or owner.group(2) != _host():
            continue
        if _process_alive(int(owner.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


# Errors that mean "the bytes did not fit": the device is full, the user's quota is
# spent, or the file outgrew the process's size limit (RLIMIT_FSIZE).
NO_ROOM_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EFBIG: "file too large"}


class NoRoomError(OSError):
    """A write failed for lack of room; str() is one line naming the file."""

    def __str__(self):
        return f"{self.strerror} while writing {self.filename}"


def no_room_error(error, final_path):
    """A NoRoomError naming `final_path` if `error` (or what caused it) is a full disk."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_ROOM_ERRNOS:
            return NoRoomError(error.errno, NO_ROOM_ERRNOS[error.errno], str(final_path))
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def atomic_path(final_path, owned=False):
    """Yield a temporary path beside `final_path`; rename it onto `final_path` on success.

    On any exception the temporary file is removed and `final_path` is left untouched; a
    full disk (or quota, or file-size limit) is raised as NoRoomError naming `final_path`.
    A process killed meanwhile leaves a `.<name>.*.tmp` file: remove_stale_temp_files;
    with `owned`, the name carries this process's PID (owned_temp_prefix), and any later
    writer can remove it once this process is gone: remove_orphaned_temps.
    """
    final_path = Path(final_path)
    prefix = owned_temp_prefix(final_path.name) if owned else temp_prefix(final_path.name)
    try:
        final_path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=prefix,
                                            suffix=TEMP_SUFFIX, dir=final_path.parent)
    except OSError as error:
        raise (no_room_error(error, final_path) or error) from None
    os.close(handle)
    try:
        yield Path(tmp_name)
        crash_point(f"atomic-partial/{final_path.name}", cut_file=tmp_name)
        os.chmod(tmp_name, _default_file_mode())  # mkstemp's 0600 would hide results from the group
        _fsync_file(tmp_name)
        crash_point(f"atomic-unrenamed/{final_path.name}")
        os.replace(tmp_name, final_path)
        crash_point(f"atomic-renamed/{final_path.name}")
        _fsync_dir(final_path.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        no_room = no_room_error(error, final_path)
        if no_room is not None:
            raise no_room from error
        raise


def remove_stale_temp_files(directory, names):
    """Remove the temporary files that writers of `names` killed mid-write left in
    `directory`. Only for a caller that alone writes those names there (a run's lock
    holder): another writer's temporary file in flight would be removed too."""
    for name in names:
        for stale in Path(directory).glob(f"{temp_prefix(name)}*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


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


class _WriteOnly:
    """A file seen only through write(): numpy then writes chunk by chunk through Python,
    and a full disk raises OSError(ENOSPC). Given the file itself, numpy's C writer
    reports only "1000000 requested and 262112 written", with no errno."""

    def __init__(self, handle):
        self.write = handle.write


def save_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(_WriteOnly(f), np.asarray(array))


def torch_save(path, obj):
    import torch  # local import: analysis code uses this module without torch loaded
    with atomic_path(path) as tmp:
        # Through a Python file: torch's own file writer reports a full disk as
        # "unexpected pos 576 vs 534", with no errno to recognise it by.
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
