"""Run trainings as subprocesses, several at a time, each pinned to a GPU or a share of cores.

Used by the local backend (on this machine) and by every SLURM job (on its node): one
`TrainerPool` per launcher process. A run is one `python train_imagenet.py ARGS` child;
its stdout and stderr are appended to `<run_dir>/train.log`, and a failure keeps the last
lines of its stderr in `<run_dir>/error.txt` unless the trainer wrote its own. One run
failing never stops the others.
"""
import collections
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ffcv_bias.common import atomic, env
from ffcv_bias.record import runs
from ffcv_bias.common.env import usable_cpu_count
from ffcv_bias.common.errors import EXIT_PREEMPTED

TRAIN_LOG_FILE = "train.log"
START_MARKER = "==> sweep: start"
ERROR_TAIL_LINES = 20
# The trainer exits non-zero with this message when another process holds the run's lock.
LOCKED_MESSAGE = "being trained by another process"
# Exit statuses of a trainer stopped by SIGTERM/SIGINT: it exits EXIT_PREEMPTED after
# saving its checkpoint, or dies of the signal (-N, or 128+N through a shell). An
# interruption to resume, not a failure.
INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
INTERRUPT_CODES = ({EXIT_PREEMPTED} | {-int(s) for s in INTERRUPT_SIGNALS}
                   | {128 + int(s) for s in INTERRUPT_SIGNALS})


def default_train_script():
    """train_imagenet.py at the repository root (the package is installed editable)."""
    return Path(__file__).resolve().parents[2] / "train_imagenet.py"


def detect_gpus():
    """GPU ids for CUDA_VISIBLE_DEVICES, without importing torch or touching CUDA.

    An inherited CUDA_VISIBLE_DEVICES (SLURM sets it to the job's GPUs) is the list;
    otherwise `nvidia-smi -L` counts the GPUs; no nvidia-smi means no GPU.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip() and gpu.strip() != "-1"]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in listing.splitlines()
                                            if l.startswith("GPU "))]


def parse_gpus(text):
    """--gpus value: 'none', a count N (the first N GPUs this process sees) or a list of
    device ids ('0,2,5', as CUDA_VISIBLE_DEVICES takes them)."""
    text = text.strip().lower()
    if text in ("", "none", "cpu"):
        return []
    if text.isdigit():
        # Under an inherited CUDA_VISIBLE_DEVICES="4,5", "--gpus 2" means devices 4 and 5.
        visible = detect_gpus()
        count = int(text)
        return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]
    return [part.strip() for part in text.split(",") if part.strip()]


def requested_gpus(text):
    """--gpus parsed and checked against the GPUs this machine has (detect_gpus): ids not
    among them would silently train on the CPU (CUDA_VISIBLE_DEVICES naming no GPU).
    Raises ValueError with a one-line message."""
    requested = parse_gpus(text)
    if not requested:
        return requested
    visible = detect_gpus()
    if not visible:
        raise ValueError(f"--gpus {text}: this machine has no CUDA GPU (no "
                         f"CUDA_VISIBLE_DEVICES, and nvidia-smi lists none); use --gpus none "
                         f"to train on the CPU")
    unknown = [gpu for gpu in requested if gpu not in visible]
    if unknown:
        raise ValueError(f"--gpus {text}: GPU {','.join(unknown)} is not one of this "
                         f"machine's GPUs ({','.join(visible)})")
    return requested


def loader_threads_for(cpu_share):
    """ffcv loader threads of a process with `cpu_share` CPUs: one is left to the
    training loop (its Python thread and the CUDA launches)."""
    return max(1, int(cpu_share) - 1)


def loader_thread_args(run, cpu_share):
    """`--data.num_workers=N` that keeps a run's loader inside its CPU share: the auto
    default (0) and a count above the share (the ImageNet recipes' 12 per GPU on an
    80-CPU node of 8 GPUs) are replaced; a smaller explicit count is kept. num_workers
    is not part of the run_id, so this never renames a run."""
    share = loader_threads_for(cpu_share)
    configured = (getattr(run, "config", None) or {}).get("data", {}).get("num_workers", 0)
    if 0 < configured <= share:
        return []
    return [f"--data.num_workers={share}"]


@dataclass
class Outcome:
    run: object            # the PlannedRun
    status: str            # complete | failed | running elsewhere | interrupted
    seconds: float = 0.0
    message: str = ""      # one line: the error, or why it did not train


class TrainerPool:
    """Trains runs as child processes; `stop()` interrupts them all (they save and exit)."""

    def __init__(self, train_script=None, cwd=None, extra_args=(), python=None):
        """`python`: the words that start a trainer's interpreter (env.python_command())."""
        self.train_script = str(train_script or default_train_script())
        self.cwd = str(cwd or os.getcwd())
        self.extra_args = list(extra_args)
        self.python = list(python or env.python_command())
        self._children = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    # ---- one run ------------------------------------------------------------------------

    def command(self, run, threads=None):
        """The trainer's command line; with `threads` (the CPU share of each of the run's
        processes) its loader threads are sized to that share."""
        sized = loader_thread_args(run, threads) if threads else []
        return ([*self.python, self.train_script] + list(run.config_args) + sized
                + self.extra_args)

    def train(self, run, gpus=None, threads=None):
        """Train one run to completion (resuming it if it has a checkpoint): an Outcome.

        Never raises for a run's own trouble (a full disk, a vanished directory): that
        run fails, the others go on.
        """
        try:
            return self._train(run, gpus, threads)
        except Exception as error:  # noqa: BLE001 - one run's trouble must not stop the pool
            message = f"launcher error: {type(error).__name__}: {error}"
            try:
                atomic.write_text(run.run_dir / runs.ERROR_FILE, message + "\n")
            except OSError:
                pass
            return Outcome(run, "failed", message=message)

    def _train(self, run, gpus, threads):
        if run.config_error:
            return Outcome(run, "failed", message=run.config_error)
        if runs.is_complete(run.run_dir, run.run_id):
            return Outcome(run, "complete", message="already complete")
        if runs.is_locked(run.run_dir):
            return Outcome(run, "running elsewhere", message="another process holds its lock")
        if self.stopping.is_set():
            return Outcome(run, "interrupted", message="not started: the launcher is stopping")
        run.run_dir.mkdir(parents=True, exist_ok=True)
        # A stale error.txt would make a resumed run look failed; its text stays in train.log.
        (run.run_dir / runs.ERROR_FILE).unlink(missing_ok=True)
        started = time.time()
        returncode, stderr_tail = self._run_child(run, gpus, threads)
        return self._outcome(run, returncode, stderr_tail, started)

    def _child_env(self, gpus, threads):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        if threads:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[name] = str(threads)
            # numba's pool (ffcv's decoding threads) would otherwise size itself to every
            # core of the node, in every slot.
            env["NUMBA_NUM_THREADS"] = str(loader_threads_for(threads))
        return env

    def _run_child(self, run, gpus, threads):
        command = self.command(run, threads)
        log_path = run.run_dir / TRAIN_LOG_FILE
        tail = collections.deque(maxlen=ERROR_TAIL_LINES)
        with open(log_path, "a", buffering=1) as log:
            where = f"host={socket.gethostname()} gpus={','.join(gpus) if gpus else 'none'}"
            log.write(f"{START_MARKER} {datetime.now().isoformat(timespec='seconds')} "
                      f"{where} threads={threads or 'default'}\n"
                      f"==> sweep: command {' '.join(command)}\n")
            log.flush()
            child = subprocess.Popen(command, cwd=self.cwd, env=self._child_env(gpus, threads),
                                     stdout=log, stderr=subprocess.PIPE, text=True,
                                     errors="replace")
            with self._lock:
                self._children.add(child)
            try:
                for line in child.stderr:  # the child's stderr: into the log and the tail
                    log.write(line)
                    # tqdm redraws with '\r': keep what the line finally showed
                    shown = line.rstrip("\n").split("\r")[-1].strip()
                    if shown:
                        tail.append(shown)
                returncode = child.wait()
            finally:
                with self._lock:
                    self._children.discard(child)
            log.write(f"==> sweep: exit code {returncode}\n")
        return returncode, list(tail)

    def _outcome(self, run, returncode, stderr_tail, started):
        seconds = time.time() - started
        if returncode == 0:
            if runs.is_complete(run.run_dir, run.run_id):
                return Outcome(run, "complete", seconds)
            return self._failed(run, seconds, "trainer exited 0 but wrote no summary.json",
                                stderr_tail)
        if any(LOCKED_MESSAGE in line for line in stderr_tail):
            return Outcome(run, "running elsewhere", seconds, "another process holds its lock")
        if self.stopping.is_set() or returncode in INTERRUPT_CODES:
            return Outcome(run, "interrupted", seconds, f"stopped (exit code {returncode})")
        if returncode < 0:
            reason = f"killed by signal {signal.Signals(-returncode).name}"
            if returncode == -signal.SIGKILL:
                reason += " (out of memory?)"
            return self._failed(run, seconds, reason, stderr_tail, reason)
        # The trainer's last stderr line is its one-line error ("error: ...").
        summary = stderr_tail[-1] if stderr_tail else f"trainer exited with code {returncode}"
        return self._failed(run, seconds, f"trainer exited with code {returncode}",
                            stderr_tail, summary)

    def _failed(self, run, seconds, reason, stderr_tail, summary=None):
        """A failed Outcome; error.txt as the trainer writes it (one line, then details)
        unless the trainer wrote its own (train() removed the old one before starting)."""
        summary = summary or reason
        error_path = run.run_dir / runs.ERROR_FILE
        if not error_path.is_file():
            details = "\n".join([f"{reason}; the last lines of its stderr:"] + stderr_tail)
            atomic.write_text(error_path, f"{summary}\n\n{details}\n")
        return Outcome(run, "failed", seconds, summary)

    # ---- many runs ----------------------------------------------------------------------

    def train_all(self, planned, max_parallel, gpus=(), processes_per_run=1, on_done=None):
        """Train `planned` with `max_parallel` at a time; returns their Outcomes in order.

        A run has `processes_per_run` processes (its dist.world_size). With GPUs, parallel
        slot i gets that many GPUs, round-robin; every process gets an equal share of the
        cores as OMP_NUM_THREADS (the trainer sizes its torch threads by it) and that
        share minus one as its loader threads (--data.num_workers, NUMBA_NUM_THREADS).
        `on_done(outcome)` is called from the calling thread as runs finish.
        """
        gpus = list(gpus)
        slots = queue.Queue()
        for slot in range(max_parallel):
            slots.put(slot)
        threads = max(1, usable_cpu_count() // (max_parallel * processes_per_run))

        def work(run):
            slot = slots.get()
            try:
                run_gpus = None
                if gpus:
                    first = slot * processes_per_run
                    run_gpus = [gpus[(first + k) % len(gpus)] for k in range(processes_per_run)]
                return self.train(run, run_gpus, threads)
            finally:
                slots.put(slot)

        outcomes = {}
        with ThreadPoolExecutor(max_workers=max_parallel) as executor:
            futures = {executor.submit(work, run): run.index for run in planned}
            try:
                for future in as_completed(futures):
                    outcome = future.result()
                    outcomes[futures[future]] = outcome
                    if on_done:
                        on_done(outcome)
            except BaseException:
                # Ctrl-C, SIGTERM or submitit's requeue exit: stop the children (they
                # save their checkpoints) and drop the runs not started yet.
                self.stop()
                for future in futures:
                    future.cancel()
                raise
        return [outcomes[run.index] for run in planned]

    def stop(self, grace_s=120.0):
        """Interrupt every child with SIGTERM; wait up to `grace_s` for them to exit."""
        self.stopping.set()
        with self._lock:
            children = list(self._children)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                child.kill()
