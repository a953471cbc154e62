"""The figures command: Pote et al.'s Figs. 1-2, 4, 5 and 6 from pruned runs."""
from pathlib import Path

import numpy as np
import pandas as pd

from ffcv_bias.common import plots
from ffcv_bias.common.tables import write_csv
from ffcv_bias.studies.diet.common import PRUNE_CHOICES, DietError, format_sparsity, load_scores
from ffcv_bias.studies.diet.prune import keep_ratio_table


def _save_figure(figure, path):
    plots.save_png(figure, path, dpi=130, bbox_inches="tight")


def _highlighted_classes(final_values, count=5):
    """Rows to label: every class when few, else the `count` highest and lowest."""
    order = np.argsort(final_values, kind="stable")
    if len(order) <= 2 * count:
        return list(order)
    return list(order[-count:][::-1]) + list(order[:count])


def plot_keep_ratio(table, sparsities, path, title="class-wise keep ratio"):
    """Keep ratio of each class vs sparsity (Pote et al. Fig. 6); with many classes only
    the five that keep most and the five that keep least are coloured and named."""
    plt = plots.pyplot()
    x = [0.0] + list(sparsities)
    ratios = np.column_stack([np.ones(len(table))] +
                             [table[f"ratio_{format_sparsity(s)}"].to_numpy() for s in sparsities])
    labelled = _highlighted_classes(ratios[:, -1])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in range(len(table)):
        if row not in labelled:
            axis.plot(x, ratios[row], color="0.8", linewidth=0.8, zorder=1)
    for row in labelled:
        axis.plot(x, ratios[row], marker="o", markersize=3, linewidth=1.4, zorder=2,
                  label=f"{table['class'][row]}: {table['class_name'][row]}")
    axis.plot(x, 1 - np.array(x), color="black", linestyle="--", linewidth=1,
              label="1 - sparsity (no class bias)")
    axis.set_xlabel("data sparsity")
    axis.set_ylabel("kept / class size")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save_figure(figure, path)


def diet_frames(runs_dir):
    """(per_class, settings) frames of the analysis package, by data.score and sparsity."""
    from ffcv_bias.analysis.analyze import run_analysis
    from ffcv_bias.analysis.records import AnalysisError
    try:
        frames = run_analysis([runs_dir], ["data.sparsity", "data.score"], out_dir=None)
    except AnalysisError as error:
        raise DietError(str(error)) from None
    return frames["per_class"], frames["settings"]


def per_run_accuracy(runs_dir):
    """(one row per complete run: score, sparsity, seed, acc [C]; class names), read with
    the analysis package's record reader."""
    from ffcv_bias.analysis.records import AnalysisError, load_runs
    try:
        run_set = load_runs([runs_dir])
    except AnalysisError as error:
        raise DietError(str(error)) from None
    rows = [{"score": run.config.get("data", {}).get("score", ""),
             "sparsity": float(run.config.get("data", {}).get("sparsity", 0.0)),
             "seed": int(run.config.get("training", {}).get("seed", 0)),
             "acc": run_set.per_class_acc[index]} for index, run in enumerate(run_set.runs)]
    return pd.DataFrame(rows), list(run_set.class_names)


def split_dense_seeds(dense_seeds):
    """(seeds that choose the classes, seeds that are plotted, 'held-out' | 'in-sample').

    Choosing the worst classes on the same runs that are then plotted makes them look
    worse at sparsity 0 than they are (regression to the mean), so that "the worst classes
    improve with pruning" appears by chance alone. The lower half of the dense seeds
    chooses, the other seeds are plotted, at every sparsity. With one dense seed there is
    no other half: the figure says in-sample."""
    seeds = sorted(set(int(seed) for seed in dense_seeds))
    if len(seeds) < 2:
        return seeds, seeds, "in-sample"
    half = len(seeds) // 2
    return seeds[:half], seeds[half:], "held-out"


def rank_best_worst(mean_acc, k):
    """{'best': [...], 'worst': [...]} class ids by accuracy (ties: lower class id first);
    k is at most half the classes."""
    accuracy = np.asarray(mean_acc, dtype=np.float64)
    classes = np.arange(len(accuracy))
    k = min(k, len(classes) // 2) or 1
    return {"best": list(classes[np.lexsort((classes, -accuracy))][:k]),
            "worst": list(classes[np.lexsort((classes, accuracy))][:k])}


def fair_best_worst(score_runs, class_names, k):
    """(chosen classes, per-class frame of the plotted seeds, selection notes) of one
    score's runs: classes ranked on the choosing dense seeds, curves from the others."""
    dense = score_runs[score_runs["sparsity"] == 0]
    if dense.empty:
        raise DietError("no dense run (data.sparsity 0): the best and worst classes are "
                        "those of the dense model")
    chosen_on, plotted, selection = split_dense_seeds(dense["seed"])
    choosing = np.stack(dense[dense["seed"].isin(chosen_on)]["acc"].to_list())
    chosen = rank_best_worst(choosing.mean(axis=0), k)
    rows = []
    for sparsity, group in score_runs[score_runs["seed"].isin(plotted)].groupby("sparsity"):
        acc = np.stack(group["acc"].to_list())
        std = acc.std(axis=0, ddof=1) if len(acc) > 1 else np.full(acc.shape[1], np.nan)
        for class_id, name in enumerate(class_names):
            rows.append({"setting": sparsity, "class": class_id, "class_name": name,
                         "n_runs": len(acc), "mean_acc": acc[:, class_id].mean(),
                         "std_acc": std[class_id]})
    notes = {"selection": selection, "chosen_on_seeds": " ".join(map(str, chosen_on)),
             "plotted_seeds": " ".join(map(str, plotted))}
    return chosen, pd.DataFrame(rows), notes


def plot_best_worst(per_class, chosen, score, path, notes):
    """Pote et al. Fig. 4: accuracy of the dense model's best and worst classes vs sparsity,
    classes chosen on other seeds than those drawn (see split_dense_seeds)."""
    plt = plots.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for axis, group in zip(axes, ("best", "worst")):
        for class_id in chosen[group]:
            rows = per_class[per_class["class"] == class_id].sort_values("setting")
            axis.plot(rows["setting"], rows["mean_acc"], marker="o", markersize=3,
                      label=f"{class_id}: {rows['class_name'].iloc[0]}")
        axis.set_title(f"{len(chosen[group])} {group} classes of the dense model ({score})")
        axis.set_xlabel("data sparsity")
        axis.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel(f"test accuracy (mean over seeds {notes['plotted_seeds']})")
    if notes["selection"] == "held-out":
        caption = (f"classes chosen on dense seed(s) {notes['chosen_on_seeds']}; curves from "
                   f"the held-out seed(s) {notes['plotted_seeds']} only")
    else:
        caption = (f"IN-SAMPLE: one dense seed ({notes['chosen_on_seeds']}) both chooses and "
                   f"is drawn; its sparsity-0 point is biased (regression to the mean)")
    figure.suptitle(caption, fontsize=9)
    _save_figure(figure, path)


def plot_by_score(settings, column, ylabel, title, path):
    """One line per score of a settings-table statistic vs sparsity, +- sd over seeds."""
    plt = plots.pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    # Policies often coincide (two at a worst-class accuracy of 0): distinct markers and
    # dashes and a small sideways offset keep every line visible.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1)))]
    groups = list(settings.groupby("data.score", sort=True))
    step = 0.006 * max(1e-9, float(settings["setting"].max() - settings["setting"].min()))
    for position, (score, rows) in enumerate(groups):
        rows = rows.sort_values("setting")
        marker, dashes = styles[position % len(styles)]
        offset = (position - (len(groups) - 1) / 2) * step
        axis.errorbar(rows["setting"] + offset, rows[f"{column}_mean"],
                      yerr=rows[f"{column}_sd"].fillna(0.0), marker=marker, markersize=4,
                      linestyle=dashes, capsize=3, label=str(score) or "(none)")
    low, high = int(settings["n_runs"].min()), int(settings["n_runs"].max())
    seeds = f"n = {low} seeds" if low == high else f"n = {low}-{high} seeds"
    axis.set_xlabel("data sparsity")
    axis.set_ylabel(ylabel)
    axis.set_title(f"{title} (mean ± sd, {seeds} per point)")
    axis.legend(title="score")
    _save_figure(figure, path)


def best_worst_table(per_class, chosen, score, notes):
    rows = []
    for group, class_ids in chosen.items():
        for rank, class_id in enumerate(class_ids, start=1):
            for _, row in per_class[per_class["class"] == class_id].sort_values(
                    "setting").iterrows():
                rows.append({"score": score, "group": group, "rank": rank,
                             "class": class_id, "class_name": row["class_name"],
                             "sparsity": row["setting"], "n_runs": row["n_runs"],
                             "mean_acc": row["mean_acc"], "std_acc": row["std_acc"],
                             **notes})
    return pd.DataFrame(rows)


def keep_ratio_for_runs(scores_dir, score, sparsities, out):
    """keep_ratio_<score>.csv/.png from the scores, at the sparsities the runs used."""
    from ffcv_bias.studies.diet.prune import kept_sets
    arrays, meta = load_scores(scores_dir)
    class_names = meta.get("classes") or [f"class_{c}" for c in range(meta["num_classes"])]
    kept, _ = kept_sets(score, arrays, meta, sparsities)
    table = keep_ratio_table(arrays["labels"], class_names, kept)
    write_csv(table, out / f"keep_ratio_{score}.csv", float_format="%.6g")
    plot_keep_ratio(table, sparsities, out / f"keep_ratio_{score}.png",
                    title=f"class-wise keep ratio ({score})")


def run_figures(options):
    """The figures command: Figs. 4, 5, 1-2 (and 6 with --scores) from pruned runs."""
    if options.top_k < 1:
        raise DietError(f"--top-k must be >= 1, not {options.top_k}")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    _, settings = diet_frames(options.runs)
    per_run, class_names = per_run_accuracy(options.runs)
    tables = []
    for score, score_runs in per_run.groupby("score", sort=True):
        chosen, plotted, notes = fair_best_worst(score_runs, class_names, options.top_k)
        plot_best_worst(plotted, chosen, score or "(no score)",
                        out / f"best_worst_{score or 'none'}.png", notes)
        tables.append(best_worst_table(plotted, chosen, score, notes))
        sparsities = sorted(s for s in score_runs["sparsity"].unique() if s > 0)
        if options.scores and score in PRUNE_CHOICES and sparsities:
            keep_ratio_for_runs(options.scores, score, sparsities, out)
    write_csv(pd.concat(tables, ignore_index=True), out / "best_worst_classes.csv",
              float_format="%.6g")
    plot_by_score(settings, "class_std", "std of per-class accuracy",
                  "class-wise accuracy spread vs sparsity", out / "class_std.png")
    plot_by_score(settings, "worst_class", "worst-class accuracy",
                  "worst class vs sparsity", out / "worst_class.png")
    plot_by_score(settings, "top1", "top-1 accuracy", "accuracy vs sparsity", out / "top1.png")
    print(f"figures in {out}: " + ", ".join(sorted(p.name for p in out.glob("*.png"))))
    return out
