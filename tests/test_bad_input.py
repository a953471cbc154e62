"""Bad input, end to end (issue #9): one table, one row per bad input a user can hand us.

Each case makes its bad input in the real on-disk format (a beton cut short, a JPEG that is
not one, a run folder of another dataset, ...), runs the command a user types, and checks
what the user gets:

- a non-zero exit with the documented code: train_imagenet.py exits 2 for a bad config or
  bad input files (nothing started) and 1 for a run that started and failed;
  write_datasets.py exits 1; `python -m ffcv_bias.analysis` and `python -m ffcv_bias.sweep`
  exit 2;
- stderr's last non-empty line is the error, one line naming the problem (the file, the
  key, the class counts), and no Python traceback anywhere on stderr;
- nothing half-written: every file under the case's folder is byte for byte what it was
  before (a good beton already at the write path included), nothing was added (no run
  directory, no *.tmp, no partial beton, no report), except what the case names: a run
  that started and failed keeps config.json and error.txt, and a refused run directory
  gets the lock file taken to check it.

Issue item -> cases:
    truncated or corrupt beton                      truncated_train_beton, corrupt_val_beton
    beton labels vs its classes.json                labels_beyond_classes_json,
                                                    sample_count_vs_classes_json,
                                                    classes_json_count_vs_names
    val beton with another class count              val_beton_with_5_of_10_classes
    unknown config key or section                   unknown_key, unknown_section
    wrong value type                                wrong_value_type
    crop lower bound outside (0, 1]                 crop_bound_zero, crop_bound_negative,
                                                    crop_bound_above_one, sweep_crop_bound_zero
    empty or missing dataset directory              empty_dataset_dir, missing_dataset_dir
    corrupt JPEG files                              corrupt_jpegs
    run directory with another run's config         run_dir_of_another_run
    analysis: no complete run / mixed datasets      no_complete_run, no_run_records,
                                                    mixed_class_counts, mixed_class_lists
    NaN loss                                        nan_loss

Most cases call the CLI's main() in this process (ffcv and torch are imported once); the
`subprocess` ones run the real command, where a traceback would reach the terminal.
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from fixtures_datasets import corrupt_folder, read_beton
from test_train import run_dir_of, train_args
from ffcv_bias.record import runs
from ffcv_bias.analysis import make_synthetic_runs
from ffcv_bias.common.errors import EXIT_FAILURE
from ffcv_bias.common.errors import EXIT_USAGE as EXIT_CONFIG
from ffcv_bias.train.config import resolve_config

REPO = Path(__file__).resolve().parents[1]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]

# What each command is, for a user: how it is started and how its errors begin.
COMMANDS = {
    "train": ([str(REPO / "train_imagenet.py")], "error: "),
    "write": ([str(REPO / "write_datasets.py")], "write_datasets.py: error: "),
    "analysis": (["-m", "ffcv_bias.analysis"], "error: "),
    "sweep": (["-m", "ffcv_bias.sweep"], "error: "),
    "diet": (["-m", "ffcv_bias.studies.diet"], "error: "),
}
EXIT_WRITE_FAILED = 1  # write_datasets.py
EXIT_MODULE_CLI_ERROR = 2  # python -m ffcv_bias.analysis / .sweep / .studies.diet


# --------------------------------------------------------------------------------------
# The folder a case works in, and what a case makes there
# --------------------------------------------------------------------------------------

class Workspace:
    """tmp_path of one case. Betons are copied in only by the cases that damage them."""

    def __init__(self, root, request):
        self.root = root
        self.request = request
        self.runs = root / "runs"

    def good_betons(self):
        """The session's tiny Fashion-MNIST (train, val) betons, read only."""
        return self.request.getfixturevalue("tiny_fashion_betons")

    def copied_betons(self):
        """Copies (train, val) under root/data, with their classes.json, to damage."""
        (self.root / "data").mkdir(exist_ok=True)
        copies = []
        for beton in self.good_betons():
            copy = self.root / "data" / beton.name
            shutil.copy(beton, copy)
            shutil.copy(classes_json(beton), classes_json(copy))
            copies.append(copy)
        return tuple(copies)

    def train_args(self, *extra, betons=None):
        return train_args(betons or self.good_betons(), self.runs, *extra)

    def file(self, name, text):
        path = self.root / name
        path.write_text(text)
        return path


@dataclass
class BadInput:
    argv: list
    needles: list                    # each must be in the error line
    may_leave: list = field(default_factory=list)  # paths the failure is allowed to add


@dataclass
class Case:
    id: str
    item: str                        # the issue's words
    command: str                     # a key of COMMANDS
    make: Callable                   # Workspace -> BadInput
    code: int
    subprocess: bool = False
    then: Callable = None            # (Workspace, BadInput, error line) -> extra checks


def classes_json(beton):
    return Path(f"{beton}.classes.json")


def edit_classes_json(beton, **changes):
    path = classes_json(beton)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- betons ------------------------------------------------------------------------------

def truncated_train_beton(ws):
    train, val = ws.copied_betons()
    with open(train, "r+b") as handle:  # a copy or download that stopped half-way
        handle.truncate(train.stat().st_size // 2)
    return BadInput(ws.train_args(betons=(train, val)),
                    ["data.train_dataset", f"truncated or unfinished beton {train}"])


def corrupt_val_beton(ws):
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType
    train, val = ws.copied_betons()
    table_start = int(np.fromfile(val, dtype=HeaderType, count=1)[0]["alloc_table_ptr"])
    table = np.fromfile(val, dtype=ALLOC_TABLE_TYPE, offset=table_start)
    table["ptr"] = val.stat().st_size  # every image now points past the end of the file
    with open(val, "r+b") as handle:
        handle.seek(table_start)
        handle.write(table.tobytes())
    return BadInput(ws.train_args(betons=(train, val)),
                    ["data.val_dataset", f"corrupt beton {val}", "runs past"])


def labels_beyond_classes_json(ws):
    train, val = ws.copied_betons()
    for beton in (train, val):  # both lists agree with each other, not with the labels
        edit_classes_json(beton, num_classes=5, classes=FASHION_CLASSES[:5])
    return BadInput(ws.train_args(betons=(train, val)),
                    ["data.train_dataset", f"beton {train} has labels 0..9",
                     "classes.json lists 5 classes"])


def sample_count_vs_classes_json(ws):
    train, val = ws.copied_betons()
    edit_classes_json(train, num_samples=601)
    return BadInput(ws.train_args(betons=(train, val)),
                    ["data.train_dataset", f"beton {train} holds 600 labels",
                     "classes.json says 601"])


def classes_json_count_vs_names(ws):
    train, val = ws.copied_betons()
    edit_classes_json(val, num_classes=9)
    return BadInput(ws.train_args(betons=(train, val)),
                    ["data.val_dataset", f"corrupt class list {classes_json(val)}",
                     "num_classes is 9 but 10 class names"])


def val_beton_with_5_of_10_classes(ws):
    """A real val beton of Fashion-MNIST's first 5 classes, written by our writer."""
    from ffcv_bias.data.sources import ArrayImages
    from ffcv_bias.data.writer import write_beton
    train, full_val = ws.good_betons()
    images, labels, _ = read_beton(full_val)
    keep = labels < 5
    val = ws.root / "fashion-mnist-5_val.beton"
    write_beton(ArrayImages(np.stack(images)[keep], labels[keep]), FASHION_CLASSES[:5], val,
                dataset_name="fashion-mnist-5", split="val")
    return BadInput(ws.train_args(betons=(train, val)),
                    [f"data.val_dataset {val} has 5 classes",
                     f"data.train_dataset {train} has 10"])


# -- config ------------------------------------------------------------------------------

def config_override(override, *needles):
    def make(ws):
        return BadInput(ws.train_args(override), list(needles))
    return make


def unknown_section(ws):
    config = ws.file("typo.yaml", "augmentation:\n  min_scale: 0.3\n")
    return BadInput(ws.train_args("--config-file", str(config)),
                    ["unknown config section 'augmentation'", str(config)])


def crop_bound(value):
    return config_override(f"--augment.min_scale={value}",
                           f"bad value for 'augment.min_scale': '{value}'", "(0, 1]")


def sweep_crop_bound_zero(ws):
    train, val = ws.good_betons()
    base = ws.file("base.yaml", yaml.safe_dump({
        "data": {"train_dataset": str(train), "val_dataset": str(val)},
        "model": {"arch": "resnet8"}, "training": {"epochs": 2, "batch_size": 32},
        "lr": {"lr_peak_epoch": 1}}))
    sweep = ws.file("crop.yaml", yaml.safe_dump({
        "base": str(base), "folder": str(ws.runs), "seeds": 1,
        "grid": {"augment.min_scale": [1.0, 0]}}))
    return BadInput(["launch", str(sweep)],
                    ["1 runs have a bad config", "augment.min_scale=0",
                     "bad value for 'augment.min_scale'"])


# -- runs --------------------------------------------------------------------------------

def run_dir_of_another_run(ws):
    args = ws.train_args()
    run_dir = run_dir_of(args)
    run_dir.mkdir(parents=True)
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps({"meta": {"run_id": "other_run"}}))
    return BadInput(args, [f"run directory {run_dir} holds the config of run other_run"],
                    may_leave=[run_dir / runs.LOCK_FILE])


def nan_loss(ws):
    args = ws.train_args("--lr.lr=1e30")
    run_dir = run_dir_of(args)
    return BadInput(args, ["non-finite loss at epoch 0 step "],
                    may_leave=[ws.runs, run_dir, run_dir / runs.LOCK_FILE,
                               run_dir / runs.CONFIG_FILE, run_dir / runs.ERROR_FILE])


def nan_loss_is_recorded_as_failed(ws, bad, error_line):
    """The failed run keeps its reason: error.txt starts with the line the user saw."""
    run_dir = run_dir_of(bad.argv)
    assert runs.run_state(run_dir) == "failed"
    error_text = (run_dir / runs.ERROR_FILE).read_text()
    assert error_text.splitlines()[0] == error_line.removeprefix("error: ")
    assert "Traceback" in error_text  # the details are for the record, not the terminal


# -- write_datasets.py -----------------------------------------------------------------------

def write_args(ws, data_dir):
    """imagefolder args whose write path holds a good beton already (it must survive)."""
    _, val = ws.good_betons()
    existing = ws.root / "out" / "folder.beton"
    existing.parent.mkdir()
    shutil.copy(val, existing)
    shutil.copy(classes_json(val), classes_json(existing))
    return ["--cfg.dataset=imagefolder", "--cfg.split=train", f"--cfg.data_dir={data_dir}",
            f"--cfg.write_path={existing}"]


def missing_dataset_dir(ws):
    missing = ws.root / "missing"
    return BadInput(write_args(ws, missing), [f"image folder directory not found: {missing}"])


def empty_dataset_dir(ws):
    empty = ws.root / "empty"
    empty.mkdir()
    return BadInput(write_args(ws, empty), [f"image folder directory is empty: {empty}"])


def corrupt_jpegs(ws):
    not_a_jpeg, _ = corrupt_folder(ws.root / "train")  # and one JPEG cut in half
    return BadInput(write_args(ws, ws.root / "train"),
                    [f"cannot read image {not_a_jpeg}", "(and 1 more)", "skip_corrupt=1"])


# -- analysis ----------------------------------------------------------------------------

def analysis_args(ws, *folders):
    return [*map(str, folders), "--vary", "augment.min_scale", "--out", str(ws.root / "report")]


def synthetic_runs(folder, **options):
    return make_synthetic_runs(folder, [1.0, 0.08], range(2), n_per_class=5, **options)


def no_complete_run(ws):
    for run_dir in synthetic_runs(ws.runs, num_classes=6)["run_dirs"]:
        (run_dir / runs.SUMMARY_FILE).unlink()  # killed before the end
    return BadInput(analysis_args(ws, ws.runs),
                    [f"no complete run (summary.json) under {ws.runs}", "(4 incomplete)"])


def no_run_records(ws):
    ws.runs.mkdir()
    return BadInput(analysis_args(ws, ws.runs),
                    [f"no run records (directories with config.json) under {ws.runs}"])


def mixed_class_counts(ws):
    synthetic_runs(ws.root / "six", num_classes=6)
    synthetic_runs(ws.root / "eight", num_classes=8)
    return BadInput(analysis_args(ws, ws.root / "six", ws.root / "eight"),
                    ["mixed datasets", "has 8 classes", "has 6 classes"])


def mixed_class_lists(ws):
    synthetic_runs(ws.root / "a", num_classes=6)
    synthetic_runs(ws.root / "b", num_classes=6, class_names=[f"other_{i}" for i in range(6)])
    return BadInput(analysis_args(ws, ws.root / "a", ws.root / "b"),
                    ["mixed datasets: class lists of", "differ"])


# -- issue 18: a changed beton, a corrupt record, an unknown arch, output paths --------------

def record_run(ws, args, complete=True):
    """The record a finished (or, complete=False, a started) run leaves: config.json with
    the fingerprints of the betons the args name now, and summary.json. Made by hand, not
    by training: these cases are about what the trainer decides before it trains."""
    from ffcv_bias.data.fingerprint import current_fingerprints
    nested = resolve_config(args)
    run_id = runs.run_id(nested)
    run_dir = Path(nested["logging"]["folder"]) / run_id
    run_dir.mkdir(parents=True)
    meta = {"run_id": run_id, "betons": current_fingerprints(nested)}
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps({**nested, "meta": meta}))
    if complete:
        (run_dir / runs.SUMMARY_FILE).write_text(json.dumps({"run_id": run_id, "top1": 0.5}))
    return run_dir


def rewrite_with_val_beton(train, val):
    """data/x_train.beton rewritten under its name with other images (the 200 val ones)."""
    shutil.copy(val, train)
    shutil.copy(classes_json(val), classes_json(train))


def beton_rewritten_after_run(complete):
    def make(ws):
        train, val = ws.copied_betons()
        args = ws.train_args(betons=(train, val))
        run_dir = record_run(ws, args, complete=complete)
        rewrite_with_val_beton(train, val)
        return BadInput(args, [f"data.train_dataset {train} is not the beton run {run_dir.name}",
                               "now: 200 samples", "the run's: 600 samples",
                               "use another logging.folder"])
    return make


def class_lists_edited_to_11(ws):
    train, val = ws.copied_betons()
    args = ws.train_args(betons=(train, val))
    record_run(ws, args)
    for beton in (train, val):  # labels 0..9 still fit: only the fingerprint sees it
        edit_classes_json(beton, num_classes=11, classes=FASHION_CLASSES + ["Extra"])
    return BadInput(args, ["data.train_dataset", "now: 600 samples, 11 classes",
                           "the run's: 600 samples, 10 classes"])


def sweep_file(ws, betons, grid):
    train, val = betons
    base = ws.file("base.yaml", yaml.safe_dump({
        "data": {"train_dataset": str(train), "val_dataset": str(val)},
        "model": {"arch": "resnet8"}, "training": {"epochs": 2, "batch_size": 32},
        "lr": {"lr_peak_epoch": 1}}))
    return ws.file("sweep.yaml", yaml.safe_dump({
        "base": str(base), "folder": str(ws.runs), "seeds": 1, "grid": grid}))


def planned_runs(sweep):
    from ffcv_bias.sweep.spec import load_sweep, plan
    return plan(load_sweep(sweep))


def sweep_launch_after_beton_rewritten(ws):
    train, val = ws.copied_betons()
    sweep = sweep_file(ws, (train, val), {"augment.min_scale": [1.0, 0.5]})
    run = planned_runs(sweep)[0]
    record_run(ws, run.config_args)
    rewrite_with_val_beton(train, val)
    return BadInput(["launch", str(sweep)],
                    ["1 runs were trained on other betons", "augment.min_scale=1.0",
                     f"is not the beton run {run.run_id}", "--folder"])


def analysis_over_rewritten_betons(ws):
    def fingerprint(samples):
        return {"size": 1000 * samples, "num_samples": samples, "num_classes": 6,
                "classes_sha256": "c" * 16, "tables_sha256": f"{samples:016d}"}
    for folder, seeds, samples in (("a", range(2), 600), ("b", range(2, 4), 500)):
        make_synthetic_runs(ws.root / folder, [1.0, 0.08], seeds, num_classes=6,
                            n_per_class=5,
                            extra_config={"meta.betons": {"val_dataset": fingerprint(samples)}})
    return BadInput(analysis_args(ws, ws.root / "a", ws.root / "b"),
                    ["mixed betons: data.val_dataset", "600 samples", "500 samples",
                     "rewritten between the runs"])


def sweep_unknown_arch(ws):
    sweep = sweep_file(ws, ws.good_betons(), {"model.arch": ["resnet8", "resnet9000"]})
    return BadInput(["launch", str(sweep)],
                    ["1 runs have a bad config", "model.arch=resnet9000",
                     "bad value for 'model.arch': 'resnet9000'"])


def logging_folder_under_a_file(ws):
    blocker = ws.file("runs_is_a_file", "not a folder\n")
    return BadInput(ws.train_args(f"--logging.folder={blocker}/runs"),
                    [f"logging.folder: cannot create {blocker}/runs: {blocker} is a file, "
                     "not a directory"])


def unwritable_folder():
    """A folder this process cannot create anything in whatever its uid (root ignores
    permission bits): /sys refuses mkdir in containers and on most systems."""
    folder = Path("/sys/ffcv_bias_probe")
    from ffcv_bias.common.output_paths import creation_problem
    if creation_problem(folder) is None:
        pytest.skip("/sys is writable here: no read-only folder to test with")
    return folder


def logging_folder_read_only(ws):
    folder = unwritable_folder()
    return BadInput(ws.train_args(f"--logging.folder={folder}"),
                    [f"logging.folder: cannot create {folder}: "])


def analysis_out_is_a_file(ws):
    synthetic_runs(ws.runs, num_classes=6)
    out = ws.file("report", "an existing file, not a folder\n")
    return BadInput(analysis_args(ws, ws.runs), [f"--out: cannot create {out}: it is a file"])


def analysis_out_read_only(ws):
    synthetic_runs(ws.runs, num_classes=6)
    folder = unwritable_folder()
    return BadInput([str(ws.runs), "--vary", "augment.min_scale", "--out", str(folder)],
                    [f"--out: cannot create {folder}: "])


def beton_path_is_a_directory(ws):
    _, val = ws.good_betons()
    folder = ws.root / "data"
    folder.mkdir()
    return BadInput(ws.train_args(betons=(folder, val)),
                    [f"data.train_dataset: {folder} is a directory, not a beton file"])


def missing_class_min_scale(ws):
    missing = ws.root / "bounds.json"
    return BadInput(ws.train_args(f"--augment.class_min_scale={missing}"),
                    [f"augment.class_min_scale: file not found: {missing}"])


def analysis_negative_top_k(ws):
    synthetic_runs(ws.runs, num_classes=6)
    return BadInput(analysis_args(ws, ws.runs) + ["--top-k", "-1"],
                    ["--top-k must be >= 1, not -1"])


def too_big_batch(override, key):
    return config_override(override, f"{key}=", "GB of memory", "this machine has",
                           "; lower ")


# -- issue 18, a fresh campaign: what a careless user typed next -------------------------

def analysis_out_is_the_runs_dir(ws):
    synthetic_runs(ws.runs, num_classes=6)
    argv = analysis_args(ws, ws.runs)
    argv[argv.index("--out") + 1] = str(ws.runs)
    return BadInput(argv, [f"--out {ws.runs} is the runs directory it reads"])


def analysis_out_inside_a_run(ws):
    run_dir = synthetic_runs(ws.runs, num_classes=6)["run_dirs"][0]
    argv = analysis_args(ws, ws.runs)
    argv[argv.index("--out") + 1] = str(run_dir / "report")
    return BadInput(argv, [f"is inside the run directory {run_dir}"])


def sweep_override_out_of_range(ws):
    sweep = sweep_file(ws, ws.good_betons(), {"augment.min_scale": [1.0]})
    content = yaml.safe_load(sweep.read_text())
    content["overrides"] = {"training.epochs": -3}
    sweep.write_text(yaml.safe_dump(content))
    return BadInput(["launch", str(sweep)],
                    ["1 runs have a bad config", "training.epochs must be >= 1"])


def sweep_slurm_without_slurm(ws):
    sweep = sweep_file(ws, ws.good_betons(), {"augment.min_scale": [1.0]})
    empty_bin = ws.root / "bin"
    empty_bin.mkdir()
    ws.request.getfixturevalue("monkeypatch").setenv("PATH", str(empty_bin))
    return BadInput(["launch", str(sweep), "--backend", "slurm", "--time", "10",
                     "--cpus-per-task", "4", "--mem", "8G"],
                    ["--backend slurm: sbatch and srun not found on PATH", "--dry-run"],
                    may_leave=[empty_bin])


def train_dataset_is_its_class_list(ws):
    train, _ = ws.good_betons()
    sidecar = classes_json(train)
    return BadInput(ws.train_args(f"--data.train_dataset={sidecar}"),
                    [f"data.train_dataset: {sidecar} is a beton's class list",
                     f"name the beton itself ({train})"])


def keep_indices_not_numbers(ws):
    keep = ws.file("keep.txt", "1,2,3\n")
    return BadInput(ws.train_args(f"--data.keep_indices={keep}"),
                    [f"data.keep_indices: cannot read numbers from {keep}",
                     "one number per line"])


def diet_score_out_is_a_file(ws):
    out = ws.file("scores", "a file where the score folder should go\n")
    train, val = ws.good_betons()
    return BadInput(["score", f"--data.train_dataset={train}", f"--data.val_dataset={val}",
                     "--model.arch=resnet8", "--epochs", "1", "--seeds", "1",
                     "--out", str(out)],
                    [f"--out: cannot create {out}: it is a file, not a directory"])


BETON = "truncated or corrupt beton"
CHANGED = "a beton rewritten under the same name"
OUTPUT = "output path or batch memory"
SMALLER = "smaller ones"
FRESH = "a fresh campaign (issue 18, second round)"
CASES = [
    Case("truncated_train_beton", BETON, "train", truncated_train_beton, EXIT_CONFIG,
         subprocess=True),
    Case("corrupt_val_beton", BETON, "train", corrupt_val_beton, EXIT_CONFIG),
    Case("labels_beyond_classes_json", "beton label count vs its classes.json", "train",
         labels_beyond_classes_json, EXIT_CONFIG),
    Case("sample_count_vs_classes_json", "beton label count vs its classes.json", "train",
         sample_count_vs_classes_json, EXIT_CONFIG),
    Case("classes_json_count_vs_names", "beton label count vs its classes.json", "train",
         classes_json_count_vs_names, EXIT_CONFIG),
    Case("val_beton_with_5_of_10_classes", "val beton with another class count", "train",
         val_beton_with_5_of_10_classes, EXIT_CONFIG),
    Case("unknown_key", "unknown config key or section", "train",
         config_override("--training.wieght_decay=0",
                         "unknown config key 'training.wieght_decay' (from command line)"),
         EXIT_CONFIG),
    Case("unknown_section", "unknown config key or section", "train", unknown_section,
         EXIT_CONFIG),
    Case("wrong_value_type", "wrong value type", "train",
         config_override("--training.epochs=three",
                         "bad value for 'training.epochs': 'three' is not an integer"),
         EXIT_CONFIG),
    Case("crop_bound_zero", "crop lower bound outside (0, 1]", "train", crop_bound("0"),
         EXIT_CONFIG, subprocess=True),
    Case("crop_bound_negative", "crop lower bound outside (0, 1]", "train",
         crop_bound("-0.1"), EXIT_CONFIG),
    Case("crop_bound_above_one", "crop lower bound outside (0, 1]", "train",
         crop_bound("1.5"), EXIT_CONFIG),
    Case("sweep_crop_bound_zero", "crop lower bound outside (0, 1]", "sweep",
         sweep_crop_bound_zero, EXIT_MODULE_CLI_ERROR),
    Case("missing_dataset_dir", "empty or missing dataset directory", "write",
         missing_dataset_dir, EXIT_WRITE_FAILED, subprocess=True),
    Case("empty_dataset_dir", "empty or missing dataset directory", "write",
         empty_dataset_dir, EXIT_WRITE_FAILED),
    Case("corrupt_jpegs", "corrupt JPEG files", "write", corrupt_jpegs, EXIT_WRITE_FAILED),
    Case("run_dir_of_another_run", "run directory with another run's config", "train",
         run_dir_of_another_run, EXIT_FAILURE),
    Case("no_complete_run", "analysis over folders with no complete run", "analysis",
         no_complete_run, EXIT_MODULE_CLI_ERROR),
    Case("no_run_records", "analysis over folders with no complete run", "analysis",
         no_run_records, EXIT_MODULE_CLI_ERROR),
    Case("mixed_class_counts", "analysis over mixed datasets", "analysis", mixed_class_counts,
         EXIT_MODULE_CLI_ERROR, subprocess=True),
    Case("mixed_class_lists", "analysis over mixed datasets", "analysis", mixed_class_lists,
         EXIT_MODULE_CLI_ERROR),
    Case("nan_loss", "NaN loss", "train", nan_loss, EXIT_FAILURE,
         then=nan_loss_is_recorded_as_failed),
    Case("rewritten_beton_complete_run", CHANGED, "train", beton_rewritten_after_run(True),
         EXIT_CONFIG, subprocess=True),
    Case("rewritten_beton_started_run", CHANGED, "train", beton_rewritten_after_run(False),
         EXIT_CONFIG),
    Case("class_lists_edited_to_11", CHANGED, "train", class_lists_edited_to_11, EXIT_CONFIG),
    Case("sweep_launch_rewritten_beton", CHANGED, "sweep", sweep_launch_after_beton_rewritten,
         EXIT_MODULE_CLI_ERROR),
    Case("analysis_rewritten_beton", CHANGED, "analysis", analysis_over_rewritten_betons,
         EXIT_MODULE_CLI_ERROR),
    Case("unknown_arch", "unknown model.arch", "train",
         config_override("--model.arch=resnet9000", "bad value for 'model.arch': 'resnet9000'",
                         "resnet50", "vit_small"), EXIT_CONFIG, subprocess=True),
    Case("sweep_unknown_arch", "unknown model.arch", "sweep", sweep_unknown_arch,
         EXIT_MODULE_CLI_ERROR),
    Case("logging_folder_under_a_file", OUTPUT, "train", logging_folder_under_a_file,
         EXIT_CONFIG),
    Case("logging_folder_read_only", OUTPUT, "train", logging_folder_read_only, EXIT_CONFIG,
         subprocess=True),
    Case("analysis_out_is_a_file", OUTPUT, "analysis", analysis_out_is_a_file,
         EXIT_MODULE_CLI_ERROR, subprocess=True),
    Case("analysis_out_read_only", OUTPUT, "analysis", analysis_out_read_only,
         EXIT_MODULE_CLI_ERROR),
    Case("validation_resolution_20000", OUTPUT, "train",
         too_big_batch("--validation.resolution=20000", "validation.resolution"),
         EXIT_CONFIG, subprocess=True),
    Case("training_resolution_20000", OUTPUT, "train",
         too_big_batch("--resolution.max_res=20000", "resolution.max_res"), EXIT_CONFIG),
    Case("training_batch_size_huge", OUTPUT, "train",
         too_big_batch("--training.batch_size=100000000", "training.batch_size"),
         EXIT_CONFIG),
    Case("beton_path_is_a_directory", SMALLER, "train", beton_path_is_a_directory,
         EXIT_CONFIG),
    Case("missing_class_min_scale", SMALLER, "train", missing_class_min_scale, EXIT_CONFIG),
    Case("analysis_negative_top_k", SMALLER, "analysis", analysis_negative_top_k,
         EXIT_MODULE_CLI_ERROR),
    Case("analysis_out_is_the_runs_dir", FRESH, "analysis", analysis_out_is_the_runs_dir,
         EXIT_MODULE_CLI_ERROR, subprocess=True),
    Case("analysis_out_inside_a_run", FRESH, "analysis", analysis_out_inside_a_run,
         EXIT_MODULE_CLI_ERROR),
    Case("sweep_override_out_of_range", FRESH, "sweep", sweep_override_out_of_range,
         EXIT_MODULE_CLI_ERROR),
    Case("sweep_slurm_without_slurm", FRESH, "sweep", sweep_slurm_without_slurm,
         EXIT_MODULE_CLI_ERROR),
    Case("train_dataset_is_its_class_list", FRESH, "train", train_dataset_is_its_class_list,
         EXIT_CONFIG),
    Case("keep_indices_not_numbers", FRESH, "train", keep_indices_not_numbers, EXIT_CONFIG),
    Case("diet_score_out_is_a_file", FRESH, "diet", diet_score_out_is_a_file,
         EXIT_MODULE_CLI_ERROR),
]

ISSUE_ITEMS = {BETON, "beton label count vs its classes.json",
               "val beton with another class count", "unknown config key or section",
               "wrong value type", "crop lower bound outside (0, 1]",
               "empty or missing dataset directory", "corrupt JPEG files",
               "run directory with another run's config",
               "analysis over folders with no complete run", "analysis over mixed datasets",
               "NaN loss", CHANGED, "unknown model.arch", OUTPUT, SMALLER, FRESH}


# --------------------------------------------------------------------------------------
# Issue 31, third round: huge counts, non-finite numbers, YAML keys given twice, sections
# that are not mappings, keys left empty, YAML syntax errors
# --------------------------------------------------------------------------------------

def config_file_case(text, *needles, extra=()):
    """A config file holding `text`, given to the trainer; needles may name {config}."""
    def make(ws):
        config = ws.file("cfg.yaml", text)
        return BadInput(ws.train_args("--config-file", str(config), *extra),
                        [needle.format(config=config) for needle in needles])
    return make


def sweep_with_two_grids(ws):
    """A second `grid:` (say, pasted from another sweep) used to replace the first:
    `sweep plan` showed 1 run instead of 3."""
    train, val = ws.good_betons()
    base = ws.file("base.yaml", yaml.safe_dump({
        "data": {"train_dataset": str(train), "val_dataset": str(val)},
        "model": {"arch": "resnet8"}, "training": {"epochs": 2, "batch_size": 32},
        "lr": {"lr_peak_epoch": 1}}))
    sweep = ws.file("sweep.yaml", f"base: {base}\nfolder: {ws.runs}\ngrid:\n"
                                  f"  augment.min_scale: [1.0, 0.5, 0.25]\nseeds: 1\n"
                                  f"grid:\n  model.dropout: [0.1]\n")
    return BadInput(["plan", str(sweep)],
                    [f"{sweep}:6:1: duplicate key 'grid' in sweep file (lines 3 and 6)"])


def sweep_yaml_syntax_error(ws):
    sweep = ws.file("sweep.yaml", "base: base.yaml\ngrid:\n  augment.min_scale: [1.0, 0.5\n"
                                  "seeds: 2\n")
    return BadInput(["plan", str(sweep)],
                    [f"{sweep}:4:", "sweep file is not valid YAML",
                     "(while parsing a flow sequence at line 3)"])


HUGE = "a huge count or a non-finite number (issue 31)"
TWICE = "a YAML key given twice, or YAML that does not parse (issue 31)"
SHAPE = "a section that is not a mapping, a key left empty (issue 31)"
CASES += [
    # Used to pass every check, create the run directory and hang building the lr schedule
    # (one list entry per epoch): the real command, so that a hang fails the test.
    Case("huge_epochs", HUGE, "train",
         config_override("--training.epochs=99999999999999999999",
                         "training.epochs=99999999999999999999 is out of range",
                         "[1, 10000]"), EXIT_CONFIG, subprocess=True),
    Case("huge_loader_threads", HUGE, "train",
         config_override("--data.num_workers=100000",
                         "data.num_workers=100000 is out of range", "[0, 1024]"), EXIT_CONFIG),
    Case("huge_world_size", HUGE, "train",
         config_override("--dist.world_size=1000000",
                         "dist.world_size=1000000 is out of range", "[1, 4096]"), EXIT_CONFIG),
    Case("huge_ramp", HUGE, "train",
         config_override("--resolution.end_ramp=99999999999",
                         "resolution.end_ramp=99999999999 is out of range", "[0, 10000]"),
         EXIT_CONFIG),
    # Used to print numpy warnings, create the run directory, then fail: "non-finite loss".
    Case("lr_inf", HUGE, "train",
         config_override("--lr.lr=inf", "bad value for 'lr.lr': 'inf' is not a finite number"),
         EXIT_CONFIG),
    Case("yaml_nan", HUGE, "train",
         config_file_case("training:\n  momentum: .nan\n",
                          "bad value for 'training.momentum': nan is not a finite number"),
         EXIT_CONFIG),
    # Used to train 3 epochs / drop the first augment section's min_scale / run 1 setting.
    Case("yaml_key_twice", TWICE, "train",
         config_file_case("training:\n  epochs: 2\n  epochs: 3\n",
                          "{config}:3:3: duplicate key 'training.epochs' in config file "
                          "(lines 2 and 3)"), EXIT_CONFIG, subprocess=True),
    Case("yaml_section_twice", TWICE, "train",
         config_file_case("augment:\n  min_scale: 0.3\nmodel:\n  dropout: 0.1\naugment:\n"
                          "  flip: 0\n",
                          "{config}:5:1: duplicate key 'augment' in config file "
                          "(lines 1 and 5)"), EXIT_CONFIG),
    Case("yaml_key_nested_and_dotted", TWICE, "train",
         config_file_case("training:\n  label_smoothing: 0.2\ntraining.label_smoothing: 0\n",
                          "config key 'training.label_smoothing' is given twice in {config}"),
         EXIT_CONFIG),
    Case("sweep_grid_twice", TWICE, "sweep", sweep_with_two_grids, EXIT_MODULE_CLI_ERROR),
    # Used to say "not valid YAML: while scanning for the next token": no file, no line.
    Case("yaml_tab", TWICE, "train",
         config_file_case("training:\n\tepochs: 2\n",
                          "{config}:2:1: config file is not valid YAML",
                          "that is a tab: YAML indents with spaces"), EXIT_CONFIG),
    Case("yaml_unclosed_bracket", TWICE, "train",
         config_file_case("augment: {min_scale: 0.3\nmodel:\n  dropout: 0.1\n",
                          "{config}:2:", "config file is not valid YAML",
                          "(while parsing a flow mapping at line 1)"), EXIT_CONFIG),
    Case("sweep_yaml_syntax_error", TWICE, "sweep", sweep_yaml_syntax_error,
         EXIT_MODULE_CLI_ERROR),
    # Used to say "unknown config key 'training'".
    Case("section_is_a_list", SHAPE, "train",
         config_file_case("training:\n  - epochs: 2\n",
                          "config section 'training' in {config} must be a mapping of keys",
                          "got a list"), EXIT_CONFIG),
    Case("section_left_empty", SHAPE, "train",
         config_file_case("training:\nepochs: 3\n",
                          "config section 'training' in {config} is empty"), EXIT_CONFIG),
    # Used to train with the default (or the earlier file's) value without a word.
    Case("key_null", SHAPE, "train",
         config_file_case("training:\n  label_smoothing: null\n",
                          "config key 'training.label_smoothing' in {config} has no value"),
         EXIT_CONFIG),
]
ISSUE_ITEMS |= {HUGE, TWICE, SHAPE}


# --------------------------------------------------------------------------------------
# Running a command as a user would, and reading what it left
# --------------------------------------------------------------------------------------

def run_in_process(command, argv, monkeypatch, capsys):
    """(exit code, stderr) of the command's main() in this process."""
    if command == "train":
        import train_imagenet
        monkeypatch.setattr(sys, "argv", ["train_imagenet.py", *argv])  # preflight reads it
        main = train_imagenet.main
    elif command == "write":
        from write_datasets import main as write_main
        main = lambda: write_main(argv)  # noqa: E731
    elif command == "analysis":
        from ffcv_bias.analysis.__main__ import main as analysis_main
        main = lambda: analysis_main(argv)  # noqa: E731
    elif command == "diet":
        from ffcv_bias.studies.diet import main as diet_main
        main = lambda: diet_main(argv)  # noqa: E731
    else:
        from ffcv_bias.sweep.cli import main as sweep_main
        main = lambda: sweep_main(argv)  # noqa: E731
    try:
        code = main()
    except SystemExit as exit_:  # argparse's way out
        code = exit_.code
    return code, capsys.readouterr().err


def run_subprocess(command, argv, cwd):
    """(exit code, stderr) of the real command line."""
    launcher, _ = COMMANDS[command]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *launcher, *argv], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def files_under(root):
    """{path: bytes, or None for a directory} of everything under root."""
    return {path: (path.read_bytes() if path.is_file() else None)
            for path in sorted(root.rglob("*"))}


def error_line(command, stderr):
    """The last non-empty stderr line, checked to be the command's error line."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    _, prefix = COMMANDS[command]
    assert lines[-1].startswith(prefix), stderr
    return lines[-1]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_non_zero_and_writes_nothing(case, tmp_path, request,
                                                          monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    workspace = Workspace(tmp_path, request)
    bad = case.make(workspace)
    capsys.readouterr()  # what making the bad input printed is not the command's output
    before = files_under(tmp_path)

    if case.subprocess:
        code, stderr = run_subprocess(case.command, bad.argv, tmp_path)
    else:
        code, stderr = run_in_process(case.command, bad.argv, monkeypatch, capsys)

    assert code == case.code, stderr
    line = error_line(case.command, stderr)
    for needle in bad.needles:
        assert needle in line, line
    if case.subprocess:  # the terminal shows the error and nothing else
        assert stderr.strip() == line, stderr

    after = files_under(tmp_path)
    assert [path for path in before if path not in after] == []
    assert [path for path in before if path in after and after[path] != before[path]] == []
    assert [path for path in after if path not in before and path not in bad.may_leave] == []
    if case.then is not None:
        case.then(workspace, bad, line)


def test_every_item_of_the_issue_has_a_case():
    assert {case.item for case in CASES} == ISSUE_ITEMS
    assert len({case.id for case in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------
# Issue 18 beyond the table: what a corrupt record, an old record and the registries do
# --------------------------------------------------------------------------------------

def train_in_this_process(argv, monkeypatch, capsys):
    """(exit code, stdout, stderr) of train_imagenet.py's main(), preflight included."""
    import train_imagenet
    monkeypatch.setattr(sys, "argv", ["train_imagenet.py", *argv])
    code = train_imagenet.main()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_corrupt_summary_is_moved_aside_and_the_run_retrained(tiny_fashion_betons, tmp_path,
                                                            monkeypatch, capsys):
    """A truncated summary.json is not "complete": the rerun moves it into corrupt-<time>/,
    resumes from the final checkpoint and writes the same record again; nothing else of
    the run is deleted. The first start records both betons' fingerprints."""
    from ffcv_bias.data.fingerprint import current_fingerprints
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = train_args(tiny_fashion_betons, tmp_path / "runs", "--training.epochs=1")
    code, _, err = train_in_this_process(args, monkeypatch, capsys)
    assert code == 0, err
    run_dir = run_dir_of(args)
    config = json.loads((run_dir / runs.CONFIG_FILE).read_text())
    assert config["meta"]["betons"] == current_fingerprints(resolve_config(args))
    logits = (run_dir / runs.VAL_LOGITS_FILE).read_bytes()
    summary = (run_dir / runs.SUMMARY_FILE).read_bytes()
    (run_dir / runs.SUMMARY_FILE).write_bytes(summary[: len(summary) // 2])
    assert runs.run_state(run_dir) == "corrupt" and not runs.is_complete(run_dir)

    code, out, err = train_in_this_process(args, monkeypatch, capsys)
    assert code == 0, err
    assert "corrupt summary.json moved to" in out and "already complete" not in out
    (aside,) = run_dir.glob("corrupt-*")
    assert (aside / runs.SUMMARY_FILE).read_bytes() == summary[: len(summary) // 2]
    assert (run_dir / runs.SUMMARY_FILE).read_bytes() == summary
    assert (run_dir / runs.VAL_LOGITS_FILE).read_bytes() == logits
    assert runs.is_complete(run_dir)
    code, out, _ = train_in_this_process(args, monkeypatch, capsys)
    assert code == 0 and "already complete" in out


def test_completeness_is_decided_in_one_place(tmp_path):
    run_dir = tmp_path / "resnet8_s0_abc"
    run_dir.mkdir()
    assert runs.completeness(run_dir) == "incomplete" and runs.run_state(run_dir) == "missing"
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps({"meta": {"run_id": "resnet8_s0_abc"}}))
    (run_dir / runs.SUMMARY_FILE).write_text(json.dumps({"run_id": "resnet8_s0_abc"}))
    assert runs.completeness(run_dir) == "complete"
    assert runs.completeness(run_dir, "resnet8_s0_other") == "corrupt"  # another run's
    (run_dir / runs.CONFIG_FILE).write_text('{"meta": {"run_id": "resn')  # cut short
    assert runs.run_state(run_dir) == "corrupt"
    names, folder = runs.set_aside_corrupt(run_dir, "resnet8_s0_abc")
    # the summary cannot be checked against a corrupt config: both go, the run is redone
    assert names == [runs.CONFIG_FILE, runs.SUMMARY_FILE]
    assert sorted(path.name for path in folder.iterdir()) == sorted(names)
    assert runs.run_state(run_dir) == "missing"
    (run_dir / runs.SUMMARY_FILE).write_text(json.dumps({"run_id": "resnet8_s0_abc"}))
    assert runs.completeness(run_dir) == "complete"  # no config.json: the summary decides
    (run_dir / runs.SUMMARY_FILE).write_text(json.dumps({"run_id": "resnet8_s0_abc"}))
    assert runs.set_aside_corrupt(run_dir, "resnet8_s0_abc") is None  # nothing corrupt


def test_sweep_status_reports_corrupt_and_launch_retrains_it(tiny_fashion_betons, tmp_path,
                                                             capsys):
    from ffcv_bias.sweep.cli import main as sweep_main
    ws = Workspace(tmp_path, None)
    sweep = sweep_file(ws, tiny_fashion_betons, {"augment.min_scale": [1.0, 0.5]})
    first, second = planned_runs(sweep)
    for run in (first, second):
        record_run(ws, run.config_args)
    (first.run_dir / runs.SUMMARY_FILE).write_text('{"run_id": "res')
    capsys.readouterr()
    assert sweep_main(["status", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 1 complete, 1 corrupt" in out, out
    assert first.run_id in out and "launch retrains it" in out
    assert sweep_main(["launch", str(sweep), "--dry-run", "--gpus", "none"]) == 0
    out = capsys.readouterr().out
    assert "1 to launch" in out  # the dry run prints the trainer command of the corrupt run
    assert "--augment.min_scale=1.0" in out and "--augment.min_scale=0.5" not in out


def test_a_record_without_fingerprints_stays_complete(tiny_fashion_betons, tmp_path,
                                                      monkeypatch, capsys):
    """Runs recorded before meta.betons existed are reused as before."""
    args = train_args(tiny_fashion_betons, tmp_path / "runs")
    run_dir = record_run(Workspace(tmp_path, None), args)
    config = json.loads((run_dir / runs.CONFIG_FILE).read_text())
    del config["meta"]["betons"]
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps(config))
    code, out, err = train_in_this_process(args, monkeypatch, capsys)
    assert code == 0 and "already complete" in out, err


def test_fingerprint_is_the_files_not_its_path(tiny_fashion_betons, tmp_path):
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType
    from ffcv_bias.data import fingerprint
    assert fingerprint.HEADER_TYPE == HeaderType
    assert fingerprint.ALLOC_TABLE_TYPE == ALLOC_TABLE_TYPE
    train, val = tiny_fashion_betons
    copy = tmp_path / "elsewhere.beton"
    shutil.copy(train, copy)
    shutil.copy(classes_json(train), classes_json(copy))
    assert fingerprint.fingerprint(copy) == fingerprint.fingerprint(train)
    assert fingerprint.fingerprint(val) != fingerprint.fingerprint(train)
    assert fingerprint.fingerprint(train)["num_samples"] == 600


def test_known_archs_are_the_model_registry():
    from ffcv_bias.train.models import ARCHITECTURES
    from ffcv_bias.train.config import KNOWN_ARCHS
    assert sorted(KNOWN_ARCHS) == sorted(ARCHITECTURES)


def test_sweep_plan_names_the_folder_when_every_run_is_invalid(tiny_fashion_betons, tmp_path,
                                                               capsys):
    from ffcv_bias.sweep.cli import main as sweep_main
    ws = Workspace(tmp_path, None)
    sweep = sweep_file(ws, tiny_fashion_betons, {"model.arch": ["resnet9000"]})
    assert sweep_main(["plan", str(sweep)]) == 1
    out = capsys.readouterr().out
    assert f"runs in {ws.runs}" in out and "None" not in out, out
    assert not ws.runs.exists()


def test_image_folder_says_how_many_files_are_not_images(tmp_path, capsys):
    from fixtures_datasets import make_image_folder
    from ffcv_bias.data.sources import list_image_folder
    make_image_folder(tmp_path / "train")
    (tmp_path / "train" / "moth" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "zebra" / ".DS_Store").write_bytes(b"\0")
    capsys.readouterr()
    _, paths, _ = list_image_folder(tmp_path / "train")
    err = capsys.readouterr().err
    files = [path for path in (tmp_path / "train").rglob("*") if path.is_file()]
    not_images = len(files) - len(paths)  # the fixture's own notes.txt, and the two above
    assert not_images >= 3 and err.count("skipping") == 1, err
    assert f"skipping {not_images} files that are not images" in err
    assert not any(path.endswith((".txt", ".DS_Store")) for path in paths)


def test_analysis_says_when_it_did_less_than_asked(tmp_path, capsys):
    """Not errors, but a user must not read a 2-fold cross-fit as the 5 folds asked for,
    or a one-setting report as a comparison."""
    from ffcv_bias.analysis.__main__ import main as analysis_main
    synthetic_runs(tmp_path / "runs", num_classes=6)  # settings 1.0 and 0.08, seeds 0-1
    base = [str(tmp_path / "runs"), "--vary", "augment.min_scale", "--no-figures"]
    assert analysis_main(base + ["--crossfit-folds", "5", "--out", str(tmp_path / "a")]) == 0
    assert ("note: --crossfit-folds 5: the fewest seeds per setting is 2, so the cross-fit "
            "used 2 folds") in capsys.readouterr().err
    assert analysis_main(base + ["--where", "augment.min_scale=1.0",
                                 "--out", str(tmp_path / "b")]) == 0
    assert "note: the runs hold one value of augment.min_scale (1.0): nothing is compared" \
        in capsys.readouterr().err
    assert analysis_main(base + ["--out", str(tmp_path / "c")]) == 0
    assert "note:" not in capsys.readouterr().err
