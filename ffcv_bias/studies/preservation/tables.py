"""The study's tables: per-class and mean accuracy per setting, and where each class loses
its label."""
import numpy as np
import pandas as pd

from ffcv_bias.studies.preservation.transforms import IDENTITY


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------

def accuracy_rows(tally, split, settings, draws, class_names):
    """(per_class rows, mean rows) for one split."""
    per_class_rows, mean_rows = [], []
    identity_acc = tally.per_class(("identity", None, 0))
    identity_top1 = tally.top1(("identity", None, 0))
    classes = np.arange(len(class_names))
    for transform, values in settings.items():
        for setting in values:
            if setting == IDENTITY[transform]:
                acc = identity_acc[None, :]
                top1 = np.array([identity_top1])
            else:
                keys = [(transform, setting, draw) for draw in range(draws)]
                acc = np.stack([tally.per_class(key) for key in keys])
                top1 = np.array([tally.top1(key) for key in keys])
            n_runs = len(acc)
            std = acc.std(axis=0, ddof=1) if n_runs > 1 else np.zeros(acc.shape[1])
            per_class_rows.append(pd.DataFrame({
                "split": split, "transform": transform, "setting": setting, "class": classes,
                "class_name": class_names, "n_runs": n_runs, "mean_acc": acc.mean(axis=0),
                "std_acc": std}))
            mean_rows.append({"split": split, "transform": transform, "setting": setting,
                              "n_runs": n_runs, "mean_acc": float(top1.mean()),
                              "std_acc": float(top1.std(ddof=1)) if n_runs > 1 else 0.0})
    return per_class_rows, mean_rows


def mild_to_strong(transform, values):
    """Settings of a transform in order of growing strength (crop: alpha falling)."""
    return sorted(values, reverse=(transform == "crop"))


def label_loss_table(per_class, threshold):
    """Per (split, transform, class): the first strength at which the label is lost."""
    rows = []
    for (split, transform), block in per_class.groupby(["split", "transform"], sort=False):
        settings = mild_to_strong(transform, block["setting"].unique())
        by_class = block.pivot(index="class", columns="setting", values="mean_acc")
        names = block.drop_duplicates("class").set_index("class")["class_name"]
        for class_index in by_class.index:
            curve = [by_class.at[class_index, s] for s in settings]
            clean = curve[0]
            row = {"split": split, "transform": transform, "class": int(class_index),
                   "class_name": names[class_index], "clean_acc": clean,
                   "threshold_acc": threshold * clean, "lost": False,
                   "loss_setting": np.nan, "last_preserving_setting": np.nan}
            if clean > 0:
                below = [i for i, acc in enumerate(curve[1:], start=1)
                         if acc < threshold * clean]
                if below:
                    row.update(lost=True, loss_setting=settings[below[0]],
                               last_preserving_setting=settings[below[0] - 1])
                else:
                    row["last_preserving_setting"] = settings[-1]
            rows.append(row)
    columns = ["split", "transform", "class", "class_name", "clean_acc", "threshold_acc",
               "lost", "loss_setting", "last_preserving_setting"]
    return pd.DataFrame(rows, columns=columns)
