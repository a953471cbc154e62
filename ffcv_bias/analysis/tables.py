"""Settings of the varied key, the reference, and the per-run / per-class / per-setting tables.

A *setting* is one value of the varied config key (e.g. augment.min_scale = 0.08); runs at
one setting that differ only in training.seed are its replicates. Settings are ordered
ascending, reversed when the reference is the largest value, so the reference sits at the
left of every table and figure and regularization grows to the right (tau 1.0 -> 0.08 as
in the paper's Fig. 2; weight decay 0 -> 5e-4).
"""
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ffcv_bias.analysis.records import REPLICATE_KEY, AnalysisError, dotted_get

# The varied keys whose "no regularization" value is the natural reference.
NO_REGULARIZATION = {"min_scale": 1.0, "weight_decay": 0.0, "dropout": 0.0,
                     "sparsity": 0.0, "label_smoothing": 0.0}


def hashable(value):
    """A JSON value usable as a dict key (lists become tuples)."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value


def rows_where(frame, column, value):
    """The rows of `frame` whose `column` equals `value` (works for None / tuple values and
    empty frames, unlike frame[frame[column] == value])."""
    mask = np.fromiter((hashable(v) == value for v in frame[column]), dtype=bool,
                       count=len(frame))
    return frame[mask]


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_setting(value):
    if _is_number(value):
        return f"{value:g}"
    return str(value)


def same_value(a, b):
    """Equal settings: numbers to within float rounding (1e-9 relative), others exactly."""
    if _is_number(a) and _is_number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    return a == b


def sort_settings(values):
    values = list(dict.fromkeys(values))
    if all(_is_number(v) for v in values):
        return sorted(values)
    return sorted(values, key=format_setting)


def parse_reference(text, values):
    """The setting among `values` that the user's --reference text names."""
    for value in values:
        if _is_number(value):
            try:
                if same_value(float(text), value):
                    return value
            except ValueError:
                pass
        elif format_setting(value) == text or (value is None and text.lower() in ("none", "null")):
            return value
    shown = text if text and text == text.strip() else repr(text)   # '' and spaces visible
    raise AnalysisError(f"--reference {shown} is not a value of the varied key; values: "
                        + ", ".join(format_setting(v) for v in sort_settings(values)))


def default_reference(key, values):
    """No regularization when it was run (tau 1.0, weight decay 0, ...), else the first value."""
    natural = NO_REGULARIZATION.get(key.split(".")[-1])
    if natural is not None:
        for value in values:
            if same_value(value, natural):
                return value
    return sort_settings(values)[0]


def order_settings(values, reference):
    ordered = sort_settings(values)
    if len(ordered) > 1 and ordered[-1] == reference:
        ordered.reverse()
    return ordered


def compared_index(settings, reference, mean_top1):
    """The setting contrasted with the reference in figures and summaries.

    The setting with the best mean top-1 (the one cross-validation would pick) or, when
    that is the reference itself, the setting farthest from it in the order.
    """
    best = int(np.argmax(mean_top1))
    reference_index = settings.index(reference)
    if best != reference_index or len(settings) == 1:
        return best
    return max(range(len(settings)), key=lambda i: abs(i - reference_index))


@dataclass
class SettingData:
    """The runs of one analysis, split by setting (all arrays in `settings` order)."""
    key: str
    settings: list              # ordered values of the varied key
    reference: object
    run_ids: list               # per setting: list of run ids
    seeds: list                 # per setting: list of training.seed
    acc: list                   # per setting: float64 [n_runs, classes]
    top1: list                  # per setting: float64 [n_runs]
    top5: list
    class_names: list
    class_counts: np.ndarray    # or None (unknown: classes weighted equally)
    run_dirs: list

    @property
    def reference_index(self):
        return self.settings.index(self.reference)

    @property
    def num_classes(self):
        return len(self.class_names)

    def class_weights(self):
        """Weights that turn per-class accuracies into top-1 (val share of each class)."""
        if self.class_counts is None:
            return np.full(self.num_classes, 1.0 / self.num_classes)
        return self.class_counts / self.class_counts.sum()


def split_by_setting(run_set, rows, key, reference_text=None):
    """SettingData for the runs `rows` (indices into run_set) of the varied `key`."""
    values = [hashable(dotted_get(run_set.runs[i].config, key)) for i in rows]
    distinct = list(dict.fromkeys(values))
    reference = (parse_reference(reference_text, distinct) if reference_text is not None
                 else default_reference(key, distinct))
    settings = order_settings(distinct, reference)
    members = {s: [i for i, v in zip(rows, values) if v == s] for s in settings}
    runs = run_set.runs
    return SettingData(
        key=key, settings=settings, reference=reference,
        run_ids=[[runs[i].run_id for i in members[s]] for s in settings],
        seeds=[[dotted_get(runs[i].config, REPLICATE_KEY, None) for i in members[s]]
               for s in settings],
        acc=[run_set.per_class_acc[members[s]] for s in settings],
        top1=[run_set.top1[members[s]] for s in settings],
        top5=[run_set.top5[members[s]] for s in settings],
        class_names=run_set.class_names, class_counts=run_set.class_counts,
        run_dirs=[[str(runs[i].run_dir) for i in members[s]] for s in settings])


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------

def runs_table(data):
    """One row per complete run: run_id, setting, seed, top1, top5, run_dir."""
    rows = []
    for index, setting in enumerate(data.settings):
        for run_id, seed, top1, top5, run_dir in zip(
                data.run_ids[index], data.seeds[index], data.top1[index],
                data.top5[index], data.run_dirs[index]):
            rows.append({"run_id": run_id, "setting": setting, "seed": seed,
                         "top1": top1, "top5": top5, "run_dir": run_dir})
    return pd.DataFrame(rows, columns=["run_id", "setting", "seed", "top1", "top5", "run_dir"])


def class_means(data):
    """(mean [S, C], std [S, C], n_runs [S]) of per-class accuracy over the seeds.

    std uses ddof=1 (NaN with a single run).
    """
    means = np.stack([a.mean(axis=0) for a in data.acc])
    with np.errstate(invalid="ignore", divide="ignore"):
        stds = np.stack([a.std(axis=0, ddof=1) if len(a) > 1 else np.full(a.shape[1], np.nan)
                         for a in data.acc])
    counts = np.array([len(a) for a in data.acc])
    return means, stds, counts


def per_class_table(data):
    """One row per (setting, class): setting, class, class_name, n_runs, mean_acc, std_acc."""
    means, stds, counts = class_means(data)
    num_settings, num_classes = means.shape
    return pd.DataFrame({
        "setting": np.repeat(np.array(data.settings, dtype=object), num_classes),
        "class": np.tile(np.arange(num_classes), num_settings),
        "class_name": np.tile(np.array(data.class_names, dtype=object), num_settings),
        "n_runs": np.repeat(counts, num_classes),
        "mean_acc": means.ravel(),
        "std_acc": stds.ravel(),
    })


def _mean_sd(values):
    values = np.asarray(values, dtype=np.float64)
    sd = values.std(ddof=1) if len(values) > 1 else np.nan
    return values.mean(), sd


def per_run_spread(acc, worst_fraction=0.1):
    """Per run: std of per-class accuracy, worst-class accuracy, mean of the worst 10%."""
    acc = acc[:, ~np.isnan(acc).any(axis=0)]   # a class without val images has no accuracy
    worst_count = max(1, math.ceil(worst_fraction * acc.shape[1]))
    ordered = np.sort(acc, axis=1)
    return acc.std(axis=1), ordered[:, 0], ordered[:, :worst_count].mean(axis=1)


def settings_table(data):
    """One row per setting: runs, seeds (and missing ones), top-1/top-5, class spread.

    Spread statistics (std over classes, worst class, worst 10%) are computed per run and
    then averaged over seeds (`_sd` columns: their std over seeds), so seed noise in a
    single run does not pass for a class effect.
    """
    all_seeds = sorted({s for seeds in data.seeds for s in seeds if s is not None}, key=str)
    rows = []
    for index, setting in enumerate(data.settings):
        class_std, worst, worst10 = per_run_spread(data.acc[index])
        row = {"setting": setting, "is_reference": setting == data.reference,
               "n_runs": len(data.top1[index]),
               "seeds": " ".join(map(str, sorted(data.seeds[index], key=str))),
               "missing_seeds": " ".join(str(s) for s in all_seeds
                                         if s not in data.seeds[index])}
        for name, values in (("top1", data.top1[index]), ("top5", data.top5[index]),
                             ("class_std", class_std), ("worst_class", worst),
                             ("worst10pct", worst10)):
            row[f"{name}_mean"], row[f"{name}_sd"] = _mean_sd(values)
        rows.append(row)
    return pd.DataFrame(rows)
