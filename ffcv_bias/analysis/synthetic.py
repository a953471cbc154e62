"""Synthetic run records with known, planted per-class effects.

They follow the run-record contract of docs/DESIGN.md exactly (nested config.json, summary.json,
optionally val_logits.npy / val_labels.npy, a `<val_dataset>.classes.json` sidecar), so the
analysis, its tests, the benchmark and the demo can check that the statistics find what was
planted and nothing else.

The model of a run: class c at setting s has true accuracy
    base_acc[c] + effects[c][s]        (effects default to 0: a null class)
Each seed adds Gaussian seed-to-seed noise (`noise_std`, one draw per run and class) and,
optionally, a component shared by every setting's run of that seed (`seed_shared_std`, one
draw per seed and class: the seeded initialization, data order and crops that make the
real design paired), and the val set then contributes binomial noise: the run gets k ~ Binomial(n_c, p) of its n_c
val images of class c right, so per_class_acc = k / n_c exactly as a trainer would report.
Null classes therefore satisfy the Welch test's H0 with equality, which is what the
false-positive test needs.

Writing is direct (no fsync): these are throw-away test records, and 1,000 of them must be
written in seconds.
"""
import json
import os
from pathlib import Path

import numpy as np

from ffcv_bias.record import runs as run_record
from ffcv_bias.record.metrics import prediction_dtype


def linear_effects(settings, reference, losing_classes=(), gaining_classes=(),
                   max_loss=0.1, max_gain=0.02):
    """Effects that grow linearly with a setting's distance from the reference.

    The farthest setting from `reference` gets the full `-max_loss` on each losing class
    and `+max_gain` on each gaining class (the paper's picture: strong regularization
    raises the mean and costs a few classes). Returns {class: {setting: delta}}.
    """
    distances = {s: abs(float(s) - float(reference)) for s in settings}
    farthest = max(distances.values()) or 1.0
    effects = {}
    for classes, size in ((losing_classes, -max_loss), (gaining_classes, max_gain)):
        for class_index in classes:
            effects[int(class_index)] = {s: size * distances[s] / farthest for s in settings}
    return effects


def _set_dotted(config, dotted_key, value):
    *sections, leaf = dotted_key.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value


def _base_config(val_dataset, seed):
    return {
        "model": {"arch": "resnet18", "dropout": 0.0},
        "data": {"train_dataset": "synthetic_train.beton", "val_dataset": str(val_dataset),
                 "num_workers": 2, "in_memory": 1},
        "augment": {"min_scale": 0.08, "max_scale": 1.0, "flip": 1},
        "training": {"seed": int(seed), "epochs": 16, "batch_size": 512,
                     "weight_decay": 5e-5, "label_smoothing": 0.1},
        "logging": {"folder": "runs"},
        "dist": {"world_size": 1},
        "meta": {"git": "synthetic", "host": "synthetic"},
    }


def _true_accuracy(base_acc, effects, setting, num_classes):
    accuracy = np.broadcast_to(np.asarray(base_acc, dtype=np.float64), (num_classes,)).copy()
    for class_index, per_setting in (effects or {}).items():
        accuracy[int(class_index)] += per_setting.get(setting, 0.0)
    return accuracy


def _write_logits(run_dir, labels, num_classes, correct, top5_extra, rng):
    """float16 logits whose argmax is right exactly where `correct` says.

    Background noise is in [0, 1); the predicted class gets 2.0. A wrong prediction goes
    to the next class; when `top5_extra` marks the sample, the true class gets 1.5 so it
    is second (inside the top 5), otherwise -1.0 so it is last (outside the top 5).
    """
    n_val = len(labels)
    logits = np.empty((n_val, num_classes), dtype=np.float16)
    rows_per_chunk = max(1, 2 ** 22 // max(num_classes, 1))
    for start in range(0, n_val, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_val)
        logits[start:stop] = rng.random((stop - start, num_classes), dtype=np.float32)
    rows = np.arange(n_val)
    predicted = np.where(correct, labels, (labels + 1) % num_classes)
    logits[rows, predicted] = 2.0
    wrong = ~correct
    logits[rows[wrong], labels[wrong]] = np.where(top5_extra[wrong], 1.5, -1.0)
    np.save(run_dir / run_record.VAL_LOGITS_FILE, logits)
    np.save(run_dir / run_record.VAL_LABELS_FILE, labels.astype(np.int64))


def _pick_per_class(class_starts, counts, eligible, rng):
    """Mark `counts[c]` random samples of class c among those where `eligible` is True.

    The val set is sorted by class (labels = repeat(arange(C), n_c)), so class c is the
    slice class_starts[c]:class_starts[c + 1].
    """
    marked = np.zeros(class_starts[-1], dtype=bool)
    for class_index, count in enumerate(counts):
        start, stop = class_starts[class_index], class_starts[class_index + 1]
        members = start + np.flatnonzero(eligible[start:stop])
        marked[rng.choice(members, int(count), replace=False)] = True
    return marked


def _write_val_sidecar(out_dir, num_classes, n_per_class, class_names=None):
    """The val set every run of one call shares: `out_dir` made, the labels (class c
    n_per_class[c] times, in class order) and the `.classes.json` of a val beton that is
    never written (the records only name it). Classes are `syn_000`, ... unless
    `class_names` are given. Returns (val_dataset, class_counts, labels)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    class_counts = np.broadcast_to(np.asarray(n_per_class, dtype=np.int64), (num_classes,))
    labels = np.repeat(np.arange(num_classes), class_counts)
    val_dataset = out_dir / "synthetic_val.beton"
    names = list(class_names) if class_names else [f"syn_{i:03d}" for i in range(num_classes)]
    Path(str(val_dataset) + ".classes.json").write_text(json.dumps(
        {"dataset": "synthetic", "split": "val", "num_samples": int(len(labels)),
         "num_classes": num_classes, "classes": names}))
    return val_dataset, class_counts, labels


def make_synthetic_runs(out_dir, settings, seeds, num_classes=10, n_per_class=50,
                        effects=None, base_acc=0.75, noise_std=0.02,
                        with_logits=False, per_class_in_summary=True,
                        vary_key="augment.min_scale", extra_config=None,
                        class_names=None, top5_rate=0.8, seed=0, seed_shared_std=0.0):
    """Write one complete run record per (setting, seed) under `out_dir`.

    settings: values of `vary_key` (a dotted config key).
    seeds: values of training.seed (the replicates).
    n_per_class: val images per class, an int or one int per class (unbalanced val set).
    effects: {class: {setting: accuracy delta}} (see `linear_effects`); others are null.
    base_acc: true accuracy at no effect, a float or one per class.
    noise_std: seed-to-seed standard deviation of a class's accuracy.
    with_logits: also write val_logits.npy (float16) and val_labels.npy.
    per_class_in_summary: False leaves per_class_acc out of summary.json, so analysis
        must recompute it from the logits (needs with_logits).
    extra_config: {dotted key: value} set in every config (e.g. a second varied key).
    top5_rate: fraction of wrong predictions that still have the true class in the top 5.
    seed_shared_std: sd of the per-(seed, class) offset shared by all settings' runs of one
        seed (0: independent runs, as before; drawn from its own stream, so records with
        0 are the same as without it).

    Returns {"run_dirs": [Path], "true_acc": {setting: per-class true accuracy},
             "val_dataset": Path, "class_counts": np.ndarray}.
    """
    if not per_class_in_summary and not with_logits:
        raise ValueError("per_class_in_summary=False needs with_logits=True")
    out_dir = Path(out_dir)
    val_dataset, class_counts, labels = _write_val_sidecar(out_dir, num_classes, n_per_class,
                                                           class_names)
    rng = np.random.default_rng(seed)

    seeds = list(seeds)
    shared = shared_seed_offsets(len(seeds), num_classes, seed_shared_std, seed)
    true_acc, run_dirs = {}, []
    for setting in settings:
        true_acc[setting] = _true_accuracy(base_acc, effects, setting, num_classes)
        for position, replicate_seed in enumerate(seeds):
            run_dirs.append(_write_one_run(
                out_dir, setting, replicate_seed, true_acc[setting] + shared[position],
                class_counts, labels, val_dataset, noise_std, with_logits,
                per_class_in_summary, vary_key, extra_config, top5_rate, rng))
    return {"run_dirs": run_dirs, "true_acc": true_acc, "val_dataset": val_dataset,
            "class_counts": np.array(class_counts)}


def shared_seed_offsets(num_seeds, num_classes, seed_shared_std, seed):
    """[seeds, classes] offsets common to all settings' runs of one seed (zeros when
    seed_shared_std is 0), from a stream of their own so the per-run draws do not move."""
    if not seed_shared_std:
        return np.zeros((num_seeds, num_classes))
    return np.random.default_rng([seed, 1]).normal(0.0, seed_shared_std,
                                                   (num_seeds, num_classes))


def simulate_accuracy(true_acc, num_seeds, n_per_class, noise_std, seed_shared_std=0.0,
                      rng=None):
    """Per-class accuracy [S, J, C] of the record model above, without writing files.

    true_acc [S, C]: true accuracy per setting and class. Every setting gets seeds
    0..num_seeds-1 (column j is seed j at every setting); noise as in make_synthetic_runs.
    For simulations over many classes (tests of the statistics' error rates).
    """
    rng = np.random.default_rng(rng)
    true_acc = np.asarray(true_acc, dtype=np.float64)
    num_settings, num_classes = true_acc.shape
    counts = np.broadcast_to(np.asarray(n_per_class, dtype=np.int64), (num_classes,))
    shared = rng.normal(0.0, seed_shared_std, (1, num_seeds, num_classes)) \
        if seed_shared_std else 0.0
    own = rng.normal(0.0, noise_std, (num_settings, num_seeds, num_classes))
    probability = np.clip(true_acc[:, None, :] + shared + own, 0.0, 1.0)
    return rng.binomial(counts, probability) / counts


def _write_one_run(out_dir, setting, replicate_seed, true_acc, class_counts, labels,
                   val_dataset, noise_std, with_logits, per_class_in_summary, vary_key,
                   extra_config, top5_rate, rng):
    config = _base_config(val_dataset, replicate_seed)
    _set_dotted(config, vary_key, setting)
    for key, value in (extra_config or {}).items():
        _set_dotted(config, key, value)
    identifier = run_record.run_id(config)
    run_dir = out_dir / identifier
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / run_record.CONFIG_FILE).write_text(json.dumps(config))

    probability = np.clip(true_acc + rng.normal(0.0, noise_std, len(true_acc)), 0.0, 1.0)
    correct_counts = rng.binomial(class_counts, probability)
    n_val = int(class_counts.sum())
    # Of the wrong predictions, top5_rate of them keep the true class in the top 5.
    top5_counts = rng.binomial(class_counts - correct_counts, top5_rate)
    if len(class_counts) <= 5:  # the top 5 then holds every class
        top5_counts = class_counts - correct_counts
    summary = {"run_id": identifier,
               "top1": float(correct_counts.sum() / n_val),
               "top5": float((correct_counts.sum() + top5_counts.sum()) / n_val),
               "n_val": n_val, "epochs": 16, "train_seconds": 1.0,
               "num_classes": len(class_counts), "val_dataset": str(val_dataset)}
    if per_class_in_summary:
        summary["per_class_acc"] = (correct_counts / class_counts).tolist()
    if with_logits:
        class_starts = np.concatenate([[0], np.cumsum(class_counts)])
        correct = _pick_per_class(class_starts, correct_counts, np.ones(n_val, bool), rng)
        top5_extra = _pick_per_class(class_starts, top5_counts, ~correct, rng)
        _write_logits(run_dir, labels, len(class_counts), correct, top5_extra, rng)
    (run_dir / run_record.SUMMARY_FILE).write_text(json.dumps(summary))
    return run_dir


def setting_data(accuracy, settings, reference, class_counts=None, key="augment.min_scale"):
    """A tables.SettingData of simulated accuracy [S, J, C] (seed j = column j at every
    setting), so the statistics can be run on many classes without any record on disk."""
    from ffcv_bias.analysis.tables import SettingData
    accuracy = np.asarray(accuracy, dtype=np.float64)
    num_settings, num_seeds, num_classes = accuracy.shape
    counts = None if class_counts is None else np.broadcast_to(
        np.asarray(class_counts, dtype=np.int64), (num_classes,)).copy()
    weights = (np.full(num_classes, 1.0 / num_classes) if counts is None
               else counts / counts.sum())
    top1 = accuracy @ weights
    return SettingData(
        key=key, settings=list(settings), reference=reference,
        run_ids=[[f"sim_{s}_{j}" for j in range(num_seeds)] for s in range(num_settings)],
        seeds=[list(range(num_seeds)) for _ in range(num_settings)],
        acc=list(accuracy), top1=list(top1), top5=list(np.full_like(top1, np.nan)),
        class_names=[f"syn_{i:03d}" for i in range(num_classes)], class_counts=counts,
        run_dirs=[[""] * num_seeds for _ in range(num_settings)])


# ----------------------------------------------------------------------------------------
# Records with predictions (val_preds.npy), fast enough for 10,000 runs
# ----------------------------------------------------------------------------------------

def make_prediction_runs(out_dir, settings, seeds, num_classes=10, n_per_class=50,
                         effects=None, base_acc=0.75, noise_std=0.02, absorbed_by=None,
                         confusable=3, vary_key="augment.min_scale", class_names=None,
                         seed=0):
    """Write one run record per (setting, seed) with val_preds.npy and val_labels.npy (no
    logits), summary.json's top1 / per_class_acc computed from the predictions.

    Each val image is right with its class's accuracy (true accuracy + the run's Gaussian
    seed noise, as in make_synthetic_runs); a wrong prediction goes to one of the
    `confusable` next classes (c+1 .. c+confusable mod C), a sparse confusion like a real
    model's. absorbed_by={A: B}: the images class A loses relative to its reference
    accuracy (base_acc) are predicted as B: a planted "A -> B" shift.
    One labels array is written once and hard-linked into every run (a copy where links
    fail). Returns {"run_dirs": [Path], "val_dataset": Path, "labels": np.ndarray}.
    """
    out_dir = Path(out_dir)
    val_dataset, _, labels = _write_val_sidecar(out_dir, num_classes, n_per_class, class_names)
    rng = np.random.default_rng(seed)
    shared_labels = out_dir / run_record.VAL_LABELS_FILE
    np.save(shared_labels, labels)
    reference_acc = np.broadcast_to(np.asarray(base_acc, dtype=np.float64), (num_classes,))
    run_dirs = []
    for setting in settings:
        true_acc = _true_accuracy(base_acc, effects, setting, num_classes)
        for replicate_seed in seeds:
            probability = np.clip(true_acc + rng.normal(0.0, noise_std, num_classes), 0, 1)
            predictions = _sample_predictions(labels, probability, reference_acc,
                                              absorbed_by or {}, confusable, rng)
            run_dirs.append(_write_prediction_run(out_dir, setting, replicate_seed, labels,
                                                  predictions, shared_labels, val_dataset,
                                                  vary_key, num_classes))
    return {"run_dirs": run_dirs, "val_dataset": val_dataset, "labels": labels}


def _sample_predictions(labels, probability, reference_acc, absorbed_by, confusable, rng):
    """One run's predictions: image i is right when u_i < p[label]; a lost image of an
    absorbed class (p <= u_i < its reference accuracy) goes to its absorber."""
    num_classes = len(probability)
    draw = rng.random(len(labels), dtype=np.float32)
    predictions = labels.copy()
    wrong = draw >= probability[labels]
    offsets = rng.integers(1, min(confusable, num_classes - 1) + 1, int(wrong.sum()))
    predictions[wrong] = (labels[wrong] + offsets) % num_classes
    for lost_class, absorber in absorbed_by.items():
        lost = wrong & (labels == lost_class) & (draw < reference_acc[lost_class])
        predictions[lost] = absorber
    return predictions.astype(prediction_dtype(num_classes))


def _write_prediction_run(out_dir, setting, replicate_seed, labels, predictions,
                          shared_labels, val_dataset, vary_key, num_classes):
    config = _base_config(val_dataset, replicate_seed)
    _set_dotted(config, vary_key, setting)
    identifier = run_record.run_id(config)
    run_dir = out_dir / identifier
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / run_record.CONFIG_FILE).write_text(json.dumps(config))
    np.save(run_dir / run_record.VAL_PREDS_FILE, predictions)
    labels_path = run_dir / run_record.VAL_LABELS_FILE
    labels_path.unlink(missing_ok=True)
    try:
        os.link(shared_labels, labels_path)
    except OSError:
        np.save(labels_path, labels)
    correct = predictions == labels
    hits = np.bincount(labels, weights=correct, minlength=num_classes)
    per_class = hits / np.bincount(labels, minlength=num_classes)
    summary = {"run_id": identifier, "top1": float(correct.mean()),
               "per_class_acc": per_class.tolist(),
               "n_val": int(len(labels)), "epochs": 16, "train_seconds": 1.0,
               "num_classes": num_classes, "val_dataset": str(val_dataset)}
    (run_dir / run_record.SUMMARY_FILE).write_text(json.dumps(summary))
    return run_dir


def add_synthetic_protocol(result, name, accuracy_change, vary_key="augment.min_scale",
                           noise_std=0.02, seed=1):
    """Give every run of `make_synthetic_runs`'s `result` a summary.json `protocols`
    entry `name` (as python -m ffcv_bias.evaluate writes), with true accuracy
    true_acc[setting] + accuracy_change[setting] (a scalar or one value per class;
    settings absent from accuracy_change: no change), the same seed and binomial noise
    model as the main protocol. Summaries only (no logits files)."""
    rng = np.random.default_rng(seed)
    class_counts = result["class_counts"]
    for run_dir in result["run_dirs"]:
        config = json.loads((run_dir / run_record.CONFIG_FILE).read_text())
        setting = config
        for part in vary_key.split("."):
            setting = setting[part]
        change = np.broadcast_to(np.asarray(accuracy_change.get(setting, 0.0), dtype=float),
                                 class_counts.shape)
        probability = np.clip(result["true_acc"][setting] + change
                              + rng.normal(0.0, noise_std, len(class_counts)), 0.0, 1.0)
        correct = rng.binomial(class_counts, probability)
        summary_path = run_dir / run_record.SUMMARY_FILE
        summary = json.loads(summary_path.read_text())
        n_val = int(class_counts.sum())
        in_top5 = correct.sum() + rng.binomial(class_counts - correct, 0.8).sum()
        summary.setdefault("protocols", {})[name] = {
            "top1": float(correct.sum() / n_val), "top5": float(in_top5 / n_val),
            "n_val": n_val,
            "per_class_acc": (correct / class_counts).tolist()}
        summary_path.write_text(json.dumps(summary))
