"""Named crash points, so the fault-injection tests can kill a run at an exact moment.

"Nothing finished is ever lost" is a claim about every instant of a run: between two
training steps, half-way through writing checkpoint.pt, after a rename but before the
directory is synced, between the record's files. A kill from outside lands on such an
instant only by luck; these points make each one reachable on purpose:

    FFCV_BIAS_CRASH_AT="atomic-renamed/checkpoint.pt:2" python train_imagenet.py ...

SIGKILLs the trainer the 2nd time it passes `crash_point("atomic-renamed/checkpoint.pt")`,
i.e. right after its second checkpoint was renamed into place. SIGKILL, not an exception:
nothing in the process (no `finally`, no atexit, no buffered write) runs afterwards, as
with the OOM killer, a node failure or `kill -9`. The points are listed in POINTS; the
tests in tests/test_faults.py walk through them.

When the variable is unset (always, outside those tests) a crash point is one comparison
with None. A malformed value is refused at import (CrashSpecError), so a typo cannot
silently disarm a test.
"""
import os
import signal

ENV_VAR = "FFCV_BIAS_CRASH_AT"

# Every point the code passes, with where it is. `<file>` is the final name of a file
# written through ffcv_bias.common.atomic (checkpoint.pt, summary.json, ...).
POINTS = {
    "atomic-partial/<file>": "a temporary file cut to half its size: a kill while writing it",
    "atomic-unrenamed/<file>": "the temporary file whole and synced, not yet renamed",
    "atomic-renamed/<file>": "renamed onto its final name, the directory not yet synced",
    "train-step": "after a training step (counted across epochs)",
    "epoch-logged": "an epoch's log line written, its checkpoint not yet",
}


class CrashSpecError(ValueError):
    pass


def parse(spec):
    """'name:N' -> (name, N); the name may itself contain ':'."""
    name, _, count = spec.rpartition(":")
    if not name or not count.isdigit() or int(count) < 1:
        raise CrashSpecError(f"{ENV_VAR}={spec!r}: expected 'point:N' with N >= 1 "
                             f"(points: {', '.join(POINTS)})")
    return name, int(count)


_armed = None      # (name, N): kill on the N-th pass of `name`; None: disarmed
_passes = {}      # name -> passes so far in this process


def arm(spec):
    """Arm the crash point `spec` ('name:N'), or disarm with None / ''. The environment
    variable arms it at import; processes forked from a warm parent call this again."""
    global _armed
    _passes.clear()
    _armed = parse(spec) if spec else None


def crash_point(name, cut_file=None):
    """SIGKILL this process if `name` is the armed point and this is its N-th pass.

    `cut_file`: first truncate that file to half its size, leaving what a kill in the
    middle of writing it would leave."""
    if _armed is None or _armed[0] != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] < _armed[1]:
        return
    if cut_file is not None:
        os.truncate(cut_file, os.path.getsize(cut_file) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get(ENV_VAR))
