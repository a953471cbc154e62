"""Per-class crop lower bounds for class-dependent augmentation (`augment.class_min_scale`).

Balestriero, Bottou & LeCun 2022, Sec. 3.4 and Fig. 7: apply the random crop only to the
classes it does not hurt, and see whether the others recover. Two ways to choose:

    python -m ffcv_bias.studies.class_bounds from-analysis report/ --tau 0.08 \\
        --out bounds/class_dependent_tau0.08.json
    python -m ffcv_bias.studies.class_bounds from-analysis report/ --setting 0.08 \\
        --tau 1.0 0.5 0.25 0.08 --out 'bounds/class_dependent_tau{tau}.json'
    python -m ffcv_bias.studies.class_bounds from-preservation preservation/ \\
        --out bounds/label_preserving.json

from-analysis ANALYSIS_OUT (the folder `python -m ffcv_bias.analysis RUNS --vary
    augment.min_scale --out ANALYSIS_OUT` wrote, or its welch.csv): the classes the crop
    hurts at `--setting` (default: each --tau) get bound 1.0 (never cropped); every other
    class gets tau. "Hurts" (--criterion):
      welch (default)  the one-sided Welch test of the analysis rejects "not lower than the
                       reference" at --confidence (95%: p_less < 0.05; with --correction bh
                       the Benjamini-Hochberg q_less < 0.05). Needs >= 2 seeds per arm.
                       This is the conservative reading: only a significant drop excludes.
      mean             the class's mean accuracy at the setting is not above the reference's
                       (diff <= 0): the paper's wording, "only applying the random crop DA
                       to the classes whose test performances increased with the DA's level".
    Several --tau values with one --setting give the Fig. 7 grid: the same classes spared
    at every tau; --out then needs a {tau} placeholder.
from-preservation PRESERVATION_OUT (the folder of `python -m ffcv_bias.studies.preservation`,
    or its label_loss.csv): input-dependent augmentation, which the paper proposes (Sec.
    3.3) but does not test: each class's bound is the smallest crop area at which the
    trained model still recognized it (label_loss.csv's last_preserving_setting, crop rows
    of --split, default train when evaluated, else val). A class the model did not
    recognize even uncropped gets --unrecognized (default 1.0: no evidence the crop keeps
    its label).

Output (JSON, read by the trainer's ffcv_bias.train.config.read_class_min_scale):
    {"min_scale": [one bound per class, in label order], "classes": [class names],
     "source": {how the bounds were chosen}}
The trainer's run_id hashes this file's content: a different choice is a different run.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from ffcv_bias.common.atomic import write_json
from ffcv_bias.common.errors import EXIT_OK, UserError, main_guard

WELCH_COLUMNS = ("setting", "class", "class_name", "diff", "p_less", "q_less")
LABEL_LOSS_COLUMNS = ("split", "transform", "class", "class_name", "last_preserving_setting")


class BoundsError(UserError, ValueError):
    """Bad input: the message is one line naming the problem."""


# ----------------------------------------------------------------------------------------
# Reading tables
# ----------------------------------------------------------------------------------------

def _table_path(path, file_name):
    path = Path(path)
    table = path / file_name if path.is_dir() else path
    if not table.is_file():
        raise BoundsError(f"{file_name} not found: {table}")
    return table


def _read_csv(path, required):
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise BoundsError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise BoundsError(f"{path} lacks column(s) {', '.join(missing)} "
                          f"(columns: {', '.join(frame.columns)})")
    return frame


def read_welch(analysis_out):
    """welch.csv of a one-key analysis."""
    path = _table_path(analysis_out, "welch.csv")
    frame = _read_csv(path, WELCH_COLUMNS)
    if frame.columns[0] != "setting":
        raise BoundsError(f"{path} comes from a two-key analysis (first column "
                          f"{frame.columns[0]!r}): point at one group's subfolder")
    if frame.empty:
        raise BoundsError(f"{path} has no rows (the analysis had a single setting)")
    return frame, path


def _same_setting(value, wanted):
    try:
        return math.isclose(float(value), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(value) == str(wanted)


def _number_or_text(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def rows_for_setting(frame, setting, path):
    """The rows of one setting, one per class, in label order 0..C-1."""
    rows = frame[[_same_setting(value, setting) for value in frame["setting"]]]
    if rows.empty:
        available = ", ".join(str(v) for v in dict.fromkeys(frame["setting"]))
        raise BoundsError(f"{path} has no setting {setting} (settings: {available})")
    rows = rows.sort_values("class", kind="stable")
    classes = rows["class"].astype(int).tolist()
    if classes != list(range(len(classes))):
        raise BoundsError(f"{path}: setting {setting} does not list classes 0..C-1 once each")
    return rows


# ----------------------------------------------------------------------------------------
# Choosing the bounds
# ----------------------------------------------------------------------------------------

def hurt_classes(rows, criterion, confidence, correction, path, setting):
    """Boolean list: does the regularizer hurt each class at this setting?"""
    if criterion == "mean":
        return [not diff > 0 for diff in rows["diff"]]
    column = "q_less" if correction == "bh" else "p_less"
    p_values = rows[column].astype(float)
    if p_values.isna().any():
        raise BoundsError(f"{path}: setting {setting} has no Welch test for some classes "
                          f"(fewer than 2 seeds per arm?); use --criterion mean or run more "
                          f"seeds")
    level = 1.0 - confidence / 100.0
    return [p < level for p in p_values]


def bounds_from_analysis(analysis_out, tau, *, setting=None, criterion="welch",
                         confidence=95.0, correction="none"):
    """The bounds file content: tau for the classes not hurt at `setting`, 1.0 otherwise."""
    check_tau(tau)
    if not 0 < confidence < 100:
        raise BoundsError(f"--confidence must be in (0, 100), got {confidence}")
    frame, path = read_welch(analysis_out)
    setting = tau if setting is None else _number_or_text(setting)
    rows = rows_for_setting(frame, setting, path)
    hurt = hurt_classes(rows, criterion, confidence, correction, path, setting)
    names = rows["class_name"].astype(str).tolist()
    return {
        "min_scale": [1.0 if is_hurt else float(tau) for is_hurt in hurt],
        "classes": names,
        "source": {"kind": "analysis", "table": path.name, "selected_at": setting,
                   "tau": float(tau), "criterion": criterion,
                   "confidence": confidence if criterion == "welch" else None,
                   "correction": correction if criterion == "welch" else None,
                   "spared_classes": [n for n, is_hurt in zip(names, hurt) if is_hurt]},
    }


def bounds_from_preservation(preservation_out, *, split=None, unrecognized=1.0):
    """The bounds file content: each class's last label-preserving crop area."""
    check_tau(unrecognized, what="--unrecognized")
    path = _table_path(preservation_out, "label_loss.csv")
    frame = _read_csv(path, LABEL_LOSS_COLUMNS)
    crop = frame[frame["transform"] == "crop"]
    if crop.empty:
        raise BoundsError(f"{path} has no crop rows (run the preservation study with crop)")
    splits = list(dict.fromkeys(crop["split"]))
    split = split or ("train" if "train" in splits else splits[0])
    rows = crop[crop["split"] == split].sort_values("class", kind="stable")
    if rows.empty:
        raise BoundsError(f"{path} has no crop rows for split {split!r} (splits: "
                          f"{', '.join(splits)})")
    if rows["class"].astype(int).tolist() != list(range(len(rows))):
        raise BoundsError(f"{path}: split {split} does not list classes 0..C-1 once each")
    bounds = [unrecognized if pd.isna(value) else float(value)
              for value in rows["last_preserving_setting"]]
    names = rows["class_name"].astype(str).tolist()
    settings_file = Path(path).parent / "preservation.json"
    threshold = None
    if settings_file.is_file():
        threshold = json.loads(settings_file.read_text()).get("loss_threshold")
    return {
        "min_scale": bounds,
        "classes": names,
        "source": {"kind": "preservation", "table": path.name, "split": split,
                   "loss_threshold": threshold, "unrecognized": unrecognized,
                   "unrecognized_classes": [n for n, v in
                                            zip(names, rows["last_preserving_setting"])
                                            if pd.isna(v)]},
    }


def check_tau(value, what="--tau"):
    if not 0 < value <= 1:
        raise BoundsError(f"{what} must be in (0, 1], got {value}")


def output_paths(template, taus):
    """One output path per tau; several taus need a {tau} placeholder in --out."""
    if len(taus) > 1 and "{tau}" not in str(template):
        raise BoundsError("several --tau values need a {tau} placeholder in --out, e.g. "
                          "'bounds/class_dependent_tau{tau}.json'")
    return [Path(str(template).replace("{tau}", f"{tau:g}")) for tau in taus]


def check_output(path):
    if path.suffix != ".json":
        raise BoundsError(f"--out {path} must end in .json")


def describe(content, path):
    bounds, names = content["min_scale"], content["classes"]
    uncropped = [n for n, b in zip(names, bounds) if b >= 1.0]
    shown = ", ".join(uncropped[:10]) + (" ..." if len(uncropped) > 10 else "")
    low = min(bounds)
    return (f"{path}: {len(bounds)} classes, bounds {low:g}..{max(bounds):g}; "
            f"{len(uncropped)} never cropped" + (f" ({shown})" if uncropped else ""))


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ffcv_bias.studies.class_bounds",
        description="Write per-class crop lower bounds (augment.class_min_scale files).")
    commands = parser.add_subparsers(dest="command", required=True)
    analysis = commands.add_parser("from-analysis",
                                   help="tau for the classes the crop does not hurt, 1.0 else")
    analysis.add_argument("analysis_out", type=Path,
                          help="folder written by python -m ffcv_bias.analysis (or welch.csv)")
    analysis.add_argument("--tau", type=float, nargs="+", required=True,
                          help="crop lower bound(s) given to the classes that keep the crop")
    analysis.add_argument("--setting",
                          help="the analysed setting whose Welch test picks the classes "
                               "(default: each tau)")
    analysis.add_argument("--criterion", choices=("welch", "mean"), default="welch",
                          help="welch: spare the classes significantly lower at the setting "
                               "(default); mean: spare every class whose mean did not rise")
    analysis.add_argument("--confidence", type=float, default=95.0,
                          help="Welch confidence in percent (default 95)")
    analysis.add_argument("--correction", choices=("none", "bh"), default="none",
                          help="bh: use the Benjamini-Hochberg q-values")
    analysis.add_argument("--out", required=True, help="output .json ({tau} for several taus)")
    preservation = commands.add_parser("from-preservation",
                                       help="each class its own label-preserving bound")
    preservation.add_argument("preservation_out", type=Path,
                              help="folder written by the preservation study (or label_loss.csv)")
    preservation.add_argument("--split", choices=("train", "val"),
                              help="which images' label loss to use (default: train if "
                                   "evaluated, else val)")
    preservation.add_argument("--unrecognized", type=float, default=1.0,
                              help="bound of a class not recognized even uncropped")
    preservation.add_argument("--out", required=True, type=Path, help="output .json")
    return parser


@main_guard()
def main(argv=None):
    args = build_parser().parse_args(argv)
    # Every bound is computed before the first file is written: a bad tau writes none.
    written = []
    if args.command == "from-analysis":
        paths = output_paths(args.out, args.tau)
        for tau, path in zip(args.tau, paths):
            check_output(path)
            content = bounds_from_analysis(args.analysis_out, tau, setting=args.setting,
                                           criterion=args.criterion,
                                           confidence=args.confidence,
                                           correction=args.correction)
            written.append((content, path))
    else:
        check_output(args.out)
        content = bounds_from_preservation(args.preservation_out, split=args.split,
                                           unrecognized=args.unrecognized)
        written.append((content, args.out))
    for content, path in written:
        write_json(path, content)
        print(describe(content, path))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
