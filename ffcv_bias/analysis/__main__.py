"""python -m ffcv_bias.analysis RUNS_DIR [RUNS_DIR ...] --vary KEY [--vary KEY2] --out OUT_DIR"""
import sys
from pathlib import Path

from ffcv_bias.analysis import where
from ffcv_bias.analysis.analyze import run_analysis
from ffcv_bias.analysis.records import AnalysisError
from ffcv_bias.analysis.report import summary_text
from ffcv_bias.common.atomic import no_room_error
from ffcv_bias.common.errors import EXIT_FAILURE, OneLineArgumentParser
from ffcv_bias.common.output_paths import (OutputPathError, path_arg, path_text,
                                           require_creatable_dir)
from ffcv_bias.common.report_folder import NotAReportError, staged_folder
from ffcv_bias.record.metrics import RecordFileError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def build_parser():
    parser = OneLineArgumentParser(
        prog="python -m ffcv_bias.analysis",
        description="Per-class analysis of training runs: which classes a regularizer hurts. "
                    "Runs that differ only in training.seed are replicates.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUNS_DIR", type=path_text,
                        help="folder(s) searched recursively for run directories (config.json)")
    parser.add_argument("--vary", action="append", required=True, metavar="KEY",
                        help="dotted config key whose values are compared, e.g. "
                             "augment.min_scale; give a second --vary to split the analysis "
                             "by that key (one report per value, in subfolders)")
    parser.add_argument("--reference", default=None, metavar="VALUE",
                        help="value of the first key the others are tested against (default: "
                             "1.0 for min_scale, 0 for weight_decay/dropout/sparsity when "
                             "present, else the smallest value)")
    parser.add_argument("--out", required=True, type=path_arg, metavar="OUT_DIR",
                        help="where to write CSV tables, figures and index.html")
    parser.add_argument("--ignore-key", action="append", default=[], metavar="KEY",
                        help="config key allowed to differ between pooled runs (use only when "
                             "it does not change results)")
    parser.add_argument("--top-k", type=int, default=5,
                        help="classes that lose / gain most drawn in the curves figure")
    parser.add_argument("--no-figures", action="store_true", help="tables and HTML only")
    parser.add_argument("--crossfit-folds", type=int, default=2, metavar="K",
                        help="folds of the cross-fitted oracle and selection: each class's "
                             "setting is chosen on K-1 blocks of seeds and scored on the "
                             "remaining one (default 2: halves)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="analyse only the runs whose config has KEY = VALUE (repeatable), "
                             "e.g. one slice of a folder holding two sweeps; the others are "
                             "counted as skipped")
    parser.add_argument("--protocol", default=None, metavar="RES@CROP_RATIO",
                        help="analyse the runs under this test protocol (summary.json's "
                             "protocols entries, see python -m ffcv_bias.evaluate); default: "
                             "each run's main protocol")
    return parser


def check_args(args):
    """The checks argparse cannot make; AnalysisError before anything is read or written."""
    if args.top_k < 1:
        raise AnalysisError(f"--top-k must be >= 1, not {args.top_k}")
    for flag, keys in (("--vary", args.vary), ("--ignore-key", args.ignore_key)):
        for key in keys:
            if not key.strip():
                raise AnalysisError(f"{flag} {key!r} names no config key: give a dotted key "
                                    f"such as augment.min_scale")
    try:
        require_creatable_dir(args.out)
    except OutputPathError as error:
        raise AnalysisError(f"--out: {error}") from None
    check_out_outside_runs(args.out, args.run_dirs)


def check_out_outside_runs(out, run_dirs):
    """The report must not land among the records it reads: a report written into a runs
    folder (or a run directory) mixes its CSVs with the records, and a rerun would search
    its own output."""
    out = Path(out).resolve()
    for root in run_dirs:
        root = Path(root).resolve()
        if out == root:
            raise AnalysisError(f"--out {out} is the runs directory it reads: give a folder "
                                f"outside it (e.g. reports/NAME)")
    for folder in (out, *out.parents):
        if (folder / "config.json").is_file() and any(
                folder == Path(r).resolve() or Path(r).resolve() in folder.parents
                for r in run_dirs):
            raise AnalysisError(f"--out {out} is inside the run directory {folder}: give "
                                f"a folder outside the runs")


def notes_on_the_request(frames, args):
    """Lines for stderr where the analysis did less than asked (nothing is wrong)."""
    lines = []
    oracle = frames.get("oracle")
    if oracle is not None and "crossfit_folds" in oracle and len(oracle):
        used = int(oracle["crossfit_folds"].min())
        if 2 <= used < args.crossfit_folds:
            lines.append(f"note: --crossfit-folds {args.crossfit_folds}: the fewest seeds per "
                         f"setting is {used}, so the cross-fit used {used} folds (one seed "
                         f"each); oracle.csv's crossfit_folds records it")
    if oracle is not None and "crossfit_settings_left_out" in oracle and len(oracle):
        for text in oracle["crossfit_settings_left_out"]:
            if isinstance(text, str) and text:
                lines.append(f"note: {text}; oracle.csv's crossfit_settings_left_out records it")
    settings = frames.get("settings")
    if settings is not None and "setting" in settings and settings["setting"].nunique() < 2:
        lines.append(f"note: the runs hold one value of {args.vary[0]} "
                     f"({settings['setting'].iloc[0]}): nothing is compared, the report "
                     f"describes that setting alone")
    return lines


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        with staged_folder(args.out) as staging:
            frames = run_analysis(args.run_dirs, args.vary, reference=args.reference,
                                  out_dir=staging, ignore_keys=args.ignore_key,
                                  top_k=args.top_k, make_plots=not args.no_figures,
                                  crossfit_folds=args.crossfit_folds, protocol=args.protocol,
                                  where_conditions=[where.parse_condition(text)
                                                    for text in args.where])
    except (AnalysisError, NotAReportError, RecordFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; no report written to {args.out} (an earlier report "
              f"there is kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:   # a full disk, wherever in the writers it surfaced
        no_room = no_room_error(error, args.out)
        if no_room is None:
            raise
        print(f"error: {no_room.strerror} while writing the report for {args.out}: nothing "
              f"written there (an earlier report there is kept)", file=sys.stderr)
        return EXIT_FAILURE
    for line in notes_on_the_request(frames, args):
        print(line, file=sys.stderr)
    print(summary_text(frames, args.vary, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
