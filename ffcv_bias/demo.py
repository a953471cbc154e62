"""`make demo`: the paper's two experiments, small, on the embedded default (Fashion-MNIST).

    python -m ffcv_bias.demo [--sweep rn50_configs/sweeps/fashion_mnist_demo.yaml]
                             [--decay-sweep rn50_configs/sweeps/fashion_mnist_demo_weight_decay.yaml]
                             [--report demo/report] [--decay-report demo/report_weight_decay]

1. betons: `python write_datasets.py` (both splits) and a 1,000-image class-stratified
   training subset, each only if missing;
2. the sweep over the random-crop lower bound tau, then the weight-decay sweep
   (`python -m ffcv_bias.sweep launch`, twice): both write into demo/runs and share their
   reference arm (tau = 100%, weight decay 5e-4: one run_id, trained once); finished runs
   are reused, interrupted ones resume;
3. the two analyses (`python -m ffcv_bias.analysis ... --where ...`, one slice of
   demo/runs each) into demo/report/ and demo/report_weight_decay/;
4. a short text summary per experiment: mean accuracy per setting, whether a setting
   raises the mean while a class falls significantly (the paper's trade-off), the classes
   that lose most, Table 1.
Each step is the same command a user would type; the demo only chains them.
"""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from ffcv_bias.analysis import calibration, verdicts
from ffcv_bias.common import env
from ffcv_bias.common.errors import (EXIT_INTERRUPTED, EXIT_OK, OneLineArgumentParser,
                                     UserError, main_guard)
from ffcv_bias.common.output_paths import creation_problem, path_arg

DATA_DIR = Path("data")
# The demo's own subsets, class-stratified: (split, images, path). Half the test set
# halves every validation's cost; 500 images per class still measure a class's accuracy
# to about 2 points (binomial sd at 50%), below the seed-to-seed sd of the hurt classes.
SUBSETS = (("train", 1000, DATA_DIR / "fashion-mnist-1k_train.beton"),
           ("val", 5000, DATA_DIR / "fashion-mnist-5k_val.beton"))
DEFAULT_SWEEP = Path("rn50_configs/sweeps/fashion_mnist_demo.yaml")
DEFAULT_DECAY_SWEEP = Path("rn50_configs/sweeps/fashion_mnist_demo_weight_decay.yaml")
DEFAULT_REPORT = Path("demo/report")
DEFAULT_DECAY_REPORT = Path("demo/report_weight_decay")


def step(message):
    print(f"\n[demo] {message}", flush=True)


class StepFailed(UserError):
    """A step's command failed; it printed its own error above."""


def run(command):
    """Run one step's command; a failure is one line naming it (the command's own error,
    printed above, is never wrapped in a traceback), with the command's exit code."""
    words = " ".join(str(part) for part in command)
    print(f"[demo] $ {words}", flush=True)
    code = subprocess.run([str(part) for part in command]).returncode
    if code != 0:
        error = StepFailed(f"demo step failed: `{words}` exited with {code} (its error is "
                           f"above)")
        error.exit_code = EXIT_INTERRUPTED if code in (-2, EXIT_INTERRUPTED) else \
            (code if 0 < code < 126 else 1)
        raise error


def check_sweeps(*sweeps):
    """Every sweep file exists and loads (SweepError: one line), before any beton is
    written or any run trained."""
    from ffcv_bias.sweep import load_sweep
    for sweep in sweeps:
        if not Path(sweep).is_file():
            raise UserError(f"sweep file not found: {sweep}")
        load_sweep(sweep)


def check_reports(*reports):
    """Each report folder can be created, asked before the betons and the sweeps' hours of
    training (the analyses that write them come last)."""
    for flag, report in zip(("--report", "--decay-report"), reports):
        problem = creation_problem(report)
        if problem:
            raise UserError(f"{flag}: cannot create {report}: {problem}")


def ensure_betons():
    """The full betons (the README's other commands read them) and the demo's two
    subsets, each written once."""
    if not (DATA_DIR / "fashion-mnist_train.beton").is_file() or \
            not (DATA_DIR / "fashion-mnist_val.beton").is_file():
        run([*env.python_command(), "write_datasets.py"])
    for split, size, path in SUBSETS:
        if not path.is_file():
            run([*env.python_command(), "write_datasets.py", "--cfg.dataset=fashion-mnist",
                 f"--cfg.split={split}", f"--cfg.subset={size}", f"--cfg.write_path={path}"])


# What the demo's numbers depend on; opencv-python resizes every crop.
SUMMARY_PACKAGES = ("torch", "ffcv", "numpy", "numba", "opencv-python")


def software_versions():
    """'python 3.11.7, torch 2.13.0+cpu, ...' (read from package metadata: no import)."""
    return ", ".join(f"{name} {version or '(not installed)'}"
                     for name, version in env.package_versions(SUMMARY_PACKAGES).items())


def print_machine():
    """Bit-identical results hold on one machine and software stack only (DESIGN.md: an AMD
    EPYC and an Intel Xeon gave 80.76% vs 80.75% ... 74.96% vs 75.22% for the demo of the
    previous round)."""
    print(f"\nmachine: {env.cpu_model()}, {os.cpu_count()} cores; {software_versions()}")
    print("  same machine + same software: bit-identical numbers; another CPU or version: "
          "expect differences of the order of the ± seed std shown (the std over seeds, n "
          "runs per setting)")


# The two experiments: (varied key, its reference, the slice of demo/runs, summary label).
CROP = ("augment.min_scale", "1.0", "training.weight_decay=0.0005", "tau")
DECAY = ("training.weight_decay", "0.0005", "augment.min_scale=1.0", "weight_decay")


def print_means(runs, label):
    """Mean top-1 per setting, ± std over seeds, n."""
    per_setting = runs.groupby("setting")["top1"].agg(["mean", "std", "count"])
    print(f"\nmean top-1 per {label} (over seeds):")
    for value, row in per_setting.sort_index(ascending=False).iterrows():
        print(f"  {label}={value:<6g} top1={row['mean']:.4f} ± {row['std']:.4f}  "
              f"(n={int(row['count'])})")


def tradeoff_lines(runs, welch, reference, label, table1=None):
    """For each setting: does it raise the mean top-1 (one-sided Welch over seeds) while a
    class falls significantly (one-sided Welch, BH q < 0.05 over the classes)? The paper's
    finding, in numbers (analysis/verdicts.py, the report's opening panel)."""
    table1 = pd.DataFrame() if table1 is None else table1
    results = verdicts.setting_verdicts(runs, welch, table1, reference)
    results.sort(key=lambda result: result["setting"], reverse=True)
    return [f"  {verdicts.verdict_line(result, label)}" for result in results]


def print_summary(report_dir, label="tau"):
    """Mean accuracy per setting (± std over seeds, n), the trade-off verdict, the classes
    that lose most and Table 1 of one analysis report."""
    runs = pd.read_csv(report_dir / "runs.csv")
    welch = pd.read_csv(report_dir / "welch.csv")
    per_class = pd.read_csv(report_dir / "per_class.csv")
    setting_rows = pd.read_csv(report_dir / "settings.csv")
    reference = setting_rows.loc[setting_rows["is_reference"].astype(bool), "setting"].iloc[0]
    print_means(runs, label)
    print(f"\nraises the mean while a class falls? (against {label}={reference:g})")
    table1 = pd.read_csv(report_dir / "table1.csv")
    print("\n".join(tradeoff_lines(runs, welch, reference, label, table1)))
    std = {(row["setting"], row["class"]): row["std_acc"] for _, row in per_class.iterrows()}
    print(f"\nlargest per-class losses against the reference ({label}={reference:g}), "
          f"± std over seeds:")
    for _, row in welch.sort_values("diff").head(5).iterrows():
        print(f"  {label}={row['setting']:<6g} {row['class_name']:<12} "
              f"{row['mean_ref']:.3f} ± {std[(reference, row['class'])]:.3f} (n={row['n_ref']})"
              f" -> {row['mean']:.3f} ± {std[(row['setting'], row['class'])]:.3f} "
              f"(n={row['n']})  p_less={row['p_less']:.3g}")
    print(f"\nTable 1: % of classes significantly LOWER than at {label}={reference:g} "
          f"(one-sided Welch, raw p), and what no effect gives on these runs (labels "
          f"swapped within seeds; docs/statistics.md):")
    print(table1.pivot(index="setting", columns="confidence",
                       values=["percent_classes", "null_percent_classes"])
          .rename(columns={"percent_classes": "observed",
                           "null_percent_classes": "no effect"})
          .to_string(float_format=lambda v: f"{v:.1f}"))
    for setting, _, verdict in calibration.verdict_rows(table1):
        print(f"  {label}={setting:g} at {calibration.VERDICT_CONFIDENCE}%: {verdict}")


def analyse(sweep, report, experiment):
    """`python -m ffcv_bias.analysis` on this experiment's slice of the sweep's folder."""
    from ffcv_bias.sweep import load_sweep
    key, reference, where, _ = experiment
    run([*env.python_command(), "-m", "ffcv_bias.analysis", load_sweep(sweep).folder,
         "--vary", key, "--reference", reference, "--where", where, "--out", report])


@main_guard(interrupted="interrupted; finished betons and runs are kept: rerun the "
                        "same command to go on")
def main(argv=None):
    """Exit 0, 2 (a sweep file missing or bad), a failed step's exit code, 130 (Ctrl-C)."""
    parser = OneLineArgumentParser(prog="python -m ffcv_bias.demo",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=path_arg, default=DEFAULT_SWEEP)
    parser.add_argument("--decay-sweep", type=path_arg, default=DEFAULT_DECAY_SWEEP)
    parser.add_argument("--report", type=path_arg, default=DEFAULT_REPORT)
    parser.add_argument("--decay-report", type=path_arg, default=DEFAULT_DECAY_REPORT)
    args = parser.parse_args(argv)
    check_sweeps(args.sweep, args.decay_sweep)
    check_reports(args.report, args.decay_report)

    step("1/4 betons (reused when present)")
    ensure_betons()
    for sweep in (args.sweep, args.decay_sweep):
        step(f"2/4 the sweep {sweep} (finished runs are reused)")
        run([*env.python_command(), "-m", "ffcv_bias.sweep", "launch", sweep])
    step(f"3/4 the analyses into {args.report} and {args.decay_report}")
    analyse(args.sweep, args.report, CROP)
    analyse(args.decay_sweep, args.decay_report, DECAY)
    step("4/4 summary")
    print_machine()
    print("\n== random crop (tau), weight decay 5e-4 ==")
    print_summary(args.report, CROP[3])
    print("\n== weight decay, tau = 100% ==")
    print_summary(args.decay_report, DECAY[3])
    print(f"\n[demo] reports: {(args.report / 'index.html').resolve()}\n"
          f"               {(args.decay_report / 'index.html').resolve()}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
