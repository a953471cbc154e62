"""`python -m ffcv_bias.sweep plan|launch|status SWEEP.yaml [options]`."""
import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ffcv_bias.common.env import usable_cpu_count
from ffcv_bias.common.errors import OneLineArgumentParser, main_guard
from ffcv_bias.common.output_paths import creation_problem, path_text
from ffcv_bias.sweep import slurm as slurm_backend
from ffcv_bias.sweep.runner import (TrainerPool, default_train_script,
                                    detect_gpus, requested_gpus)
from ffcv_bias.sweep.spec import (SweepError, describe, load_sweep, plan, slurm_settings,
                                  world_size)
from ffcv_bias.sweep.status import (TODO_STATES, beton_change_message, count_states,
                                    counts_line, plan_table, run_state, status_report)

BACKENDS = ("local", "slurm", "submitit-local")
SLURM_FLAGS = ("partition", "account", "qos", "constraint", "time", "gpus_per_node",
               "cpus_per_task", "mem", "mode", "runs_per_node")
SLURM_TEXT_FLAGS = ("partition", "account", "qos", "constraint", "mem", "mode")
# Flags whose value may begin with '-' (`--mem -5G`, `--gpus -1`): argparse would take
# it for an option and answer "expected one argument"; they are joined as `--mem=-5G`
# so that the value itself is checked and named.
VALUE_FLAGS = ("--folder", "--max-parallel", "--gpus", "--train-script",
               *("--" + flag.replace("_", "-") for flag in SLURM_FLAGS))


def build_parser():
    parser = OneLineArgumentParser(
        prog="python -m ffcv_bias.sweep",
        description="Plan, launch (locally or on SLURM) and follow a sweep of training runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "list the runs and their states; nothing runs"),
                       ("launch", "train every run that is not complete (resumes started runs)"),
                       ("status", "counts of complete/running/failed/started/missing runs")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("sweep_file", type=path_text,
                         help="sweep YAML (see ffcv_bias/sweep/__init__.py)")
        sub.add_argument("--folder", type=path_text,
                         help="run folder (logging.folder), overriding the sweep "
                              "file's 'folder:'; relative to the current directory")
        if name == "launch":
            _add_launch_flags(sub)
    return parser


def _add_launch_flags(sub):
    sub.add_argument("--backend", choices=BACKENDS, default="local",
                     help="local: subprocesses here; slurm: submitit job arrays; "
                          "submitit-local: the SLURM job code run by submitit on this machine")
    sub.add_argument("--max-parallel", type=int,
                     help="runs at once (local) or array tasks at once (slurm)")
    sub.add_argument("--gpus", type=non_empty("GPUs: 'none', a count or a list like 0,2"),
                     help="local GPUs to use: 'none', a count or a list '0,2' "
                          "(default: CUDA_VISIBLE_DEVICES, else nvidia-smi)")
    sub.add_argument("--dry-run", action="store_true",
                     help="print what would be launched, launch nothing")
    sub.add_argument("--wait", action="store_true",
                     help="slurm: stay and show progress until the submitted jobs end")
    sub.add_argument("--train-script", type=path_text,
                     help="trainer to run (default: train_imagenet.py of this repository)")
    for flag in SLURM_FLAGS:
        kind = (minutes if flag == "time" else
                non_empty(f"slurm.{flag} (leave the flag out for the sweep file's or SLURM's "
                          f"default)") if flag in SLURM_TEXT_FLAGS else int)
        sub.add_argument("--" + flag.replace("_", "-"), type=kind, dest=f"slurm_{flag}",
                         help=f"slurm.{flag}, overriding the sweep file"
                              + (" (minutes)" if flag == "time" else ""))


def non_empty(what):
    """An argparse type: the text, refused when empty (`--partition ''`, an unset shell
    variable), which would otherwise be passed on or silently read as 'not given'."""
    def parse(text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"empty value {text!r}: give {what}")
        return text
    parse.__name__ = "text"
    return parse


def minutes(text):
    """--time: a whole number of minutes (SLURM's HH:MM:SS is not read: 10:00 would be
    ten minutes to sbatch and ten hours to a reader)."""
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of minutes (e.g. 600 for 10 hours)")
    return int(text)


def join_dash_values(argv):
    """`--mem -5G` -> `--mem=-5G` for VALUE_FLAGS (see there)."""
    joined, index = [], 0
    while index < len(argv):
        word = argv[index]
        follows = argv[index + 1] if index + 1 < len(argv) else None
        if (word in VALUE_FLAGS and follows is not None and follows.startswith("-")
                and not follows.startswith("--") and follows != "-h"):
            joined.append(f"{word}={follows}")
            index += 2
            continue
        joined.append(word)
        index += 1
    return joined


# ----------------------------------------------------------------------------------------
# plan and status
# ----------------------------------------------------------------------------------------

def load_and_plan(args):
    sweep = load_sweep(args.sweep_file)
    planned = plan(sweep, folder=args.folder)
    folder = runs_folder(planned)
    if folder is not None:
        problem = folder_problem(folder)
        if problem:
            raise SweepError(f"cannot create {folder}: {problem}")
    queued = slurm_backend.queued_run_ids(folder) if folder else set()
    states = [run_state(run, queued) for run in planned]
    return sweep, planned, states, folder


def folder_problem(folder):
    """Why `folder` (or a folder above it) cannot hold runs because it is a file, or None.
    Asked by plan and status too: they would list every run as missing in it."""
    path = Path(folder)
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    if os.path.lexists(path) and not path.is_dir():
        return ("it is a file, not a directory" if path == Path(folder) else
                f"{path} is a file, not a directory")
    return None


def runs_folder(planned):
    for run in planned:
        if run.run_dir is not None:
            return run.run_dir.parent
    return None


def planned_folder(sweep, args):
    """The run folder as the sweep names it, for when no run resolved (all invalid)."""
    named = args.folder or sweep.folder
    return Path(named).resolve() if named else "(none: every run's config is invalid)"


def cmd_plan(args):
    sweep, planned, states, folder = load_and_plan(args)
    print(f"sweep {sweep.name}: base {sweep.base}")
    print(f"runs in {folder or planned_folder(sweep, args)}\n")
    print(plan_table(planned, states))
    print("\n" + counts_line(count_states(states)))
    invalid = [run for run, state in zip(planned, states) if state == "invalid"]
    if invalid:
        # The table says it per run on stdout; stderr names the problem in one line, as
        # `launch` does before it refuses the sweep.
        print(f"error: {len(invalid)} of {len(planned)} runs have a bad config, e.g. "
              f"{describe(invalid[0])}: {invalid[0].config_error}; launch refuses the sweep",
              file=sys.stderr)
        return 1
    return 0


def cmd_status(args):
    sweep, planned, states, folder = load_and_plan(args)
    if folder is not None and not Path(folder).exists():
        print(f"note: the run folder {folder} does not exist: no run of this sweep has "
              f"started there (is --folder or the sweep file's 'folder:' the one launched?)",
              file=sys.stderr)
    print(f"sweep {sweep.name}: runs in {folder}\n")
    print(status_report(planned, states))
    submissions = slurm_backend.read_jobs(folder)["submissions"] if folder else []
    if submissions:
        last = submissions[-1]
        ids = ", ".join(job["job_id"] for job in last["jobs"][:10])
        more = f" (+{len(last['jobs']) - 10} more)" if len(last["jobs"]) > 10 else ""
        print(f"\nlast submission {last['time']} ({last['cluster']}): jobs {ids}{more}")
    return 0


# ----------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------

def cmd_launch(args):
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SweepError(f"--max-parallel must be >= 1, not {args.max_parallel}")
    gpus = check_gpus_flag(args) if args.backend == "local" else []
    sweep, planned, states, folder = load_and_plan(args)
    invalid = [run for run, state in zip(planned, states) if state == "invalid"]
    if invalid:
        # Refuse the whole sweep: a typo in one grid value should cost no cluster time.
        raise SweepError(f"{len(invalid)} runs have a bad config, e.g. {describe(invalid[0])}: "
                         f"{invalid[0].config_error}")
    refuse_changed_betons(planned, states)
    problem = creation_problem(folder)
    if problem:
        raise SweepError(f"cannot create {folder}: {problem}")
    todo = [run for run, state in zip(planned, states) if state in TODO_STATES]
    print(counts_line(count_states(states)) + f"; {len(todo)} to launch")
    if not todo:
        return 0
    train_script = Path(args.train_script or default_train_script()).resolve()
    if train_script.is_dir():
        raise SweepError(f"--train-script {train_script} is a directory, not a Python script")
    if not train_script.is_file():
        raise SweepError(f"train script not found: {train_script}")
    if args.backend == "local":
        return launch_local(todo, sweep, args, train_script, gpus)
    return launch_submitit(todo, sweep, args, train_script, folder)


def refuse_changed_betons(planned, states):
    """Runs recorded on other betons are neither complete nor to be retrained in place."""
    changed = [run for run, state in zip(planned, states) if state == "changed"]
    if changed:
        raise SweepError(f"{len(changed)} runs were trained on other betons than the sweep "
                         f"names now, e.g. {describe(changed[0])}: "
                         f"{beton_change_message(changed[0])}")


def check_gpus_flag(args):
    """The local GPUs to use: --gpus checked against this machine's (before anything is
    printed or planned), else every GPU detected."""
    if args.gpus is None:
        return detect_gpus()
    try:
        return requested_gpus(args.gpus)
    except ValueError as error:
        raise SweepError(str(error)) from None


def launch_local(todo, sweep, args, train_script, gpus):
    # A DDP run (dist.world_size > 1) takes that many GPUs; its world size is part of its
    # run_id, so it cannot be shrunk to fit.
    processes_per_run = max(world_size(run) for run in todo)
    if gpus and len(gpus) < processes_per_run:
        raise SweepError(f"runs need dist.world_size={processes_per_run} GPUs each, "
                         f"only {len(gpus)} available ({','.join(gpus)})")
    max_parallel = (args.max_parallel or sweep.max_parallel
                    or max(1, len(gpus) // processes_per_run))
    pool = TrainerPool(train_script)
    threads = max(1, usable_cpu_count() // (max_parallel * processes_per_run))
    placement = (f"GPUs {','.join(gpus)} round-robin, {processes_per_run} per run"
                 if gpus else "CPU") + f", {threads} threads per process"
    print(f"local: {max_parallel} at a time, {placement}")
    if args.dry_run:
        for run in todo:
            print(" ".join(pool.command(run)))
        return 0
    bar = tqdm(total=len(todo), desc=f"sweep {sweep.name}", unit="run")
    tally = {"complete": 0, "failed": 0}

    def on_done(outcome):
        tally[outcome.status] = tally.get(outcome.status, 0) + 1
        if outcome.status != "complete":
            tqdm.write(f"{outcome.status}: {outcome.run.run_id} {describe(outcome.run)}"
                       f" {outcome.message}")
        bar.set_postfix(done=tally["complete"], failed=tally["failed"])
        bar.update()

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        outcomes = pool.train_all(todo, max_parallel, gpus, processes_per_run, on_done=on_done)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: started runs saved their checkpoints; launch again to resume",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    return report_outcomes(outcomes)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def report_outcomes(outcomes):
    failed = [o for o in outcomes if o.status == "failed"]
    by_status = {}
    for outcome in outcomes:
        by_status[outcome.status] = by_status.get(outcome.status, 0) + 1
    print("launched: " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())))
    for outcome in failed:
        print(f"FAILED {outcome.run.run_id} {describe(outcome.run)}: {outcome.message}",
              file=sys.stderr)
    return 1 if failed else 0


def launch_submitit(todo, sweep, args, train_script, folder):
    cluster = "local" if args.backend == "submitit-local" else "slurm"
    flags = {flag: getattr(args, f"slurm_{flag}") for flag in SLURM_FLAGS}
    settings = slurm_settings(sweep.slurm, flags, "command line")
    max_parallel = args.max_parallel or sweep.max_parallel
    layout = slurm_backend.job_layout(todo, settings, cluster)
    params = slurm_backend.executor_parameters(settings, sweep.name, max_parallel, cluster)
    print(f"{cluster}: {len(layout)} jobs (mode {settings.mode}, "
          f"{slurm_backend.runs_per_job(settings, cluster)} runs per job), parameters {params}")
    if args.dry_run:
        for index, job_runs in enumerate(layout):
            print(f"job {index}: " + ", ".join(run.run_id for run in job_runs))
        return 0
    submitted = slurm_backend.submit(todo, sweep=sweep, settings=settings, folder=folder,
                                     max_parallel=max_parallel, train_script=train_script,
                                     cwd=Path.cwd(), cluster=cluster)
    print(f"submitted {len(submitted)} jobs: "
          + ", ".join(str(job.job_id) for job, _ in submitted)
          + f" (recorded in {Path(folder) / slurm_backend.SWEEP_DIR / slurm_backend.JOBS_FILE})")
    if cluster == "local" or args.wait:
        return wait_for_jobs(submitted, sweep.name)
    return 0


def wait_for_jobs(submitted, name, poll_s=5.0):
    """Follow submitted jobs: a bar over their runs until every job has ended."""
    all_runs = [run for _, job_runs in submitted for run in job_runs]
    bar = tqdm(total=len(all_runs), desc=f"sweep {name}", unit="run")
    while True:
        states = [run_state(run) for run in all_runs]
        finished = sum(state in ("complete", "failed") for state in states)
        bar.n = finished
        bar.set_postfix(failed=states.count("failed"), running=states.count("running"))
        bar.refresh()
        if all(job.done() for job, _ in submitted):
            break
        time.sleep(poll_s)
    bar.close()
    states = [run_state(run) for run in all_runs]
    print(counts_line(count_states(states)))
    return 1 if any(state != "complete" for state in states) else 0


@main_guard()
def main(argv=None):
    """Exit 0, 1 (a run failed or is not complete) or 2 (SweepError: bad input)."""
    args = build_parser().parse_args(join_dash_values(
        list(sys.argv[1:] if argv is None else argv)))
    commands = {"plan": cmd_plan, "launch": cmd_launch, "status": cmd_status}
    return commands[args.command](args)
