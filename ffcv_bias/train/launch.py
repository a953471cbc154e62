"""Start one run: resolve and check its config, take its run directory, run the Trainer
in one process, N spawned ones (--dist.world_size=N) or under torchrun, and turn every
outcome into an exit code and at most one line on stderr.

    python train_imagenet.py --config-file rn50_configs/fashion_mnist_cpu.yaml \
        --training.seed=3 --augment.min_scale=0.25

A run's life (complete, resumed, stopped, failed) and its record: docs/DESIGN.md,
"A run's life" and "The run record".
"""
import os
import signal
import socket
import sys
import traceback
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from ffcv_bias import record
from ffcv_bias.common import atomic, env
from ffcv_bias.common.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED
from ffcv_bias.common.errors import EXIT_USAGE as EXIT_CONFIG
from ffcv_bias.data.ffcv_patches import LoaderThreadError
from ffcv_bias.data.fingerprint import current_fingerprints
from ffcv_bias.data.sidecar import check_beton
from ffcv_bias.data.sources import DatasetError
from ffcv_bias.record import runs
from ffcv_bias.train import distributed, torchrun
from ffcv_bias.train.checks import checked_config, said_complete
from ffcv_bias.train.config import is_distributed, run_config
from ffcv_bias.train.fastargs_strict import ConfigError, flatten
from ffcv_bias.train.loop import Trainer
from ffcv_bias.train.state import (Preempted, RunDirRefused, RunError, StopRequest,
                                   choose_loader_threads, torch_settings_kept)

# The files this trainer writes atomically into the run directory (error.txt aside, which
# the sweep launcher writes too).
RECORD_FILES = (runs.CONFIG_FILE, runs.LOG_FILE, runs.CHECKPOINT_FILE, runs.WEIGHTS_FILE,
                runs.VAL_LOGITS_FILE, runs.VAL_PREDS_FILE, runs.VAL_LABELS_FILE,
                runs.SUMMARY_FILE)


# ---------------------------------------------------------------------------------------
# Run directory: config.json, error.txt, provenance
# ---------------------------------------------------------------------------------------

def check_run_dir(run_dir, run_id):
    """Refuse a directory that holds another run's config; remove a stale error.txt."""
    stored = runs.read_json_object(run_dir / runs.CONFIG_FILE)  # None: missing or corrupt
    if stored is not None:
        stored_id = stored.get("meta", {}).get("run_id") or runs.run_id(stored)
        if stored_id != run_id:
            raise RunDirRefused(f"run directory {run_dir} holds the config of run {stored_id}")
    set_aside = runs.set_aside_corrupt(run_dir, run_id)
    if set_aside:
        names, folder = set_aside
        print(f"run {run_id}: corrupt {', '.join(names)} moved to {folder}; training it "
              f"again (from its checkpoint, if any)", flush=True)
    (run_dir / runs.ERROR_FILE).unlink(missing_ok=True)
    # A holder killed mid-write left its temporary files; only the lock holder writes them.
    atomic.remove_stale_temp_files(run_dir, RECORD_FILES)


def write_config(run_dir, nested, info, command):
    """config.json at the first start (a resumed run keeps the original one)."""
    path = run_dir / runs.CONFIG_FILE
    commit, dirty = env.git_commit()
    meta = {"run_id": runs.run_id(nested), "betons": current_fingerprints(nested),
            "git": commit, "git_dirty": dirty,
            "versions": env.package_versions(), "host": socket.gethostname(),
            "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "world_size": info.world_size, "device": str(info.device),
            "torch_threads": torch.get_num_threads(),
            "loader_threads": choose_loader_threads(nested["data"]["num_workers"],
                                                    info.local_world_size)}
    if not path.is_file():
        record.write_config(run_dir, {**nested, "meta": meta})
    print(f"run {meta['run_id']}: {run_dir}\ngit {commit}{' (dirty)' if dirty else ''}\n"
          + "\n".join(f"  {'.'.join(key)}: {value}"
                      for key, value in sorted(flatten(nested).items())), flush=True)


def write_error(run_dir, error, details):
    # On a full disk error.txt may not fit either: the error on stderr must still be the
    # original one, not this write's.
    try:
        atomic.write_text(run_dir / runs.ERROR_FILE, f"{error}\n\n{details}")
    except OSError as write_failure:
        print(f"(could not write {runs.ERROR_FILE}: {write_failure})", file=sys.stderr)


def one_line(error):
    if isinstance(error, (RunError, ConfigError, runs.RunLockedError, atomic.NoRoomError,
                          LoaderThreadError)):
        return str(error)
    return f"{type(error).__name__}: {error}".splitlines()[0]


# ---------------------------------------------------------------------------------------
# Processes: single, spawned (--dist.world_size=N) or torchrun
# ---------------------------------------------------------------------------------------

def train_worker(rank, nested, run_dir, command, owns_run_dir):
    """One process of a run. `owns_run_dir`: this process locks the run directory and
    writes error.txt (single process, or rank 0 under torchrun; spawned workers leave both
    to their parent)."""
    run_dir = Path(run_dir)
    if distributed.launched_by_torchrun():
        rank, world_size, local_rank, local_world_size = distributed.torchrun_ranks()
    else:
        world_size = local_world_size = nested["dist"]["world_size"]
        local_rank = rank
    with torch_settings_kept(), ExitStack() as stack, StopRequest() as stop:
        info = distributed.setup(rank, world_size, local_rank, local_world_size,
                                 start_group=is_distributed(nested),
                                 address=nested["dist"]["address"], port=nested["dist"]["port"],
                                 timeout_s=nested["dist"].get(
                                     "timeout", distributed.DEFAULT_TIMEOUT_S))
        stack.callback(distributed.cleanup, info)
        try:
            if take_run_dir(stack, run_dir, nested, info, owns_run_dir):
                if info.is_main:
                    print(finished_meanwhile(run_dir), flush=True)
                return EXIT_OK
            if info.is_main:
                write_config(run_dir, nested, info, command)
            summary = Trainer(run_config(nested), run_dir, info, stop).fit()
        except Preempted:
            print(f"stopped by {stop.signal_name}; resume from "
                  f"{run_dir / runs.CHECKPOINT_FILE}",
                  file=sys.stderr, flush=True)
            torchrun.say_preempted()  # under torchrun, its exit code is not ours
            return EXIT_PREEMPTED
        except RunDirRefused:
            raise
        except Exception as error:
            if owns_run_dir and info.is_main and run_dir.is_dir():
                write_error(run_dir, one_line(error), traceback.format_exc())
            raise
    if summary is not None:
        print(f"done: top1 {summary['top1']:.4f}  top5 {summary['top5']:.4f}  "
              f"({summary['train_seconds']:.0f} s of training)  {run_dir}", flush=True)
    return EXIT_OK


@contextmanager
def trainer_in_this_process(nested, run_dir):
    """A Trainer of `nested` as the only rank of the calling process (no process group, no
    run lock, nothing written until it is driven), for benchmarks and tests that call its
    methods. SIGTERM and SIGUSR2 stop it between steps as they stop a run; the torch
    settings it changes (threads, deterministic algorithms) are restored on exit."""
    with torch_settings_kept(), StopRequest() as stop:
        yield Trainer(run_config(nested), run_dir,
                      distributed.setup(0, 1, 0, 1, start_group=False), stop)


def take_run_dir(stack, run_dir, nested, info, owns_run_dir):
    """The owner locks the run directory and checks it; under torchrun every rank learns
    whether rank 0 succeeded, so none is left waiting in a collective. True when the run
    turned out complete once locked."""
    failure, complete = None, False
    if owns_run_dir and info.is_main:
        try:
            stack.enter_context(runs.run_lock(run_dir))
            complete = complete_once_locked(run_dir, nested)
        except (runs.RunLockedError, RunDirRefused) as error:
            failure = str(error)
    failure, complete = distributed.broadcast_object((failure, complete), info)
    if failure is not None:
        raise RunDirRefused(failure) if info.is_main else SystemExit(EXIT_FAILURE)
    return complete


def complete_once_locked(run_dir, nested):
    """The final answer to "is this run complete", asked by the holder of its lock (after
    refusing another run's directory and moving corrupt files aside): run() answered
    before the lock, and a second launcher's trainer can finish the run in between."""
    run_id = runs.run_id(nested)
    check_run_dir(run_dir, run_id)
    return runs.is_complete(run_dir, run_id)


def finished_meanwhile(run_dir):
    return f"run {run_dir.name} was completed by another process meanwhile: {run_dir}"


def spawned_worker(rank, nested, run_dir, command):
    """Entry point of a process started by distributed.spawn (exit code = its status)."""
    code = train_worker(rank, nested, run_dir, command, owns_run_dir=False)
    if code != EXIT_OK:
        sys.exit(code)


def launch_spawned(nested, run_dir, command):
    """--dist.world_size=N without torchrun: this process locks the run and spawns N,
    all told the same rendezvous port (a free one for dist.port=auto)."""
    import torch.multiprocessing as torch_mp
    world_size = nested["dist"]["world_size"]
    try:
        port = distributed.rendezvous_port(nested["dist"]["port"], nested["dist"]["address"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    nested = {**nested, "dist": {**nested["dist"], "port": port}}
    with runs.run_lock(run_dir):
        if complete_once_locked(run_dir, nested):
            print(finished_meanwhile(run_dir), flush=True)
            return EXIT_OK
        try:
            distributed.spawn(spawned_worker, world_size, (nested, str(run_dir), command))
        except torch_mp.ProcessExitedException as error:
            if error.exit_code == EXIT_PREEMPTED:
                return EXIT_PREEMPTED
            message = f"worker {error.error_index} exited with code {error.exit_code}"
            write_error(run_dir, message, str(error))
            raise RunError(message) from None
        except torch_mp.ProcessRaisedException as error:
            # The worker's traceback ends in "module.ErrorType: message": show the message.
            last_line = [line for line in str(error).splitlines() if line.strip()][-1]
            message = last_line.split(": ", 1)[-1] if ": " in last_line else last_line
            write_error(run_dir, message, str(error))
            raise RunError(message) from None
    return EXIT_OK


def check_betons(nested):
    """Both betons whole and agreeing with their .classes.json, checked before the run
    directory exists: a truncated file or labels beyond the class list would otherwise
    surface mid-training as a numpy or CUDA error, after a run directory was made.
    It reads the metadata and allocation table only (no image), as the loaders do anyway."""
    for key in ("train_dataset", "val_dataset"):
        try:
            check_beton(nested["data"][key])
        except DatasetError as error:
            raise ConfigError(f"data.{key}: {error}") from None


def run(argv=None, nested=None):
    """Resolve and check the config of `argv` (or take `nested`, checked by
    checks.preflight), then train it, or do nothing if the run is complete. Exit code."""
    command = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    if nested is None:
        nested = checked_config(argv)
    run_dir = Path(nested["logging"]["folder"]) / runs.run_id(nested)
    check_betons(nested)
    if said_complete(nested):
        return EXIT_OK
    if distributed.launched_by_torchrun():
        return train_worker(int(os.environ["RANK"]), nested, run_dir, command,
                            owns_run_dir=True)
    if nested["dist"]["world_size"] > 1:
        return launch_spawned(nested, run_dir, command)
    return train_worker(0, nested, run_dir, command, owns_run_dir=True)


def main(argv=None, nested=None):
    """CLI: one line on stderr for a known error; exit 0 / 1 (run failed) / 2 (config) / 75.
    `nested`: the config checks.preflight already resolved and checked from argv."""
    try:
        return run(argv, nested)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (RunError, runs.RunLockedError, atomic.NoRoomError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:
        traceback.print_exc()
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_FAILURE
