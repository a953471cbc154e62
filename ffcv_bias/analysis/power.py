"""Seed planning: how many seeds per arm detect a per-class drop of d points.

From the runs at hand (a pilot of a few seeds per setting), per class:
  * seed_sd: the pooled within-setting standard deviation of the class's accuracy over
    seeds (all settings, ddof=1 per setting, pooled with weights n_s - 1): the noise of
    the Welch test;
  * diff_sd: the pooled standard deviation of the seed-matched differences setting minus
    reference (settings whose seeds match the reference's): the noise of the paired test.

Design stated for each test, one-sided at level alpha = 0.05 (95% confidence), power 0.8,
the same number n of seeds in both arms, a true drop of d accuracy points in one class:
  * Welch (equal n and variances): t has df = 2(n - 1) and noncentrality
    d / (seed_sd sqrt(2 / n));
  * paired: df = n - 1 and noncentrality d / (diff_sd / sqrt(n)).
Power = P(T' < -t_crit) with T' noncentral t (scipy.special.nctdtr), exact rather than a
normal approximation, which undercounts at the small n these sweeps use. The smallest n
with power >= 0.8 is found by bisection over n (power rises with n), vectorized over
classes and d. The planning takes the pilot's sd as the truth: with few pilot seeds it is
itself uncertain (a 5-seed sd is off by +-35% at 1 sd), and the level is per class, with
no correction for the number of classes tested.
"""
import numpy as np
import pandas as pd
from scipy.special import nctdtr, stdtrit

from ffcv_bias.analysis.paired import matched_rows

DROPS_POINTS = (1, 2, 5, 10)
ALPHA = 0.05
TARGET_POWER = 0.8
MAX_SEEDS = 100_000        # reported as NaN beyond this: the drop is not detectable


def power_one_sided(n, drop, sd, paired, alpha=ALPHA):
    """Power of the one-sided test (Welch: equal n / variances; paired) at n seeds per arm
    to detect a drop `drop` (fraction) when the noise sd is `sd`; arrays broadcast."""
    n = np.asarray(n, dtype=np.float64)
    df = n - 1.0 if paired else 2.0 * (n - 1.0)
    standard_error = sd / np.sqrt(n) if paired else sd * np.sqrt(2.0 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        noncentrality = np.asarray(drop / standard_error, dtype=np.float64)
    critical = stdtrit(df, 1.0 - alpha)
    # A drop makes t negative; by symmetry P(T'(-nc) < -c) = P(T'(nc) > c) = 1 - cdf.
    # nctdtr returns NaN far out in the tail (noncentrality ~40 at df 30); at 20 the
    # power is already above 0.998 for every df >= 1, so clamping there cannot move a
    # decision about power 0.8.
    power = 1.0 - nctdtr(df, np.minimum(noncentrality, 20.0), critical)
    return np.where(np.asarray(sd) == 0, 1.0, power)


def seeds_needed(drop, sd, paired, alpha=ALPHA, target=TARGET_POWER, max_seeds=MAX_SEEDS):
    """Smallest n >= 2 with power >= target, per element of the broadcast (drop, sd);
    NaN where sd is NaN or even max_seeds is not enough."""
    drop, sd = np.broadcast_arrays(np.asarray(drop, float), np.asarray(sd, float))
    known = np.isfinite(sd)
    sd_safe = np.where(known, sd, 1.0)
    reachable = power_one_sided(max_seeds, drop, sd_safe, paired, alpha) >= target
    low, high = _bracket(drop, sd_safe, paired, alpha, target, max_seeds)
    while np.any(high - low > 1):
        open_ = high - low > 1                 # settled elements keep their bracket
        middle = np.floor((low + high) / 2)
        enough = power_one_sided(middle, drop, sd_safe, paired, alpha) >= target
        high = np.where(open_ & enough, middle, high)
        low = np.where(open_ & ~enough, middle, low)
    return np.where(known & reachable, high, np.nan)


def _bracket(drop, sd, paired, alpha, target, max_seeds):
    """(low, high): power(low) < target <= power(high), from the normal approximation
    n_z = k (z_alpha + z_power)^2 (sd / drop)^2 (k = 2 for Welch, 1 paired), which the
    exact n is at least; verified, and widened to (1, max_seeds) where it fails. Saves
    most bisection steps (each is one noncentral-t evaluation per class and d)."""
    from scipy.special import ndtri
    with np.errstate(divide="ignore", invalid="ignore"):
        n_normal = ((1 if paired else 2) * (ndtri(1 - alpha) + ndtri(target)) ** 2
                    * (sd / drop) ** 2)
    n_normal = np.clip(np.nan_to_num(n_normal, nan=1.0, posinf=max_seeds), 1, max_seeds)
    low = np.clip(np.floor(n_normal) - 1, 1, max_seeds - 1)
    high = np.clip(np.ceil(1.1 * n_normal) + 4, 2, max_seeds)
    low_ok = (low == 1) | (power_one_sided(low, drop, sd, paired, alpha) < target)
    high_ok = power_one_sided(high, drop, sd, paired, alpha) >= target
    return (np.where(low_ok, low, 1.0),
            np.where(high_ok, high, float(max_seeds)))


def _pooled_sd(arms):
    """Pooled ddof=1 sd per column over the arms with >= 2 rows, and its df; NaN if none."""
    sum_squares, df = 0.0, 0
    for arm in arms:
        if len(arm) >= 2:
            sum_squares = sum_squares + ((arm - arm.mean(axis=0)) ** 2).sum(axis=0)
            df += len(arm) - 1
    if df == 0:
        return None, 0
    return np.sqrt(sum_squares / df), df


def pilot_noise(data):
    """(seed_sd [C] or None, its df, diff_sd [C] or None, its df) from the runs."""
    seed_sd, seed_df = _pooled_sd(data.acc)
    reference_acc = data.acc[data.reference_index]
    differences = []
    for index in range(len(data.settings)):
        if index == data.reference_index:
            continue
        rows = matched_rows(data.seeds[index], data.seeds[data.reference_index])
        if rows is not None:
            differences.append(data.acc[index][rows[0]] - reference_acc[rows[1]])
    diff_sd, diff_df = _pooled_sd(differences)
    return seed_sd, seed_df, diff_sd, diff_df


def power_table(data, drops_points=DROPS_POINTS):
    """power.csv: per (class, d): the pilot noise and the seeds per arm each test needs,
    and the power each test has at the seeds per arm run now."""
    seed_sd, seed_df, diff_sd, diff_df = pilot_noise(data)
    num_classes = data.num_classes
    nan = np.full(num_classes, np.nan)
    seed_sd = nan if seed_sd is None else seed_sd
    diff_sd = nan if diff_sd is None else diff_sd
    seeds_now = min(len(a) for a in data.acc)
    frames = []
    for drop_points in drops_points:
        drop = drop_points / 100.0
        frames.append(pd.DataFrame({
            "class": np.arange(num_classes), "class_name": data.class_names,
            "drop_points": drop_points,
            "seed_sd": seed_sd, "seed_sd_df": seed_df,
            "seeds_per_arm_welch": seeds_needed(drop, seed_sd, paired=False),
            "diff_sd": diff_sd, "diff_sd_df": diff_df,
            "seeds_per_arm_paired": seeds_needed(drop, diff_sd, paired=True),
            "seeds_per_arm_now": seeds_now,
            "power_now_welch": _power_now(seeds_now, drop, seed_sd, paired=False),
            "power_now_paired": _power_now(seeds_now, drop, diff_sd, paired=True)}))
    return pd.concat(frames, ignore_index=True)


def _power_now(seeds, drop, sd, paired):
    if seeds < 2:
        return np.full(len(sd), np.nan)
    return np.where(np.isfinite(sd), power_one_sided(seeds, drop, np.nan_to_num(sd, nan=1.0),
                                                     paired), np.nan)


def planning_line(power):
    """One summary line: median (90th-percentile) class's seeds per arm for each d."""
    if power.empty or power["seed_sd"].isna().all():
        return "seed planning: needs at least 2 seeds at some setting (no seed variance)"
    parts = []
    for drop_points, block in power.groupby("drop_points", sort=True):
        welch = block.loc[block["seed_sd"].notna(), "seeds_per_arm_welch"]
        text = f"d = {drop_points:g} pts: Welch {_quantiles(welch)}"
        if block["diff_sd"].notna().any():
            paired = block.loc[block["diff_sd"].notna(), "seeds_per_arm_paired"]
            text += f", paired {_quantiles(paired)}"
        parts.append(text)
    return ("seeds per arm for power 0.8 at 95% one-sided, median [90th percentile] class: "
            + "; ".join(parts))


def _quantiles(needed):
    """'median [p90]' of seed counts; '>100000' where the drop is out of reach."""
    values = needed.to_numpy(dtype=float)
    filled = np.where(np.isnan(values), np.inf, values)
    # method="higher": a count some class really needs, never an interpolated fraction.
    median = np.quantile(filled, 0.5, method="higher")
    p90 = np.quantile(filled, 0.9, method="higher")
    return f"{_count(median)} [{_count(p90)}]"


def _count(value):
    return f">{MAX_SEEDS}" if not np.isfinite(value) else f"{value:.0f}"
