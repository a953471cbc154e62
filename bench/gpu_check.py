"""The GPU acceptance check (issue 17): what a first CUDA run must show, in one command.

    bash bench/gpu_check.sh                       # a machine with one CUDA GPU, < 8 minutes
    bash bench/gpu_check.sh --device cpu --tiny   # the same code on a CPU (1-2 minutes)

(gpu_check.sh runs this script under a hard timeout and says where the JSON went.)

It writes its own synthetic ImageNet-like betons (by default 6,000 training and 1,000
validation images around 500x375, half of them JPEG at quality 90, 100 classes) and
prints one line per check or figure, `PASS`, `FAIL`, `INFO` (a figure with no pass mark)
or `SKIP` (not measurable on this device), and writes them all to <out>/gpu_check.json:

  buffers     ffcv's host buffers pinned; no batch whose GPU copy differs from its content
              at yield (a CPU fingerprint), with and without a simulated GPU backlog
              (torch.cuda._sleep before each step), with the copy in the training step (the
              old way: the race of issue 17 item 3, INFO) and inside the pipeline (ToDevice:
              must PASS);
  resume      SIGTERM -> exit 75 -> rerun resumes -> val_logits.npy equal to an
              uninterrupted training.deterministic=1 run; the same with SIGUSR2;
  syncs       host-device synchronizations of the training loop per step, counted apart
              from those at each epoch's end (torch.cuda.set_sync_debug_mode);
  trainer     the trainer's img/s and the share of its time spent waiting for the loader,
              over about --steps steps;
  model       img/s of --arch at each of --resolutions, batch --batch, bf16 channels-last,
              eager / fused SGD / torch.compile / both, and peak GPU memory;
  loader      loader img/s per thread at the first resolution, for each decoder mode the
              loader offers (augment.decode exact|fast where it exists);
  ddp         one epoch in a 1-process NCCL group (gloo on CPU).

The JSON is rewritten after each section ("complete": false until the end), so a check
stopped by the timeout keeps what it measured; "section_seconds" says where the time went.

--tiny (the CPU test, tests/test_gpu_check.py) shrinks the sizes (TINY), runs every
process on one torch thread and traces the compiled variants with torch.compile's
aot_eager backend (dynamo and AOT autograd, as on a GPU, without inductor's C++ code
generation); the checks themselves are the same as on a GPU.

Exit code: 0 when no check failed, 1 otherwise, 2 on a bad argument.
"""
import argparse
import contextlib
import inspect
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402

from ffcv_bias.common import atomic, env  # noqa: E402

TRAIN_SCRIPT = REPO / "train_imagenet.py"
EXIT_PREEMPTED = 75
# Sizes of --tiny: the whole check in about a minute on a CPU (for the tests). One torch
# thread per process: on a loaded 2-core machine several processes each spinning up as
# many OpenMP threads as there are cores made one trainer run 29 s instead of 12 s.
# aot_eager traces the compiled variants (dynamo and AOT autograd, as on a GPU) without
# inductor's C++ code generation, which took minutes on such a machine.
TINY = {"images": 96, "val_images": 32, "size": "64x48", "classes": 4, "arch": "resnet8",
        "batch": 16, "resolutions": "32,40", "steps": 12, "small_arch": "resnet8",
        "small_res": 32, "small_batch": 16, "model_steps": 2, "backlog_ms": 0.0,
        "torch_threads": 1, "compile_backend": "aot_eager"}


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------

class Report:
    """Prints each result as it comes; `failed` says whether any check failed."""

    def __init__(self):
        self.results = []

    def add(self, status, name, detail, **figures):
        self.results.append({"status": status, "name": name, "detail": detail, **figures})
        print(f"{status:<4}  {name}: {detail}", flush=True)

    def check(self, name, ok, detail, **figures):
        self.add("PASS" if ok else "FAIL", name, detail, **figures)

    def info(self, name, detail, **figures):
        self.add("INFO", name, detail, **figures)

    def skip(self, name, why):
        self.add("SKIP", name, why)

    @property
    def failed(self):
        return any(result["status"] == "FAIL" for result in self.results)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------
# Synthetic ImageNet-like betons
# ----------------------------------------------------------------------------------------

class SyntheticImages:
    """Deterministic photo-like images (smooth colour fields plus fine noise, so that JPEG
    compresses them as it does photographs), sizes scattered +-20% around (width, height),
    label = index % classes with a class-specific tint."""

    def __init__(self, count, width, height, classes, seed=0):
        self.count, self.width, self.height, self.classes, self.seed = (
            count, width, height, classes, seed)
        self.indices = np.arange(count)

    def __len__(self):
        return len(self.indices)

    @property
    def labels(self):
        return (self.indices % self.classes).astype(np.int64)

    def shape_of(self, index):
        rng = np.random.default_rng([self.seed, int(index), 0])
        scale = rng.uniform(0.8, 1.2, size=2)
        return max(8, int(self.height * scale[0])), max(8, int(self.width * scale[1]))

    def __getitem__(self, position):
        index = int(self.indices[position])
        height, width = self.shape_of(index)
        rng = np.random.default_rng([self.seed, index, 1])
        coarse = rng.uniform(0, 255, size=(6, 8, 3))
        rows = np.linspace(0, 5, height)[:, None]
        cols = np.linspace(0, 7, width)[None, :]
        smooth = (coarse[np.floor(rows).astype(int), np.floor(cols).astype(int)]
                  * 0.7 + 0.3 * coarse[np.ceil(rows).astype(int), np.ceil(cols).astype(int)])
        label = index % self.classes
        tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
        noise = rng.normal(0, 12, size=(height, width, 3))
        image = np.clip(0.75 * smooth + 0.25 * tint + noise, 0, 255).astype(np.uint8)
        return image, label

    def describe(self, position):
        return f"synthetic image {int(self.indices[position])}"

    def subset(self, indices):
        subset = SyntheticImages(self.count, self.width, self.height, self.classes, self.seed)
        subset.indices = self.indices[np.asarray(indices)]
        return subset

    def largest_image_bytes(self, max_resolution=None):
        return 3 * int(self.height * 1.2 + 1) * int(self.width * 1.2 + 1)


def write_betons(options, folder, report):
    from ffcv_bias.data.writer import write_beton
    width, height = options.width_height
    classes = [f"class_{index:03d}" for index in range(options.classes)]
    paths = []
    started = time.perf_counter()
    for split, count, seed in (("train", options.images, 0), ("val", options.val_images, 1)):
        path = folder / f"synthetic_{split}.beton"
        write_beton(SyntheticImages(count, width, height, options.classes, seed), classes, path,
                    dataset_name="synthetic-imagenet", split=split, write_mode="proportion",
                    compress_probability=0.5, jpeg_quality=90,
                    num_workers=max(1, min(16, os.cpu_count() or 1)))
        paths.append(path)
    seconds = time.perf_counter() - started
    size_mb = sum(path.stat().st_size for path in paths) / 1e6
    report.info("betons", f"{options.images} + {options.val_images} images around "
                          f"{width}x{height}, half JPEG q90, {options.classes} classes: "
                          f"{size_mb:.0f} MB in {seconds:.0f} s", seconds=seconds)
    return tuple(paths)


# ----------------------------------------------------------------------------------------
# Buffers: pinned, and no batch mismatched between yield and the GPU copy
# ----------------------------------------------------------------------------------------

def reference_fingerprints(beton, options, resolution):
    """Per-batch sums of the images as the CPU pipeline yields them, read at once: the truth
    (crops are seeded by (seed, epoch, sample), so every loader of this seed agrees)."""
    from ffcv_bias.data.loaders import create_train_loader
    loader = create_train_loader(beton, batch_size=options.batch, resolution=resolution, seed=0,
                                 num_workers=options.threads)
    loader.set_epoch(0)
    return [int(images.sum(dtype=torch.int64)) for images, _ in loader]


def copied_fingerprints(beton, options, resolution, device, in_pipeline, backlog_cycles):
    """Per-batch sums of the batches as they arrive on `device`: copied in the step
    (`in_pipeline` False: non-blocking .to() on the compute stream, the old way) or by
    ToDevice in the pipeline. `backlog_cycles` of torch.cuda._sleep queued before each
    copy keep the GPU behind the loader. Also whether the host buffers were pinned."""
    from ffcv_bias.data.loaders import create_train_loader
    loader = create_train_loader(beton, batch_size=options.batch, resolution=resolution, seed=0,
                                 num_workers=options.threads,
                                 device=device if in_pipeline else None)
    loader.set_epoch(0)
    sums, pinned = [], []
    for images, _ in loader:
        if backlog_cycles and device.type == "cuda":
            torch.cuda._sleep(backlog_cycles)  # the GPU still busy with earlier steps
        if not in_pipeline:
            pinned.append(images.is_pinned() if device.type == "cuda" else None)
            images = images.to(device, non_blocking=True)
        sums.append(images.sum(dtype=torch.int64))  # queued: read when the GPU gets there
    synchronize(device)
    return [int(value) for value in sums], pinned


def check_buffers(options, report, beton, device):
    resolution = options.resolution_list[0]
    truth = reference_fingerprints(beton, options, resolution)
    backlog_cycles = sleep_cycles(device, options.backlog_ms)
    backlogs = [0] + ([backlog_cycles] if backlog_cycles else [])
    if not backlog_cycles:
        report.skip("buffers with a GPU backlog", "needs CUDA (torch.cuda._sleep)")
    for in_pipeline in (False, True):
        where = "ToDevice in the pipeline" if in_pipeline else "copy in the step (old)"
        if in_pipeline and device.type != "cuda":
            report.skip(f"buffers {where}", "ToDevice is added for CUDA devices only")
            continue
        for backlog in backlogs:
            seen, pinned = copied_fingerprints(beton, options, resolution, device, in_pipeline,
                                               backlog)
            mismatched = sum(a != b for a, b in zip(seen, truth))
            lag = f"{options.backlog_ms:g} ms GPU backlog per step" if backlog else "no backlog"
            detail = (f"{mismatched} of {len(truth)} batches differ from their content at "
                      f"yield (n = {len(seen)} batches of {options.batch})")
            name = f"buffers {where}, {lag}"
            if in_pipeline:
                report.check(name, mismatched == 0 and len(seen) == len(truth), detail,
                             mismatched=mismatched, batches=len(truth))
            else:
                report.info(name, detail + (" (the race ToDevice fixes)" if mismatched else ""),
                            mismatched=mismatched, batches=len(truth))
            if not in_pipeline and backlog == 0:
                if pinned and pinned[0] is not None:
                    report.check("buffers pinned", all(pinned),
                                 f"{sum(pinned)} of {len(pinned)} yielded host buffers pinned")
                else:
                    report.skip("buffers pinned", "ffcv pins its buffers only on CUDA builds")


def sleep_cycles(device, milliseconds):
    """GPU clock cycles that torch.cuda._sleep needs to keep the GPU busy `milliseconds`
    (measured: the clock rate is not in torch's device properties), 0 without CUDA."""
    if device.type != "cuda" or milliseconds <= 0 or not hasattr(torch.cuda, "_sleep"):
        return 0
    probe = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * milliseconds / max(start.elapsed_time(end), 1e-3))


# ----------------------------------------------------------------------------------------
# Trainer runs in subprocesses: SIGTERM / SIGUSR2 -> 75 -> resume, and a DDP epoch
# ----------------------------------------------------------------------------------------

def small_run_args(options, betons, folder, *extra):
    train, val = betons
    return [f"--data.train_dataset={train}", f"--data.val_dataset={val}",
            f"--logging.folder={folder}", "--logging.progress=0",
            f"--model.arch={options.small_arch}", "--training.epochs=2",
            f"--training.batch_size={options.small_batch}", "--lr.lr=0.2",
            "--lr.lr_peak_epoch=1", f"--resolution.min_res={options.small_res}",
            f"--resolution.max_res={options.small_res}",
            f"--validation.resolution={options.small_res}",
            f"--validation.batch_size={options.small_batch}", "--training.deterministic=1",
            f"--data.num_workers={options.threads}", *extra]


def trainer_env(device, torch_threads):
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    if torch_threads > 0:
        environment["OMP_NUM_THREADS"] = str(torch_threads)  # the trainer's torch threads
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    if device.type == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""
    return environment


def run_trainer(args, options, device):
    result = subprocess.run([*env.python_command(), str(TRAIN_SCRIPT), *args],
                            env=trainer_env(device, options.torch_threads),
                            capture_output=True, text=True, timeout=options.timeout)
    return result.returncode, result.stdout + result.stderr


def only_run_dir(folder):
    dirs = [path for path in Path(folder).iterdir() if path.is_dir()]
    return dirs[0] if len(dirs) == 1 else None


def interrupted_then_resumed(args, folder, options, device, number):
    """Start a run, signal it once its first checkpoint exists, rerun it. (exit code on the
    signal, its last stderr line, exit code of the rerun, whether the rerun resumed)."""
    child = subprocess.Popen([*env.python_command(), str(TRAIN_SCRIPT), *args],
                             env=trainer_env(device, options.torch_threads),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timeout = options.timeout
    deadline = time.time() + timeout
    while time.time() < deadline and child.poll() is None:
        run_dir = only_run_dir(folder) if Path(folder).is_dir() else None
        if run_dir is not None and (run_dir / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    child.send_signal(number)
    _, stderr = child.communicate(timeout=timeout)
    last_line = (stderr.strip().splitlines() or [""])[-1]
    code, output = run_trainer(args, options, device)
    return child.returncode, last_line, code, "resuming" in output


def train_here(args):
    """(exit code, output) of train_imagenet.py's main run in this process: the same code
    as the subprocesses, without a second start-up (imports, numba's typed-dict compile)."""
    from ffcv_bias.train.launch import main as train_main
    # train_worker restores torch's threads and determinism; training.deterministic=1 also
    # turns cudnn's autotuner off: the throughput sections after this one must not
    # measure with it off.
    cudnn = torch.backends.cudnn
    cudnn_flags = (cudnn.benchmark, cudnn.deterministic)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = train_main(args)
    finally:
        cudnn.benchmark, cudnn.deterministic = cudnn_flags
    return code, output.getvalue()


def reference_run(args, options, device):
    """The uninterrupted run: on CUDA a process of its own (training.deterministic=1 sets
    CUBLAS_WORKSPACE_CONFIG before cuBLAS starts; in this process it would also restrict
    the cuBLAS of the throughput sections), on a CPU here (one start-up less)."""
    if device.type == "cuda":
        return run_trainer(args, options, device)
    return train_here(args)


def check_resume(options, report, betons, folder, device):
    """The two interrupted-then-resumed runs (subprocesses, watched from threads) side by
    side with the uninterrupted reference run (from the main thread: signal handlers can
    only be installed there). Each has its own folder, and all are deterministic, so
    sharing the machine changes no logit; the runs are mostly start-up anyway."""
    uninterrupted = folder / "uninterrupted"
    signals = (signal.SIGTERM, signal.SIGUSR2)
    targets = {number: folder / f"interrupted_{signal.Signals(number).name}"
               for number in signals}
    with ThreadPoolExecutor(max_workers=len(signals)) as pool:
        interrupted = {number: pool.submit(interrupted_then_resumed,
                                           small_run_args(options, betons, target), target,
                                           options, device, number)
                       for number, target in targets.items()}
        code, output = reference_run(small_run_args(options, betons, uninterrupted), options,
                                     device)
        outcomes = {number: future.result() for number, future in interrupted.items()}
    if code != 0:
        report.check("resume reference run", False,
                     f"exit {code}: {(output.strip().splitlines() or [''])[-1]}")
        return
    reference = np.load(only_run_dir(uninterrupted) / "val_logits.npy")
    for number in signals:
        name, target = signal.Signals(number).name, targets[number]
        stopped, last_line, rerun, resumed = outcomes[number]
        report.check(f"{name} -> exit 75", stopped == EXIT_PREEMPTED and
                     last_line.startswith(f"stopped by {name}"),
                     f"exit {stopped}: {last_line}")
        run_dir = only_run_dir(target)
        equal = (rerun == 0 and run_dir is not None and (run_dir / "val_logits.npy").exists()
                 and np.array_equal(np.load(run_dir / "val_logits.npy"), reference))
        report.check(f"{name} -> resume -> same val_logits", equal and resumed,
                     f"rerun exit {rerun}, resumed: {resumed}, val_logits equal to the "
                     f"uninterrupted deterministic run: {equal}")


def check_ddp_epoch(options, report, betons, folder, device):
    backend = "NCCL" if device.type == "cuda" else "gloo"
    args = small_run_args(options, betons, folder / "ddp", "--training.distributed=1",
                          "--training.epochs=1", "--lr.lr_peak_epoch=0.5")
    started = time.perf_counter()
    code, output = run_trainer(args, options, device)
    run_dir = only_run_dir(folder / "ddp")
    complete = run_dir is not None and (run_dir / "summary.json").exists()
    report.check(f"1-process {backend} DDP epoch", code == 0 and complete,
                 f"exit {code}, summary.json written: {complete}, "
                 f"{time.perf_counter() - started:.0f} s"
                 + ("" if code == 0 else f": {(output.strip().splitlines() or [''])[-1]}"))


# ----------------------------------------------------------------------------------------
# The trainer in this process: syncs per step, img/s, loader wait
# ----------------------------------------------------------------------------------------

def trainer_config(options, betons, run_dir, epochs):
    from ffcv_bias.train.config import resolve_config
    train, val = betons
    resolution = options.resolution_list[0]
    return resolve_config([
        f"--data.train_dataset={train}", f"--data.val_dataset={val}",
        f"--logging.folder={run_dir}", "--logging.progress=0", f"--model.arch={options.arch}",
        f"--training.epochs={epochs}", f"--training.batch_size={options.batch}",
        "--lr.lr=0.5", "--lr.lr_peak_epoch=0", "--lr.lr_schedule_type=cosine",
        f"--resolution.min_res={resolution}", f"--resolution.max_res={resolution}",
        f"--data.num_workers={options.threads}"])


class SyncCounter:
    """Host-device synchronizations as they happen: torch.cuda.set_sync_debug_mode's
    warnings, those of this (the training loop's) thread apart from those of other threads
    (ffcv's loader thread waiting for its own copies stalls no step). On a CPU, where
    set_sync_debug_mode does not exist, whatever warns like it (the tests)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.main, self.other = 0, 0

    def __enter__(self):
        import threading
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        main_thread = threading.current_thread()

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                if threading.current_thread() is main_thread:
                    self.main += 1
                else:
                    self.other += 1
        warnings.showwarning = record
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        return self._catch.__exit__(*exc)


class SyncMarkingLoader:
    """The trainer's loader, noting the training loop's sync count as it hands out each
    batch (`marks`: one list per epoch). The syncs between two batches are a step's (its
    periodic loss check included); those before an epoch's first batch and after its last
    (that step's check, forced at the end of every epoch, and the epoch's own: the mean
    loss) are the epoch's."""

    def __init__(self, loader, counter):
        self.loader, self.counter, self.marks = loader, counter, []

    def __getattr__(self, name):  # set_epoch, set_resolution, resolution, wait_seconds...
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        marks = []
        self.marks.append(marks)
        for batch in self.loader:
            marks.append(self.counter.main)
            yield batch


def sync_phases(marks, epoch_totals):
    """(syncs within steps, steps measured, syncs at the epochs' ends, epochs) from the
    per-epoch `marks` of SyncMarkingLoader and each epoch's total. An epoch of n batches
    measures its first n - 1 steps (its last step ends in the epoch's own check)."""
    step_syncs = sum(epoch[-1] - epoch[0] for epoch in marks if epoch)
    steps = sum(max(len(epoch) - 1, 0) for epoch in marks)
    return step_syncs, steps, sum(epoch_totals) - step_syncs, len(epoch_totals)


def timed_epochs_with_syncs(trainer, epochs, device):
    """(seconds, (step syncs, steps, epoch syncs, epochs), loader-thread syncs) of
    trainer.train_epoch(1..epochs), its syncs counted by phase."""
    with SyncCounter(device) as counter:
        loader = trainer.train_loader = SyncMarkingLoader(trainer.train_loader, counter)
        synchronize(device)
        started = time.perf_counter()
        totals = []
        for epoch in range(1, epochs + 1):
            before = counter.main
            trainer.train_epoch(epoch)
            totals.append(counter.main - before)
        synchronize(device)
        seconds = time.perf_counter() - started
    trainer.train_loader = loader.loader
    return seconds, sync_phases(loader.marks, totals), counter.other


def report_syncs(report, phases, other):
    """The "syncs per step" check: the training loop's syncs within steps (the stop vote is
    on the host and the loss is checked every CUDA_CHECK_EVERY_STEPS steps: well under one
    per step), with the epochs' own syncs (a few each) beside it, not in it: at the default
    sizes an epoch is 11 steps, and counting its end into its steps made ~0.5 per step."""
    step_syncs, steps, epoch_syncs, epochs = phases
    per_step = step_syncs / max(steps, 1)
    report.check("syncs per step", steps > 0 and per_step < 0.25,
                 f"{step_syncs} synchronizations within {steps} steps ({per_step:.3f} per "
                 f"step); {epoch_syncs} at the ends of {epochs} epochs "
                 f"({epoch_syncs / max(epochs, 1):.1f} per epoch: the last step's check, the "
                 f"mean loss); {other} in other threads (the loader's)",
                 syncs=step_syncs, steps=steps, epoch_syncs=epoch_syncs, epochs=epochs,
                 other_thread_syncs=other)


def check_trainer(options, report, betons, device):
    sys.path.insert(0, str(REPO / "bench"))
    from train_step import TimedLoader
    from ffcv_bias.train.launch import trainer_in_this_process
    steps_per_epoch = options.images // options.batch
    epochs = max(1, math.ceil(options.steps / max(1, steps_per_epoch)))
    with tempfile.TemporaryDirectory() as run_dir, trainer_in_this_process(
            trainer_config(options, betons, run_dir, epochs + 1), run_dir) as trainer:
        trainer.train_epoch(0)  # warm-up: numba compiles the pipeline, cudnn picks kernels
        timed = trainer.train_loader = TimedLoader(trainer.train_loader)
        seconds, phases, other = timed_epochs_with_syncs(trainer, epochs, device)
    steps = epochs * steps_per_epoch
    images_per_second = steps * options.batch / seconds
    wait_share = timed.wait_seconds / seconds
    report.info(f"trainer {options.arch} {options.resolution_list[0]} px batch {options.batch}",
                f"{images_per_second:.0f} img/s over {steps} steps, {100 * wait_share:.1f}% "
                f"of the time waiting for the loader", images_per_second=images_per_second,
                loader_wait_share=wait_share, steps=steps)
    if device.type != "cuda":
        report.skip("syncs per step", "needs CUDA (torch.cuda.set_sync_debug_mode)")
    else:
        report_syncs(report, phases, other)


# ----------------------------------------------------------------------------------------
# Model throughput: bf16 channels-last, eager / fused / compiled
# ----------------------------------------------------------------------------------------

# What the model figures compare with: ffcv-imagenet's ResNet-50 on 8 A100s, 78.1% top-1 in
# ~77 min for 88 epochs, about 3,000 img/s per GPU over its 160-192 px schedule (the whole
# loop with its loader and validation; these figures are the bare step's, on one GPU).
REFERENCE_IMAGES_PER_SECOND = {"resnet50": 3000}
REFERENCE_TEXT = ("ffcv-imagenet's ResNet-50, ~3,000 img/s per A100 over 160-192 px "
                  "(8 A100s, 88 epochs in ~77 min, 78.1% top-1)")


def model_images_per_second(options, device, resolution, compiled):
    """{fused: (img/s, peak GB)} of Trainer-equivalent steps on synthetic uint8 batches,
    for-each then fused SGD on one model (compiled once)."""
    from ffcv_bias.data.loaders import normalize
    from ffcv_bias.train.models import create_model
    from ffcv_bias.train.loop import compile_for_resolutions
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer (training.deterministic=0)
    model = create_model(options.arch, 1000).to(device, memory_format=torch.channels_last)
    step_model = (compile_for_resolutions(model, [resolution], options.compile_backend)
                  if compiled else model)
    images = torch.randint(0, 256, (options.batch, 3, resolution, resolution), dtype=torch.uint8,
                           device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (options.batch,), device=device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(optimizer):
        inputs = normalize(images, device, dtype=amp_dtype or torch.float32)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(step_model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    results = {}
    for fused in (False, True):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                    **({"fused": True} if fused else {}))
        for _ in range(3):  # warm-up (and, the first time, the compilation)
            step(optimizer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(options.model_steps):
            step(optimizer)
        synchronize(device)
        seconds = time.perf_counter() - started
        peak_gb = (torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
                   else None)
        results[fused] = (options.model_steps * options.batch / seconds, peak_gb)
    return results


def compiled_label(options):
    if options.compile_backend == "inductor":
        return "compiled"
    return f"compiled (backend {options.compile_backend})"


def check_model_throughput(options, report, device):
    for resolution in options.resolution_list:
        for compiled in (False, True):
            if compiled and not options.compile:
                report.skip(f"model {options.arch} {resolution} px compiled", "--no-compile")
                continue
            label = (f"model {options.arch} {resolution} px batch {options.batch} "
                     f"{'bf16' if device.type == 'cuda' else 'fp32'} channels-last, "
                     f"{compiled_label(options) if compiled else 'eager'}")
            try:
                measured = model_images_per_second(options, device, resolution, compiled)
            except Exception as error:  # noqa: BLE001 - report it, go on with the rest
                message = str(error).splitlines()[0] if str(error) else ""
                report.check(label, False, f"{type(error).__name__}: {message}")
                continue
            reference = REFERENCE_IMAGES_PER_SECOND.get(options.arch)
            for fused, (rate, peak) in measured.items():
                memory = f", peak {peak:.1f} GB" if peak is not None else ""
                compared = (f"; reference: {REFERENCE_TEXT} ({rate / reference:.2f}x)"
                            if reference else "")
                report.info(f"{label}, {'fused' if fused else 'for-each'} SGD",
                            f"{rate:.0f} img/s{memory}{compared}", images_per_second=rate,
                            peak_gb=peak, **({"reference_images_per_second": reference}
                                             if reference else {}))


# ----------------------------------------------------------------------------------------
# Loader throughput per thread
# ----------------------------------------------------------------------------------------

def decoder_modes():
    """The decoder modes the train loader offers: ['default'] or, where the decode
    option exists (augment.decode), each of its modes."""
    from ffcv_bias.data.loaders import create_train_loader
    if "decode" in inspect.signature(create_train_loader).parameters:
        return ["exact", "fast"]
    return [None]


def loader_images_per_second(beton, options, resolution, threads, decode):
    from ffcv_bias.data.loaders import create_train_loader
    extra = {"decode": decode} if decode else {}
    loader = create_train_loader(beton, batch_size=options.batch, resolution=resolution, seed=0,
                                 num_workers=threads, **extra)
    loader.set_epoch(0)
    for _ in loader:  # warm-up epoch: numba compiles, the page cache fills
        pass
    loader.set_epoch(1)
    started = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - started)


def check_loader(options, report, beton):
    resolution = options.resolution_list[0]
    for decode in decoder_modes():
        for threads in sorted({1, options.threads}):
            rate = loader_images_per_second(beton, options, resolution, threads, decode)
            mode = f", augment.decode={decode}" if decode else ""
            report.info(f"loader {resolution} px, {threads} threads{mode}",
                        f"{rate:.0f} img/s, {rate / threads:.0f} img/s per thread",
                        images_per_second=rate, per_thread=rate / threads, threads=threads)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default="gpu_check_out", help="betons, runs and gpu_check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--resolutions", default="160,192")
    parser.add_argument("--steps", type=int, default=150, help="trainer steps to time")
    parser.add_argument("--model-steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--small-arch", default="resnet18", help="arch of the resume runs")
    parser.add_argument("--small-res", type=int, default=64)
    parser.add_argument("--small-batch", type=int, default=256)
    parser.add_argument("--backlog-ms", type=float, default=250.0,
                        help="simulated GPU work queued before each copy (CUDA only)")
    parser.add_argument("--threads", type=int, default=0,
                        help="loader threads (0: the CPUs this process may use, minus one)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled variants (--tiny: "
                             "aot_eager, the same graphs without code generation)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads in this process and the trainer runs (0: as the "
                             "trainer chooses; --tiny: 1)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per trainer run")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: "
                        "buffers,resume,trainer,model,loader,ddp")
    options = parser.parse_args(argv)
    if options.tiny:
        for key, value in TINY.items():
            if getattr(options, key) == parser.get_default(key):
                setattr(options, key, value)
    try:
        width, height = (int(part) for part in options.size.lower().split("x"))
        options.width_height = (width, height)
        options.resolution_list = [int(part) for part in options.resolutions.split(",")]
    except ValueError:
        parser.error("--size must be WIDTHxHEIGHT and --resolutions a comma list of integers")
    if options.threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        options.threads = max(1, cores - 1)
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here (torch "
                     f"{torch.__version__}); use --device cpu for a dry run")
    if options.images // options.batch < 2:
        parser.error(f"--images {options.images} must hold at least 2 batches of {options.batch}")
    options.skip = {part.strip() for part in options.skip.split(",") if part.strip()}
    return options


def describe_machine(report, device):
    import ffcv_bias
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report.info("machine", f"{name}, {cores} CPUs, torch {torch.__version__}, "
                           f"ffcv_bias from {Path(ffcv_bias.__file__).parent}")


def limit_torch_threads(threads):
    """This process's torch threads and those of the trainers it starts (which read
    OMP_NUM_THREADS, as under a launcher); 0 leaves both as they are."""
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def main(argv=None):
    options = parse_arguments(argv)
    limit_torch_threads(options.torch_threads)
    device = torch.device(options.device, 0) if options.device == "cuda" else torch.device("cpu")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    started = time.perf_counter()
    describe_machine(report, device)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        scratch = Path(scratch)
        betons = write_betons(options, scratch, report)
        sections = [("buffers", lambda: check_buffers(options, report, betons[0], device)),
                    ("resume", lambda: check_resume(options, report, betons, scratch, device)),
                    ("trainer", lambda: check_trainer(options, report, betons, device)),
                    ("ddp", lambda: check_ddp_epoch(options, report, betons, scratch, device)),
                    ("loader", lambda: check_loader(options, report, betons[0])),
                    ("model", lambda: check_model_throughput(options, report, device))]
        section_seconds = {}
        for name, section in sections:
            if name in options.skip:
                report.skip(name, "--skip")
                continue
            section_started = time.perf_counter()
            try:
                section()
            except Exception as error:  # noqa: BLE001 - one broken section must not hide the rest
                report.check(f"{name} section", False, f"{type(error).__name__}: {error}")
            section_seconds[name] = round(time.perf_counter() - section_started, 1)
            # After each section: a check stopped by gpu_check.sh's timeout keeps what it
            # measured ("complete": false).
            write_json(out, device, options, report, time.perf_counter() - started,
                       section_seconds, complete=False)
    seconds = time.perf_counter() - started
    failed = report.failed
    print(f"{'FAILED' if failed else 'ALL PASSED'}: "
          f"{sum(r['status'] == 'PASS' for r in report.results)} passed, "
          f"{sum(r['status'] == 'FAIL' for r in report.results)} failed, "
          f"{sum(r['status'] == 'SKIP' for r in report.results)} skipped in {seconds:.0f} s ("
          + ", ".join(f"{name} {value:.0f} s" for name, value in section_seconds.items()) + ")")
    write_json(out, device, options, report, seconds, section_seconds, complete=True)
    return 1 if failed else 0


def write_json(out, device, options, report, seconds, section_seconds, complete):
    atomic.write_text(out / "gpu_check.json", json.dumps(
        {"device": str(device), "complete": complete, "seconds": seconds,
         "section_seconds": section_seconds,
         "options": {key: value for key, value in vars(options).items() if key != "skip"},
         "results": report.results}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
