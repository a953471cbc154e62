"""Worker processes that die with their parent.

A process killed with SIGKILL (or by the OOM killer) runs no clean-up: the multiprocessing
workers it forked (ffcv's beton writers, the image-check pool) would live on, holding
memory, a /dev/shm segment and the temporary file they write, and keeping multiprocessing's
resource tracker alive (it frees the shared memory only once every holder of its pipe has
exited). On Linux the kernel can send a signal to a child when its parent dies
(prctl PR_SET_PDEATHSIG); `die_with_parent` asks for it, first thing in the child.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid=None, signum=signal.SIGKILL):
    """In a child process: have the kernel send `signum` to it when its parent exits.
    `parent_pid`: the parent's PID as the parent saw it; a child whose parent is already
    gone (it died before this call) exits at once. Returns whether the kernel took the
    request (False off Linux, where it is a no-op).

    The signal comes when the parent *thread* that forked the child exits: call this only
    in children started from a thread that lives as long as they should (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # orphaned before the request was made: the kernel will not signal
    return True
