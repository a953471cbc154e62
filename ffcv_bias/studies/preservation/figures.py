"""The study's figures: per-class curves per transform and split, and the mean curves."""
from pathlib import Path

import numpy as np

from ffcv_bias.common import plots
from ffcv_bias.studies.preservation.tables import mild_to_strong


NAMED_CLASSES_IN_FIGURE = 12

# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------

AXIS_LABELS = {"crop": "area kept by the crop (alpha)", "cutout": "CutOut side fraction",
               "jitter": "colour-jitter strength"}


def _named_classes(curves, k=5):
    """Classes drawn with their names: all when few, else the k least and the k most
    robust ones (mean of the curve relative to the clean accuracy)."""
    classes = list(curves.index)
    if len(classes) <= NAMED_CLASSES_IN_FIGURE:
        return classes
    clean = curves.iloc[:, 0]
    recognized = curves[clean > 0]
    robustness = recognized.mean(axis=1) / clean[clean > 0]
    ranked = list(robustness.sort_values(kind="stable").index)
    return list(dict.fromkeys(ranked[:k] + ranked[-k:]))


def plot_transform(block, mean_block, transform, title, path):
    plt = plots.pyplot()

    settings = mild_to_strong(transform, block["setting"].unique())
    positions = np.arange(len(settings))
    curves = block.pivot(index="class", columns="setting", values="mean_acc")[settings]
    names = block.drop_duplicates("class").set_index("class")["class_name"]
    named = _named_classes(curves)
    figure, axis = plt.subplots(figsize=(8, 5))
    for class_index in curves.index:
        if class_index not in named:
            axis.plot(positions, curves.loc[class_index], color="0.8", linewidth=0.6)
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(named), 2)))
    for colour, class_index in zip(colours, named):
        axis.plot(positions, curves.loc[class_index], color=colour, linewidth=1.4,
                  marker="o", markersize=3, label=str(names[class_index]))
    mean_curve = mean_block.set_index("setting").loc[settings, "mean_acc"]
    axis.plot(positions, mean_curve.values, color="black", linewidth=3, label="all images")
    axis.set_xticks(positions, [f"{s:g}" for s in settings])
    axis.set_xlabel(AXIS_LABELS[transform] + "  (stronger to the right)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    plots.save_png(figure, path, dpi=110)


def plot_mean_curves(mean_frame, path):
    plt = plots.pyplot()

    transforms = list(dict.fromkeys(mean_frame["transform"]))
    figure, axes = plt.subplots(1, len(transforms), figsize=(4.5 * len(transforms), 3.8),
                                squeeze=False)
    for axis, transform in zip(axes[0], transforms):
        for split, style in (("val", "-"), ("train", "--")):
            block = mean_frame[(mean_frame["transform"] == transform)
                               & (mean_frame["split"] == split)]
            if block.empty:
                continue
            settings = mild_to_strong(transform, block["setting"].unique())
            means = block.set_index("setting").loc[settings, "mean_acc"]
            axis.plot(np.arange(len(settings)), means.values, style, marker="o",
                      color="black", label=split)
            axis.set_xticks(np.arange(len(settings)), [f"{s:g}" for s in settings])
        axis.set_xlabel(AXIS_LABELS[transform])
        axis.set_ylabel("accuracy")
        axis.set_ylim(-0.02, 1.02)
        axis.legend(fontsize=8)
    figure.tight_layout()
    plots.save_png(figure, path, dpi=110)


def make_figures(per_class, mean_frame, out_dir, model_label):
    figure_dir = Path(out_dir) / "figures"
    written = []
    for (split, transform), block in per_class.groupby(["split", "transform"], sort=False):
        mean_block = mean_frame[(mean_frame["split"] == split)
                                & (mean_frame["transform"] == transform)]
        path = figure_dir / f"{split}_{transform}.png"
        plot_transform(block, mean_block, transform,
                       f"{model_label}: {transform} on {split} images", path)
        written.append(path)
    path = figure_dir / "mean_curves.png"
    plot_mean_curves(mean_frame, path)
    return written + [path]
