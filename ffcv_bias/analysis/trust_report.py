"""Report pieces for the estimates that survive selection (issue 19): the cross-fitted
oracle and selection, the seed-paired Table 1, seed planning, and the record warnings
(determinism failures, classes left out). report.py calls these at a few places.
"""
import html

import numpy as np
import pandas as pd

from ffcv_bias.analysis.calibration import VERDICT_CONFIDENCE, verdict_rows
from ffcv_bias.analysis.records import DETERMINISM_FAILURE
from ffcv_bias.analysis.stats import setting_blocks
from ffcv_bias.analysis.tables import format_setting

# Accuracy columns (fractions in the CSVs) of the new tables, shown in percent.
PERCENT_COLUMNS = {"oracle_gain_in_sample", "oracle_top1_crossfit", "best_top1_crossfit",
                   "oracle_gain_crossfit", "oracle_gain_crossfit_se", "noise_gain_in_sample_mean",
                   "noise_gain_in_sample_sd", "noise_gain_crossfit_mean", "score_crossfit",
                   "top1_crossfit", "worst_class_acc_crossfit", "cost_top1_crossfit",
                   "oracle_acc_crossfit", "sd_diff", "seed_sd", "diff_sd"}
# Long text columns of oracle.csv, shown as sentences rather than in the table.
TEXT_COLUMNS = ["how_much_is_real", "excluded_classes"]

CROSSFIT_NOTE = (
    "How much of the oracle gain is real: the <i>_crossfit</i> columns choose each class's "
    "setting on some seeds and score it on the others (K folds of contiguous seeds, the "
    "same split at every setting, averaged), so selection on noise cannot inflate them; "
    "<i>noise_gain_in_sample_mean</i> is the in-sample gain after shuffling the setting "
    "labels within each seed (no real difference left): what noise alone gives.")
SELECTION_CROSSFIT_NOTE = (
    "Read the <i>_crossfit</i> columns as what each criterion's pick is worth on seeds it "
    "was not chosen on (chosen on the other folds, scored on the held-out fold, averaged); "
    "<i>pick_agreement</i> is the share of folds picking the same setting as all seeds do. "
    "Held-out scores use fewer seeds, so the worst-class ones are, if anything, low.")
PAIRED_NOTE = (
    "Seed-paired Table 1: the same percentages from the one-sided paired t-test on "
    "seed-matched differences (runs of one seed share initialization, data order and "
    "crops), which finds a drop with fewer seeds when seed noise is shared; read it beside "
    "the Welch Table 1 above, which stays the paper's number. A setting whose seeds do not "
    "match the reference's falls back to Welch (<i>test</i> column). Per class: paired.csv.")
POWER_NOTE = (
    "Seed planning: seeds per arm that detect a per-class drop of d points with power 0.8 "
    "at 95% one-sided confidence, for the median and the 90th-percentile class, from the "
    "seed noise of these runs (noncentral t; power.csv has every class, and the power "
    "the seeds run now give).")


def record_warnings(skipped):
    """Lines for records of one run_id whose results differ (a determinism failure)."""
    if skipped is None or not len(skipped):
        return []
    failures = skipped[skipped["reason"].astype(str).str.startswith(DETERMINISM_FAILURE)]
    return [f"{row['run_dir']}: {row['reason']}" for _, row in failures.iterrows()]


def oracle_sentences(oracle):
    """The one-sentence verdict(s) of oracle.csv (how much is real; classes left out)."""
    row = oracle.iloc[0]
    return [str(row[c]) for c in TEXT_COLUMNS if c in oracle and isinstance(row[c], str)
            and row[c]]


def without_text(oracle):
    return oracle.drop(columns=[c for c in TEXT_COLUMNS if c in oracle])


def power_overview(power):
    """Per d: median and 90th-percentile seeds per arm (Welch, paired) over the classes."""
    rows = []
    for drop_points, block in power.groupby("drop_points", sort=True):
        row = {"drop_points": drop_points, "seeds_now": block["seeds_per_arm_now"].iloc[0]}
        for test, sd in (("welch", "seed_sd"), ("paired", "diff_sd")):
            needed = block.loc[block[sd].notna(), f"seeds_per_arm_{test}"].to_numpy(float)
            needed = np.where(np.isnan(needed), np.inf, needed)
            for label, q in (("median", 0.5), ("p90", 0.9)):
                row[f"{test}_{label}"] = (np.quantile(needed, q, method="higher")
                                          if len(needed) else np.nan)
            row[f"power_now_{test}_median"] = block[f"power_now_{test}"].median()
        rows.append(row)
    return pd.DataFrame(rows)


def html_sections(frames, display):
    """The HTML of the new tables; `display` is report._display."""
    parts = []
    if "table1_paired" in frames and not frames["table1_paired"].empty:
        parts.append("<h2>Table 1, seed-paired</h2>"
                     f"<p class='note'>{PAIRED_NOTE}</p>" + display(frames["table1_paired"]))
    if "power" in frames and not frames["power"].empty:
        parts.append("<h2>Seed planning</h2>"
                     f"<p class='note'>{POWER_NOTE}</p>" + display(power_overview(frames["power"])))
    return "\n".join(parts)


def oracle_html(oracle, display):
    sentences = "".join(f"<p><b>{html.escape(s)}</b></p>" for s in oracle_sentences(oracle))
    return sentences + f"<p class='note'>{CROSSFIT_NOTE}</p>" + display(without_text(oracle))


def table1_lines(table1, test_name):
    """stdout: Table 1 beside its measured no-effect rates, and the verdict per setting."""
    lines = [f"  Table 1 ({test_name}), % of classes significantly lower than the reference "
             f"(raw p; 90 / 95 / 99% confidence) | the same with the setting and reference "
             f"labels swapped within seeds (no effect, measured on these runs; nominal "
             f"10 / 5 / 1 holds only for independent runs):"]
    verdicts = verdict_rows(table1)
    for (setting, block), (_, _, verdict) in zip(setting_blocks(table1), verdicts):
        observed = " / ".join(f"{p:.1f}" for p in block["percent_classes"])
        null = " / ".join(f"{p:.1f}" for p in block["null_percent_classes"])
        test = f", {block['test'].iloc[0]}" if "test" in block else ""
        lines.append(f"    {format_setting(setting):>12}: {observed} | no effect: {null}  "
                     f"(n = {block['n_classes_tested'].iloc[0]} classes{test})")
        lines.append(f"    {'':>12}  at {VERDICT_CONFIDENCE}%: {verdict}")
    return lines


def summary_lines(frames):
    """stdout lines: cross-fitted oracle beside the in-sample one, paired Table 1, plan."""
    from ffcv_bias.analysis.power import planning_line
    lines = []
    oracle = frames["oracle"].iloc[0]
    if "oracle_top1_crossfit" in oracle:
        lines.append(
            f"  oracle in-sample {100 * oracle['oracle_top1']:.2f}% "
            f"({100 * oracle['oracle_gain_in_sample']:+.2f} pts) | cross-fitted "
            f"{100 * oracle['oracle_top1_crossfit']:.2f}% "
            f"({100 * oracle['oracle_gain_crossfit']:+.2f} pts over the cross-fitted best "
            f"single setting, {oracle['crossfit_folds']} folds of {oracle['n_seeds']} seeds)")
        lines += [f"  {s}" for s in oracle_sentences(frames["oracle"])]
    if "table1_paired" in frames and not frames["table1_paired"].empty:
        lines += table1_lines(frames["table1_paired"], "seed-paired, beside the Welch one")
    if "power" in frames:
        lines.append(f"  {planning_line(frames['power'])}")
    return lines
