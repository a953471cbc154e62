"""python -m ffcv_bias.analysis RUNS_DIR [RUNS_DIR ...] --vary KEY [--vary KEY2] --out OUT_DIR"""
import argparse
import sys
from pathlib import Path

from ffcv_bias.analysis import where
from ffcv_bias.analysis.analyze import run_analysis
from ffcv_bias.analysis.records import AnalysisError
from ffcv_bias.analysis.report import summary_text
from ffcv_bias.output_paths import OutputPathError, require_creatable_dir


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ffcv_bias.analysis",
        description="Per-class analysis of training runs: which classes a regularizer hurts. "
                    "Runs that differ only in training.seed are replicates.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUNS_DIR",
                        help="folder(s) searched recursively for run directories (config.json)")
    parser.add_argument("--vary", action="append", required=True, metavar="KEY",
                        help="dotted config key whose values are compared, e.g. "
                             "augment.min_scale; give a second --vary to split the analysis "
                             "by that key (one report per value, in subfolders)")
    parser.add_argument("--reference", default=None, metavar="VALUE",
                        help="value of the first key the others are tested against (default: "
                             "1.0 for min_scale, 0 for weight_decay/dropout/sparsity when "
                             "present, else the smallest value)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT_DIR",
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
    try:
        require_creatable_dir(args.out)
    except OutputPathError as error:
        raise AnalysisError(f"--out: {error}") from None


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        frames = run_analysis(args.run_dirs, args.vary, reference=args.reference,
                              out_dir=args.out, ignore_keys=args.ignore_key, top_k=args.top_k,
                              make_plots=not args.no_figures,
                              crossfit_folds=args.crossfit_folds, protocol=args.protocol,
                              where_conditions=[where.parse_condition(text)
                                                for text in args.where])
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_text(frames, args.vary, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
