"""index.html (one page per analysis) and the short text summary printed on stdout.

Tables show accuracies in percent; the CSV files beside the page keep fractions.
"""
import html
import time

import numpy as np
import pandas as pd

from ffcv_bias.analysis import calibration, trust_report, verdicts
from ffcv_bias.analysis.stats import setting_blocks
from ffcv_bias.analysis.tables import compared_index, format_setting, rows_where
from ffcv_bias.analysis.where import OUTSIDE_STATE
from ffcv_bias.common.atomic import write_text

# Columns holding accuracies (fractions in the CSVs), shown as percentages in the page.
PERCENT_COLUMNS = {"top1", "top5", "mean_ref", "mean", "diff", "mean_acc", "std_acc",
                   "best_top1", "reference_top1", "oracle_top1", "oracle_gain",
                   "best_top1_class_weighted", "score", "worst_class_acc", "cost_top1",
                   "oracle_acc", "best_setting_acc", "reference_acc",
                   "lost", "share", "rate_ref", "rate"} | {
    f"{name}_{stat}" for name in ("top1", "top5", "class_std", "worst_class", "worst10pct")
    for stat in ("mean", "sd")} | trust_report.PERCENT_COLUMNS | {
    # analysis/protocols.py's per-class table (its mean_<protocol> columns: _is_percent)
    "change_main", "change_best_cross_fitted", "protocol_part", "change_best_in_sample"}


def _is_percent(column):
    return column in PERCENT_COLUMNS or column.startswith("mean_")

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em;
        display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; max-width: 60em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.warn { color: #a40; }
.answer { background: #f6f8fb; border: 1px solid #ccd; padding: 0.2em 1em 0.5em; }
.answer td, .answer th { text-align: left; vertical-align: top; }
"""

TABLE1_NOTE = (
    "Percentage of classes whose accuracy is significantly <b>lower</b> at the setting than at "
    "the reference: the one-sided Welch test (H0: accuracy at the setting &ge; accuracy at the "
    "reference) rejects at that confidence (p_less &lt; 1 &minus; confidence). This is the "
    "paper's Table 1 (ResNet-50 random crop: 5.9 / 4.5 / 2.6%). <b>What no effect gives is "
    "measured, not assumed</b>: the nominal 10 / 5 / 1% (<i>expected_if_null</i>) holds only "
    "for independent runs, and runs of one seed share initialization, data order and crops "
    "(Welch then rejects far less often). The <i>no effect (measured)</i> columns swap the "
    "setting and reference labels within half of the seeds and count again (the mean over "
    "such swaps); the verdict's <i>calibration p</i> is the exact permutation p of the "
    "records' evidence over every swap pattern (at least 1/2<sup>seeds</sup>: a pilot of 4 "
    "seeds cannot be told from noise). <i>percent_classes_bh</i> controls the false "
    "discovery rate within the "
    "setting (Benjamini&ndash;Hochberg); <i>q_less_all_settings</i> in welch.csv corrects "
    "across all settings. Tied arms (every run of each arm equal, common at 50 images per "
    "class) get the exact randomization p (1/6 at 2 + 2 seeds), never 0; arms with fewer "
    "than 2 runs are not tested. docs/statistics.md has the rules and their measured "
    "null behaviour.")
ORACLE_NOTE = (
    "Oracle: every class takes the setting where its mean accuracy (over seeds) is highest; "
    "its top-1 weights classes by their val images. It is <b>optimistically biased</b>: the "
    "setting is chosen on the same val set it is scored on, so part of the gain is selection "
    "on noise. It bounds what class-dependent regularization could reach (paper: 77.14% at "
    "tau = 8%, 77.29% at tau = 10%, oracle 79.37%).")
SELECTION_NOTE = (
    "The setting each criterion picks, on per-class accuracy averaged over seeds. "
    "<i>cost_top1</i> is the mean top-1 given up relative to the mean-accuracy pick: the "
    "price of choosing for the worst classes. Ties go to the setting nearest the reference.")
FLOWS_NOTE = (
    "How to read: each bar / group of rows is a class the setting hurts (one-sided Welch "
    "test with Benjamini&ndash;Hochberg q_less &lt; 0.05, or the largest drops when none "
    "is significant, as <i>selected_by</i> says); <i>lost</i> is the net accuracy it lost "
    "against the reference (mean over seeds, points). Its images move both ways: "
    "<i>gross_out</i> is the points of its images newly predicted as other classes "
    "(rows <i>to</i>, bars right of 0) and <i>gross_back</i> the points that came back "
    "from confusions that fell (rows <i>back from</i>, bars left of 0), so "
    "lost = gross_out &minus; gross_back (the diamond). <i>change</i> is the row's signed "
    "change in the share of the hurt class's images predicted as <i>other_name</i>; the "
    "changes of all classes sum to <i>lost</i>. <i>share</i> is the row's part of its own "
    "direction's gross flow (|change| / gross_out or / gross_back): the shares of one "
    "direction sum to 100% when all its classes are listed (at most 5 each way; grey in "
    "the figure: the rest). <i>rate_ref</i> / <i>rate</i> are how often the hurt class is "
    "predicted as that class at the reference / the setting; <i>n_ref</i>, <i>n</i>: "
    "seeds. A large flow to one class means the two classes are being confused, not that "
    "the hurt class is destroyed. All settings: confusion_flows.csv; the mean confusion "
    "matrices: confusion.csv.")
WELCH_NOTE = (
    "Welch one-sided test per class (scipy.stats.ttest_ind(setting, reference, "
    "equal_var=False, alternative='less')); <i>diff</i> = mean &minus; mean_ref; "
    "<i>hedges_g</i> = Cohen's d with pooled SD, small-sample corrected; <i>q_less</i> = "
    "Benjamini&ndash;Hochberg within the setting. Full table: welch.csv.")


def _display(frame, max_rows=None):
    shown = frame.head(max_rows).copy() if max_rows else frame.copy()
    for column in shown.columns:
        if _is_percent(column):
            shown[column] = 100 * shown[column].astype(float)
        if column == "setting" or column == "best_setting" or column.endswith("_setting"):
            shown[column] = [format_setting(v) for v in shown[column]]
    shown = shown.rename(columns={c: f"{c} (%)" for c in shown.columns if _is_percent(c)})
    return shown.to_html(index=False, escape=True, na_rep="",
                         float_format=lambda v: f"{v:.4g}" if abs(v) < 1e-3 else f"{v:.2f}")


def _class_extremes(frames, n=15):
    """Welch rows at the compared setting: most significant losers, and the top gainers."""
    settings = frames["settings"]
    values = settings["setting"].tolist()
    reference = values[int(np.flatnonzero(settings["is_reference"].to_numpy())[0])]
    setting = values[compared_index(values, reference, settings["top1_mean"].to_numpy())]
    welch = frames["welch"]
    rows = rows_where(welch, "setting", setting)
    columns = ["class", "class_name", "mean_ref", "mean", "diff", "hedges_g", "p_less", "q_less"]
    # Untested classes (fewer than 2 runs) have NaN p: then the largest drops come first.
    order = ["diff"] if rows["p_less"].isna().all() else ["p_less", "diff"]
    losers = rows[rows["diff"] < 0].sort_values(order, kind="stable")[columns].head(n)
    gainers = rows[rows["diff"] > 0].sort_values("diff", ascending=False,
                                                 kind="stable")[columns].head(n)
    return setting, losers, gainers


def _table1_wide(table1):
    """One row per setting: % flagged and % under no effect (measured) per confidence, and
    the verdict at 95%."""
    if table1.empty:
        return table1
    rows = []
    verdicts = {format_setting(s): v for s, _, v in calibration.verdict_rows(table1)}
    for setting, block in setting_blocks(table1):
        row = {"setting": setting}
        for _, line in block.iterrows():
            row[f"{line['confidence']}%"] = line["percent_classes"]
            row[f"{line['confidence']}% no effect (measured)"] = line["null_percent_classes"]
        row["n classes"] = block["n_classes_tested"].iloc[0]
        row[f"at {calibration.VERDICT_CONFIDENCE}%"] = verdicts.get(format_setting(setting), "")
        rows.append(row)
    return pd.DataFrame(rows)


def _warnings(settings):
    lines = []
    if len(settings) == 1:
        lines.append("only one value of the varied key: nothing to compare with the reference")
    for _, row in settings.iterrows():
        if row["missing_seeds"]:
            lines.append(f"setting {format_setting(row['setting'])} lacks seed(s) "
                         f"{row['missing_seeds']} that other settings have")
        if row["n_runs"] < 2:
            lines.append(f"setting {format_setting(row['setting'])} has {row['n_runs']} run: "
                         f"no Welch test against it (needs at least 2 seeds)")
    return lines


def _header(title, context, data=None):
    parts = [f"<h1>{html.escape(title)}</h1><p>"]
    parts.append(f"Runs read from {html.escape(', '.join(context['roots']))}. "
                 f"<b>{context['n_complete']}</b> complete run(s) analysed, "
                 f"<b>{len(context['skipped'])}</b> skipped (incomplete, failed, duplicate; "
                 f"see below and skipped.csv). ")
    if data is not None:
        parts.append(f"Varied key <b>{html.escape(data.key)}</b>, {len(data.settings)} settings, "
                     f"reference <b>{html.escape(format_setting(data.reference))}</b>, "
                     f"{data.num_classes} classes (class weights: {context['class_weighting']}). ")
    parts.append(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>")
    return "".join(parts)


def _page(title, body):
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{body}</body></html>\n")


def write_group_index(out_dir, data, frames, figure_files, context):
    """index.html for one analysis (one value of the second key, or the only one)."""
    title = f"Per-class effect of {data.key}"
    if context.get("group_label"):
        title += f" ({context['group_label']})"
    setting, losers, gainers = _class_extremes(frames)
    body = [_header(title, context, data)]
    warnings = _warnings(frames["settings"]) + trust_report.record_warnings(context["skipped"])
    if warnings:
        body.append("<ul class='warn'>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
                    + "</ul>")
    body.append(answer_panel(frames, data))
    body.append("<h2>Settings</h2>" + _display(frames["settings"]))
    captions = (("accuracy_curves", "Mean accuracy and the classes that lose / gain most"),
                ("class_spread", "Spread of per-class accuracy and the worst classes"),
                ("change_histogram", "Per-class change, reference to compared setting"))
    for name, caption in captions:
        if name in figure_files:
            body.append(f"<h2>{caption}</h2><img src='{figure_files[name]}' alt='{name}'>")
    body.append("<h2>Table 1: classes significantly hurt</h2>"
                f"<p class='note'>{TABLE1_NOTE}</p>" + _display(_table1_wide(frames["table1"]))
                + "<details><summary>with counts and BH</summary>" + _display(frames["table1"])
                + "</details>")
    body.append(trust_report.html_sections(frames, _display))
    body.append(f"<h2>Oracle</h2><p class='note'>{ORACLE_NOTE}</p>"
                + trust_report.oracle_html(frames["oracle"], _display))
    body.append("<h2>Model selection: the price of fairness</h2>"
                f"<p class='note'>{SELECTION_NOTE} {trust_report.SELECTION_CROSSFIT_NOTE}</p>"
                + _display(frames["selection"]))
    if "protocols" in frames:
        from ffcv_bias.analysis.protocols import protocol_section
        body.append(protocol_section(frames, figure_files, _display))
    compared = html.escape(format_setting(setting))
    body.append(f"<h2>Classes hurt most at {compared} (smallest p_less)</h2>"
                f"<p class='note'>{WELCH_NOTE}</p>" + _display(losers))
    body.append(f"<h2>Classes helped most at {compared}</h2>" + _display(gainers))
    body.append(_flows_section(frames, setting, figure_files))
    if len(context["skipped"]):
        body.append("<h2>Skipped runs</h2>" + _display(context["skipped"], max_rows=200))
    body.append("<h2>Files</h2><p>" + " &middot; ".join(
        f"<a href='{n}.csv'>{n}.csv</a>" for n in ("runs", "settings", "per_class", "welch",
                                                   "table1", "oracle", "oracle_per_class",
                                                   "selection", "paired", "table1_paired",
                                                   "power", "confusion",
                                                   "confusion_flows")) + "</p>")
    write_text(out_dir / "index.html", _page(title, "\n".join(body)))


ANSWER_NOTE = (
    "Per setting against the reference: the change of the mean top-1 (one-sided Welch "
    "over the seeds' top-1, n = seeds per arm), the classes that fall significantly (one-sided "
    "Welch per class, Benjamini&ndash;Hochberg q &lt; 0.05 within the setting), whether "
    "that is the paper's trade-off, and whether the count of falling classes is more than "
    "swapping the setting and reference labels within seeds gives (Table 1's null "
    "calibration at 95%). Details below.")


def answer_panel(frames, data):
    """The report's opening: one row per setting from analysis/verdicts.py."""
    results = verdicts.setting_verdicts(frames["runs"], frames["welch"], frames["table1"],
                                        data.reference)
    if not results:
        return ""
    rows = []
    for result in results:
        rows.append(
            f"<tr><td>{html.escape(format_setting(result['setting']))}</td>"
            f"<td>{result['rise']:+.2f} pts (p = {result['p_rise']:.2g}, n = {result['n']} / "
            f"{result['n_ref']})</td>"
            f"<td>{html.escape(verdicts.losers_text(result['losers']))}</td>"
            f"<td>{html.escape(result['tradeoff'])}</td>"
            f"<td>{html.escape(result['calibration'])}</td></tr>")
    return ("<div class='answer'><h2>The answer</h2>"
            f"<p class='note'>{ANSWER_NOTE}</p><table><tr><th>setting</th>"
            "<th>mean top-1 vs reference</th><th>classes that fall (BH q &lt; 0.05)</th>"
            "<th>trade-off</th><th>per-class findings at this seed count</th></tr>"
            + "".join(rows) + "</table></div>")


def _flows_section(frames, setting, figure_files, max_rows=40):
    """Confusion flows at the compared setting: the figure, the first rows, one note."""
    title = f"<h2>Where the hurt classes' predictions went at {html.escape(format_setting(setting))}</h2>"
    if frames["confusion"].empty:
        return title + ("<p class='note'>No confusion flows: no run of the reference kept "
                        "its predictions (val_preds.npy, or val_logits.npy, with "
                        "val_labels.npy).</p>")
    flows = rows_where(frames["confusion_flows"], "setting", setting)
    if flows.empty:
        return title + "<p class='note'>No class loses accuracy at this setting.</p>"
    figure = (f"<img src='{figure_files['confusion_flows']}' alt='confusion flows'>"
              if "confusion_flows" in figure_files else "")
    shown = flows.drop(columns=["setting"])
    # Flows are points of the class's images (fractions in the CSV), not accuracies.
    for column in ("lost", "gross_out", "gross_back", "change"):
        shown[column] = 100 * shown[column].astype(float)
    shown = shown.rename(columns={c: f"{c} (pts)" for c in
                                  ("lost", "gross_out", "gross_back", "change")})
    return title + f"<p class='note'>{FLOWS_NOTE}</p>" + figure + _display(shown, max_rows)


def flow_lines(frames, setting, n_classes=3, n_absorbers=3):
    """'Shirt -5.0 pts net (n = 4 / 4 seeds): +20.0 went to Coat and +1.0 to Dress; -16.0
    came back from T-shirt/top' for the first hurt classes: the signed changes (points of
    the class's images predicted as each other class) add up to the net loss, the
    classes not named summed as 'others'."""
    if "confusion_flows" not in frames:
        return []
    flows = rows_where(frames["confusion_flows"], "setting", setting)
    lines = []
    for class_index in list(dict.fromkeys(flows["class"]))[:n_classes]:
        block = flows[flows["class"] == class_index]
        first = block.iloc[0]
        parts = []
        for direction, verb, gross, sign in (("to", "went to", first["gross_out"], 1),
                                             ("back from", "came back from",
                                              first["gross_back"], -1)):
            named = block[block["direction"] == direction].head(n_absorbers)
            words = [f"{100 * row['change']:+.1f} {verb if k == 0 else direction.split()[-1]}"
                     f" {row['other_name']}" for k, (_, row) in enumerate(named.iterrows())]
            rest = 100 * (float(gross) - named["change"].abs().sum())
            if round(rest, 1) > 0:
                words.append(f"{sign * rest:+.1f} {verb if not words else direction.split()[-1]}"
                             " others")
            if words:
                parts.append(", ".join(words[:-1]) + (" and " if len(words) > 1 else "")
                             + words[-1])
        lines.append(f"    {first['class_name'][:30]:<30} -{100 * first['lost']:.1f} pts net "
                     f"(n = {first['n_ref']} / {first['n']} seeds): " + "; ".join(parts))
    return lines


def write_top_index(out_dir, combined, links, context):
    """index.html above the per-group reports (two varied keys)."""
    first, second = context["vary_keys"]
    title = f"Per-class effect of {first}, for each {second}"
    body = [_header(title, context)]
    body.append("<p class='note'>One complete report per value of "
                f"{html.escape(second)}; the tables below combine them (column "
                f"{html.escape(second)}).</p><ul>")
    body += [f"<li><a href='{folder}/index.html'>{html.escape(label)}</a></li>"
             for label, folder in links]
    body.append("</ul>")
    for label, folder in links:
        body.append(f"<h3>{html.escape(label)}</h3>"
                    f"<img src='{folder}/accuracy_curves.png' alt='{html.escape(label)}'>")
    body.append(f"<h2>Table 1</h2><p class='note'>{TABLE1_NOTE}</p>" + _display(combined["table1"]))
    body.append(f"<h2>Oracle</h2><p class='note'>{ORACLE_NOTE} {trust_report.CROSSFIT_NOTE}"
                "</p>" + _display(trust_report.without_text(combined["oracle"])))
    body.append(f"<h2>Table 1, seed-paired</h2><p class='note'>{trust_report.PAIRED_NOTE}</p>"
                + _display(combined["table1_paired"]))
    body.append(f"<h2>Selection</h2><p class='note'>{SELECTION_NOTE}</p>"
                + _display(combined["selection"]))
    if len(context["skipped"]):
        body.append("<h2>Skipped runs</h2>" + _display(context["skipped"], max_rows=200))
    write_text(out_dir / "index.html", _page(title, "\n".join(body)))


# ----------------------------------------------------------------------------------------
# stdout
# ----------------------------------------------------------------------------------------

def _group_frames(frames, vary_keys):
    if len(vary_keys) == 1:
        return [(None, frames)]
    key = vary_keys[1]
    groups = []
    for value in dict.fromkeys(frames["settings"][key].tolist()):
        groups.append((f"{key} = {format_setting(value)}",
                       {name: rows_where(frame, key, value).drop(columns=key)
                        for name, frame in frames.items() if name != "skipped"}))
    return groups


def _summary_of_group(frames, n_losers=5):
    lines = []
    settings = frames["settings"]
    lines.append(f"  {'setting':>12} {'runs':>5} {'top-1 % (± sd)':>16} {'worst class %':>14}"
                 f" {'class std pts':>14}")
    for _, row in settings.iterrows():
        label = format_setting(row["setting"]) + (" (ref)" if row["is_reference"] else "")
        top1_sd = 100 * np.nan_to_num(row["top1_sd"])
        lines.append(f"  {label:>12} {row['n_runs']:>5} {100 * row['top1_mean']:>8.2f} ± "
                     f"{top1_sd:<5.2f} {100 * row['worst_class_mean']:>14.2f} "
                     f"{100 * row['class_std_mean']:>14.2f}")
    if not frames["welch"].empty:
        setting, losers, _ = _class_extremes(frames, n=n_losers)
        lines.append(f"  classes losing most at {format_setting(setting)} "
                     "(one-sided Welch vs reference):")
        for _, row in losers.iterrows():
            lines.append(f"    {row['class_name'][:30]:<30} {100 * row['diff']:+7.2f} pts  "
                         f"p={row['p_less']:.2g}  q={row['q_less']:.2g}")
        lines += trust_report.table1_lines(frames["table1"], "Welch")
        compared = _class_extremes(frames, n=1)[0]
        flows = flow_lines(frames, compared)
        if flows:
            lines.append(f"  where the hurt classes' predictions went at "
                         f"{format_setting(compared)} (points of the class's images; "
                         f"confusion_flows.csv):")
            lines += flows
    oracle = frames["oracle"].iloc[0]
    lines.append(f"  best setting {format_setting(oracle['best_setting'])}: top-1 "
                 f"{100 * oracle['best_top1']:.2f}%; per-class oracle "
                 f"{100 * oracle['oracle_top1']:.2f}% ({100 * oracle['oracle_gain']:+.2f} pts, "
                 "optimistic: chosen on the val set)")
    lines += trust_report.summary_lines(frames)
    picks = ", ".join(f"{row['criterion']} -> {format_setting(row['setting'])} "
                      f"({100 * row['cost_top1']:+.2f} pts)"
                      for _, row in frames["selection"].iterrows())
    lines.append(f"  selection: {picks}")
    if "protocols" in frames:
        from ffcv_bias.analysis.protocols import summary_lines
        lines += summary_lines(frames)
    lines += [f"  warning: {w}" for w in _warnings(settings)]
    return lines


def summary_text(frames, vary_keys, out_dir=None):
    """The short text summary the CLI prints."""
    skipped = frames["skipped"]
    n_runs = len(frames["runs"])
    lines = [f"{n_runs} complete run(s) analysed over {', '.join(vary_keys)}; "
             f"{len(skipped)} skipped" + (" (" + ", ".join(
                 f"{count} {state}" for state, count in skipped["state"].value_counts().items())
                 + ")" if len(skipped) else "")]
    listed = skipped[skipped["state"] != OUTSIDE_STATE] if len(skipped) else skipped
    for _, row in listed.head(10).iterrows():  # runs outside --where are only counted
        lines.append(f"  skipped {row['run_dir']}: {row['state']}, {row['reason']}")
    if len(listed) > 10:
        lines.append(f"  ... {len(listed) - 10} more in skipped.csv")
    lines += [f"  WARNING {w}" for w in trust_report.record_warnings(skipped)]
    for label, group in _group_frames(frames, vary_keys):
        if label:
            lines.append(f"[{label}]")
        lines += _summary_of_group(group)
    if out_dir is not None:
        lines.append(f"report: {out_dir / 'index.html'}")
    return "\n".join(lines)

