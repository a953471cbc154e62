"""The machine and the software a result came from: device, CPUs, git, versions.

The trainer's config.json `meta`, the transfer probe's record, the studies' and the
benchmarks' defaults all ask these questions; one answer each keeps them agreeing.
torch is imported only by the function that needs it.
"""
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

# The packages whose versions a record keeps (the numbers depend on them). Versions come
# from package metadata: ffcv's own __version__ says 0.0.3rc1 in its 1.0.2 release.
RECORDED_PACKAGES = ("torch", "ffcv", "numpy", "numba")
# The repository whose commit is recorded: the one this package lives in.
SOURCE_DIR = Path(__file__).resolve().parent.parent
GIT_TIMEOUT_S = 10
# `git diff` reads every tracked file: a large checkout on a slow disk needs longer.
GIT_DIFF_TIMEOUT_S = 30
# The command that starts the Python processes ffcv_bias starts (the sweep's trainers, the
# demo's steps), when not this interpreter: a profiler (`nsys profile -o prof python`), a
# wrapper script, or the test suite's warm fork server (tests/warm_python.py).
PYTHON_ENV_VAR = "FFCV_BIAS_PYTHON"


def usable_cpu_count():
    """CPUs this process may run on (its affinity mask under SLURM or taskset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def python_command():
    """The words that start a child Python: $FFCV_BIAS_PYTHON split as a shell would, else
    this interpreter. A child started so must behave as `python ARGS` does."""
    words = shlex.split(os.environ.get(PYTHON_ENV_VAR, ""))
    return words or [sys.executable]


def default_device():
    """The first CUDA device when torch sees one, else the CPU."""
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def git_commit(source_dir=SOURCE_DIR):
    """(commit, dirty) of the repository `source_dir` is in, or (None, None) outside one
    (an installed wheel) or without git. dirty: tracked files differ from the commit."""
    try:
        commit = subprocess.run(["git", "-C", str(source_dir), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", str(source_dir), "diff", "--quiet", "HEAD"],
                               capture_output=True, timeout=GIT_DIFF_TIMEOUT_S).returncode != 0
        return commit.stdout.strip(), dirty
    except (OSError, subprocess.TimeoutExpired):
        return None, None


def package_versions(packages=RECORDED_PACKAGES):
    """{"python": ..., package: installed version or None} (read from metadata: no import)."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _cpuinfo_field(name):
    """The first `name : value` of /proc/cpuinfo, or None (not Linux, or no such field)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
    return (_cpuinfo_field("model name") or platform.processor() or platform.machine()
            or "unknown CPU")


def cpu_flags():
    """The CPU's feature flags (Linux /proc/cpuinfo), an empty set where unknown."""
    return set((_cpuinfo_field("flags") or "").split())
