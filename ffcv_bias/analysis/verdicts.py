"""The answer an analysis opens with: per setting, does it raise the mean while a class
falls, and are its per-class findings more than noise at this seed count?

The paper's claim needs both halves: a mean top-1 that rises beyond seed noise (one-sided
Welch over the seeds' top-1) and a class that falls significantly (one-sided Welch per
class, Benjamini-Hochberg q < 0.05 within the setting: raw p < 0.05 flags about 5% of the
classes under no effect). The null calibration of Table 1 (analysis/calibration.py) says
whether the count of falling classes is more than label swaps within seeds give.
`python -m ffcv_bias.demo` prints these lines; the report shows them first.
"""
import numpy as np

from ffcv_bias.analysis.calibration import VERDICT_CONFIDENCE, verdict
from ffcv_bias.analysis.stats import welch_less
from ffcv_bias.analysis.tables import format_setting, rows_where

SIGNIFICANT = 0.05
SHOWN_LOSERS = 3


def tradeoff_verdict(rise, p_rise, n_losers):
    """One phrase: the paper's trade-off, its shape within noise, or neither."""
    if rise <= 0:
        return "no trade-off here: the mean does not rise"
    if not n_losers:
        return "the mean rises and no class falls significantly"
    if p_rise < SIGNIFICANT:
        return "the paper's trade-off: the mean rises significantly while a class falls"
    return ("the paper's shape, but the mean's rise is within seed noise at these seeds "
            f"(p={p_rise:.2g} >= {SIGNIFICANT})")


def setting_verdicts(runs, welch, table1, reference):
    """[dict] per non-reference setting (in the runs' order): setting, rise (points),
    p_rise, n, n_ref, losers (DataFrame rows at q < SIGNIFICANT, largest drop first),
    tradeoff (tradeoff_verdict) and calibration (the null calibration's verdict at
    VERDICT_CONFIDENCE, or '' when Table 1 has no calibration columns)."""
    top1 = {}
    for setting, value in zip(runs["setting"], runs["top1"]):
        top1.setdefault(setting, []).append(value)
    reference_top1 = np.asarray(top1[reference], dtype=np.float64)
    results = []
    for setting, values in top1.items():
        if setting == reference:
            continue
        values = np.asarray(values, dtype=np.float64)
        rise = 100 * (values.mean() - reference_top1.mean())
        # One-sided Welch "the setting's mean is higher": the reference tested as lower.
        p_rise = float(welch_less(reference_top1[:, None], values[:, None])["p_less"][0])
        rows = rows_where(welch, "setting", setting)
        losers = rows[(rows["q_less"] < SIGNIFICANT) & (rows["diff"] < 0)].sort_values("diff")
        results.append({"setting": setting, "rise": rise, "p_rise": p_rise,
                        "n": len(values), "n_ref": len(reference_top1), "losers": losers,
                        "tradeoff": tradeoff_verdict(rise, p_rise, len(losers)),
                        "calibration": _calibration_verdict(table1, setting)})
    return results


def _calibration_verdict(table1, setting):
    if "calibration_p" not in table1:
        return ""
    rows = rows_where(table1, "setting", setting)
    rows = rows[rows["confidence"] == VERDICT_CONFIDENCE]
    return verdict(rows.iloc[0]) if len(rows) else ""


def losers_text(losers, limit=SHOWN_LOSERS):
    """'Shirt -13.4 pts (p=0.0027, BH q=0.027), ...' or 'no class'."""
    return ", ".join(f"{row['class_name']} {100 * row['diff']:+.1f} pts "
                     f"(p={row['p_less']:.2g}, BH q={row['q_less']:.2g})"
                     for _, row in losers.head(limit).iterrows()) or "no class"


def verdict_line(result, label):
    """The one-line answer for one setting (the demo's and the report's)."""
    return (f"{label}={format_setting(result['setting'])}: mean {result['rise']:+.2f} pts "
            f"(n={result['n']} / {result['n_ref']} seeds; one-sided Welch "
            f"p={result['p_rise']:.2g}); falls at BH q<{SIGNIFICANT}: "
            f"{losers_text(result['losers'])} -> {result['tradeoff']}")
