"""Where a losing class's accuracy goes: confusion matrices and confusion flows.

From each run's predictions (val_preds.npy, or the argmax of val_logits.npy in records
older than it; metrics.read_predictions), read one run at a time:

confusion.csv, one row per (setting, true class, predicted class): `rate` = the share of
    the true class's val images predicted as that class, averaged over the setting's seeds
    (row-normalised: a true class's rates sum to 1, its diagonal is its mean accuracy).
    Every pair when there are at most DENSE_MAX_CLASSES classes; above that the diagonal
    and the TOP_K_SPARSE largest off-diagonal rates of each true class (sparse).
confusion_flows.csv, for each setting and each class it hurts: where its predictions went
    and where they came back from. With r_ref and r_s the reference's and the setting's
    rates (fractions; "points" below are these times 100),
        lost   = r_ref[c, c] - r_s[c, c]         (net points of accuracy the class lost)
        change = r_s[c, j] - r_ref[c, j]         (for j != c; the changes sum to `lost`)
        gross_out  = sum of the positive changes (c's images newly predicted as others)
        gross_back = - sum of the negative changes (confusions that fell: images back)
    so lost = gross_out - gross_back. A class losing 5 points net while its confusion
    with j1 rises 20 points and that with j2 falls 15 has gross_out 20, gross_back 15.
    Rows: the ABSORBERS largest positive changes (direction "to") and the ABSORBERS
    largest negative ones (direction "back from"), each with its signed `change` and
    share = |change| / gross_out ("to") or |change| / gross_back ("back from"), the
    row's part of its own direction's gross flow: the shares of one direction sum to at
    most 1 (exactly 1 when every class with a change that way is listed).
    The hurt classes are those with Benjamini-Hochberg q_less < ALPHA and diff < 0 at the
    setting (the welch table), most significant first, or, when none is, the
    WORST_WHEN_NONE largest drops (flagged in `selected_by`). A hurt class whose
    prediction runs show no net loss (lost <= 0) gets no rows.

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
CHANGE_TOLERANCE = 1e-12   # smaller changes of a confusion rate are rounding, not flows
# Predictions of this many images are counted in one np.bincount call.
BATCH_IMAGES = 2 ** 22

CONFUSION_COLUMNS = ["setting", "true_class", "true_name", "predicted_class",
                     "predicted_name", "rate", "n"]
FLOW_COLUMNS = ["setting", "class", "class_name", "selected_by", "p_less", "q_less", "lost",
                "gross_out", "gross_back", "direction", "other_class", "other_name",
                "change", "share", "rate_ref", "rate", "n_ref", "n"]
TO, BACK = "to", "back from"   # values of the direction column


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
            labels = metrics.read_labels_file(path)
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
    """(class indices, how they were chosen) at one setting, most significant first:
    Benjamini-Hochberg q_less < ALPHA with a drop, else the WORST_WHEN_NONE largest drops."""
    significant = welch_rows[(welch_rows["q_less"] < ALPHA) & (welch_rows["diff"] < 0)]
    if len(significant):
        ordered = significant.sort_values(["q_less", "p_less", "diff"], kind="stable")
        return ordered["class"].to_numpy(), f"q_less < {ALPHA:g}"
    dropping = welch_rows[welch_rows["diff"] < 0].sort_values("diff", kind="stable")
    return (dropping["class"].to_numpy()[:WORST_WHEN_NONE],
            f"largest drop (none with q_less < {ALPHA:g})")


def flow_rows(setting, rates, reference_rates, welch_rows, n_ref, n, class_names):
    """confusion_flows.csv rows of one setting (see the module docstring)."""
    classes, selected_by = hurt_classes(welch_rows)
    p_less = dict(zip(welch_rows["class"], welch_rows["p_less"]))
    q_less = dict(zip(welch_rows["class"], welch_rows["q_less"]))
    rows = []
    for class_index in classes:
        lost = reference_rates[class_index, class_index] - rates[class_index, class_index]
        if not lost > 0:  # this run subset did not lose (or the class has no images)
            continue
        change = rates[class_index] - reference_rates[class_index]
        change[class_index] = 0.0
        # Equal counts over different numbers of seeds can differ in the last bit.
        change[np.abs(change) < CHANGE_TOLERANCE] = 0.0
        gross_out = float(change[change > 0].sum())
        gross_back = float(np.abs(change[change < 0]).sum())
        order = np.argsort(-change, kind="stable")
        went = [j for j in order[:ABSORBERS] if change[j] > 0]
        came_back = [j for j in order[::-1][:ABSORBERS] if change[j] < 0]
        for direction, others, gross in ((TO, went, gross_out), (BACK, came_back, gross_back)):
            for other in others:
                rows.append({"setting": setting, "class": int(class_index),
                             "class_name": class_names[class_index],
                             "selected_by": selected_by,
                             "p_less": p_less.get(class_index, np.nan),
                             "q_less": q_less.get(class_index, np.nan), "lost": lost,
                             "gross_out": gross_out, "gross_back": gross_back,
                             "direction": direction, "other_class": int(other),
                             "other_name": class_names[other], "change": change[other],
                             "share": abs(change[other]) / gross,
                             "rate_ref": reference_rates[class_index, other],
                             "rate": rates[class_index, other], "n_ref": n_ref, "n": n})
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

def _colour_index(class_index):
    """tab20 colour of a class: the 10 dark hues first, then the 10 light ones (tab20's
    neighbours are one hue in two shades, too alike for neighbouring class indices)."""
    k = class_index % 20
    return (2 * k) % 20 + (k // 10) % 2


def flows_figure(flows, setting, path, max_classes=8, title_suffix=""):
    """Diverging horizontal bars, one per hurt class at `setting` (most significant on
    top): right of 0 the points of its images newly predicted as other classes (gross
    out, split by class, the unlisted rest grey), left of 0 the points that came back
    from confusions that fell (gross back); a diamond at the net loss (gross out - gross
    back). Each other class keeps one colour. False when there is nothing to draw."""
    rows = rows_where(flows, "setting", setting)
    classes = list(dict.fromkeys(rows["class"]))[:max_classes]
    if not classes:
        return False
    from ffcv_bias.analysis.figures import _save
    from ffcv_bias.common import plots
    plt = plots.pyplot()
    figure, axis = plt.subplots(figsize=(10, 0.6 * len(classes) + 1.9))
    palette = plt.get_cmap("tab20")
    per_class = rows.groupby("class")[["lost", "gross_out", "gross_back"]].first()
    right = 100 * float(per_class["gross_out"].max())
    left = 100 * float(per_class["gross_back"].max())
    span = max(right + left, 1e-9)
    for position, class_index in enumerate(classes):
        block = rows[rows["class"] == class_index]
        totals = per_class.loc[class_index]
        for direction, sign, gross in ((TO, 1.0, totals["gross_out"]),
                                       (BACK, -1.0, totals["gross_back"])):
            start = 0.0
            for _, row in block[block["direction"] == direction].iterrows():
                width = 100 * abs(float(row["change"]))
                axis.barh(position, sign * width, left=sign * start,
                          color=palette(_colour_index(int(row["other_class"]))),
                          edgecolor="white")
                if width > 0.07 * span:
                    axis.text(sign * (start + width / 2), position,
                              f"{row['other_name'][:14]}", ha="center", va="center",
                              fontsize=7)
                start += width
            rest = 100 * float(gross) - start
            if rest > 1e-9:  # classes past the listed ABSORBERS
                axis.barh(position, sign * rest, left=sign * start, color="#ccc",
                          edgecolor="white")
        lost = 100 * float(totals["lost"])
        axis.plot(lost, position, marker="D", color="black", markersize=6, linestyle="none",
                  label="net loss" if position == 0 else None, zorder=3)
        axis.text(100 * float(totals["gross_out"]) + 0.03 * span + 0.1, position,
                  f"net -{lost:.1f} pts = {100 * totals['gross_out']:.1f} out "
                  f"- {100 * totals['gross_back']:.1f} back", va="center", fontsize=8)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlim(-left - 0.05 * span - 0.1, right + 0.45 * span + 0.1)
    axis.set_yticks(range(len(classes)))
    axis.set_yticklabels([rows[rows["class"] == c]["class_name"].iloc[0][:28] for c in classes])
    axis.invert_yaxis()
    axis.set_xlabel("change in the share of the class's images predicted as each other class "
                    "(points):\nright = went to, left = came back from; diamond = net loss "
                    "(grey: classes not listed)")
    axis.set_title(f"Where the hurt classes' predictions went at "
                   f"{format_setting(setting)}{title_suffix}")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    _save(figure, path)
    return True
