"""Per-protocol analysis: how much of a class's change is the test protocol.

A run's main protocol is validation.resolution @ validation.crop_ratio (its summary's
top1 / per_class_acc); extra ones are summary.json's `protocols` entries (written by the
trainer with validation.protocols, or later by `python -m ffcv_bias.evaluate`).

- `select_protocol(run_set, P)`: the runs as seen under protocol P (`--protocol P`); a run
  without P is skipped with the command that adds it.
- `protocol_frames(...)`: with >= 2 protocols common to all runs,
    protocols.csv           mean top-1 (± sd, n) of each setting under each protocol, plus
                            each arm's best protocol, cross-fitted and in-sample;
    protocol_choice.csv     which protocol each half of each arm's seeds chose;
    protocol_per_class.csv  per class and setting: the change from the reference under the
                            main protocol, under each arm's cross-fitted best protocol, and
                            the difference (the part the protocol accounts for), with
                            one-sided Welch p-values for both.
  Cross-fitting (why: a protocol picked on the seeds it is scored on flatters its arm): an
  arm's seeds are split in two halves (even / odd positions in seed order); the protocol
  with the best mean top-1 on one half scores the runs of the other half, and vice versa.
  Every run thus gets an honest "best protocol" accuracy, and the Welch test runs on those.
  The in-sample pick (chosen and scored on all seeds) is shown beside it, labelled.
"""
import numpy as np
import pandas as pd

from ffcv_bias.analysis import stats, tables
from ffcv_bias.analysis.records import AnalysisError, RunSet, SkippedRun
from ffcv_bias.record.protocols import ProtocolError, main_protocol, parse_protocol

MAIN_LABEL = "main"   # the main protocol of records whose config has no validation section
CROSS_FITTED = "best (cross-fitted)"
IN_SAMPLE = "best (in-sample)"


def main_protocol_name(run):
    try:
        return main_protocol(run.config).name
    except (KeyError, TypeError, ValueError):
        return MAIN_LABEL


def run_protocol_names(run):
    """The run's main protocol first, then its extra ones in the summary's order."""
    names = [main_protocol_name(run)]
    names += [name for name in run.summary.get("protocols", {}) if name not in names]
    return names


def protocol_result(run, name):
    """{top1, top5, per_class_acc} of `run` under protocol `name`, or None."""
    if name == main_protocol_name(run):
        return run.summary
    return run.summary.get("protocols", {}).get(name)


def common_protocols(runs):
    """Protocols every run has, in the first run's order."""
    shared = run_protocol_names(runs[0])
    for run in runs[1:]:
        have = set(run_protocol_names(run))
        shared = [name for name in shared if name in have]
    return shared


def canonical_name(name):
    """'40@1' -> '40@1.0'; 'main' stays (each run's main protocol, whatever it is)."""
    if name == MAIN_LABEL:
        return name
    try:
        return parse_protocol(name).name
    except ProtocolError as error:
        raise AnalysisError(f"--protocol: {error}") from None


def select_protocol(run_set, name):
    """The RunSet as measured under protocol `name` (same runs minus those lacking it);
    'main' = each run's main protocol."""
    name = canonical_name(name)
    if name == MAIN_LABEL:
        return run_set
    kept, skipped = [], list(run_set.skipped)
    for index, run in enumerate(run_set.runs):
        result = protocol_result(run, name)
        if result is None or result.get("per_class_acc") is None:
            skipped.append(SkippedRun(
                run.run_dir, run.run_id, "no such protocol",
                f"no test protocol {name} (add it: python -m ffcv_bias.evaluate "
                f"{run.run_dir} --protocols {name})", run.config))
            continue
        kept.append((index, result))
    if not kept:
        available = sorted({p for run in run_set.runs for p in run_protocol_names(run)})
        raise AnalysisError(f"no run has test protocol {name} (protocols present: "
                            f"{', '.join(available)})")
    rows = [index for index, _ in kept]
    return RunSet(
        runs=[run_set.runs[i] for i in rows],
        per_class_acc=np.array([r["per_class_acc"] for _, r in kept], dtype=np.float64),
        top1=np.array([r["top1"] for _, r in kept], dtype=np.float64),
        top5=np.array([r.get("top5", np.nan) for _, r in kept], dtype=np.float64),
        class_names=run_set.class_names, class_counts=run_set.class_counts,
        n_val=run_set.n_val, skipped=skipped)


# ----------------------------------------------------------------------------------------
# Cross-fitted choice of each arm's best protocol
# ----------------------------------------------------------------------------------------

def seed_halves(seeds):
    """(positions of half A, half B): even / odd places in seed order."""
    order = np.argsort(np.asarray(seeds, dtype=float), kind="stable")
    return order[0::2], order[1::2]


def best_protocol(top1_by_protocol, positions):
    """Index of the protocol with the best mean top-1 over `positions` (ties: the first)."""
    return int(np.argmax([top1[positions].mean() for top1 in top1_by_protocol]))


def cross_fit_arm(acc_by_protocol, top1_by_protocol, seeds):
    """Per-run accuracies under the protocol chosen on the arm's other half of seeds.

    acc_by_protocol: [P] arrays [n, C]; top1_by_protocol: [P] arrays [n].
    Returns (acc [n, C], top1 [n], [(scored positions, chosen protocol index)]).
    """
    n_runs = len(seeds)
    acc = np.full(acc_by_protocol[0].shape, np.nan)
    top1 = np.full(n_runs, np.nan)
    choices = []
    if n_runs < 2:
        return acc, top1, choices
    half_a, half_b = seed_halves(seeds)
    for scored, chosen_on in ((half_a, half_b), (half_b, half_a)):
        chosen = best_protocol(top1_by_protocol, chosen_on)
        acc[scored] = acc_by_protocol[chosen][scored]
        top1[scored] = top1_by_protocol[chosen][scored]
        choices.append((scored, chosen_on, chosen))
    return acc, top1, choices


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------

def protocol_setting_data(run_set, rows, key, reference, names):
    """{protocol: SettingData} for the runs `rows`; every protocol holds the same runs."""
    by_protocol = {}
    for name in names:
        selected = select_protocol(run_set, name)
        if len(selected.runs) != len(run_set.runs):
            raise AnalysisError(f"test protocol {name} is missing from some runs")
        by_protocol[name] = tables.split_by_setting(selected, rows, key, reference)
    return by_protocol


def _mean_sd(values):
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    sd = values.std(ddof=1) if len(values) > 1 else np.nan
    return (values.mean() if len(values) else np.nan), sd, len(values)


def protocol_frames(by_protocol):
    """protocols, protocol_choice and protocol_per_class frames (see module docstring)."""
    names = list(by_protocol)
    first = by_protocol[names[0]]
    fits, in_sample = [], []
    for index in range(len(first.settings)):
        acc = [by_protocol[n].acc[index] for n in names]
        top1 = [by_protocol[n].top1[index] for n in names]
        fits.append(cross_fit_arm(acc, top1, first.seeds[index]))
        in_sample.append(best_protocol(top1, np.arange(len(top1[0]))))
    return {"protocols": _summary_frame(by_protocol, fits, in_sample),
            "protocol_choice": _choice_frame(first, names, fits),
            "protocol_per_class": _per_class_frame(by_protocol, fits, in_sample)}


def _summary_frame(by_protocol, fits, in_sample):
    names = list(by_protocol)
    first = by_protocol[names[0]]
    rows = []
    for index, setting in enumerate(first.settings):
        for name in names:
            mean, sd, n = _mean_sd(by_protocol[name].top1[index])
            rows.append({"setting": setting, "protocol": name, "n_runs": n,
                         "top1_mean": mean, "top1_sd": sd})
        mean, sd, n = _mean_sd(fits[index][1])
        rows.append({"setting": setting, "protocol": CROSS_FITTED, "n_runs": n,
                     "top1_mean": mean, "top1_sd": sd})
        chosen = names[in_sample[index]]
        mean, sd, n = _mean_sd(by_protocol[chosen].top1[index])
        rows.append({"setting": setting, "protocol": f"{IN_SAMPLE}: {chosen}", "n_runs": n,
                     "top1_mean": mean, "top1_sd": sd})
    return pd.DataFrame(rows, columns=["setting", "protocol", "n_runs", "top1_mean",
                                       "top1_sd"])


def _choice_frame(first, names, fits):
    rows = []
    for index, setting in enumerate(first.settings):
        seeds = np.asarray(first.seeds[index], dtype=object)
        for scored, chosen_on, chosen in fits[index][2]:
            rows.append({"setting": setting, "protocol": names[chosen],
                         "chosen_on_seeds": " ".join(map(str, sorted(seeds[chosen_on]))),
                         "scored_on_seeds": " ".join(map(str, sorted(seeds[scored])))})
    return pd.DataFrame(rows, columns=["setting", "protocol", "chosen_on_seeds",
                                       "scored_on_seeds"])


def _per_class_frame(by_protocol, fits, in_sample):
    names = list(by_protocol)
    main = by_protocol[names[0]]
    ref = main.reference_index
    ref_fit = fits[ref][0]
    ref_in_sample = by_protocol[names[in_sample[ref]]].acc[ref]
    compared = tables.compared_index(main.settings, main.reference,
                                     [t.mean() for t in main.top1])
    parts = []
    for index, setting in enumerate(main.settings):
        if index == ref:
            continue
        arm_fit = fits[index][0]
        change_main = main.acc[index].mean(axis=0) - main.acc[ref].mean(axis=0)
        change_best = np.nanmean(arm_fit, axis=0) - np.nanmean(ref_fit, axis=0)
        arm_in_sample = by_protocol[names[in_sample[index]]].acc[index]
        frame = pd.DataFrame({
            "setting": [setting] * main.num_classes,
            "is_compared": index == compared,   # the setting the main report compares
            "class": np.arange(main.num_classes),
            "class_name": main.class_names,
            "n_runs": len(main.acc[index]), "n_runs_ref": len(main.acc[ref]),
            "change_main": change_main,
            "p_less_main": stats.welch_less(main.acc[index], main.acc[ref])["p_less"],
            "change_best_cross_fitted": change_best,
            "p_less_best_cross_fitted": _welch_or_nan(arm_fit, ref_fit),
            "protocol_part": change_main - change_best,
            "change_best_in_sample": arm_in_sample.mean(axis=0) - ref_in_sample.mean(axis=0),
        })
        for name in names:
            frame[f"mean_{name}"] = by_protocol[name].acc[index].mean(axis=0)
            frame[f"mean_ref_{name}"] = by_protocol[name].acc[ref].mean(axis=0)
        parts.append(frame)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _welch_or_nan(arm, ref):
    if np.isnan(arm).any() or np.isnan(ref).any():
        return np.full(arm.shape[1], np.nan)
    return stats.welch_less(arm, ref)["p_less"]


def protocol_analysis(run_set, rows, key, reference):
    """(frames, by_protocol) when the runs share >= 2 protocols, else (None, None)."""
    runs = [run_set.runs[i] for i in rows]
    names = common_protocols(runs)
    if len(names) < 2:
        return None, None
    by_protocol = protocol_setting_data(run_set, rows, key, reference, names)
    return protocol_frames(by_protocol), by_protocol


# ----------------------------------------------------------------------------------------
# Text and figure
# ----------------------------------------------------------------------------------------

def summary_lines(frames, n_classes=5):
    """A few lines: mean top-1 per protocol, and the classes whose loss survives (at the
    setting the main report compares)."""
    lines = ["  test protocols (mean top-1 %, n runs; best = each arm's own best protocol, "
             "chosen on the other half of its seeds):"]
    summary = frames["protocols"]
    for setting, block in summary.groupby("setting", sort=False):
        cells = ", ".join(f"{row['protocol']} {100 * row['top1_mean']:.2f} (n={row['n_runs']})"
                          for _, row in block.iterrows())
        lines.append(f"    {tables.format_setting(setting):>8}: {cells}")
    per_class = frames["protocol_per_class"]
    per_class = per_class[per_class["is_compared"].astype(bool)] if len(per_class) else per_class
    if len(per_class):
        compared_setting = per_class["setting"].iloc[0]
        worst = per_class.sort_values("change_main").head(n_classes)
        lines.append(f"  at {tables.format_setting(compared_setting)}, per-class change under "
                     "the main protocol -> under both arms' best protocol (cross-fitted):")
        for _, row in worst.iterrows():
            lines.append(f"    {row['class_name'][:24]:<24} {100 * row['change_main']:+6.1f} "
                         f"(p={row['p_less_main']:.2g}) -> "
                         f"{100 * row['change_best_cross_fitted']:+6.1f} "
                         f"(p={row['p_less_best_cross_fitted']:.2g}); protocol part "
                         f"{100 * row['protocol_part']:+.1f} pts")
    return lines


def protocol_figure(by_protocol, frames, path):
    """Left: mean top-1 per setting under each protocol; right: per-class change at the
    compared setting under the main protocol and under the cross-fitted best."""
    from ffcv_bias.analysis.figures import _band, _save, _seed_mean_sd, _settings_axis
    from ffcv_bias.common import plots
    plt = plots.pyplot()
    names = list(by_protocol)
    first = by_protocol[names[0]]
    x = np.arange(len(first.settings))
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.2, top=0.86, wspace=0.3)
    for name in names:
        mean, sd = _seed_mean_sd(by_protocol[name].top1)
        main_mark = " (main)" if name == names[0] and name != MAIN_LABEL else ""
        _band(left, x, mean, sd, label=name + main_mark)
    best = tables.rows_where(frames["protocols"], "protocol", CROSS_FITTED)
    left.plot(x, 100 * best["top1_mean"].to_numpy(), color="black", linestyle="--",
              label=CROSS_FITTED)
    left.set_ylabel("top-1 accuracy (%)")
    left.set_title("Mean accuracy under each test protocol (band: ± std over seeds)")
    left.legend(loc="best", fontsize=8)
    _settings_axis(left, first)
    per_class = frames["protocol_per_class"]
    per_class = per_class[per_class["is_compared"].astype(bool)]
    compared_setting = per_class["setting"].iloc[0]
    order = np.argsort(per_class["change_main"].to_numpy(), kind="stable")
    y = np.arange(len(order))
    right.barh(y - 0.2, 100 * per_class["change_main"].to_numpy()[order], height=0.4,
               color="tab:gray", label=f"main protocol {names[0]}")
    right.barh(y + 0.2, 100 * per_class["change_best_cross_fitted"].to_numpy()[order],
               height=0.4, color="tab:red", label="each arm's best protocol (cross-fitted)")
    right.set_yticks(y)
    right.set_yticklabels([str(n)[:20] for n in per_class["class_name"].to_numpy()[order]],
                          fontsize=7)
    right.axvline(0, color="black", linewidth=1)
    right.set_xlabel(f"per-class change (% points), reference -> "
                     f"{tables.format_setting(compared_setting)}")
    right.set_title("What survives the best protocol for both arms")
    right.legend(loc="best", fontsize=8)
    right.grid(alpha=0.3)
    figure.suptitle(f"Test protocols vs {first.key}")
    _save(figure, path)


PROTOCOL_FRAME_NAMES = ("protocols", "protocol_choice", "protocol_per_class")
PROTOCOL_FIGURE = "protocols.png"
PROTOCOL_NOTE = ("Each setting's mean top-1 under every test protocol (RES@CROP_RATIO), "
                 "and under each arm's own best protocol: chosen on half of the arm's seeds, "
                 "scored on the other half, and swapped (cross-fitted; the in-sample pick, "
                 "chosen on the scored seeds, is optimistic and shown for comparison). "
                 "protocol_part = change under the main protocol - change under both arms' "
                 "best protocol: the share of a class's change that the test protocol, not "
                 "the training, accounts for.")


def write_protocol_outputs(frames, by_protocol, out_dir, make_plots, write_csv):
    """The CSVs and (optionally) the figure; returns the figure's file name or None."""
    for name in PROTOCOL_FRAME_NAMES:
        write_csv(frames[name], out_dir / f"{name}.csv")
    if not make_plots or frames["protocol_per_class"].empty:
        return None
    protocol_figure(by_protocol, frames, out_dir / PROTOCOL_FIGURE)
    return PROTOCOL_FIGURE


def protocol_section(frames, figure_files, display):
    """The report's HTML section (display: the report's DataFrame -> HTML function)."""
    parts = [f"<h2>Test protocols</h2><p class='note'>{PROTOCOL_NOTE}</p>"]
    if "protocols" in figure_files:
        parts.append(f"<img src='{figure_files['protocols']}' alt='protocols'>")
    parts.append(display(frames["protocols"]))
    per_class = frames["protocol_per_class"]
    if len(per_class):
        compared = per_class[per_class["is_compared"].astype(bool)]
        columns = ["setting", "class_name", "n_runs", "n_runs_ref", "change_main",
                   "p_less_main", "change_best_cross_fitted", "p_less_best_cross_fitted",
                   "protocol_part", "change_best_in_sample"]
        parts.append("<h3>Per class at the compared setting</h3>"
                     + display(compared.sort_values("change_main")[columns]))
    parts.append("<p><a href='protocols.csv'>protocols.csv</a> &middot; "
                 "<a href='protocol_choice.csv'>protocol_choice.csv</a> &middot; "
                 "<a href='protocol_per_class.csv'>protocol_per_class.csv</a></p>")
    return "".join(parts)
