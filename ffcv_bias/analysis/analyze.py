"""run_analysis: run records -> per-class tables, statistics, figures and an HTML report.

Output layout (every file written atomically):
  one varied key:   OUT_DIR/{runs,settings,per_class,welch,table1,oracle,oracle_per_class,
                    selection,paired,table1_paired,power,confusion,confusion_flows,
                    skipped}.csv, the figures (with confusion_flows.png when a class is
                    hurt), index.html
  two varied keys:  one complete report per value of the second key in a subfolder
                    OUT_DIR/<key2>=<value>/ (same files, runs grouped by that value), plus
                    OUT_DIR/*.csv combining the groups with a leading <key2> column, and
                    OUT_DIR/index.html linking the groups. The first key is the one whose
                    settings are compared (Welch, Table 1, oracle, selection); the second
                    only splits the runs.
"""
import re
from pathlib import Path

import pandas as pd

from ffcv_bias.analysis import (calibration, confusion, crossfit, paired, power, protocols,
                                report, stats, tables, where)
from ffcv_bias.analysis.records import (REPLICATE_KEY, AnalysisError, check_poolable,
                                        dotted_get, load_runs)
from ffcv_bias.common.tables import write_csv

FRAME_NAMES = ("runs", "settings", "per_class", "welch", "table1", "oracle",
               "oracle_per_class", "selection", "paired", "table1_paired", "power",
               "confusion", "confusion_flows")


def analyse_settings(data, crossfit_folds=crossfit.DEFAULT_FOLDS):
    """All tables for one SettingData: {name: DataFrame}, plus the class-mean arrays."""
    class_means, class_stds, _ = tables.class_means(data)
    welch = stats.welch_table(data)
    oracle_summary, oracle_per_class = stats.oracle(data, class_means)
    null = calibration.null_calibration(data)
    trust = trust_frames(data, class_means, oracle_summary, oracle_per_class, crossfit_folds,
                         null)
    frames = {
        "runs": tables.runs_table(data),
        "settings": tables.settings_table(data),
        "per_class": tables.per_class_table(data),
        "welch": welch,
        "table1": calibration.add_calibration(stats.table1(welch), null, "welch"),
        "oracle": oracle_summary,
        "oracle_per_class": oracle_per_class,
        "selection": stats.selection(data, class_means),
    }
    frames.update(trust)
    frames["selection"] = frames["selection"].merge(
        crossfit.crossfit_selection(data, class_means, crossfit_folds), on="criterion",
        how="left")
    # Where the hurt classes' predictions went (reads each run's predictions once).
    flows = confusion.confusion_tables(data, welch)
    frames["confusion"], frames["confusion_flows"] = flows["confusion"], flows["confusion_flows"]
    return frames, class_means, class_stds


def trust_frames(data, class_means, oracle_summary, oracle_per_class, folds, null):
    """Estimates that survive selection, beside the in-sample ones (issue 19): the
    cross-fitted oracle (columns added to oracle / oracle_per_class in place), the
    seed-paired tests and their Table 1 (with its measured null rates, `null`:
    calibration.null_calibration), and the seed planning table."""
    columns, class_acc = crossfit.crossfit_oracle(data, class_means, folds)
    for name, value in columns.items():
        oracle_summary[name] = [value]
    oracle_per_class["oracle_acc_crossfit"] = class_acc
    excluded = stats.excluded_class_note(data, stats.scored_classes(class_means))
    oracle_summary["excluded_classes"] = [excluded]
    paired_frame = paired.paired_table(data)
    table1_paired = calibration.add_calibration(paired.table1_paired(paired_frame), null,
                                                "paired")
    return {"paired": paired_frame, "table1_paired": table1_paired,
            "power": power.power_table(data)}


def _check_vary_keys(run_set, vary_keys):
    if not 1 <= len(vary_keys) <= 2 or len(set(vary_keys)) != len(vary_keys):
        raise AnalysisError(f"give one or two distinct --vary keys (got {vary_keys})")
    for key in vary_keys:
        if key == REPLICATE_KEY:
            raise AnalysisError(f"{REPLICATE_KEY} marks replicates and cannot be varied")
        missing = [r for r in run_set.runs if _absent(r.config, key)]
        if missing:
            section_name = key.rsplit(".", 1)[0] if "." in key else ""
            section = (dotted_get(missing[0].config, section_name, None) if section_name
                       else missing[0].config)
            known = ", ".join(sorted(section)) if isinstance(section, dict) else ""
            where = f"its {section_name} section holds" if section_name else "its keys are"
            raise AnalysisError(
                f"config key {key} is absent from {len(missing)} of {len(run_set.runs)} "
                f"run(s), e.g. {missing[0].run_dir}" + (f" ({where}: {known})" if known else
                f" (it has no {section_name} section)" if section_name else ""))
        sections = [r for r in run_set.runs if isinstance(dotted_get(r.config, key, None), dict)]
        if sections:
            inside = ", ".join(sorted(dotted_get(sections[0].config, key)))
            raise AnalysisError(f"--vary {key} names a config section, not a key: give one "
                                f"of its keys, {key}.KEY (in {sections[0].run_dir}: {inside})")


def _absent(config, key):
    marker = object()
    return dotted_get(config, key, marker) is marker


def _groups(run_set, vary_keys):
    """[(value of the second key or None, row indices)] in sorted value order."""
    rows = list(range(len(run_set.runs)))
    if len(vary_keys) == 1:
        return [(None, rows)]
    values = [tables.hashable(dotted_get(run_set.runs[i].config, vary_keys[1])) for i in rows]
    return [(value, [i for i, v in zip(rows, values) if v == value])
            for value in tables.sort_settings(values)]


def group_folder(key, value):
    """Subfolder name for one value of the second key, safe on any file system."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{key}={tables.format_setting(value)}")


def _skipped_table(skipped, vary_keys):
    rows = []
    for run in skipped:
        row = {"run_dir": str(run.run_dir), "run_id": run.run_id, "state": run.state,
               "reason": run.reason}
        for key in vary_keys:
            row[key] = dotted_get(run.config or {}, key, None)
        row["seed"] = dotted_get(run.config or {}, REPLICATE_KEY, None)
        rows.append(row)
    return pd.DataFrame(rows, columns=["run_dir", "run_id", "state", "reason",
                                       *vary_keys, "seed"])


def _write_group(frames, data, out_dir, make_plots, top_k, context):
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FRAME_NAMES:
        write_csv(frames[name], out_dir / f"{name}.csv")
    figure_files = {}
    if frames.get("protocols_by") is not None:   # analysis/protocols.py
        figure = protocols.write_protocol_outputs(frames, frames["protocols_by"], out_dir,
                                                  make_plots, write_csv)
        if figure:
            figure_files["protocols"] = figure
    if make_plots:
        from ffcv_bias.analysis.figures import make_figures  # matplotlib only when drawing
        suffix = f" ({context['group_label']})" if context.get("group_label") else ""
        figure_files = make_figures(data, frames["class_means"], frames["class_stds"],
                                    frames["welch"], out_dir, k=top_k, title_suffix=suffix)
        figure_files.update(confusion_figure(data, frames, out_dir, suffix))
    report.write_group_index(out_dir, data, frames, figure_files, context)


def confusion_figure(data, frames, out_dir, suffix):
    """{"confusion_flows": file name} when the compared setting hurts a class, else {}."""
    from ffcv_bias.analysis.figures import compared_index
    setting = data.settings[compared_index(data)]
    drawn = confusion.flows_figure(frames["confusion_flows"], setting,
                                   out_dir / "confusion_flows.png", title_suffix=suffix)
    return {"confusion_flows": "confusion_flows.png"} if drawn else {}


def run_analysis(run_dirs, vary, reference=None, out_dir=None, ignore_keys=(), top_k=5,
                 make_plots=True, crossfit_folds=crossfit.DEFAULT_FOLDS, protocol=None,
                 where_conditions=()):
    """Analyse every run record under `run_dirs`; returns {name: DataFrame}.

    run_dirs: a folder or a list of folders, searched recursively for run directories.
    vary: the dotted config key whose values are compared (e.g. 'augment.min_scale'), or
        a list of two: the second splits the runs into separate analyses.
    reference: the value the others are tested against (text or number); default: no
        regularization (tau 1.0, weight decay / dropout / sparsity 0) when run, else the
        smallest value.
    out_dir: where to write CSVs, figures and index.html (nothing written when None).
    ignore_keys: config keys allowed to differ between pooled runs.
    crossfit_folds: K of the cross-fitted oracle and selection (seeds split in K blocks).
    Returned frames: runs, settings, per_class, welch, table1, oracle, oracle_per_class,
    selection, paired, table1_paired, power, confusion, confusion_flows
    (analysis/confusion.py), skipped; with two keys, each has a leading column named
    after the second.
    protocol: analyse the runs under this test protocol (RES@CROP_RATIO, see
        analysis/protocols.py); None = each run's main protocol. Runs sharing >= 2
        protocols also get the protocol tables (protocols, protocol_choice,
        protocol_per_class) and protocols.png.
    where_conditions: (key, value) pairs (analysis/where.py): only runs whose config
        matches all of them are analysed; the others are counted in skipped.
    Raises AnalysisError on bad input (no complete run, mixed datasets, unpoolable runs).
    """
    if not isinstance(crossfit_folds, int) or crossfit_folds < 2:
        raise AnalysisError(f"--crossfit-folds must be an integer of at least 2 (got "
                            f"{crossfit_folds})")
    roots = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    vary_keys = [vary] if isinstance(vary, str) else list(vary)
    run_set = where.select_where(load_runs(roots), where_conditions)
    if protocol is not None:
        run_set = protocols.select_protocol(run_set, protocol)
    _check_vary_keys(run_set, vary_keys)
    check_poolable(run_set.runs, vary_keys, ignore_keys)
    out_dir = Path(out_dir) if out_dir is not None else None
    skipped = _skipped_table(run_set.skipped, vary_keys)
    context = {"roots": [str(r) for r in roots], "vary_keys": vary_keys,
               "n_complete": len(run_set.runs), "skipped": skipped,
               "class_weighting": "val counts" if run_set.class_counts is not None
                                  else "uniform"}

    per_group, links = [], []
    for group_value, rows in _groups(run_set, vary_keys):
        try:
            data = tables.split_by_setting(run_set, rows, vary_keys[0], reference)
        except AnalysisError as error:
            if len(vary_keys) == 1:
                raise
            raise AnalysisError(f"{error} (in the runs with {vary_keys[1]} = "
                                f"{tables.format_setting(group_value)})") from None
        frames, class_means, class_stds = analyse_settings(data, crossfit_folds)
        protocol_frames, by_protocol = protocols.protocol_analysis(
            run_set, rows, vary_keys[0], data.reference)
        frames.update(protocol_frames or {})
        per_group.append((group_value, frames))
        if out_dir is None:
            continue
        group_dir, group_context = out_dir, dict(context, group_label=None)
        if len(vary_keys) > 1:
            folder = group_folder(vary_keys[1], group_value)
            group_dir = out_dir / folder
            label = f"{vary_keys[1]} = {tables.format_setting(group_value)}"
            group_context = dict(context, group_label=label,
                                 skipped=_skipped_in_group(skipped, vary_keys[1], group_value),
                                 n_complete=len(rows))
            links.append((label, folder))
        frames_with_arrays = dict(frames, class_means=class_means, class_stds=class_stds,
                                  protocols_by=by_protocol)
        _write_group(frames_with_arrays, data, group_dir, make_plots, top_k, group_context)

    combined = _combine(per_group, vary_keys)
    combined["skipped"] = skipped
    if out_dir is not None:
        write_csv(skipped, out_dir / "skipped.csv")
        if len(vary_keys) > 1:
            for name in FRAME_NAMES:
                write_csv(combined[name], out_dir / f"{name}.csv")
            report.write_top_index(out_dir, combined, links, context)
    return combined


def _skipped_in_group(skipped, key, value):
    return tables.rows_where(skipped, key, value)


def _combine(per_group, vary_keys):
    if len(vary_keys) == 1:
        return dict(per_group[0][1])
    combined = {}
    names = list(FRAME_NAMES)
    if all("protocols" in frames for _, frames in per_group):
        names += protocols.PROTOCOL_FRAME_NAMES
    for name in names:
        parts = []
        for group_value, frames in per_group:
            part = frames[name].copy()
            part.insert(0, vary_keys[1], [group_value] * len(part))
            parts.append(part)
        combined[name] = pd.concat(parts, ignore_index=True)
    return combined
