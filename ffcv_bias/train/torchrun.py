r"""torchrun with the trainer's preemption contract (exit 75, checkpoint kept, rerun resumes).

    srun python -m ffcv_bias.train.torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 \
        --rdzv_backend=c10d --rdzv_endpoint=$head_node:29500 --rdzv_id=$SLURM_JOB_ID \
        train_imagenet.py --config-file rn50_configs/rn50_88_epochs.yaml ...

(head_node: the job's first host; README, "Preemption under torchrun and SLURM") takes
torchrun's own arguments and runs torchrun's own code (torch.distributed.run) in
this process, with three changes. Plain torchrun breaks the contract twice:

- SIGUSR2 (SLURM's warning before the time limit, `#SBATCH --signal=USR2@90`, the one
  submitit asks for) is not among the signals torchrun's agent handles (SIGTERM, SIGINT,
  SIGHUP, SIGQUIT): its default action kills the agent at once, srun ends the step, and the
  workers die mid-step or mid-checkpoint. Here SIGUSR2 is added to them (torch reads
  `PET_SIGNALS_TO_HANDLE`, its --signals_to_handle, and recent releases, 2.13 here,
  overwrite `TORCHELASTIC_SIGNALS_TO_HANDLE` with it, which older ones read: both are set), so
  the agent passes it on to its workers like SIGTERM and waits for them
  (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, set to SHUTDOWN_TIMEOUT_S unless already set; torch's
  default is 30 s), ignoring a second signal meanwhile. The workers agree to stop after the
  current step, rank 0 writes the checkpoint, all exit 75.
- A worker's exit 75 is a failure to the agent (torchrun exits 1), and an agent stopped by
  SIGTERM exits 1 too. Here the exit code is 75 when the agent was stopped by SIGTERM or
  SIGUSR2 (it passed the signal on and waited for its workers, which resume from their
  checkpoint), or when a worker said it stopped for a signal: the workers inherit
  `FFCV_BIAS_PREEMPTED_MARKER`, a fresh path per launch, and `say_preempted` (called by
  launch.train_worker as it exits 75) creates that file. Otherwise torchrun's own outcome:
  0, 1 (a worker failed), 2 (bad arguments), 130 on SIGINT.

Each node runs its own agent and its own marker, so this holds across nodes too. With
`--dist.world_size=N` (no torchrun) the trainer's parent process does all this itself.
"""
import os
import signal
import sys
import tempfile
from pathlib import Path

from ffcv_bias.common.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED

MARKER_VARIABLE = "FFCV_BIAS_PREEMPTED_MARKER"
# torch's --signals_to_handle default, plus SIGUSR2.
TORCH_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
# How long the agent waits for its workers after passing a stop signal on, before SIGKILL:
# a stop after the current step and rank 0's checkpoint take seconds; a signal during
# validation or torch.compile's first graphs waits for those to end.
SHUTDOWN_TIMEOUT_S = 120


class _StoppedBeforeStart(Exception):
    def __init__(self, signum):
        super().__init__(f"got {signal.Signals(signum).name}")
        self.sigval = signal.Signals(signum)


def say_preempted():
    """In a worker started by this module: tell it that the run stopped for a signal and
    kept its checkpoint (a no-op elsewhere)."""
    path = os.environ.get(MARKER_VARIABLE)
    if path:
        try:
            Path(path).touch()
        except OSError:
            pass


def with_signal(names, signum):
    """The comma list of signal `names` with `signum`'s name added (kept once)."""
    listed = [name.strip() for name in names.split(",") if name.strip()]
    wanted = signal.Signals(signum).name
    return ",".join(listed + ([wanted] if wanted not in listed else []))


def agent_environment(environ, marker):
    """The environment torchrun's agent (and so every worker) runs with."""
    handled = environ.get("PET_SIGNALS_TO_HANDLE") or environ.get(
        "TORCHELASTIC_SIGNALS_TO_HANDLE") or TORCH_DEFAULT_SIGNALS
    handled = with_signal(handled, signal.SIGUSR2)
    return {**environ, "PET_SIGNALS_TO_HANDLE": handled,
            "TORCHELASTIC_SIGNALS_TO_HANDLE": handled,
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                                                          str(SHUTDOWN_TIMEOUT_S)),
            MARKER_VARIABLE: str(marker)}


def exit_code(outcome, marker):
    """This launcher's exit code. `outcome`: None (torchrun returned: every worker exited 0),
    a signal number (the agent was stopped by it), an int exit status (SystemExit: bad
    arguments) or "failed" (a worker failed)."""
    if isinstance(outcome, signal.Signals):
        if outcome in STOP_SIGNALS:
            return EXIT_PREEMPTED
        return 128 + int(outcome)
    if Path(marker).exists():
        return EXIT_PREEMPTED
    if outcome is None:
        return EXIT_OK
    if outcome == "failed":
        return EXIT_FAILURE
    return int(outcome)


def _raise_stopped(signum, frame):
    raise _StoppedBeforeStart(signum)


def first_signal_only(handler):
    """torch's agent handler, raising on the first signal only. The agent stops by passing
    that signal on to its workers and waiting for them; a second signal (SLURM's SIGTERM at
    the time limit after its SIGUSR2 warning) would raise again inside that wait, and the
    agent would leave its workers to be killed mid-checkpoint."""
    raised = []

    def once(signum, frame):
        if raised:
            return
        raised.append(signum)
        handler(signum, frame)
    return once


def run_torchrun(argv):
    """torch.distributed.run's main on `argv`: None, a signal, an exit status or
    "failed"."""
    from torch.distributed.elastic.multiprocessing import api as elastic_api
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main
    # PContext.start installs the module's handler, looked up by name when it runs.
    if hasattr(elastic_api, "_terminate_process_handler"):
        elastic_api._terminate_process_handler = first_signal_only(
            elastic_api._terminate_process_handler)
    try:
        torchrun_main(list(argv))
    except (SignalException, _StoppedBeforeStart) as stopped:
        return signal.Signals(stopped.sigval)
    except ChildFailedError:
        return "failed"
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_FAILURE
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="ffcv_bias_torchrun_") as folder:
        marker = Path(folder) / "preempted"
        os.environ.update(agent_environment(os.environ, marker))
        # Until torchrun's agent installs its handlers (rendezvous can take minutes): a stop
        # signal ends the launch at once (no worker started, nothing to save) as a stop.
        for number in STOP_SIGNALS:
            signal.signal(number, _raise_stopped)
        try:
            outcome = run_torchrun(argv)
        except _StoppedBeforeStart as stopped:  # between the handlers and torchrun's main
            outcome = stopped.sigval
        except KeyboardInterrupt:
            outcome = signal.SIGINT
        code = exit_code(outcome, marker)
    if code == EXIT_PREEMPTED:
        print("torchrun: the run was stopped by a signal; it resumes from its last "
              "checkpoint when started again (exit 75)", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
