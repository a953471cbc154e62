"""The SLURM backend: submitit array jobs, one node each, requeued on preemption.

Two layouts of a job (`slurm.mode` in the sweep file):
    pack  one job trains `runs_per_node` runs at once (default: one per GPU), each pinned to
          one GPU of the node through CUDA_VISIBLE_DEVICES (FFCV's "8 ResNet-18s at once");
    ddp   one job trains one run on all GPUs of its node: the trainer is started once and
          spawns `dist.world_size` processes, one per GPU. The run's config must say
          `dist.world_size: <gpus_per_node>` (the world size changes the global batch, so it
          is part of the run_id and the job cannot change it).

Preemption and time limits follow submitit's checkpoint protocol: `SweepJob.checkpoint()`
stops the trainers with SIGTERM (each saves its checkpoint.pt and exits) and returns a fresh
`DelayedSubmission` of the same job, which submitit requeues. The requeued job skips the
runs that completed and resumes the others from their checkpoints.

Submitted jobs are recorded in `<folder>/.sweep/jobs.json` (job id -> run ids), which also
lets `plan`/`status`/`launch` see runs whose job is still waiting in the queue.
"""
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

from ffcv_bias.common import atomic
from ffcv_bias.record import runs
from ffcv_bias.sweep.runner import TrainerPool, detect_gpus
from ffcv_bias.sweep.spec import SweepError, describe, world_size

SWEEP_DIR = ".sweep"
JOBS_FILE = "jobs.json"
DEFAULT_LOCAL_TIMEOUT_MIN = 24 * 60


class SweepJob:
    """What one array task runs: its runs, on the node it lands on (submitit-checkpointable)."""

    def __init__(self, planned, train_script, cwd, mode, runs_in_parallel, grace_s):
        self.planned = planned
        self.train_script = str(train_script)
        self.cwd = str(cwd)
        self.mode = mode
        self.runs_in_parallel = runs_in_parallel
        self.grace_s = grace_s  # how long trainers may take to save after SIGTERM
        self._pool = None

    def __call__(self):
        gpus = detect_gpus()
        max_parallel, processes_per_run = self.runs_in_parallel, 1
        if self.mode == "ddp":
            max_parallel = 1
            processes_per_run = max(world_size(run) for run in self.planned)
        self._pool = TrainerPool(self.train_script, self.cwd)
        print(f"sweep job: {len(self.planned)} runs, mode {self.mode}, GPUs {gpus or 'none'}",
              flush=True)
        outcomes = self._pool.train_all(self.planned, max_parallel, gpus, processes_per_run,
                                        on_done=_print_outcome)
        # Raised after every run of the job ended, so that sacct shows the job FAILED.
        # "interrupted": the trainers got SIGTERM without submitit's checkpoint signal (a
        # preemption that SLURM did not announce with USR2); relaunching resumes them.
        unfinished = [o for o in outcomes if o.status in ("failed", "interrupted")]
        if unfinished:
            names = ", ".join(f"{o.run.run_id} ({o.status})" for o in unfinished)
            raise RuntimeError(f"{len(unfinished)} of {len(outcomes)} runs did not complete: "
                               f"{names}; `launch` again to retry or resume them")
        return {o.run.run_id: o.status for o in outcomes}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption/timeout: let the trainers save, then requeue."""
        import submitit
        if self._pool is not None:
            self._pool.stop(grace_s=self.grace_s)
        fresh = SweepJob(self.planned, self.train_script, self.cwd, self.mode,
                         self.runs_in_parallel, self.grace_s)
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None  # live child processes stay with the process that owns them
        return state


def _print_outcome(outcome):
    print(f"{outcome.status}: {outcome.run.run_id} {describe(outcome.run)} "
          f"{outcome.seconds:.0f}s {outcome.message}", flush=True)


# ----------------------------------------------------------------------------------------
# Layout and submission
# ----------------------------------------------------------------------------------------

def runs_per_job(settings, cluster):
    if settings.mode == "ddp":
        return 1
    if settings.runs_per_node:
        return settings.runs_per_node
    return max(1, job_gpus(settings, cluster))


def job_gpus(settings, cluster):
    """GPUs each job asks for; a local trial asks only for the GPUs this machine has."""
    if cluster == "local":
        return min(settings.gpus_per_node, len(detect_gpus()))
    return settings.gpus_per_node


def check_world_sizes(todo, settings):
    """A job cannot change a run's dist.world_size (it is part of the run_id): check it fits."""
    for run in todo:
        size = world_size(run)
        if settings.mode == "ddp" and size != settings.gpus_per_node:
            raise SweepError(f"mode ddp runs one run per node on its {settings.gpus_per_node} "
                             f"GPUs, but run {describe(run)} has dist.world_size={size}: set "
                             f"'dist.world_size: {settings.gpus_per_node}' in the overrides "
                             f"or slurm.gpus_per_node: {size}")
        if settings.mode == "pack" and size != 1:
            raise SweepError(f"mode pack trains single-GPU runs, but run {describe(run)} has "
                             f"dist.world_size={size}: set 'dist.world_size: 1' in the "
                             f"overrides, or use slurm.mode: ddp")


def job_layout(todo, settings, cluster="slurm"):
    """Split the runs to train into jobs (plan order kept): a list of lists of runs."""
    check_world_sizes(todo, settings)
    size = runs_per_job(settings, cluster)
    return [todo[start:start + size] for start in range(0, len(todo), size)]


def check_resources(settings):
    """A SLURM job must say how many CPUs and how much memory it needs: SLURM's defaults
    (often 1 CPU and a few GB) would be shared by every run and loader of the node."""
    missing = [key for key in ("cpus_per_task", "mem") if getattr(settings, key) is None]
    if missing:
        raise SweepError(f"a SLURM sweep needs {' and '.join('slurm.' + key for key in missing)}"
                         f" (e.g. 'slurm: {{cpus_per_task: 80, mem: 480G}}' for 8 GPUs, or "
                         f"--cpus-per-task / --mem): SLURM's default CPU and memory would be "
                         f"shared by all the node's runs")


def executor_parameters(settings, name, max_parallel, cluster):
    """submitit AutoExecutor parameters of one sweep job."""
    timeout = settings.time
    if timeout is None:
        if cluster == "slurm":
            raise SweepError("a SLURM sweep needs a time limit: 'slurm: {time: MINUTES}' "
                             "in the sweep file or --time")
        timeout = DEFAULT_LOCAL_TIMEOUT_MIN
    if cluster == "slurm":
        check_resources(settings)
    params = {"name": name, "timeout_min": timeout, "nodes": 1, "tasks_per_node": 1,
              "gpus_per_node": job_gpus(settings, cluster)}
    if settings.cpus_per_task:
        params["cpus_per_task"] = settings.cpus_per_task
    slurm_only = {"partition": settings.partition, "account": settings.account,
                  "qos": settings.qos, "constraint": settings.constraint, "mem": settings.mem,
                  "array_parallelism": max_parallel, "signal_delay_s": settings.signal_delay_s}
    params.update({f"slurm_{key}": value for key, value in slurm_only.items()
                   if value is not None})
    return params


def require_slurm_commands():
    """submitit submits with sbatch and needs srun in the job: without them it raises a
    RuntimeError (a traceback); this says it in one line, before any file is written."""
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        raise SweepError(f"--backend slurm: {' and '.join(missing)} not found on PATH (this "
                         f"is not a SLURM login node?); run the launch where sbatch works, "
                         f"or use --backend local / submitit-local, or --dry-run to see "
                         f"the jobs")


def make_executor(folder, settings, name, max_parallel, cluster):
    import submitit
    if cluster == "slurm":
        require_slurm_commands()
    log_folder = Path(folder) / SWEEP_DIR / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=log_folder, cluster=cluster,
                                     slurm_max_num_timeout=settings.max_timeouts,
                                     local_max_num_timeout=settings.max_timeouts)
    executor.update_parameters(**executor_parameters(settings, name, max_parallel, cluster))
    if cluster == "local":
        # AutoExecutor does not pass signal_delay_s on to the LocalExecutor, which reads it.
        executor._executor.update_parameters(signal_delay_s=settings.signal_delay_s)
    return executor


def submit(todo, *, sweep, settings, folder, max_parallel, train_script, cwd,
           cluster="slurm"):
    """Submit the runs as one job array; record it in jobs.json; return [(job, runs)]."""
    layout = job_layout(todo, settings, cluster)
    executor = make_executor(folder, settings, sweep.name, max_parallel, cluster)
    parallel = runs_per_job(settings, cluster)
    # Trainers must have saved and exited before SLURM kills the job at its time limit.
    grace_s = max(1, settings.signal_delay_s - 15)
    jobs = []
    with executor.batch():
        for job_runs in layout:
            task = SweepJob(job_runs, train_script, cwd, settings.mode, parallel, grace_s)
            jobs.append(executor.submit(task))
    record_submission(folder, sweep, cluster, settings, list(zip(jobs, layout)))
    return list(zip(jobs, layout))


def record_submission(folder, sweep, cluster, settings, jobs_and_runs):
    path = Path(folder) / SWEEP_DIR / JOBS_FILE
    record = read_jobs(folder)
    record["submissions"].append({
        "time": datetime.now().isoformat(timespec="seconds"),
        "sweep": str(Path(sweep.path).resolve()),
        "cluster": cluster,
        "mode": settings.mode,
        "jobs": [{"job_id": str(job.job_id), "runs": [run.run_id for run in job_runs]}
                 for job, job_runs in jobs_and_runs],
    })
    atomic.write_json(path, record)


def read_jobs(folder):
    path = Path(folder) / SWEEP_DIR / JOBS_FILE
    if not path.is_file():
        return {"submissions": []}
    return runs.read_json(path)


# ----------------------------------------------------------------------------------------
# Which submitted runs are still waiting in the SLURM queue
# ----------------------------------------------------------------------------------------

def parse_squeue_ids(text):
    """Job ids as squeue prints them (%i) -> set of ids, array ranges expanded.

    '123', '124_7' and '125_[0-3,8%4]' give {'123', '124_7', '125_0', ..., '125_3', '125_8'}.
    """
    ids = set()
    for token in text.split():
        match = re.fullmatch(r"(\d+)_\[([^\]]*)\]", token)
        if not match:
            ids.add(token)
            continue
        array_id, ranges = match.group(1), match.group(2).split("%")[0]
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            for index in range(int(low), int(high or low) + 1):
                ids.add(f"{array_id}_{index}")
    return ids


def queued_run_ids(folder):
    """Run ids whose submitted SLURM job is still in the queue (pending or running).

    Empty when nothing was submitted to SLURM or squeue is not available here.
    """
    submissions = [s for s in read_jobs(folder)["submissions"] if s.get("cluster") == "slurm"]
    if not submissions:
        return set()
    try:
        listing = subprocess.run(["squeue", "--noheader", "--format=%i", "--me"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    in_queue = parse_squeue_ids(listing)
    return {run_id for submission in submissions for job in submission["jobs"]
            if job["job_id"] in in_queue for run_id in job["runs"]}
