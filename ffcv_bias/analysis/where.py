"""`--where KEY=VALUE`: analyse one slice of a folder that holds several sweeps.

Two sweeps may share a folder and so share their common runs (the demo's crop sweep and
weight-decay sweep share the tau = 100%, default-weight-decay arm: one run_id, trained
once). Each analysis then keeps the runs whose config has KEY = VALUE; the runs it leaves
out are counted (state `outside --where` in skipped.csv), never silently dropped.
"""
import numpy as np
import yaml

from ffcv_bias.analysis.records import AnalysisError, RunSet, SkippedRun, dotted_get
from ffcv_bias.analysis.tables import same_value

OUTSIDE_STATE = "outside --where"
_ABSENT = object()


def parse_condition(text):
    """'training.weight_decay=5e-4' -> ('training.weight_decay', 0.0005). The value is read
    as YAML (numbers, true/false, null, text), as in a sweep file."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        raise AnalysisError(f"--where {text!r}: expected KEY=VALUE, e.g. "
                            f"training.weight_decay=0.0005")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value.strip()
    if isinstance(parsed, str):  # '5e-4' is text to YAML 1.1, a number to a user
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key, parsed


def select_where(run_set, conditions):
    """The RunSet restricted to runs matching every (key, value); the others go to
    `skipped` as OUTSIDE_STATE. Raises AnalysisError when no run matches."""
    if not conditions:
        return run_set
    keep, skipped = [], list(run_set.skipped)
    for index, run in enumerate(run_set.runs):
        mismatch = next(((key, actual) for key, wanted in conditions
                         for actual in [dotted_get(run.config, key, _ABSENT)]
                         if actual is _ABSENT or not same_value(actual, wanted)), None)
        if mismatch is None:
            keep.append(index)
            continue
        key, actual = mismatch
        has = "no such key" if actual is _ABSENT else f"{key} = {actual}"
        skipped.append(SkippedRun(run.run_dir, run.run_id, OUTSIDE_STATE, has, run.config))
    if not keep:
        wanted = ", ".join(f"{key}={value}" for key, value in conditions)
        for key, _ in conditions:
            if run_set.runs and all(dotted_get(run.config, key, _ABSENT) is _ABSENT
                                    for run in run_set.runs):
                raise AnalysisError(f"--where {wanted}: no run's config has the key {key} "
                                    f"(a typo? the keys are dotted, e.g. "
                                    f"training.weight_decay)")
        raise AnalysisError(f"--where {wanted}: none of the {len(run_set.runs)} complete "
                            f"runs matches")
    rows = np.asarray(keep, dtype=np.int64)
    return RunSet(runs=[run_set.runs[i] for i in keep], per_class_acc=run_set.per_class_acc[rows],
                  top1=run_set.top1[rows], top5=run_set.top5[rows],
                  class_names=run_set.class_names, class_counts=run_set.class_counts,
                  n_val=run_set.n_val, skipped=skipped)
