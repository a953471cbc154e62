"""Find and read run records: config.json, summary.json, and (when needed) the val logits.

Reads files only: no torch, no ffcv. A run directory is any directory holding config.json;
it is complete when summary.json is there (the trainer writes it last, atomically).
Incomplete runs are not dropped silently: they come back as `SkippedRun`s with a reason,
and the report counts them.

Per-class accuracy comes from summary.json's `per_class_acc`. When a summary lacks it, it
is recomputed from val_preds.npy (or, in records older than it, the argmax of
val_logits.npy with the trainer's tie rule) and val_labels.npy, one run at a time, the
logits through a memory map in row chunks, so memory stays bounded whatever the number
of runs.
"""
import filecmp
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ffcv_bias.record import metrics
from ffcv_bias.record import runs as run_record
from ffcv_bias.data.fingerprint import describe, recorded_fingerprints


class AnalysisError(Exception):
    """Bad input for the analysis; the message is one line that names the problem."""


@dataclass
class Run:
    run_dir: Path
    run_id: str
    config: dict
    summary: dict


@dataclass
class SkippedRun:
    run_dir: Path
    run_id: str
    state: str   # failed, running, started, unreadable, duplicate, no per-class data
    reason: str
    config: dict = None


@dataclass
class RunSet:
    """The complete runs of one analysis, with their accuracies as arrays (row = run)."""
    runs: list
    per_class_acc: np.ndarray   # float64 [runs, classes]
    top1: np.ndarray            # float64 [runs]
    top5: np.ndarray            # float64 [runs]
    class_names: list
    class_counts: np.ndarray    # int64 [classes] val images per class, or None if unknown
    n_val: int
    skipped: list = field(default_factory=list)

    @property
    def num_classes(self):
        return self.per_class_acc.shape[1]


# ----------------------------------------------------------------------------------------
# Finding run directories
# ----------------------------------------------------------------------------------------

def find_run_dirs(roots):
    """Every directory under `roots` (recursively) that holds config.json, sorted, unique.

    A run directory's own subdirectories are not searched: runs do not nest.
    """
    found = set()
    for root in roots:
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise AnalysisError(f"runs directory {root} is a file: give the folder that holds "
                                f"the run directories")
        if not root.is_dir():
            raise AnalysisError(f"runs directory not found: {root}")
        for directory, subdirs, files in os.walk(root):
            if run_record.CONFIG_FILE in files:
                found.add(Path(directory).resolve())
                subdirs[:] = []
            else:
                subdirs.sort()
    return sorted(found)


def _read_json_or_none(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _first_line(path):
    try:
        with open(path) as handle:
            return handle.readline().strip()[:200]
    except OSError:
        return ""


def _is_number_or_none(value):
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


# What json.load gives for a number or null (never a subclass): the set of a list's value
# types is one pass in C, where a call per value cost 10 s over 10,000 x 1,000 values.
_JSON_NUMBER_TYPES = frozenset({int, float, type(None)})


def is_run_summary(summary):
    """A summary the tables can use: top1 a number, per_class_acc (when there) a list of
    numbers or None (a hand-edited or foreign file would otherwise end in a traceback)."""
    if not isinstance(summary, dict) or not _is_number_or_none(summary.get("top1", "")):
        return False
    if summary.get("top1") is None:
        return False
    per_class = summary.get("per_class_acc", [])
    return isinstance(per_class, list) and set(map(type, per_class)) <= _JSON_NUMBER_TYPES


def summary_length_problem(summary):
    """'' or what is wrong with the length of per_class_acc: it must have num_classes
    entries (a list cut short would otherwise read as a run on another dataset)."""
    num_classes, per_class = summary.get("num_classes"), summary.get("per_class_acc")
    if (isinstance(num_classes, int) and isinstance(per_class, list)
            and len(per_class) != num_classes):
        return f"per_class_acc has {len(per_class)} entries but num_classes is {num_classes}"
    return ""


def _skip_reason(run_dir):
    state = run_record.run_state(run_dir)
    if state == "failed":
        return state, "failed: " + _first_line(run_dir / run_record.ERROR_FILE)
    if state == "corrupt":
        return state, ("summary.json cut short or naming another run (a relaunch moves it "
                       "aside and retrains)")
    if run_record.is_locked(run_dir):
        return "running", "training now (its lock is held)"
    return state, "no summary.json (killed or not finished; a relaunch resumes it)"


def read_records(roots):
    """(complete Runs, SkippedRuns) under `roots`; of several records of one run_id only
    the first (by sorted run directory) is kept, the others are skipped as duplicates."""
    run_dirs = find_run_dirs(roots)
    if not run_dirs:
        raise AnalysisError("no run records (directories with config.json) under "
                            + ", ".join(str(r) for r in roots))
    complete, skipped, seen = [], [], {}
    for run_dir in tqdm(run_dirs, desc="reading run records", unit="run", disable=None):
        config = _read_json_or_none(run_dir / run_record.CONFIG_FILE)
        if not isinstance(config, dict):
            skipped.append(SkippedRun(run_dir, run_dir.name, "unreadable",
                                      "config.json is not a JSON object"))
            continue
        if not run_record.is_complete(run_dir):
            state, reason = _skip_reason(run_dir)
            skipped.append(SkippedRun(run_dir, run_dir.name, state, reason, config))
            continue
        summary = _read_json_or_none(run_dir / run_record.SUMMARY_FILE)
        if not is_run_summary(summary):
            skipped.append(SkippedRun(run_dir, run_dir.name, "unreadable",
                                      "summary.json is not a run summary", config))
            continue
        problem = summary_length_problem(summary)
        if problem:
            skipped.append(SkippedRun(run_dir, run_dir.name, "corrupt",
                                      f"summary.json is corrupt: {problem}", config))
            continue
        identifier = str(summary.get("run_id", run_dir.name))
        first = seen.get(identifier)
        if (first is not None and _same_val_shape(first.summary, summary)
                and not _class_lists_conflict(first.config, config)):
            skipped.append(duplicate_record(first, run_dir, identifier, summary, config))
            continue
        run = Run(run_dir, identifier, config, summary)
        seen[identifier] = run
        complete.append(run)
    return complete, skipped


# A run's identity is its run_id: the same config and seed trained twice (a rerun, or two
# sweep folders sharing a setting) is one replicate, not two. Augmentation is seeded per
# (seed, epoch, sample) and the loader order by the seed, so on one machine and software
# stack a rerun reproduces the logits bit for bit; a difference means a determinism
# failure (or another machine / stack) and is reported loudly, not averaged away.
DETERMINISM_FAILURE = "DETERMINISM FAILURE"
# Files whose bytes two records of one run_id must share (when both have them).
RESULT_FILES = (run_record.VAL_LOGITS_FILE, run_record.VAL_PREDS_FILE)


def _same_val_shape(summary_a, summary_b):
    """Same number of classes and val images: otherwise one run_id (datasets enter it by
    file name) names runs on two different val sets, which check_one_dataset refuses."""
    def shape(summary):
        return len(summary.get("per_class_acc", ())), summary.get("n_val")
    return shape(summary_a) == shape(summary_b)


def _val_class_names(config):
    """The class list of the val beton a config names (its sidecar), or None when the
    sidecar cannot be read (a moved data folder: the path in config.json is stale)."""
    path = dotted_get(config, "data.val_dataset", None) if isinstance(config, dict) else None
    sidecar = _read_json_or_none(str(path) + ".classes.json") if path else None
    return sidecar.get("classes") if isinstance(sidecar, dict) else None


def _class_lists_conflict(config_a, config_b):
    """True only when both records' class lists are known and differ: then one run_id
    names runs on two datasets, and check_one_dataset refuses them. A list that cannot be
    read (a moved data folder keeps the run_id, README) is no conflict: identity is the
    run_id, so such a record is a duplicate of the first, not a second replicate."""
    names_a, names_b = _val_class_names(config_a), _val_class_names(config_b)
    return names_a is not None and names_b is not None and names_a != names_b


def _results_differ(first, run_dir, summary):
    """Names of what differs between two records of one run_id (empty when they agree)."""
    differing = [key for key in ("per_class_acc", "top1")
                 if key in summary and key in first.summary
                 and summary[key] != first.summary[key]]
    for name in RESULT_FILES:
        path_a, path_b = first.run_dir / name, run_dir / name
        if path_a.is_file() and path_b.is_file() and not filecmp.cmp(path_a, path_b,
                                                                     shallow=False):
            differing.append(name)
    return differing


def duplicate_record(first, run_dir, identifier, summary, config):
    """The SkippedRun for a second record of `first`'s run_id; warns on stderr when its
    results differ from the kept one's (the first by sorted run directory)."""
    differing = _results_differ(first, run_dir, summary)
    reason = f"same run_id as {first.run_dir} (kept: first by sorted path)"
    if differing:
        reason = (f"{DETERMINISM_FAILURE}: {', '.join(differing)} differ(s) from {first.run_dir}"
                  f" with the same run_id (kept that one: first by sorted path)")
        print(f"warning: {run_dir}: {reason}", file=sys.stderr)
    return SkippedRun(run_dir, identifier, "duplicate", reason, config)


# ----------------------------------------------------------------------------------------
# Per-class accuracy from the logits (streamed)
# ----------------------------------------------------------------------------------------

def accuracy_from_logits(run_dir, need_top5=False, max_chunk_elements=2 ** 23,
                         num_classes=None):
    """(per-class accuracy [C], top1, top5 or None, labels) from one run's predictions.

    The predictions are val_preds.npy, or for a record written before it existed the
    argmax of val_logits.npy with the trainer's tie rule (metrics.predictions_from_logits).
    The logits (float16 [N, C], ~100 MB at ImageNet-val size) are memory-mapped and read
    in row chunks of at most `max_chunk_elements` values, so only one chunk is in memory;
    they are read for the top-5 only on request (several times slower than the argmax),
    and top5 is None without val_logits.npy. `num_classes` defaults to the logits' width,
    else summary.json's num_classes, else the largest class index seen + 1.
    """
    labels = metrics.read_labels_file(run_dir / run_record.VAL_LABELS_FILE)
    logits = None
    if (run_dir / run_record.VAL_PREDS_FILE).is_file():
        predictions = metrics.load_record_array(run_dir / run_record.VAL_PREDS_FILE, 1,
                                                integer=True)
        source = run_record.VAL_PREDS_FILE
    else:
        logits = metrics.load_record_array(run_dir / run_record.VAL_LOGITS_FILE, 2,
                                           integer=False, mmap_mode="r")
        predictions = metrics.predictions_from_logits(logits, max_chunk_elements)
        source = run_record.VAL_LOGITS_FILE
    if len(labels) != len(predictions):
        raise AnalysisError(f"{run_dir}: {source} has {len(predictions)} rows but "
                            f"val_labels.npy has {len(labels)}")
    if num_classes is None:
        num_classes = _record_num_classes(run_dir, logits, labels, predictions)
    per_class = metrics.per_class_accuracy(predictions, labels, num_classes)
    top5 = None
    if need_top5 and logits is None and (run_dir / run_record.VAL_LOGITS_FILE).is_file():
        logits = metrics.load_record_array(run_dir / run_record.VAL_LOGITS_FILE, 2,
                                           integer=False, mmap_mode="r")
    if need_top5 and logits is not None:
        ranks = metrics.label_ranks(logits, labels, max_chunk_elements)
        top5 = float(np.mean(ranks < min(5, logits.shape[1])))
    del logits  # closes the memory map
    return per_class, metrics.top1_accuracy(predictions, labels), top5, labels


def _record_num_classes(run_dir, logits, labels, predictions):
    if logits is not None:
        return logits.shape[1]
    summary = _read_json_or_none(run_dir / run_record.SUMMARY_FILE) or {}
    if isinstance(summary.get("num_classes"), int):
        return summary["num_classes"]
    return int(max(labels.max(initial=-1), predictions.max(initial=-1))) + 1


def _fill_from_logits(runs, skipped):
    """Give every run without per_class_acc in its summary the one from its logits."""
    kept = []
    needing = [r for r in runs if "per_class_acc" not in r.summary]
    if needing:
        print(f"{len(needing)} run(s) lack per_class_acc in summary.json: "
              f"recomputing from val_preds.npy or val_logits.npy (one run at a time)")
    for run in tqdm(runs, desc="per-class accuracy from logits", unit="run",
                    disable=None if needing else True):
        if "per_class_acc" in run.summary:
            kept.append(run)
            continue
        if not any((run.run_dir / name).is_file()
                   for name in (run_record.VAL_PREDS_FILE, run_record.VAL_LOGITS_FILE)):
            skipped.append(SkippedRun(run.run_dir, run.run_id, "no per-class data",
                                      "summary.json has no per_class_acc and there is "
                                      "neither val_preds.npy nor val_logits.npy", run.config))
            continue
        per_class, top1, top5, _ = accuracy_from_logits(
            run.run_dir, need_top5="top5" not in run.summary)
        run.summary = dict(run.summary, per_class_acc=per_class.tolist())
        run.summary.setdefault("top1", top1)
        if top5 is not None:
            run.summary["top5"] = top5
        kept.append(run)
    return kept


# ----------------------------------------------------------------------------------------
# Dataset identity: class names, class counts, one dataset only
# ----------------------------------------------------------------------------------------

def _val_dataset_paths(run):
    paths = [run.config.get("data", {}).get("val_dataset"), run.summary.get("val_dataset")]
    return [p for p in paths if p]


def _read_class_list(runs):
    """{val_dataset path: class list} for each distinct path whose classes.json exists."""
    class_lists = {}
    for run in runs:
        for path in _val_dataset_paths(run):
            if path in class_lists:
                continue
            sidecar = _read_json_or_none(str(path) + ".classes.json")
            class_lists[path] = sidecar.get("classes") if isinstance(sidecar, dict) else None
    return {path: names for path, names in class_lists.items() if names}


def check_one_dataset(runs):
    """Raise AnalysisError unless every run was evaluated on the same val set."""
    shapes = {}
    for run in runs:
        shape = (len(run.summary["per_class_acc"]), run.summary.get("n_val"))
        shapes.setdefault(shape, run.run_dir)
    if len(shapes) > 1:
        (shape_a, dir_a), (shape_b, dir_b) = list(shapes.items())[:2]
        raise AnalysisError(
            f"mixed datasets: {dir_a} has {shape_a[0]} classes / n_val {shape_a[1]} but "
            f"{dir_b} has {shape_b[0]} classes / n_val {shape_b[1]}; analyse them separately")
    num_classes = next(iter(shapes))[0]
    distinct = {}
    for path, names in _read_class_list(runs).items():
        distinct.setdefault(tuple(names), path)
    if len(distinct) > 1:
        (_, path_a), (_, path_b) = list(distinct.items())[:2]
        raise AnalysisError(f"mixed datasets: class lists of {path_a} and {path_b} differ")
    if distinct:
        names, path = next(iter(distinct.items()))
        if len(names) != num_classes:
            raise AnalysisError(f"{path}.classes.json lists {len(names)} classes but the runs "
                                f"report {num_classes}")
        return list(names)
    return [f"class_{i}" for i in range(num_classes)]


def check_same_betons(runs):
    """Raise AnalysisError if two runs name a beton by the same file name but recorded
    different fingerprints (config.json meta.betons): the file was rewritten between
    them, so they were trained or evaluated on different data. Runs recorded before
    fingerprints existed are not checked."""
    first_seen = {}   # (dataset key, file name) -> (fingerprint, run)
    for run in runs:
        for key, recorded in sorted(recorded_fingerprints(run.config).items()):
            name = Path(str(dotted_get(run.config, f"data.{key}", ""))).name
            fingerprint, first = first_seen.setdefault((key, name), (recorded, run))
            if fingerprint != recorded:
                raise AnalysisError(
                    f"mixed betons: data.{key} {name} of {first.run_dir} ({describe(fingerprint)}) "
                    f"is not the one of {run.run_dir} ({describe(recorded)}): the file was "
                    f"rewritten between the runs; analyse them separately")


def _class_counts(runs, num_classes, n_val):
    """Val images per class from the first run that kept val_labels.npy; None if none did."""
    for run in runs:
        labels_path = run.run_dir / run_record.VAL_LABELS_FILE
        if labels_path.is_file():
            counts = np.bincount(metrics.read_labels_file(labels_path), minlength=num_classes)
            if len(counts) == num_classes and (n_val is None or counts.sum() == n_val):
                return counts
    return None


# ----------------------------------------------------------------------------------------
# Everything together
# ----------------------------------------------------------------------------------------

def load_runs(roots):
    """Read every run record under `roots` into a RunSet (raises AnalysisError on bad input)."""
    runs, skipped = read_records(roots)
    runs = _fill_from_logits(runs, skipped)
    if not runs:
        raise AnalysisError(f"no complete run (summary.json) under {', '.join(map(str, roots))}"
                            f" ({len(skipped)} incomplete)")
    class_names = check_one_dataset(runs)
    check_same_betons(runs)
    per_class_acc = np.array([r.summary["per_class_acc"] for r in runs], dtype=np.float64)
    top1 = np.array([r.summary["top1"] for r in runs], dtype=np.float64)
    top5 = np.array([r.summary.get("top5", np.nan) for r in runs], dtype=np.float64)
    n_val = runs[0].summary.get("n_val")
    counts = _class_counts(runs, len(class_names), n_val)
    return RunSet(runs, per_class_acc, top1, top5, class_names, counts, n_val, skipped)


_MISSING = object()


def dotted_get(config, dotted_key, default=_MISSING):
    """config['a']['b'] for 'a.b'; `default` (or KeyError) when absent."""
    node = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(dotted_key)
            return default
        node = node[part]
    return node


# Runs that differ only in this key are replicates of one setting.
REPLICATE_KEY = "training.seed"
# Keys that follow from a varied key and so may differ with it: each data-diet sparsity
# level trains on its own keep_indices file (the pruning method stays checked: data.score).
DEPENDENT_KEYS = {"data.sparsity": ("data.keep_indices",)}


def _flat_result_config(config):
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
            else:
                flat[prefix + key] = json.dumps(value, sort_keys=True)
    walk(run_record.result_config(config), "")
    return flat


def check_poolable(runs, vary_keys, ignore_keys=()):
    """Raise AnalysisError if runs differ in a result-changing key other than the varied
    keys and training.seed: pooling them as replicates would mix two experiments.

    result_config already leaves out what cannot change a result (logging.*, dist.*, meta,
    data.num_workers, data.in_memory) and compares dataset paths by file name.
    """
    exempt = set(vary_keys) | {REPLICATE_KEY} | set(ignore_keys)
    for key in vary_keys:
        exempt.update(DEPENDENT_KEYS.get(key, ()))
    values_by_key = {}   # key -> {value: first run dir with it}
    flats = [_flat_result_config(run.config) for run in runs]
    all_keys = set().union(*flats)
    for key in sorted(all_keys - exempt):
        if any(key.startswith(prefix + ".") for prefix in exempt):
            continue
        for run, flat in zip(runs, flats):
            values_by_key.setdefault(key, {}).setdefault(flat.get(key, "<absent>"), run.run_dir)
        if len(values_by_key[key]) > 1:
            (value_a, dir_a), (value_b, dir_b) = list(values_by_key[key].items())[:2]
            raise AnalysisError(
                f"runs differ in {key} besides the varied key(s) and {REPLICATE_KEY} "
                f"({value_a} in {dir_a.name}, {value_b} in {dir_b.name}): pass "
                f"--vary {key} to analyse each value separately, --ignore-key {key} if it "
                f"does not change results, or analyse the folders separately")
