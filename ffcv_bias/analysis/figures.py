"""The report's figures (PNG, matplotlib's Agg backend: no display needed).

1. accuracy_curves.png: mean top-1 vs the varied value, and the per-class curves of the k
   classes with the largest significant loss (one-sided Welch, BH q < 0.05 within the
   setting: raw p < 0.05 would flag about 5% of classes under no effect) at ANY setting and
   the k that gain most at the compared setting (the paper's Figs. 2-4); each line's label
   gives both its change at the compared setting and its largest significant loss.
2. class_spread.png: standard deviation of per-class accuracy and worst-class accuracy
   vs the varied value.
3. change_histogram.png: per-class change between the reference and the compared setting.
Bands are mean +- one standard deviation across seeds.

"Lose most" / "gain most" are measured between the reference and the *compared setting*:
the setting with the best mean top-1 (the one cross-validation would pick), or, when that
is the reference itself, the setting farthest from it.
"""
import numpy as np

from ffcv_bias.analysis import tables
from ffcv_bias.analysis.tables import format_setting, per_run_spread, rows_where
from ffcv_bias.common import plots

AXIS_NAMES = {"min_scale": "random-crop lower bound tau (augment.min_scale)",
              "weight_decay": "weight decay (training.weight_decay)",
              "dropout": "dropout rate (model.dropout)",
              "sparsity": "fraction of training data pruned (data.sparsity)"}


def axis_name(key):
    return AXIS_NAMES.get(key.split(".")[-1], key)


def compared_index(data):
    """Index of the compared setting (see module docstring)."""
    return tables.compared_index(data.settings, data.reference,
                                 [t.mean() for t in data.top1])


def largest_losses(data, class_means, welch, alpha=0.05):
    """Per class: (the most negative change from the reference over all settings among the
    significant ones, BH q_less < alpha; NaN if none), its setting, and its q_less."""
    worst = np.full(data.num_classes, np.nan)
    where = np.full(data.num_classes, None, dtype=object)
    p_values = np.full(data.num_classes, np.nan)
    if welch is None or welch.empty:
        return worst, where, p_values
    for _, row in welch.iterrows():
        c = int(row["class"])
        if row["q_less"] < alpha and row["diff"] < 0 and not (row["diff"] >= worst[c]):
            worst[c], where[c], p_values[c] = row["diff"], row["setting"], row["q_less"]
    return worst, where, p_values


def classes_to_draw(data, class_means, welch, k, alpha=0.05):
    """(losers, gainers): the k classes with the largest significant loss at ANY setting
    (then, if fewer lose significantly, the largest changes at the compared setting), and
    the k that gain most at the compared setting. Ranking by the compared setting alone
    could draw a class that collapses at another setting as a "gainer"."""
    k = max(1, min(k, data.num_classes // 2))
    change = class_means[compared_index(data)] - class_means[data.reference_index]
    worst, _, _ = largest_losses(data, class_means, welch, alpha)
    significant = np.flatnonzero(~np.isnan(worst))
    losers = list(significant[np.argsort(worst[significant], kind="stable")][:k])
    for class_index in np.argsort(change, kind="stable"):
        if len(losers) >= k:
            break
        if class_index not in losers:
            losers.append(int(class_index))
    gainers = [int(c) for c in np.argsort(change, kind="stable")[::-1] if c not in losers][:k]
    return np.array(losers, dtype=int), np.array(gainers, dtype=int)


def curve_label(data, class_index, change, compared, worst, where, p_values):
    """'Shirt: at 0.65 +3.0; worst -10.2 at 0.3 (q=0.003)' (or 'no significant loss')."""
    text = f"{_short(data.class_names[class_index], 20)}: at {compared} {change:+.1f}"
    if np.isnan(worst[class_index]):
        return text + "; no sig. loss"
    return (text + f"; worst {100 * worst[class_index]:+.1f} at "
            f"{format_setting(where[class_index])} (q={p_values[class_index]:.2g})")


def losers_and_gainers(data, class_means, k):
    """(k classes losing most, k classes gaining most) from reference to compared setting."""
    change = class_means[compared_index(data)] - class_means[data.reference_index]
    k = max(1, min(k, data.num_classes // 2))
    order = np.argsort(change, kind="stable")
    return order[:k], order[::-1][:k]


def _save(figure, path):
    plots.save_png(figure, path, dpi=110)


def _band(axis, x, mean, sd, band_alpha=0.15, **style):
    line, = axis.plot(x, mean, marker="o", markersize=3, **style)
    axis.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=band_alpha,
                      linewidth=0)
    return line


def _settings_axis(axis, data):
    axis.set_xticks(range(len(data.settings)))
    axis.set_xticklabels([format_setting(s) + (" (ref)" if s == data.reference else "")
                          for s in data.settings], rotation=30, ha="right")
    axis.set_xlabel(axis_name(data.key))
    axis.grid(alpha=0.3)


def _seed_mean_sd(per_setting_values):
    """Mean and std (ddof=1, 0 for one run) over seeds, in % points."""
    means = np.array([100 * np.mean(v) for v in per_setting_values])
    sds = np.array([100 * np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_setting_values])
    return means, sds


def _short(name, width=28):
    return name if len(name) <= width else name[:width - 1] + "…"


def accuracy_curves(data, class_means, class_stds, path, k=5, title_suffix="", welch=None):
    x = np.arange(len(data.settings))
    plt = plots.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(16, 5))
    # Fixed margins (room for the legend on the right): a layout engine costs ~1 s a figure.
    figure.subplots_adjust(left=0.05, right=0.75, bottom=0.2, top=0.86, wspace=0.22)
    mean, sd = _seed_mean_sd(data.top1)
    _band(left, x, mean, sd, color="tab:blue", label="mean top-1")
    left.set_ylabel("top-1 accuracy (%)")
    left.set_title("Mean accuracy (band: ± std over seeds)")
    left.legend(loc="best")
    _settings_axis(left, data)

    losers, gainers = classes_to_draw(data, class_means, welch, k)
    worst, where, p_values = largest_losses(data, class_means, welch)
    # Labelled with the signed change at the compared setting and the largest significant
    # loss anywhere: with few classes, the "k that gain most" may still lose a little.
    change = 100 * (class_means[compared_index(data)] - class_means[data.reference_index])
    compared = format_setting(data.settings[compared_index(data)])
    reds = plt.cm.Reds(np.linspace(0.95, 0.5, len(losers)))
    greens = plt.cm.Greens(np.linspace(0.95, 0.5, len(gainers)))
    for classes, colours, kind in ((losers, reds, "loses"), (gainers, greens, "gains")):
        for class_index, colour in zip(classes, colours):
            std = np.nan_to_num(class_stds[:, class_index])
            _band(right, x, 100 * class_means[:, class_index], 100 * std, band_alpha=0.07,
                  color=colour,
                  linestyle="-" if kind == "loses" else "--",
                  label=curve_label(data, class_index, change[class_index], compared,
                                    worst, where, p_values))
    right.plot(x, mean, color="black", linewidth=2, alpha=0.6, label="mean top-1")
    right.set_ylabel("per-class accuracy (%)")
    right.set_title(f"Solid: the {len(losers)} largest significant losses at any setting "
                    f"(BH q<0.05);\ndashed: the {len(gainers)} largest gains at {compared} "
                    f"(change in pts vs ref)", fontsize=10)
    right.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    _settings_axis(right, data)
    figure.suptitle(f"Accuracy vs {data.key}{title_suffix}")
    _save(figure, path)


def class_spread(data, path, title_suffix=""):
    x = np.arange(len(data.settings))
    spreads = [per_run_spread(acc) for acc in data.acc]
    plt = plots.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.22, top=0.85, wspace=0.22)
    std_mean, std_sd = _seed_mean_sd([s[0] for s in spreads])
    _band(left, x, std_mean, std_sd, color="tab:purple", label="std of per-class accuracy")
    left.set_ylabel("std over classes (% points)")
    left.set_title("Spread of per-class accuracy (per run; band: ± std over seeds)")
    left.legend(loc="best")
    _settings_axis(left, data)
    worst_mean, worst_sd = _seed_mean_sd([s[1] for s in spreads])
    worst10_mean, worst10_sd = _seed_mean_sd([s[2] for s in spreads])
    _band(right, x, worst_mean, worst_sd, color="tab:red", label="worst class")
    _band(right, x, worst10_mean, worst10_sd, color="tab:orange", linestyle="--",
          label="mean of worst 10% of classes")
    right.set_ylabel("accuracy (%)")
    right.set_title("Worst classes (per run; band: ± std over seeds)")
    right.legend(loc="best")
    _settings_axis(right, data)
    figure.suptitle(f"Class spread vs {data.key}{title_suffix}")
    _save(figure, path)


def change_histogram(data, class_means, welch, path, alpha=0.05, title_suffix=""):
    """Histogram of per-class change, classes significantly lower (BH q_less < alpha) in red."""
    compared = compared_index(data)
    change = 100 * (class_means[compared] - class_means[data.reference_index])
    rows = rows_where(welch, "setting", data.settings[compared])
    significant = np.zeros(data.num_classes, dtype=bool)
    if len(rows):
        significant[rows["class"].to_numpy()] = rows["q_less"].to_numpy(dtype=float) < alpha
    plt = plots.pyplot()
    figure, axis = plt.subplots(figsize=(8.5, 4.5))
    figure.subplots_adjust(left=0.09, right=0.97, bottom=0.14, top=0.9)
    bins = np.histogram_bin_edges(change, bins=min(60, max(10, data.num_classes // 5)))
    axis.hist([change[~significant], change[significant]], bins=bins, stacked=True,
              color=["tab:gray", "tab:red"],
              label=[f"not significantly lower ({(~significant).sum()})",
                     f"significantly lower, BH q < {alpha:g} ({significant.sum()})"])
    axis.axvline(0, color="black", linewidth=1)
    axis.axvline(change.mean(), color="tab:blue", linestyle="--",
                 label=f"mean change {change.mean():+.2f} pts")
    worst = int(np.argmin(change))
    axis.annotate(_short(data.class_names[worst]), (change[worst], 0), xytext=(0, 25),
                  textcoords="offset points", ha="left", fontsize=8,
                  arrowprops={"arrowstyle": "->", "color": "tab:red"})
    from_to = f"{format_setting(data.reference)} -> {format_setting(data.settings[compared])}"
    axis.set_xlabel(f"per-class accuracy change (% points), {data.key} = {from_to}")
    axis.set_ylabel("number of classes")
    why = "best mean top-1" if compared == int(np.argmax([t.mean() for t in data.top1])) \
        else "farthest from the reference"
    axis.set_title(f"Per-class change, reference -> compared setting ({why}){title_suffix}")
    axis.legend(loc="best", fontsize=8)
    axis.grid(alpha=0.3)
    _save(figure, path)


FIGURE_FILES = {"accuracy_curves": "accuracy_curves.png", "class_spread": "class_spread.png",
                "change_histogram": "change_histogram.png"}


def make_figures(data, class_means, class_stds, welch, out_dir, k=5, title_suffix=""):
    """Write the figures into out_dir; returns {name: file name} of those written."""
    written = {}
    accuracy_curves(data, class_means, class_stds, out_dir / FIGURE_FILES["accuracy_curves"],
                    k=k, title_suffix=title_suffix, welch=welch)
    written["accuracy_curves"] = FIGURE_FILES["accuracy_curves"]
    class_spread(data, out_dir / FIGURE_FILES["class_spread"], title_suffix=title_suffix)
    written["class_spread"] = FIGURE_FILES["class_spread"]
    if len(data.settings) > 1:
        change_histogram(data, class_means, welch, out_dir / FIGURE_FILES["change_histogram"],
                         title_suffix=title_suffix)
        written["change_histogram"] = FIGURE_FILES["change_histogram"]
    return written
