"""Where a losing class's accuracy goes: confusion matrices and confusion flows.

From each run's predictions (val_preds.npy, or the argmax of val_logits.npy in records
older than it; metrics.read_predictions), read one run at a time:

confusion.csv, one row per (setting, true class, predicted class): `rate` = the share of
    the true class's val images predicted as that class, averaged over the setting's seeds
    (row-normalised: a true class's rates sum to 1, its diagonal is its mean accuracy).
    Every pair when there are at most DENSE_MAX_CLASSES classes; above that the diagonal
    and the TOP_K_SPARSE largest off-diagonal rates of each true class (sparse).
confusion_flows.csv, for each setting and each class it hurts: the classes that absorbed
    its lost predictions. With r_ref and r_s the reference's and the setting's rates,
        lost  = r_ref[c, c] - r_s[c, c]          (points of accuracy the class lost)
        gain  = r_s[c, j] - r_ref[c, j]          (for j != c; the gains sum to `lost`)
        share = gain / lost                       (of the loss that went to class j)
    The gains of all j sum to `lost`, so the positive ones sum to at least `lost`: where
    some confusions fell, the rising ones' shares add up to more than 100% (Dress -2.5
    pts going to Shirt 200% means its Shirt confusion rose 5 points, others fell 2.5).
    The hurt classes are those whose one-sided Welch p_less < ALPHA at the setting (the
    welch table), or, when none is, the WORST_WHEN_NONE largest drops (flagged). Each
    gets its ABSORBERS largest positive gains.

Seeds enter as a mean: the seeds of one setting are pooled into one count matrix, which
divided by (n seeds x the class's val images) is exactly the mean of the per-seed
row-normalised matrices (every run is evaluated on the same val set).
Memory: two C x C count matrices (the reference's and the current setting's), int64:
16 MB at 1,000 classes; one run's predictions at a time.
"""
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ffcv_bias.record import metrics
from ffcv_bias.record import runs as run_record
from ffcv_bias.analysis.records import AnalysisError
from ffcv_bias.analysis.tables import format_setting, rows_where

DENSE_MAX_CLASSES = 100
TOP_K_SPARSE = 5
ALPHA = 0.05
WORST_WHEN_NONE = 3
ABSORBERS = 5
# Predictions of this many images are counted in one np.bincount call.
BATCH_IMAGES = 2 ** 22

CONFUSION_COLUMNS = ["setting", "true_class", "true_name", "predicted_class",
                     "predicted_name", "rate", "n"]
FLOW_COLUMNS = ["setting", "class", "class_name", "selected_by", "p_less", "lost",
                "absorbing_class", "absorbing_name", "share", "rate_ref", "rate",
                "n_ref", "n"]


class LabelReader:
    """val_labels.npy of each run, read once per distinct file (runs of a sweep often
    hard-link one file) and checked against the first: one val set for all runs."""

    def __init__(self):
        self.by_file, self.first, self.first_dir = {}, None, None

    def __call__(self, run_dir):
        path = run_dir / run_record.VAL_LABELS_FILE
        stat = os.stat(path)
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        labels = self.by_file.get(identity)
        if labels is None:
            labels = np.load(path).astype(np.int64)
            if self.first is None:
                self.first, self.first_dir = labels, run_dir
            elif not np.array_equal(labels, self.first):
                raise AnalysisError(f"val_labels.npy of {run_dir} differs from that of "
                                    f"{self.first_dir}: the runs were not evaluated on one "
                                    "val set")
            self.by_file[identity] = labels
        return labels


def has_predictions(run_dir):
    return ((run_dir / run_record.VAL_LABELS_FILE).is_file()
            and any((run_dir / name).is_file()
                    for name in (run_record.VAL_PREDS_FILE, run_record.VAL_LOGITS_FILE)))


def confusion_counts(run_dirs, num_classes, read_labels):
    """(counts [C, C] int64 (row = true class), runs counted) over `run_dirs`."""
    counts = np.zeros(num_classes * num_classes, dtype=np.int64)
    # label * C per distinct labels array (LabelReader keeps them alive, so ids are
    # stable): each run then costs one addition and its share of a bincount.
    index_dtype = np.int32 if counts.size < 2 ** 31 else np.int64
    row_starts = {}
    pending, pending_images, counted = [], 0, 0
    for run_dir in run_dirs:
        labels = read_labels(run_dir)
        starts = row_starts.get(id(labels))
        if starts is None:
            starts = row_starts[id(labels)] = labels.astype(index_dtype) * num_classes
        predictions = metrics.read_predictions(run_dir)
        if len(predictions) != len(labels):
            raise AnalysisError(f"{run_dir}: {len(predictions)} predictions for "
                                f"{len(labels)} val labels")
        if predictions.size and (predictions.min() < 0 or predictions.max() >= num_classes):
            raise AnalysisError(f"{run_dir}: a prediction outside 0..{num_classes - 1}")
        pending.append(starts + predictions)
        pending_images += len(labels)
        counted += 1
        if pending_images >= BATCH_IMAGES:
            counts += np.bincount(np.concatenate(pending), minlength=counts.size)
            pending, pending_images = [], 0
    if pending:
        counts += np.bincount(np.concatenate(pending), minlength=counts.size)
    return counts.reshape(num_classes, num_classes), counted


def rates_from_counts(counts, runs_counted, class_counts):
    """Row-normalised mean confusion: counts / (runs x val images of the true class)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / (runs_counted * class_counts[:, None].astype(np.float64))


def confusion_rows(setting, rates, runs_counted, class_names):
    """confusion.csv rows of one setting: dense, or the diagonal + top-k off-diagonal."""
    num_classes = len(rates)
    if num_classes <= DENSE_MAX_CLASSES:
        true_class = np.repeat(np.arange(num_classes), num_classes)
        predicted = np.tile(np.arange(num_classes), num_classes)
    else:
        off_diagonal = np.where(np.eye(num_classes, dtype=bool), -np.inf,
                                np.nan_to_num(rates, nan=-np.inf))
        k = min(TOP_K_SPARSE, num_classes - 1)
        top = np.argpartition(-off_diagonal, k - 1, axis=1)[:, :k]
        true_class = np.repeat(np.arange(num_classes), k + 1)
        predicted = np.concatenate([np.arange(num_classes)[:, None], top], axis=1).ravel()
        keep = (predicted == true_class) | (rates[true_class, predicted] > 0)
        true_class, predicted = true_class[keep], predicted[keep]
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame({"setting": [setting] * len(true_class), "true_class": true_class,
                         "true_name": names[true_class], "predicted_class": predicted,
                         "predicted_name": names[predicted],
                         "rate": rates[true_class, predicted], "n": runs_counted})


def hurt_classes(welch_rows):
    """(class indices, how they were chosen) at one setting, most significant first."""
    significant = welch_rows[(welch_rows["p_less"] < ALPHA) & (welch_rows["diff"] < 0)]
    if len(significant):
        ordered = significant.sort_values(["p_less", "diff"], kind="stable")
        return ordered["class"].to_numpy(), f"p_less < {ALPHA:g}"
    dropping = welch_rows[welch_rows["diff"] < 0].sort_values("diff", kind="stable")
    return (dropping["class"].to_numpy()[:WORST_WHEN_NONE],
            f"largest drop (none with p_less < {ALPHA:g})")


def flow_rows(setting, rates, reference_rates, welch_rows, n_ref, n, class_names):
    """confusion_flows.csv rows of one setting (see the module docstring)."""
    classes, selected_by = hurt_classes(welch_rows)
    p_less = dict(zip(welch_rows["class"], welch_rows["p_less"]))
    rows = []
    for class_index in classes:
        lost = reference_rates[class_index, class_index] - rates[class_index, class_index]
        if not lost > 0:  # this run subset did not lose (or the class has no images)
            continue
        gain = rates[class_index] - reference_rates[class_index]
        gain[class_index] = -np.inf
        absorbers = [j for j in np.argsort(-gain, kind="stable")[:ABSORBERS] if gain[j] > 0]
        for absorbing in absorbers:
            rows.append({"setting": setting, "class": int(class_index),
                         "class_name": class_names[class_index], "selected_by": selected_by,
                         "p_less": p_less.get(class_index, np.nan), "lost": lost,
                         "absorbing_class": int(absorbing),
                         "absorbing_name": class_names[absorbing],
                         "share": gain[absorbing] / lost,
                         "rate_ref": reference_rates[class_index, absorbing],
                         "rate": rates[class_index, absorbing], "n_ref": n_ref, "n": n})
    return rows


def confusion_tables(data, welch):
    """{"confusion": DataFrame, "confusion_flows": DataFrame} for one SettingData, from
    the runs that kept predictions (their count per setting: column n); both tables are
    empty when no run of the reference kept them."""
    usable = [[Path(d) for d in dirs if has_predictions(Path(d))] for dirs in data.run_dirs]
    if not usable[data.reference_index]:
        return {"confusion": pd.DataFrame(columns=CONFUSION_COLUMNS),
                "confusion_flows": pd.DataFrame(columns=FLOW_COLUMNS)}
    read_labels = LabelReader()
    reference_counts, n_ref = confusion_counts(usable[data.reference_index],
                                               data.num_classes, read_labels)
    class_counts = np.bincount(read_labels.first, minlength=data.num_classes)
    reference_rates = rates_from_counts(reference_counts, n_ref, class_counts)
    confusion_parts, flows = [], []
    for index, setting in enumerate(data.settings):
        if index == data.reference_index:
            rates, n = reference_rates, n_ref
        elif usable[index]:
            counts, n = confusion_counts(usable[index], data.num_classes, read_labels)
            rates = rates_from_counts(counts, n, class_counts)
        else:
            continue
        confusion_parts.append(confusion_rows(setting, rates, n, data.class_names))
        if index != data.reference_index:
            welch_rows = rows_where(welch, "setting", setting)
            flows += flow_rows(setting, rates, reference_rates, welch_rows, n_ref, n,
                               data.class_names)
    return {"confusion": pd.concat(confusion_parts, ignore_index=True),
            "confusion_flows": pd.DataFrame(flows, columns=FLOW_COLUMNS)}


# ----------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------

def flows_figure(flows, setting, path, max_classes=8, title_suffix=""):
    """Horizontal bars, one per hurt class at `setting` (most significant on top): its
    lost points split by the classes that absorbed them, the rest grey. False when there
    is nothing to draw."""
    rows = rows_where(flows, "setting", setting)
    classes = list(dict.fromkeys(rows["class"]))[:max_classes]
    if not classes:
        return False
    from ffcv_bias.analysis.figures import _save
    from ffcv_bias.common import plots
    plt = plots.pyplot()
    figure, axis = plt.subplots(figsize=(9, 0.6 * len(classes) + 1.6))
    palette = plt.get_cmap("tab10")
    # A name fits in a bar wider than ~7% of the widest bar (gains can exceed the loss
    # where other classes receive fewer of the hurt class's images than at the reference).
    widest = max(100 * rows.groupby("class")["lost"].first().max(),
                 100 * (rows["lost"] * rows["share"]).groupby(rows["class"]).sum().max())
    for position, class_index in enumerate(classes):
        block = rows[rows["class"] == class_index]
        lost = 100 * float(block["lost"].iloc[0])
        left = 0.0
        for rank, (_, row) in enumerate(block.iterrows()):
            width = lost * float(row["share"])
            axis.barh(position, width, left=left, color=palette(rank % 10), edgecolor="white")
            if width > 0.07 * widest:
                axis.text(left + width / 2, position, f"{row['absorbing_name'][:14]}",
                          ha="center", va="center", fontsize=7)
            left += width
        if left < lost:
            axis.barh(position, lost - left, left=left, color="#ccc", edgecolor="white")
        axis.text(max(lost, left) + 0.3, position, f"-{lost:.1f} pts", va="center", fontsize=8)
    axis.set_yticks(range(len(classes)))
    axis.set_yticklabels([rows[rows["class"] == c]["class_name"].iloc[0][:28] for c in classes])
    axis.invert_yaxis()
    axis.set_xlabel("accuracy lost vs the reference (points), split by the classes that "
                    "absorbed it (grey: the rest)")
    axis.set_title(f"Where the hurt classes' predictions went at "
                   f"{format_setting(setting)}{title_suffix}")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    _save(figure, path)
    return True
