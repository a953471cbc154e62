"""Can a directory be created (or written into) at a path? Asked before any work starts.

A read-only file system, a folder without write permission or a file where a folder
should go would otherwise surface as an OSError traceback after minutes of work (or,
for the trainer, after a run directory was half made). The probe creates a hidden
directory in the nearest existing ancestor and removes it at once: it asks the file
system itself (os.access is wrong for root, for read-only mounts and for ACLs) and
leaves nothing behind.
"""
import argparse
import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """str() is one line: `cannot create <path>: <reason>`."""


def _nearest_existing(path):
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def creation_problem(path):
    """Why a directory cannot be made or written into at `path`, or None."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        if existing == path:
            return "it is a file, not a directory"
        return f"{existing} is a file, not a directory"
    try:
        probe = tempfile.mkdtemp(prefix=".write-probe-", dir=existing)
    except OSError as error:
        return error.strerror or str(error)
    os.rmdir(probe)
    return None


def require_creatable_dir(path):
    problem = creation_problem(path)
    if problem:
        raise OutputPathError(f"cannot create {path}: {problem}")


def path_text(text):
    """An argparse `type` for a path flag, as users type it: an empty value (`--out ''`, an
    unset shell variable) is refused instead of being read as the current directory, and a
    leading `~` is the home directory also where the shell left it (`--out=~/reports`):
    a folder named `~` in the working directory is never what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"empty path {text!r} (an unset shell variable?): give a file or folder name")
    if text != text.strip():
        raise argparse.ArgumentTypeError(
            f"path {text!r} begins or ends with a space: remove it (quote a name that has one "
            f"inside)")
    return os.path.expanduser(text)


def path_arg(text):
    """`path_text` as a Path."""
    return Path(path_text(text))
