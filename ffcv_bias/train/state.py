"""What a run carries across a stop and a resume: the stop signals, the seeds and every
random stream, determinism and thread counts, and the checkpoint file.

Only an epoch boundary resumes bit for bit (the loader cannot start an epoch half-way),
so a checkpoint holds whole epochs and log.jsonl is cut back to them (docs/DESIGN.md,
"The run record").
"""
import json
import os
import random
import signal
import threading
from contextlib import contextmanager

import numpy as np
import torch

from ffcv_bias.common import atomic, env

CHECKPOINT_FORMAT = 1


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line for the user."""


class NonFiniteLossError(RunError):
    pass


class RunDirRefused(RunError):
    """The run directory is locked by another process or holds another run: not ours to
    write into (no error.txt)."""


class Preempted(Exception):
    """SIGTERM arrived: stop, keep the last checkpoint, exit EXIT_PREEMPTED."""


class CheckpointUnreadable(RunDirRefused):
    """checkpoint.pt exists but cannot be loaded: resuming is impossible, and the choice to
    start over is the user's (training.restart=1), so nothing is written (no error.txt)."""


# Where training.restart=1 moves an unreadable checkpoint (never deleted: it may be
# recoverable, and it is evidence of what went wrong).
UNREADABLE_CHECKPOINT_SUFFIX = ".unreadable"



# Signals that mean "stop and keep the checkpoint": SIGTERM (scancel, preemption, the sweep
# launcher) and SIGUSR2, which submitit's `--signal=USR2@90` asks SLURM to send before the
# time limit; SLURM delivers it to every process of the step, trainers included, and
# USR2's default action would kill them (reported as failed instead of requeued).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    """Set by SIGTERM or SIGUSR2; read by the training loop between steps."""

    def __init__(self):
        self.requested = False
        self.signal_name = "SIGTERM"
        self.previous = {}

    def __enter__(self):
        # Python lets only the main thread install handlers; elsewhere the signals keep
        # their default meaning (the process dies; the last checkpoint is still the resume
        # point).
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle)
                             for number in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for number, previous in self.previous.items():
            signal.signal(number, previous)


def rank_seed(seed, rank):
    """A torch seed per (run seed, rank): ranks draw different dropout masks."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def set_determinism(device, deterministic):
    if device.type == "cuda" and deterministic:
        # cuBLAS reads this when it starts (the model's first matmul comes later).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type == "cpu" or deterministic:
        # training.deterministic=1 promises bit-identical reruns: an op without a
        # deterministic kernel must stop the run, not print a warning and break the promise.
        # CPU runs without the flag keep warn_only (every CPU op used here is deterministic).
        torch.use_deterministic_algorithms(True, warn_only=not deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = bool(deterministic)


@contextmanager
def torch_settings_kept():
    """Undoes on exit what Trainer.setup_process changes (torch's threads, deterministic
    algorithms), for callers that go on in the same process (tests, benchmarks, notebooks)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def choose_torch_threads(local_world_size):
    """OMP_NUM_THREADS when the launcher set it, else this process's share of the cores."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = env.usable_cpu_count()
    return max(1, cores // local_world_size)


def choose_loader_threads(configured, local_world_size):
    """data.num_workers, or for 0 (auto) this process's share of the CPUs it may use minus
    one (left to the training loop), within NUMBA_NUM_THREADS when the launcher set it."""
    if configured > 0:
        return configured
    cores = env.usable_cpu_count()
    threads = max(1, cores // local_world_size - 1)
    if os.environ.get("NUMBA_NUM_THREADS", "").isdigit():
        threads = min(threads, max(1, int(os.environ["NUMBA_NUM_THREADS"])))
    return threads


def rng_state(device):
    """Every random stream the run draws from, in a form torch.load(weights_only) accepts."""
    numpy_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [str(numpy_state[0]), torch.from_numpy(numpy_state[1].astype(np.int64)),
                  int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state, device):
    """Restore rng_state(); its tensors must be CPU tensors (torch.set_rng_state and
    torch.cuda.set_rng_state take only a CPU ByteTensor), whatever device they were
    loaded to: `.cpu()` is a no-op for a checkpoint read with read_checkpoint()."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), position, has_gauss,
                         cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))




# ---------------------------------------------------------------------------------------
# The checkpoint and the log it matches
# ---------------------------------------------------------------------------------------

def read_checkpoint(path, restart_allowed=False, move_aside=True):
    """checkpoint.pt loaded to the CPU, or None when it is unreadable and the user allowed
    a restart (it is then moved aside, not deleted).

    To the CPU, not to the run's device: the RNG states must stay CPU ByteTensors
    (torch.set_rng_state refuses a CUDA tensor), and load_state_dict copies the model's
    and the optimizer's tensors to their parameters' device anyway."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip, pickle and OS errors alike
        if not restart_allowed:
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            raise CheckpointUnreadable(
                f"cannot read checkpoint {path} (truncated?): {reason}; the run cannot "
                f"resume from it: rerun with --training.restart=1 to move it aside to "
                f"{path.name}{UNREADABLE_CHECKPOINT_SUFFIX} and train the run from "
                f"scratch") from None
    if move_aside:
        aside = unused_name(path.with_name(path.name + UNREADABLE_CHECKPOINT_SUFFIX))
        os.replace(path, aside)
        print(f"training.restart=1: moved the unreadable {path} to {aside}; training "
              f"from scratch", flush=True)
    return None


def unused_name(path):
    """`path`, or `path.1`, `path.2`, ...: the first name not taken (never overwrite)."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def truncate_log(log_path, epochs_done):
    """Keep the log lines of the epochs a checkpoint holds; later ones are redone."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] < epochs_done:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash (logs were once appended to)
    atomic.write_text(log_path, "".join(line + "\n" for line in kept))
