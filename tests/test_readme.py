"""Every command in README.md, run as written on tiny data (issue #8).

The README's ```bash blocks are parsed into commands (continuation lines joined, comments
dropped) and so is its ```python snippet. Each command has exactly one entry in COMMANDS:
either it runs here, or it is exempt and names the test or CI step that covers it. A
README command without an entry, or an entry whose command left the README, fails
`test_every_readme_command_has_one_entry`, so a README edit cannot add an untested command.

The commands run in README order, in one sandbox laid out like the repository root, each
reading what the earlier ones wrote, as a user would: `python write_datasets.py` writes
data/, the sweep writes runs/, the analysis reads them. What differs from the README is
listed in tables, each line with its reason (and one change of order, RUN_FIRST):
  REWRITES      text replaced in a command (dataset roots -> tiny trees, fewer seeds ...);
  SHRUNK_FILES  config and sweep files the sandbox holds in a smaller version, same keys;
  PLACED        inputs the README names but no README command makes (the user's runs);
  DEMO_SUBSETS  the demo's own subset betons, written smaller before it runs (it writes
                them only if missing);
  ENVIRONMENT   process environment (one torch thread, stand-in sbatch/squeue/srun, the
                warm python for the processes the commands start);
  PYTHON_SNIPPET_REWRITES  the ```python block's "cuda" -> "cpu".
Nothing else changes. `python X.py ARGS` and `python -m M ARGS` run in this process
through runpy, as the interpreter runs them (__main__, sys.argv, the sandbox as working
directory, ENVIRONMENT), so ffcv is imported and its pipelines compiled once, not once per
command; what they start (sweep trainers, the demo's steps) and torchrun are processes.
A failure shows the command as written and as run, its exit status and output.
FFCV_BIAS_README=draft.md runs all this on a README draft.
"""
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import yaml

from fixtures_datasets import (make_cifar10_dir, make_inaturalist_tree, save_image,
                               smooth_image, write_idx)
from warm_python import exit_status

# Every test here runs README commands as processes (trainers, launchers, analysis).
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
# FFCV_BIAS_README=draft.md checks a README draft before it replaces README.md.
README = Path(os.environ.get("FFCV_BIAS_README", REPO / "README.md"))
COMMAND_TIMEOUT_S = 600
# The sandbox links these (read-only for the commands) and copies rn50_configs/ (shrunk).
SANDBOX_LINKS = ("write_datasets.py", "train_imagenet.py", "bench", "setup.py")
SANDBOX_COPIES = ("rn50_configs",)


# ======================================================================================
# Reading the README
# ======================================================================================

def fenced_blocks(text, language):
    """The bodies of the ```<language> blocks, in order."""
    pattern = re.compile(r"^```" + re.escape(language) + r"[ \t]*\n(.*?)^```[ \t]*$",
                         re.MULTILINE | re.DOTALL)
    return [match.group(1) for match in pattern.finditer(text)]


def block_commands(block):
    """Shell commands of one block: backslash-continued lines joined, comments dropped,
    each normalised to shlex.join of its words (so spacing never matters)."""
    commands, pending = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            commands.append(shlex.join(words))
    assert not pending.strip(), f"README block ends inside a continued line: {pending!r}"
    return commands


def readme_commands(text=None):
    text = README.read_text() if text is None else text
    return [command for block in fenced_blocks(text, "bash") for command in block_commands(block)]


def readme_table_files(text, first_header):
    """The file names in the first column of the README table whose header starts with
    `first_header` (`runs.csv`, `*.png` ...): what the README promises a command writes.
    Rows whose meaning starts with "when ..." are conditional and left out."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith(f"| {first_header}"))
    names = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        name_cell, meaning = line.split("|")[1:3]
        if meaning.strip().startswith("when "):
            continue  # written only under a condition the row states; its own test covers it
        names += re.findall(r"`([^`]+)`", name_cell)
    return names


# ======================================================================================
# The sandbox and its tiny data
# ======================================================================================

@dataclass
class Sandbox:
    root: Path
    env: dict = field(repr=False)           # kept out of failure reports
    fashion_idx: Path                       # tiny Fashion-MNIST in the IDX format
    outcomes: dict = field(default_factory=dict, repr=False)   # README command -> Outcome

    def path(self, relative):
        return self.root / relative


@dataclass
class Outcome:
    command: str              # as written in the README
    ran: str                  # what ran after the rewrites
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    failure: Optional[str] = None   # exit status or failed check, one paragraph
    rewrites: list = field(default_factory=list)   # why `ran` differs from `command`

    def report(self):
        why = "".join(f"\n  rewritten: {reason}" for reason in self.rewrites)
        return (f"README: {self.command}\nran:    {self.ran}{why}\nexit {self.returncode} "
                f"after {self.seconds:.0f} s: {self.failure}\n--- stdout (end)\n"
                f"{self.stdout[-3000:]}\n--- stderr (end)\n{self.stderr[-3000:]}")


def make_tiny_fashion_idx(root, train_size=600, val_size=200):
    """A class-stratified slice of Debian's Fashion-MNIST, written back in its IDX format
    (600 training images: more than the README snippet's batch of 256)."""
    from ffcv_bias.data.sources import FASHION_MNIST_DIR, read_idx, stratified_subset
    root.mkdir(parents=True)
    for prefix, size in (("train", train_size), ("t10k", val_size)):
        images = read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        keep = stratified_subset(labels, size)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
    return root


def make_imagenet_folder(root, per_class, seed):
    """An ImageFolder split (JPEG and PNG of various sizes), 3 classes."""
    rng = np.random.default_rng(seed)
    for class_name in ("n01440764", "n01443537", "n01484850"):
        for index in range(per_class):
            height, width = (int(side) for side in rng.integers(24, 64, size=2))
            suffix = ".JPEG" if index % 2 else ".png"
            save_image(root / class_name / f"{class_name}_{index}{suffix}",
                       smooth_image(rng, height, width))


def make_dataset_roots(datasets_dir):
    """Tiny trees in the real formats where the README's /datasets/... paths point."""
    make_imagenet_folder(datasets_dir / "imagenet" / "train", per_class=8, seed=0)
    make_imagenet_folder(datasets_dir / "imagenet" / "val", per_class=4, seed=1)
    make_cifar10_dir(datasets_dir, per_batch=40, test_size=60)   # cifar-10-batches-py/
    make_inaturalist_tree(datasets_dir / "inat2021", split="train")
    make_inaturalist_tree(datasets_dir / "inat2021", split="val", seed=1)


def write_stand_in_slurm(bin_dir, record_dir):
    """sbatch keeps each script it is given and answers a job id; squeue lists no job;
    srun exists (submitit looks for it). Nothing is run."""
    bin_dir.mkdir(parents=True)
    record_dir.mkdir(parents=True)
    scripts = {
        "sbatch": f'#!/bin/sh\nn=$(ls {record_dir} | wc -l)\ncp "$1" {record_dir}/sbatch_$n.sh\n'
                  f'echo "Submitted batch job $((4242 + n))"\n',
        "squeue": "#!/bin/sh\nexit 0\n",
        "srun": "#!/bin/sh\nexit 0\n",
    }
    for name, content in scripts.items():
        (bin_dir / name).write_text(content)
        (bin_dir / name).chmod(0o755)


# ======================================================================================
# What differs from the README, with the reasons
# ======================================================================================

# (commands it applies to, regex, replacement, why). Placeholders {sandbox},
# {fashion_idx} and {demo_run} are filled in at run time. A rewrite that finds nothing
# in a command it applies to is an error: the README changed under it.
REWRITES = [
    (r".*--cfg\.data_dir=/datasets/.*", r"--cfg\.data_dir=/datasets/",
     "--cfg.data_dir={sandbox}/datasets/",
     "the README's dataset roots -> tiny trees in the real formats, laid out alike"),
    (r"python write_datasets\.py", r"$", " --cfg.data_dir={fashion_idx}",
     "the embedded default reads /usr/share/datasets/fashion-mnist (70,000 images): the "
     "same IDX files cut to 600 + 200 images"),
    (r"torchrun .*", r"--nproc_per_node=8", "--nproc_per_node=2",
     "no GPU here: 2 CPU processes (gloo)"),
    (r"torchrun .*", r"$", " --dist.world_size=2",
     "the recipe's dist.world_size is 8 (kept: the SLURM command checks it against "
     "--gpus-per-node 8); torchrun with 2 processes needs 2"),
    (r".* --weights '?demo/runs/<run_id>'? .*", r"'?demo/runs/<run_id>'?",
     "demo/runs/{demo_run}", "placeholder: the first run the demo trained"),
    (r".*studies\.diet score .*", r"--epochs 20 --seeds 10", "--epochs 0 --seeds 1",
     "scores of one untrained network (its documented --epochs 0) instead of 10 runs of 20 "
     "epochs; training the score runs is tests/test_diet.py's `scored` fixture"),
    (r".*studies\.diet prune .*", r"--sparsity 0\.1,0\.3,0\.5,0\.7,0\.9",
     "--sparsity 0.5 --seeds 1 --max-parallel 2",
     "one sparsity, one seed, both runs at once: the launch trains 2 runs, not 18 in turn"),
]

# Files of the sandbox's rn50_configs/ replaced by smaller versions: {file: {key path:
# value}}; every key path must already exist (same keys, smaller values). Why: ResNet-8,
# 1-3 epochs, 1-2 seeds, at most 2 grid values (the reference and the strongest) make a
# dozen short runs of what would be days of training.
SHRUNK_FILES = {
    "rn50_configs/fashion_mnist_cpu.yaml": {
        ("model", "arch"): "resnet8", ("training", "epochs"): 1,
        ("lr", "lr_peak_epoch"): 0.5, ("data", "num_workers"): 1},
    "rn50_configs/sweeps/fashion_mnist_crop_small.yaml": {
        ("grid", "augment.min_scale"): [0.25], ("seeds",): 1},
    # Both demo sweeps shrunk alike, so that they still share their reference arm; tau 0.3
    # stays: the class-bounds command reads its Welch test at tau = 0.3.
    "rn50_configs/sweeps/fashion_mnist_demo.yaml": {
        ("seeds",): 2, ("overrides", "training.epochs"): 1,
        ("overrides", "lr.lr_peak_epoch"): 0.5},
    "rn50_configs/sweeps/fashion_mnist_demo_weight_decay.yaml": {
        ("seeds",): 2, ("overrides", "training.epochs"): 1,
        ("overrides", "lr.lr_peak_epoch"): 0.5},
    "rn50_configs/sweeps/fashion_mnist_reference.yaml": {
        ("grid", "augment.min_scale"): [1.0, 0.08], ("seeds",): 1,
        ("overrides", "training.epochs"): 1},
    "rn50_configs/cifar10_resnet18.yaml": {
        ("model", "arch"): "resnet8", ("training", "epochs"): 1,
        ("training", "batch_size"): 32, ("data", "num_workers"): 1},
    "rn50_configs/rn50_88_epochs.yaml": {
        ("model", "arch"): "resnet8",
        ("training", "epochs"): 3,   # > lr_peak_epoch (2, the recipe's default)
        ("training", "batch_size"): 4, ("data", "num_workers"): 1,
        ("resolution", "min_res"): 32, ("resolution", "max_res"): 32,
        ("resolution", "start_ramp"): 0, ("resolution", "end_ramp"): 0,
        ("validation", "resolution"): 32},
}

# The one change of order: every Fashion-MNIST command (the demo first) reads the betons
# this writes, which `make demo` writes for a user; here they are the tiny ones.
RUN_FIRST = r"python write_datasets\.py"

ENVIRONMENT = {
    "OMP_NUM_THREADS": ("1", "one torch thread per process: 2 cores, other tests beside"),
    "PYTHONUNBUFFERED": ("1", "output in order when a command fails"),
    "PATH": ("{sandbox}/bin:$PATH", "stand-in sbatch/squeue/srun (write_stand_in_slurm)"),
    "FFCV_BIAS_PYTHON": ("{warm_python}", "what the commands start (sweep trainers, the "
                         "demo's steps) starts from conftest's warm python: imports paid once"),
}


def synthetic_weight_decay_runs(sandbox):
    from ffcv_bias.analysis import make_synthetic_runs
    make_synthetic_runs(sandbox.path("runs/wd"), [0.0, 5e-5, 5e-4], range(3),
                        vary_key="training.weight_decay")


def synthetic_grid_runs(sandbox):
    from ffcv_bias.analysis import make_synthetic_runs
    for index, weight_decay in enumerate((5e-5, 5e-4)):
        make_synthetic_runs(sandbox.path("runs/grid"), [1.0, 0.5, 0.08], range(3),
                            extra_config={"training.weight_decay": weight_decay},
                            seed=index)


# Inputs the README names but no README command makes: {path: (maker, why)}.
PLACED = {
    "runs/wd": (synthetic_weight_decay_runs,
                "a user's weight-decay sweep (ImageNet scale): synthetic run records in the "
                "record format the analysis reads"),
    "runs/grid": (synthetic_grid_runs,
                  "a user's tau x weight-decay grid: synthetic run records, 2 x 3 settings"),
}


# `make demo` writes its two subsets from the real Fashion-MNIST only when they are missing
# (ffcv_bias/demo.py SUBSETS). (path, split, images, why); check_demo asserts the demo
# reused each one.
DEMO_SUBSETS = [
    ("data/fashion-mnist-5k_val.beton", "val", 1000,
     "1,000 test images (100 per class) instead of 5,000: the demo validates each run at two "
     "protocols with flip averaging, two thirds of a shrunk run's CPU (cProfile)"),
]


def write_demo_subsets(sandbox):
    for relative, split, images, _ in DEMO_SUBSETS:
        subprocess.run([sys.executable, "write_datasets.py", "--cfg.dataset=fashion-mnist",
                        f"--cfg.split={split}", f"--cfg.subset={images}",
                        f"--cfg.write_path={relative}"],
                       cwd=sandbox.root, env=sandbox.env, check=True, capture_output=True)


def apply_rewrites(command, values):
    """(the command after every rewrite that applies to it, their reasons); raises if
    one finds nothing."""
    reasons = []
    for applies_to, pattern, replacement, why in REWRITES:
        if not re.fullmatch(applies_to, command):
            continue
        rewritten = re.sub(pattern, replacement.format(**values), command, count=1)
        if rewritten == command:
            raise AssertionError(f"rewrite {pattern!r} finds nothing in: {command}")
        command = rewritten
        reasons.append(why)
    return command, reasons


def set_key_path(content, key_path, value, file_name):
    node = content
    for key in key_path[:-1]:
        node = node[key]
    if key_path[-1] not in node:
        raise AssertionError(f"{file_name} has no key {'/'.join(key_path)} to shrink")
    node[key_path[-1]] = value


def shrink_files(root):
    for relative, changes in SHRUNK_FILES.items():
        path = root / relative
        content = yaml.safe_load(path.read_text())
        for key_path, value in changes.items():
            set_key_path(content, key_path, value, relative)
        path.write_text(yaml.safe_dump(content, sort_keys=False))


# ======================================================================================
# Checks: the outputs the README promises, per command
# ======================================================================================

def read_json(path):
    return json.loads(Path(path).read_text())


def option(words, name, default=None):
    """The value of --name=VALUE or --name VALUE in a command's words."""
    for index, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name and index + 1 < len(words):
            return words[index + 1]
    return default


def runs_under(folder):
    return sorted(path.parent for path in Path(folder).glob("*/config.json"))


def check_run_record(run_dir):
    """The run record of the README's table, complete."""
    record_files = readme_table_files(README.read_text(), "file | content")
    missing = [name for name in record_files if not (run_dir / name).is_file()]
    assert not missing, f"{run_dir} lacks {missing}"
    return read_json(run_dir / "config.json"), read_json(run_dir / "summary.json")


def check_betons(sandbox, words, outcome):
    from ffcv_bias.data.sidecar import check_beton
    dataset = option(words, "--cfg.dataset", "fashion-mnist")
    split = option(words, "--cfg.split", "both")
    write_path = option(words, "--cfg.write_path")
    splits = ("train", "val") if split == "both" else (split,)
    for one_split in splits:
        beton = sandbox.path(write_path or f"data/{dataset}_{one_split}.beton")
        classes = check_beton(beton)
        assert classes["split"] == one_split and classes["num_samples"] > 0, classes


def check_one_training(sandbox, words, outcome):
    overrides = dict(word[2:].split("=", 1) for word in words if word.startswith("--")
                     and "=" in word and not word.startswith("--nproc"))
    records = [check_run_record(run_dir) for run_dir in runs_under(sandbox.path("runs"))]
    matching = [(config, summary) for config, summary in records
                if all(str(config[key.split(".")[0]][key.split(".")[1]]) == value
                       for key, value in overrides.items())]
    assert len(matching) == 1, f"expected one run in runs/ with {overrides}, found {len(matching)}"
    config, summary = matching[0]
    assert 0 <= summary["top1"] <= summary["top5"] <= 1
    if words[0] == "torchrun":
        assert config["meta"]["world_size"] == 2


def planned_runs(sandbox, sweep_file):
    from ffcv_bias.sweep import load_sweep, plan
    with contextlib.chdir(sandbox.root):  # a sweep's folder is relative to the cwd
        return plan(load_sweep(sweep_file))


def check_sweep_plan(sandbox, words, outcome):
    planned = planned_runs(sandbox, words[-1])
    assert f"{len(planned)} runs: " in outcome.stdout
    assert all(run.run_id in outcome.stdout for run in planned)


def check_sweep_launch(sandbox, words, outcome):
    planned = planned_runs(sandbox, words[4])
    incomplete = [str(run.run_dir) for run in planned
                  if not (run.run_dir / "summary.json").is_file()]
    assert not incomplete, f"launch left runs incomplete: {incomplete}"
    for run in planned:
        check_run_record(run.run_dir)


def check_sweep_status(sandbox, words, outcome):
    planned = planned_runs(sandbox, words[-1])
    assert f"{len(planned)} runs: {len(planned)} complete" in outcome.stdout, outcome.stdout


def check_slurm_submission(sandbox, words, outcome):
    planned = planned_runs(sandbox, words[4])
    folder = planned[0].run_dir.parent
    jobs = read_json(folder / ".sweep" / "jobs.json")["submissions"][-1]["jobs"]
    assert len(jobs) == len(planned)  # --mode ddp: one run per job
    assert sorted(run for job in jobs for run in job["runs"]) == \
        sorted(run.run_id for run in planned)
    script = "\n".join(path.read_text() for path in sandbox.path("slurm").glob("sbatch_*.sh"))
    for flag, name in (("--partition", "partition"), ("--time", "time"),
                       ("--gpus-per-node", "gpus-per-node")):
        assert f"#SBATCH --{name}={option(words, flag)}" in script


def analysis_outputs(folder):
    """Each file the README's analysis table names, found in `folder`."""
    for name in readme_table_files(README.read_text(), "file | meaning"):
        assert list(Path(folder).glob(name)), f"{folder} lacks {name}"


def check_analysis(sandbox, words, outcome):
    out = sandbox.path(option(words, "--out"))
    vary = [words[i + 1] for i, word in enumerate(words) if word == "--vary"]
    if len(vary) == 1:
        analysis_outputs(out)
        return
    groups = sorted(path for path in out.iterdir() if path.is_dir())
    assert len(groups) >= 2 and all(vary[1] in group.name for group in groups), groups
    for group in groups:
        analysis_outputs(group)
    assert (out / "index.html").is_file() and (out / "table1.csv").is_file()


def check_preservation(sandbox, words, outcome):
    out = sandbox.path(option(words, "--out"))
    for name in ("per_class.csv", "mean.csv", "label_loss.csv", "preservation.json",
                 "figures/mean_curves.png"):
        assert (out / name).is_file(), f"{out} lacks {name}"


def check_transfer(sandbox, words, outcome):
    sources = [run for run in runs_under(sandbox.path(option(words, "--source-runs")))
               if (run / "summary.json").is_file()]
    probes = runs_under(sandbox.path(option(words, "--out")))
    assert len(probes) == len(sources) >= 2
    for probe in probes:  # the record of transfer.py's docstring (no checkpoint: no epochs)
        for name in ("config.json", "log.jsonl", "weights.pt", "val_logits.npy",
                     "val_labels.npy", "summary.json"):
            assert (probe / name).is_file(), f"{probe} lacks {name}"
        assert read_json(probe / "summary.json")["source_run"] in {s.name for s in sources}


def check_class_bounds(sandbox, words, outcome):
    bounds = read_json(sandbox.path(option(words, "--out")))
    tau = float(option(words, "--tau"))
    assert len(bounds["min_scale"]) == len(bounds["classes"]) == 10
    assert set(bounds["min_scale"]) <= {tau, 1.0}


def check_class_dependent_training(sandbox, words, outcome):
    bounds_file = option(words, "--augment.class_min_scale")
    with_bounds = [check_run_record(run) for run in runs_under(sandbox.path("runs"))
                   if read_json(run / "config.json")["augment"]["class_min_scale"]]
    assert len(with_bounds) == 1 and bounds_file in \
        with_bounds[0][0]["augment"]["class_min_scale"]


def check_diet_scores(sandbox, words, outcome):
    out = sandbox.path(option(words, "--out"))
    scores = np.load(out / "scores.npz")
    assert len(scores["el2n"]) == len(scores["grand"]) == read_json(
        out / "scores.json")["num_samples"] > 0
    assert np.isfinite(scores["el2n"]).all() and np.isfinite(scores["grand"]).all()


def check_diet_prune(sandbox, words, outcome):
    out = sandbox.path(option(words, "--out"))
    for sparsity in option(words, "--sparsity").split(","):
        assert (out / f"keep_{option(words, '--score')}_{sparsity}.npy").is_file()
    for name in ("sweep.yaml", "keep_ratio.csv", "keep_ratio.png"):
        assert (out / name).is_file(), f"{out} lacks {name}"


def check_demo(sandbox, words, outcome):
    from ffcv_bias.data.sidecar import check_beton
    assert check_beton(sandbox.path("data/fashion-mnist-1k_train.beton"))["num_samples"] == 1000
    for relative, _, images, _ in DEMO_SUBSETS:  # reused, not rewritten
        assert check_beton(sandbox.path(relative))["num_samples"] == images
    for report in ("demo/report", "demo/report_weight_decay"):
        analysis_outputs(sandbox.path(report))
    # Two sweeps, one folder: the weight-decay sweep trains only its own arm.
    assert len(runs_under(sandbox.path("demo/runs"))) == 6
    for heading in ("mean top-1 per tau", "mean top-1 per weight_decay",
                    "raises the mean while a class falls?", "largest per-class losses",
                    "Table 1"):
        assert heading in outcome.stdout


# ======================================================================================
# The table: every README command, and how it is exercised
# ======================================================================================

@dataclass(frozen=True)
class Run:
    """Runs here (after REWRITES); `check` asserts the outputs the README promises."""
    pattern: str
    check: Callable


@dataclass(frozen=True)
class Exempt:
    """Cannot run here. `covered_by` is "path::test_function" or a CI file, which must
    exist and contain `must_contain`; `substitute` (optional) is run here instead, in the
    command's place."""
    pattern: str
    covered_by: str
    reason: str
    must_contain: str = ""
    substitute: Optional[Callable] = None     # sandbox -> the command to run instead
    check: Optional[Callable] = None


def makefile_recipe(target):
    """The commands of a Makefile target, `$(PY)` read as `python`."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"{target}:")))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(PY)", "python"))
    return recipe


def demo_module_command(sandbox):
    (command,) = makefile_recipe("demo")   # `make demo` = make setup, then this
    return command


COMMANDS = [
    Exempt(r"make demo", covered_by=".ci/run", must_contain="make setup",
           reason="make setup needs apt and a fresh .venv; CI's .ci/run does it on a fresh "
                  "machine. The demo itself (the `demo:` recipe minus set-up) runs here",
           substitute=demo_module_command, check=check_demo),
    Exempt(r"make test", covered_by=".ci/run", must_contain="make test",
           reason="the whole suite; CI's .ci/run runs `make test` on a fresh machine"),
    Exempt(r"pip install -e \.", covered_by=".ci/run", must_contain="make setup",
           reason="CI's `make setup` installs the package editable (with the test extra) "
                  "on a fresh machine; the cluster extra is setup.py's"),
    Run(r"python write_datasets\.py( --cfg\..*)?", check_betons),
    Run(r"python train_imagenet\.py --config-file rn50_configs/fashion_mnist_cpu\.yaml "
        r"--augment\.min_scale=0\.25 --training\.seed=3", check_one_training),
    Run(r"torchrun --nproc_per_node=8 train_imagenet\.py .*", check_one_training),
    Run(r"python -m ffcv_bias\.sweep plan \S+", check_sweep_plan),
    Run(r"python -m ffcv_bias\.sweep launch \S+( --max-parallel \d+)?", check_sweep_launch),
    Run(r"python -m ffcv_bias\.sweep status \S+", check_sweep_status),
    Run(r"python -m ffcv_bias\.sweep launch \S+ --backend slurm .*", check_slurm_submission),
    Run(r"python -m ffcv_bias\.analysis .* --out \S+", check_analysis),
    Run(r"python -m ffcv_bias\.studies\.preservation .*", check_preservation),
    Run(r"python -m ffcv_bias\.studies\.transfer .*", check_transfer),
    Run(r"python -m ffcv_bias\.studies\.class_bounds from-analysis .*", check_class_bounds),
    Run(r"python train_imagenet\.py .* --augment\.class_min_scale=\S+",
        check_class_dependent_training),
    Run(r"python -m ffcv_bias\.studies\.diet score .*", check_diet_scores),
    Run(r"python -m ffcv_bias\.studies\.diet prune .*", check_diet_prune),
]


def entries_of(command):
    return [entry for entry in COMMANDS if re.fullmatch(entry.pattern, command)]


def covering_test_exists(covered_by, must_contain):
    path, _, function = covered_by.partition("::")
    source = (REPO / path).read_text()
    if function:
        # A regex, not ast.parse: CPython 3.11's AST builder keeps its recursion depth in
        # interpreter-wide state, and ast.parse raised a spurious "AST constructor recursion
        # depth mismatch" SystemError here in CI (CPython gh-106905).
        defined = re.search(rf"^def {re.escape(function)}\(", source, re.MULTILINE)
        assert defined, f"{covered_by}: no such test"
    assert must_contain in source, f"{covered_by} does not contain {must_contain!r}"


# ======================================================================================
# Running the README
# ======================================================================================

def sandbox_env(root, warm_python):
    values = {"sandbox": root, "warm_python": shlex.join(warm_python)}
    env = dict(os.environ)
    for name, (value, _) in ENVIRONMENT.items():
        env[name] = value.format(**values).replace("$PATH", os.environ.get("PATH", ""))
    return env


def make_sandbox(root, warm_python):
    for name in SANDBOX_LINKS:
        (root / name).symlink_to(REPO / name)
    for name in SANDBOX_COPIES:
        shutil.copytree(REPO / name, root / name)
    shrink_files(root)
    make_dataset_roots(root / "datasets")
    write_stand_in_slurm(root / "bin", root / "slurm")
    sandbox = Sandbox(root, sandbox_env(root, warm_python),
                      make_tiny_fashion_idx(root / "tiny_fashion"))
    for relative, (make, _) in PLACED.items():
        make(sandbox)
    write_demo_subsets(sandbox)
    return sandbox


def first_demo_run(sandbox):
    complete = [run for run in runs_under(sandbox.path("demo/runs"))
                if (run / "summary.json").is_file()]
    return complete[0].name if complete else "<no complete demo run>"


@contextlib.contextmanager
def inside(sandbox, argv):
    """The sandbox as working directory, its environment, and sys.argv, for one command."""
    saved_env, saved_argv = dict(os.environ), sys.argv
    os.environ.clear()
    os.environ.update(sandbox.env)
    sys.argv = list(argv)
    try:
        with contextlib.chdir(sandbox.root):
            yield
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)


def run_in_process(words, sandbox):
    """`python -m MODULE ARGS` or `python SCRIPT ARGS`, run by runpy as the interpreter
    runs them (__main__, sys.argv), in the sandbox. Returns (status, stdout, stderr)."""
    if words[1] == "-m":
        argv = [words[2], *words[3:]]
        def main(): runpy.run_module(words[2], run_name="__main__", alter_sys=True)
    else:
        argv = words[1:]
        def main(): runpy.run_path(words[1], run_name="__main__")
    out, err = io.StringIO(), io.StringIO()
    with inside(sandbox, argv), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            main()
            status = 0
        except SystemExit as stop:
            status = exit_status(stop.code)
        except Exception:  # the interpreter would print it and exit 1
            traceback.print_exc()
            status = 1
    return status, out.getvalue(), err.getvalue()


def run_in_subprocess(words, sandbox):
    try:
        result = subprocess.run([executable(words[0]), *words[1:]], cwd=sandbox.root,
                                env=sandbox.env, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        return -1, str(error.stdout or ""), f"{error.stderr or ''}\nstill running after " \
                                            f"{COMMAND_TIMEOUT_S} s"
    return result.returncode, result.stdout, result.stderr


def executable(word):
    """torchrun is the one installed beside this interpreter."""
    return str(Path(sys.executable).with_name(word)) if word == "torchrun" else word


def run_one(sandbox, readme_command, command, check):
    """Run one command (`python ...` in this process, others as processes), then its
    check; the Outcome."""
    words = shlex.split(command)
    start = time.monotonic()
    runner = run_in_process if words[0] == "python" else run_in_subprocess
    status, stdout, stderr = runner(words, sandbox)
    outcome = Outcome(readme_command, command, status, stdout, stderr,
                      time.monotonic() - start)
    if status != 0:
        outcome.failure = f"exit status {status}"
    elif check is not None:
        try:
            check(sandbox, words, outcome)
        except (AssertionError, OSError, ValueError, KeyError) as error:
            outcome.failure = f"check {check.__name__} failed: {error}"
    return outcome


def run_order(commands):
    """README order, but RUN_FIRST first."""
    return sorted(commands, key=lambda command: not re.fullmatch(RUN_FIRST, command))


def run_readme(sandbox, commands):
    """Each command in run_order; an exempt one's substitute, if any, in its place."""
    for command in run_order(commands):
        (entry,) = entries_of(command)
        if isinstance(entry, Exempt) and entry.substitute is not None:
            sandbox.outcomes[command] = run_one(sandbox, command, entry.substitute(sandbox),
                                                entry.check)
        elif isinstance(entry, Run):
            values = {"sandbox": sandbox.root, "fashion_idx": sandbox.fashion_idx,
                      "demo_run": first_demo_run(sandbox)}
            rewritten, reasons = apply_rewrites(command, values)
            outcome = run_one(sandbox, command, rewritten, entry.check)
            outcome.rewrites = reasons
            sandbox.outcomes[command] = outcome


PYTHON_SNIPPET_REWRITES = [
    ('"cuda"', '"cpu"', "no GPU here"),
]
# Appended to the snippet: what its loop produced, for the check.
SNIPPET_PROBE = ("\nimport torch\nprint('snippet:', images.dtype, tuple(images.shape), "
                 "x.dtype, x.is_contiguous(memory_format=torch.channels_last))\n")


def run_python_snippet(sandbox, snippet):
    """The snippet, rewritten, as a script run in the sandbox (in this process)."""
    for old, new, _ in PYTHON_SNIPPET_REWRITES:
        assert old in snippet, f"snippet rewrite {old!r} finds nothing"
        snippet = snippet.replace(old, new)
    script = sandbox.path("readme_snippet.py")
    script.write_text(snippet + SNIPPET_PROBE)
    return run_one(sandbox, "```python block", f"python {script.name}", check=None)


@pytest.fixture(scope="module")
def readme_sandbox(tmp_path_factory, warm_python):
    """Every README command run once, in order, in one sandbox; outcomes by command."""
    from ffcv_bias.data.sources import FASHION_MNIST_DIR
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (run `make setup`)")
    sandbox = make_sandbox(tmp_path_factory.mktemp("readme_sandbox"), warm_python)
    text = README.read_text()
    run_readme(sandbox, readme_commands(text))
    for snippet in fenced_blocks(text, "python"):
        sandbox.outcomes[snippet] = run_python_snippet(sandbox, snippet)
    return sandbox


# ======================================================================================
# Tests
# ======================================================================================

def test_readme_parser_joins_continuations_and_drops_comments():
    block = ("# a comment line\n"
             "python a.py --x=1 \\\n    --y='two words'   # trailing comment\n"
             "\n"
             "python -m b plan   f.yaml\n")
    assert block_commands(block) == ["python a.py --x=1 '--y=two words'",
                                     "python -m b plan f.yaml"]
    text = "```bash\nmake demo  # note\n```\n```\nnot a command\n```\n```python\nx = 1\n```\n"
    assert readme_commands(text) == ["make demo"]
    assert fenced_blocks(text, "python") == ["x = 1\n"]


def test_every_readme_command_has_one_entry():
    """A new README command fails here until it is given a way to be exercised."""
    commands = readme_commands()
    unmatched = [command for command in commands if len(entries_of(command)) != 1]
    assert not unmatched, ("README commands without exactly one entry in COMMANDS: "
                           + "; ".join(f"{c} ({len(entries_of(c))} entries)" for c in unmatched))
    stale = [entry.pattern for entry in COMMANDS
             if not any(re.fullmatch(entry.pattern, command) for command in commands)]
    assert not stale, f"COMMANDS entries matching no README command: {stale}"


def test_exemptions_name_an_existing_test_or_ci_step():
    for entry in COMMANDS:
        if isinstance(entry, Exempt):
            covering_test_exists(entry.covered_by, entry.must_contain)
            assert entry.reason
    assert '"cluster"' in (REPO / "setup.py").read_text()   # pip install -e '.[cluster]'


def test_an_exemption_naming_a_missing_test_is_refused():
    covering_test_exists("tests/test_train.py::"
                         "test_two_gloo_processes_write_a_complete_record_in_beton_order", "")
    with pytest.raises(AssertionError, match="no such test"):
        covering_test_exists("tests/test_train.py::test_torchrun_on_eight_gpus", "")
    with pytest.raises(AssertionError, match="does not contain"):
        covering_test_exists(".ci/run", "make deploy")


def test_every_rewrite_and_placed_input_is_used():
    commands = readme_commands()
    for applies_to, _, _, why in REWRITES:
        assert any(re.fullmatch(applies_to, c) for c in commands), f"unused rewrite: {why}"
    for relative in PLACED:
        assert any(f" {relative} " in f" {c} " for c in commands), f"unused input {relative}"


def short_id(command, width=70):
    return command if len(command) <= width else command[:width - 3] + "..."


@pytest.mark.parametrize("command", readme_commands(), ids=short_id)
def test_readme_command_works_as_written(readme_sandbox, command):
    (entry,) = entries_of(command)
    if isinstance(entry, Exempt):
        covering_test_exists(entry.covered_by, entry.must_contain)
        if entry.substitute is None:
            return
    outcome = readme_sandbox.outcomes[command]
    assert outcome.failure is None, outcome.report()


def test_readme_python_snippet_runs(readme_sandbox):
    snippets = fenced_blocks(README.read_text(), "python")
    assert snippets, "the README's ```python block is gone"
    for snippet in snippets:
        outcome = readme_sandbox.outcomes[snippet]
        assert outcome.failure is None, outcome.report()
        # uint8 [B,3,H,W] channels-last, as the snippet's comment says
        assert "snippet: torch.uint8 (256, 3, 32, 32) torch.float32 True" in outcome.stdout
