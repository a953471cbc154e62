"""Per-class analysis of run records: tables, the paper's statistics, figures, a report.

Reads only files (config.json, summary.json, optionally val_logits.npy / val_labels.npy):
it never imports torch or ffcv, so it runs anywhere the run folders can be read.

    python -m ffcv_bias.analysis runs/ --vary augment.min_scale --out report/

or, from Python:

    from ffcv_bias.analysis import run_analysis
    frames = run_analysis("runs/", vary="augment.min_scale", out_dir="report/")
    frames["table1"], frames["welch"], frames["oracle"], ...

Stages: records (find and read runs) -> tables (settings, per-class means) -> stats (Welch,
Benjamini-Hochberg, Table 1, oracle, selection) -> figures -> report (index.html, stdout).
`synthetic.make_synthetic_runs` writes records with planted effects for tests and demos.
"""
from ffcv_bias.analysis.analyze import run_analysis
from ffcv_bias.analysis.records import AnalysisError, load_runs
from ffcv_bias.analysis.synthetic import linear_effects, make_synthetic_runs

__all__ = ["run_analysis", "AnalysisError", "load_runs", "make_synthetic_runs",
           "linear_effects"]
