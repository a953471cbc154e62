"""Cross-fitted oracle and selection, and a permutation (noise-only) reference for the gain.

Why: the in-sample oracle (stats.oracle, the paper's 77.14% -> 79.37%) picks each class's
best setting on the same seeds it then scores, so with S settings and seed noise it gains
something even when every setting is identical (the max of S noisy means is biased up).
Cross-fitting removes that bias:

  * the seeds are split into K folds (default 2), one fold per seed for every setting
    (runs of one seed share initialization, data order and crops, so a seed's runs must
    stay on one side), balanced so that every setting's own seeds are spread over the
    folds (`seed_folds`): with unequal seed counts (reference 0-9, others 0-3) or
    disjoint seeds every setting with at least K seeds still takes part; a setting
    without runs in every fold is left out of the cross-fit and named;
  * for each fold: every class takes the setting whose mean over the OTHER folds is
    highest, and is scored by its mean over THIS fold; the folds are averaged.

The cross-fitted gain (oracle minus the best single setting, both cross-fitted) cannot be
inflated by selection on noise, but when the gains are real it is biased LOW: its choices
are made on (K-1)/K of the seeds, and noisier choices are worse ones (with a planted
1.5-point gain at 6 seeds it reports about 0.65). The in-sample gain is biased HIGH. So
the report gives both as the ends of an interval, each widened by 1.96 standard errors
over the classes (`oracle_gain_interval`), whose coverage of a planted gain is measured
by simulation at 2, 6 and 20 seeds (bench/stats_null.py; docs/statistics.md). A
noise-only reference for the gain comes from permuting the
setting labels within each seed (a fixed, seeded number of permutations): that keeps the
seed structure and destroys every real difference between settings, so the in-sample gain
of the permuted data is what selection on noise alone gives.

Everything is vectorized over classes and permutations: one seed-level array [S, J, C]
(settings x seeds x classes), per-fold sums from it, and a single matrix product per
sparse matrix product for all permutations; no Python loop runs over classes.
"""
import numpy as np
import pandas as pd

from ffcv_bias.analysis.stats import argmax_nearest, scored_classes, selection_scores
from ffcv_bias.analysis.tables import format_setting

DEFAULT_FOLDS = 2
DEFAULT_PERMUTATIONS = 100
PERMUTATION_SEED = 0          # fixed: the same records give the same noise reference
MIN_PERMUTATIONS = 20
PERMUTATION_WORK = 2 * 10 ** 8   # multiply-adds: ~20 permutations at 10 x 1,000 x 1,000


# ----------------------------------------------------------------------------------------
# Seed-level layout
# ----------------------------------------------------------------------------------------

def _seed_sort_key(key):
    seed, occurrence = key
    is_number = isinstance(seed, (int, float)) and not isinstance(seed, bool)
    return (0, seed, "", occurrence) if is_number else (1, 0, str(seed), occurrence)


def seed_keys(seeds):
    """Per run, (seed, occurrence): the n-th run of one seed at a setting is occurrence n,
    so two runs of one seed at one setting (only possible with --ignore-key) stay apart."""
    seen = {}
    keys = []
    for seed in seeds:
        keys.append((seed, seen.get(seed, 0)))
        seen[seed] = seen.get(seed, 0) + 1
    return keys


def seed_layout(data):
    """(values [S, J, C], top1 [S, J], present [S, J], keys [J]) of a SettingData.

    Column j holds every setting's run of seed key j (NaN / absent where a setting lacks
    it); seed keys are in sorted order, so folds are contiguous blocks of seeds.
    """
    per_setting = [seed_keys(seeds) for seeds in data.seeds]
    keys = sorted({k for ks in per_setting for k in ks}, key=_seed_sort_key)
    column = {k: j for j, k in enumerate(keys)}
    num_settings, num_seeds = len(data.settings), len(keys)
    values = np.full((num_settings, num_seeds, data.num_classes), np.nan)
    top1 = np.full((num_settings, num_seeds), np.nan)
    present = np.zeros((num_settings, num_seeds), dtype=bool)
    for s, ks in enumerate(per_setting):
        columns = [column[k] for k in ks]
        values[s, columns] = data.acc[s]
        top1[s, columns] = data.top1[s]
        present[s, columns] = True
    return values, top1, present, keys


def seed_folds(present, folds):
    """Fold index [J] of each seed column, one fold per seed for every setting (a seed's
    runs share initialization, data order and crops, so they stay on one side), chosen so
    that every setting's own seeds are spread over the folds.

    Greedy in sorted seed order: seed j goes to the fold where the settings that ran it
    have the fewest runs so far (the sparsest such setting first, then their total, then
    the fold with fewest seeds, then the lowest index). With every setting on the same
    seeds this is an alternation (0, 1, 0, 1, ...); with reference seeds 0-9 and other
    settings 0-3, every setting still lands in both folds, which contiguous blocks of the
    union (0-4 / 5-9) would not do.
    """
    num_settings, num_seeds = present.shape
    per_setting = np.zeros((folds, num_settings), dtype=np.int64)
    per_fold = np.zeros(folds, dtype=np.int64)
    fold_of_seed = np.zeros(num_seeds, dtype=np.int64)
    for j in range(num_seeds):
        ran = present[:, j]

        def load(fold):
            counts = per_setting[fold, ran]
            return int(counts.max(initial=0)), int(counts.sum()), int(per_fold[fold]), fold
        fold = min(range(folds), key=load)
        fold_of_seed[j] = fold
        per_setting[fold, ran] += 1
        per_fold[fold] += 1
    return fold_of_seed


def settings_in_every_fold(present, fold_of_seed, folds):
    """[S] bool: the settings with at least one run in every fold (the others cannot be
    chosen on some folds and scored on the rest, so the cross-fit leaves them out)."""
    return np.stack([present[:, fold_of_seed == k].any(axis=1) for k in range(folds)]).all(axis=0)


# ----------------------------------------------------------------------------------------
# Fold sums (observed and permuted)
# ----------------------------------------------------------------------------------------

def fold_sums(values, present, fold_of_seed, folds):
    """(sums [K, S, C], counts [K, S]) of the runs of each fold and setting (absent runs
    are NaN in `values` and count as nothing)."""
    runs = np.where(present[:, :, None], values, 0.0)
    sums = np.stack([runs[:, fold_of_seed == k].sum(axis=1) for k in range(folds)])
    counts = np.stack([present[:, fold_of_seed == k].sum(axis=1) for k in range(folds)])
    return sums, counts


def within_seed_permutations(present, num_permutations, rng):
    """source [P, J, S]: in permutation p, setting s of seed j gets the run of setting
    source[p, j, s]. Only settings that ran seed j are shuffled among themselves (absent
    ones map to absent ones), so the runs-per-setting pattern is unchanged."""
    num_settings, num_seeds = present.shape
    present_js = present.T                                      # [J, S]
    keys = rng.random((num_permutations, num_seeds, num_settings))
    keys[:, ~present_js] = np.inf                               # absent sources sort last
    order = np.argsort(keys, axis=-1, kind="stable")            # present first, shuffled
    slots = np.where(present_js, np.arange(num_settings), np.inf)
    targets = np.argsort(slots, axis=-1, kind="stable")         # present slots, in order
    source = np.empty_like(order)
    p_index = np.arange(num_permutations)[:, None, None]
    j_index = np.arange(num_seeds)[None, :, None]
    source[p_index, j_index, targets[None]] = order
    return source


def permuted_fold_sums(values, present, fold_of_seed, folds, source):
    """sums [P, K, S, C] of the permuted data: a sparse one-hot [P*K*S, S*J] matrix (one
    entry per permutation, setting and seed) times the runs [S*J, C], so the work is one
    multiply-add per permuted run and class, P*S*J*C in all."""
    from scipy.sparse import csr_matrix   # only here: the rest of the analysis needs none
    num_settings, num_seeds, num_classes = values.shape
    runs = np.where(present[:, :, None], values, 0.0).reshape(num_settings * num_seeds,
                                                              num_classes)
    num_permutations = len(source)
    p_index, j_index, s_index = np.meshgrid(np.arange(num_permutations),
                                            np.arange(num_seeds), np.arange(num_settings),
                                            indexing="ij")
    rows = (p_index * folds + fold_of_seed[j_index]) * num_settings + s_index
    columns = source * num_seeds + j_index
    one_hot = csr_matrix((np.ones(rows.size), (rows.ravel(), columns.ravel())),
                         shape=(num_permutations * folds * num_settings,
                                num_settings * num_seeds))
    return (one_hot @ runs).reshape(num_permutations, folds, num_settings, num_classes)


def permutation_count(num_settings, num_seeds, num_classes):
    """DEFAULT_PERMUTATIONS, fewer (not under MIN_PERMUTATIONS) when settings x seeds x
    classes is so large that they would cost more than PERMUTATION_WORK multiply-adds:
    there the noise gain is a mean over many classes and already precise (its sd over the
    permutations is reported beside it). Deterministic: same records, same count."""
    per_permutation = max(1, num_settings * num_seeds * num_classes)
    return int(min(DEFAULT_PERMUTATIONS, max(MIN_PERMUTATIONS,
                                              PERMUTATION_WORK // per_permutation)))


# ----------------------------------------------------------------------------------------
# Oracle gains from fold sums (any leading batch axis)
# ----------------------------------------------------------------------------------------

def _divide(sums, counts):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[..., None] > 0, sums / counts[..., None], np.nan)


def _weighted(weights, means):
    """weights @ means over the last axis, NaN where a needed mean is NaN."""
    return np.einsum("...c,c->...", means, weights)


def oracle_gains(sums, counts, weights, reference_index, eligible=None):
    """In-sample and cross-fitted oracle / best single setting from fold sums.

    sums [..., K, S, C], counts [K, S] (the same for every permutation); weights [C] sum
    to 1; eligible [S] (default all): the settings the cross-fit may choose (those with
    runs in every fold). Returns a dict of [...] arrays (top-1 as fractions) plus
    'crossfit_class_acc' [..., C]: each class's held-out accuracy at its cross-fitted
    choice, averaged over folds, and the standard errors over classes of both gains.
    """
    folds = counts.shape[0]
    total_counts = counts.sum(axis=0)
    eligible = np.ones(counts.shape[1], dtype=bool) if eligible is None else eligible
    means = _divide(sums.sum(axis=-3), total_counts)            # [..., S, C]
    oracle_in = _weighted(weights, np.nanmax(means, axis=-2))
    single_in = _weighted(weights, means)                       # [..., S]
    best_in = np.nanmax(single_in, axis=-1)
    best_index = argmax_nearest(single_in, reference_index, axis=-1)
    best_means = np.take_along_axis(means, best_index[..., None, None], axis=-2)[..., 0, :]
    gain_in_se = _weighted_mean_se(np.nanmax(means, axis=-2) - best_means, weights)
    oracle_folds, best_folds, class_acc, class_gain = [], [], [], []
    for k in range(folds):
        chosen_counts, scored_counts = total_counts - counts[k], counts[k]
        usable = (chosen_counts > 0) & (scored_counts > 0) & eligible       # [S]
        if not usable.any():
            continue
        choose = _divide(sums.sum(axis=-3) - sums[..., k, :, :], chosen_counts)
        choose = np.where(usable[:, None], choose, np.nan)
        score = _divide(sums[..., k, :, :], scored_counts)
        per_class_pick = argmax_nearest(choose, reference_index, axis=-2)   # [..., C]
        held_out = np.take_along_axis(score, per_class_pick[..., None, :], axis=-2)[..., 0, :]
        single_pick = argmax_nearest(_weighted(weights, choose), reference_index, axis=-1)
        single = np.take_along_axis(_weighted(weights, score), single_pick[..., None],
                                    axis=-1)[..., 0]
        oracle_folds.append(_weighted(weights, held_out))
        best_folds.append(single)
        class_acc.append(held_out)
        single_scores = np.take_along_axis(score, single_pick[..., None, None], axis=-2)
        class_gain.append(held_out - single_scores[..., 0, :])
    if not oracle_folds:
        nan = np.full(oracle_in.shape, np.nan)
        return {"oracle_in": oracle_in, "best_in": best_in, "gain_in": oracle_in - best_in,
                "gain_in_se": gain_in_se,
                "oracle_crossfit": nan, "best_crossfit": nan, "gain_crossfit": nan,
                "crossfit_class_acc": np.full(means.shape[:-2] + means.shape[-1:], np.nan),
                "gain_crossfit_se": nan,
                "folds_used": 0}
    oracle_cf = np.mean(oracle_folds, axis=0)
    best_cf = np.mean(best_folds, axis=0)
    return {"oracle_in": oracle_in, "best_in": best_in, "gain_in": oracle_in - best_in,
            "gain_in_se": gain_in_se, "oracle_crossfit": oracle_cf, "best_crossfit": best_cf,
            "gain_crossfit": oracle_cf - best_cf,
            "crossfit_class_acc": np.mean(class_acc, axis=0), "folds_used": len(oracle_folds),
            "gain_crossfit_se": _weighted_mean_se(np.mean(class_gain, axis=0), weights)}


def _weighted_mean_se(per_class, weights):
    """Standard error of sum_c w_c x_c (weights summing to 1) treating classes as
    independent draws: sqrt(C / (C - 1) * sum_c w_c^2 (x_c - mean_w)^2)."""
    num_classes = per_class.shape[-1]
    if num_classes < 2:
        return np.full(per_class.shape[:-1], np.nan)
    centred = per_class - _weighted(weights, per_class)[..., None]
    return np.sqrt(num_classes / (num_classes - 1) * _weighted(weights ** 2, centred ** 2))


def oracle_with_noise_reference(values, present, weights, reference_index,
                                folds=DEFAULT_FOLDS, num_permutations=DEFAULT_PERMUTATIONS,
                                rng_seed=PERMUTATION_SEED):
    """Observed gains (oracle_gains) and, under `noise_*`, the same over setting labels
    permuted within each seed: [P] arrays. values [S, J, C] on the scored classes only."""
    num_seeds = values.shape[1]
    folds = min(folds, num_seeds)
    fold_of_seed = seed_folds(present, max(folds, 1))
    eligible = settings_in_every_fold(present, fold_of_seed, max(folds, 1))
    sums, counts = fold_sums(values, present, fold_of_seed, max(folds, 1))
    observed = oracle_gains(sums, counts, weights, reference_index, eligible)
    if folds < 2:
        observed.update(folds_used=0, oracle_crossfit=np.nan, best_crossfit=np.nan,
                        gain_crossfit=np.nan)
        eligible = np.zeros_like(eligible)
    observed["folds"] = folds
    observed["eligible"] = eligible
    if num_permutations > 0:
        source = within_seed_permutations(present, num_permutations,
                                          np.random.default_rng(rng_seed))
        permuted = oracle_gains(permuted_fold_sums(values, present, fold_of_seed,
                                                   max(folds, 1), source),
                                counts, weights, reference_index, eligible)
        observed["noise_gain_in"] = permuted["gain_in"]
        observed["noise_gain_crossfit"] = (permuted["gain_crossfit"] if folds >= 2
                                           else np.full(num_permutations, np.nan))
    return observed


# ----------------------------------------------------------------------------------------
# Tables for the analysis
# ----------------------------------------------------------------------------------------

def _scored_weights(data, scored):
    weights = np.where(scored, data.class_weights(), 0.0)[scored]
    return weights / weights.sum()


# z of the interval's ends; its coverage is measured, not assumed (bench/stats_null.py,
# docs/statistics.md "How much of the oracle gain is real").
INTERVAL_Z = 1.96
# Measured coverage of the interval (bench/stats_null.py, 400 simulated sweeps of 1,000
# classes at 50 images per class for each case; docs/statistics.md has the table).
MEASURED_COVERAGE = ("in simulations it held a planted 1.5-point gain in 100% of sweeps at 2, "
                     "6 and 20 seeds and a zero gain in 95.5-96.8%: docs/statistics.md")


def oracle_gain_interval(result):
    """(low, high) for the gain of per-class choices: from the cross-fitted gain (biased
    low when the gains are real: its choices are made on (K-1)/K of the seeds) minus
    INTERVAL_Z standard errors, to the in-sample gain (biased high: chosen and scored on
    the same seeds) plus INTERVAL_Z standard errors; standard errors over classes."""
    low = result["gain_crossfit"] - INTERVAL_Z * result["gain_crossfit_se"]
    high = result["gain_in"] + INTERVAL_Z * result["gain_in_se"]
    return float(low), float(high)


def _gain_sentence(row):
    """One sentence: what is known of the per-class oracle's gain, with its seeds."""
    gain_in, gain_cf = 100 * row["oracle_gain_in_sample"], 100 * row["oracle_gain_crossfit"]
    if not np.isfinite(gain_cf):
        return (f"The in-sample oracle gains {gain_in:+.2f} pts; it cannot be cross-fitted "
                f"here (needs at least 2 seeds in every setting), so none of it is known to "
                f"be real.")
    text = (f"Per-class choices gain between {gain_cf:+.2f} pts (cross-fitted: chosen on "
            f"some of the {row['n_seeds']} seeds, scored on the others, {row['crossfit_folds']}"
            f" folds; a lower bound when the gains are real) and {gain_in:+.2f} pts (in-sample:"
            f" chosen and scored on the same seeds; an upper bound); interval "
            f"[{100 * row['oracle_gain_low']:+.2f}, {100 * row['oracle_gain_high']:+.2f}] pts "
            f"(each end ± {INTERVAL_Z} standard errors over the classes; {MEASURED_COVERAGE})")
    if row["n_permutations"]:
        # With real differences the noise part of the observed gain is smaller than this
        # (a class with a clear winner is not selected on noise): a reference, not a split.
        noise = 100 * row["noise_gain_in_sample_mean"]
        text += (f"; with the setting labels shuffled within each seed "
                 f"({row['n_permutations']} permutations) the in-sample gain is still "
                 f"{noise:+.2f} ± {100 * row['noise_gain_in_sample_sd']:.2f} pts: what "
                 f"selection on noise alone gives when no setting differs")
    if row.get("crossfit_settings_left_out"):
        text += f"; {row['crossfit_settings_left_out']}"
    return text + "."


def _left_out_text(data, eligible):
    """'' or the settings the cross-fit could not use (runs missing from a fold)."""
    left_out = [format_setting(data.settings[i]) for i in np.flatnonzero(~eligible)]
    if not left_out or len(left_out) == len(data.settings):
        return ""
    return ("left out of the cross-fit (too few seeds to have runs in every fold): setting(s) "
            + ", ".join(left_out))


def crossfit_oracle(data, class_means, folds=DEFAULT_FOLDS, num_permutations=None):
    """(columns to add to oracle.csv as a dict, per-class held-out accuracy [C]).

    num_permutations: of the noise reference; None: permutation_count of the data's size.
    """
    scored = scored_classes(class_means)
    values, _, present, keys = seed_layout(data)
    if not scored.all():       # (a copy, so only when a class must go)
        values = values[:, :, scored]
    if num_permutations is None:
        num_permutations = permutation_count(*values.shape)
    result = oracle_with_noise_reference(values, present,
                                         _scored_weights(data, scored), data.reference_index,
                                         folds, num_permutations)
    noise_in = result.get("noise_gain_in", np.array([]))
    noise_cf = result.get("noise_gain_crossfit", np.array([]))
    gain_in = float(result["gain_in"])
    columns = {
        "oracle_gain_in_sample": gain_in,
        "oracle_top1_crossfit": float(result["oracle_crossfit"]),
        "best_top1_crossfit": float(result["best_crossfit"]),
        "oracle_gain_crossfit": float(result["gain_crossfit"]),
        "oracle_gain_crossfit_se": float(result["gain_crossfit_se"])
                                   if np.isfinite(result["gain_crossfit"]) else np.nan,
        "oracle_gain_in_sample_se": float(result["gain_in_se"]),
        "oracle_gain_low": oracle_gain_interval(result)[0],
        "oracle_gain_high": oracle_gain_interval(result)[1],
        "crossfit_folds": int(result["folds"]) if result["folds"] >= 2 else 0,
        "n_seeds": len(keys),
        "n_permutations": len(noise_in),
        "noise_gain_in_sample_mean": float(noise_in.mean()) if len(noise_in) else np.nan,
        "noise_gain_in_sample_sd": float(noise_in.std(ddof=1)) if len(noise_in) > 1 else np.nan,
        "noise_gain_crossfit_mean": float(np.mean(noise_cf)) if len(noise_cf) else np.nan,
        # Share of permutations whose in-sample gain reaches the observed one (+1 smoothed).
        "permutation_p_gain": (float((1 + (noise_in >= gain_in).sum()) / (1 + len(noise_in)))
                               if len(noise_in) else np.nan),
        "crossfit_settings_left_out": (_left_out_text(data, result["eligible"])
                                       if result["folds"] >= 2 else ""),
    }
    columns["how_much_is_real"] = _gain_sentence(columns)
    class_acc = np.full(data.num_classes, np.nan)
    if columns["crossfit_folds"]:
        class_acc[scored] = result["crossfit_class_acc"]
    return columns, class_acc


def crossfit_selection(data, class_means, folds=DEFAULT_FOLDS, worst_fraction=0.1):
    """Per criterion of stats.selection: the held-out score of its cross-fitted pick.

    For each fold the criterion picks a setting on the other folds' seeds and is scored on
    this fold's (same definitions as stats.selection), averaged over folds. Returns a
    DataFrame keyed by criterion with score_crossfit, top1_crossfit,
    worst_class_acc_crossfit, cost_top1_crossfit (vs the mean-accuracy pick, same folds)
    and pick_agreement (share of folds picking the in-sample choice's setting).
    """
    values, top1, present, keys = seed_layout(data)
    scored = scored_classes(class_means)
    values = values[:, :, scored]   # a class without val images has no score to average
    folds = min(folds, len(keys))
    criteria = list(selection_scores(class_means, np.zeros(len(data.settings)),
                                     worst_fraction))
    if folds < 2:
        return pd.DataFrame({"criterion": criteria})
    fold_of_seed = seed_folds(present, folds)
    eligible = settings_in_every_fold(present, fold_of_seed, folds)
    sums, counts = fold_sums(values, present, fold_of_seed, folds)
    top1_sums = np.stack([np.where(present, top1, 0.0)[:, fold_of_seed == k].sum(axis=1)
                          for k in range(folds)])
    in_sample_picks = _in_sample_picks(data, class_means, worst_fraction)
    per_fold = []
    for k in range(folds):
        chosen_counts, scored_counts = counts.sum(axis=0) - counts[k], counts[k]
        usable = (chosen_counts > 0) & (scored_counts > 0) & eligible
        if not usable.any():
            continue
        choose_means = _divide(sums.sum(axis=0) - sums[k], chosen_counts)
        choose_top1 = (top1_sums.sum(axis=0) - top1_sums[k]) / np.maximum(chosen_counts, 1)
        held_means = _divide(sums[k], scored_counts)
        held_top1 = top1_sums[k] / np.maximum(scored_counts, 1)
        choose_scores = _scores_on(usable, choose_means, choose_top1, worst_fraction)
        held_scores = _scores_on(usable, held_means, held_top1, worst_fraction)
        picks = {c: int(argmax_nearest(s, data.reference_index))
                 for c, s in choose_scores.items()}
        for criterion, pick in picks.items():
            per_fold.append({
                "criterion": criterion, "score_crossfit": held_scores[criterion][pick],
                "top1_crossfit": held_top1[pick],
                "worst_class_acc_crossfit": held_scores["worst_class"][pick],
                "cost_top1_crossfit": held_top1[pick] - held_top1[picks["mean_accuracy"]],
                "pick_agreement": float(pick == in_sample_picks[criterion])})
    if not per_fold:
        return pd.DataFrame({"criterion": criteria})
    table = pd.DataFrame(per_fold).groupby("criterion", sort=False).mean().reset_index()
    table["crossfit_folds"] = folds
    table["crossfit_settings_left_out"] = _left_out_text(data, eligible)
    return table


def _in_sample_picks(data, class_means, worst_fraction):
    mean_top1 = np.array([t.mean() for t in data.top1])
    return {c: int(argmax_nearest(s, data.reference_index))
            for c, s in selection_scores(class_means, mean_top1, worst_fraction).items()}


def _scores_on(usable, means, top1, worst_fraction):
    """selection_scores over the usable settings only, as [S] arrays (NaN elsewhere), so a
    setting without runs on one side of a fold neither wins nor removes classes."""
    subset = selection_scores(means[usable], top1[usable], worst_fraction)
    full = {}
    for criterion, score in subset.items():
        full[criterion] = np.full(len(usable), np.nan)
        full[criterion][usable] = score
    return full
