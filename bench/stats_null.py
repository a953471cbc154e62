"""Simulation check of the per-class tests under the conditions users have (issue 29).

Part 1, no effect at all: for every combination of
  * accuracy model: `continuous` (per-class accuracy plus Gaussian seed noise, no steps),
    `binomial50` (50 val images per class, each run's count Binomial(50, p): ImageNet's
    50 images, accuracy in steps of 2 points) and `images50` (50 images per class with
    their own difficulty q ~ Beta(2p, 2(1-p)), each run right on an image with probability
    q: less seed variance than binomial, so more tied arms);
  * seeds per arm: 2, 3, 5, 10;
  * seed effect: none, or a per-(seed, class) offset of sd 2 points shared by both arms'
    runs of one seed (the project's design: a seed fixes init, data order and crops),
it simulates SWEEPS sweeps of one setting against a reference over CLASSES classes with
ImageNet-like true accuracies (Beta(2.8, 0.9), mean 0.76), runs the Welch and the paired
test of ffcv_bias.analysis exactly as the analysis does, BH within the setting, and
prints the share of sweeps with ANY class at BH q < 0.05 (the family-wise error under the
complete null: the goal is <= 7%), the mean share of classes at raw p < 0.05, and the
count of p = 0.

Part 2, a planted class-dependent gain: two settings, half the classes gain 1.5 points at
one setting and the other half at the other (and, as a control, no gain), 50 images per
class, at 2, 6 and 20 seeds; the share of sweeps whose reported interval for the oracle
gain (analysis/crossfit.py, `oracle_gain_interval`) holds the true gain (computed from the
planted means): its measured coverage.

    .venv/bin/python bench/stats_null.py [--sweeps 400] [--classes 1000] [--seed 0]
        [--json out.json]
"""
import argparse
import json
import sys
import time

import numpy as np

from ffcv_bias.analysis import crossfit, paired, stats

MODELS = ("continuous", "binomial50", "images50")
SEED_COUNTS = (2, 3, 5, 10)
SHARED_SD = 0.02
OWN_SD = 0.02          # continuous model: per-run seed noise
IMAGES = 50
ALPHA = 0.05


def true_accuracies(num_classes, rng):
    return np.clip(rng.beta(2.8, 0.9, num_classes), 0.02, 0.999)


def simulate_arms(model, true_acc, seeds, shared_sd, rng):
    """[2, seeds, classes] accuracies of the reference (0) and the setting (1), no effect."""
    num_classes = len(true_acc)
    shared = rng.normal(0.0, shared_sd, (1, seeds, num_classes)) if shared_sd else 0.0
    if model == "continuous":
        return true_acc + shared + rng.normal(0.0, OWN_SD, (2, seeds, num_classes))
    if model == "binomial50":
        probability = np.clip(true_acc + shared + np.zeros((2, seeds, num_classes)), 0, 1)
        return rng.binomial(IMAGES, probability) / IMAGES
    # images50: per-image difficulty, fixed across runs (the val set is fixed).
    kappa = 2.0
    difficulty = rng.beta(np.maximum(true_acc * kappa, 1e-3)[:, None],
                          np.maximum((1 - true_acc) * kappa, 1e-3)[:, None],
                          (num_classes, IMAGES))
    offset = shared[..., None] if shared_sd else 0.0
    probability = np.clip(difficulty[None, None] + offset, 0, 1)
    probability = np.broadcast_to(probability, (2, seeds, num_classes, IMAGES))
    return (rng.random(probability.shape) < probability).mean(axis=-1)


def null_rates(model, seeds, shared_sd, sweeps, num_classes, rng):
    """{test: (share of sweeps with any q < ALPHA, mean share of classes p < ALPHA,
    count of p == 0)}."""
    results = {}
    counts = {name: [0, 0.0, 0] for name in ("welch", "paired")}
    for _ in range(sweeps):
        accuracy = simulate_arms(model, true_accuracies(num_classes, rng), seeds,
                                 shared_sd, rng)
        for name, test in (("welch", stats.welch_less), ("paired", paired.paired_less)):
            p_less = test(accuracy[1], accuracy[0])["p_less"]
            q_less = stats.benjamini_hochberg(p_less)
            counts[name][0] += bool(np.nanmin(q_less) < ALPHA)
            counts[name][1] += float(np.nanmean(p_less < ALPHA))
            counts[name][2] += int((p_less == 0).sum())
    for name, (any_q, raw, zeros) in counts.items():
        results[name] = {"any_q_below_0.05": any_q / sweeps,
                         "raw_p_below_0.05": raw / sweeps, "p_zero": zeros}
    return results


def planted_gain_coverage(seeds, sweeps, num_classes, gain, rng):
    """Share of sweeps whose oracle-gain interval holds the true gain (two settings, each
    half of the classes better by `gain` at one of them)."""
    covered, lower, upper = 0, [], []
    weights = np.full(num_classes, 1.0 / num_classes)
    present = np.ones((2, seeds), dtype=bool)
    for _ in range(sweeps):
        base = true_accuracies(num_classes, rng)
        true = np.stack([base, base.copy()])
        half = num_classes // 2
        true[0, :half] += gain
        true[1, half:] += gain
        true = np.clip(true, 0, 1)
        truth = weights @ true.max(axis=0) - (true @ weights).max()
        shared = rng.normal(0.0, SHARED_SD, (1, seeds, num_classes))
        probability = np.clip(true[:, None, :] + shared, 0, 1)
        accuracy = rng.binomial(IMAGES, probability) / IMAGES
        result = crossfit.oracle_with_noise_reference(accuracy, present, weights, 0,
                                                      num_permutations=0)
        low, high = crossfit.oracle_gain_interval(result)
        covered += bool(low <= truth <= high)
        lower.append(low - truth)
        upper.append(high - truth)
    return {"coverage": covered / sweeps, "true_gain": gain,
            "mean_lower_minus_truth": float(np.mean(lower)),
            "mean_upper_minus_truth": float(np.mean(upper))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=400)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--coverage-sweeps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    report = {"sweeps": args.sweeps, "classes": args.classes, "null": [], "coverage": []}
    print(f"no effect: {args.sweeps} sweeps x {args.classes} classes per condition; share of "
          f"sweeps with any BH q < {ALPHA} (goal <= 0.07) | mean share of classes with raw "
          f"p < {ALPHA} | classes with p = 0")
    print(f"{'model':>11} {'seeds':>5} {'shared':>6} | {'welch':>22} | {'paired':>22}")
    for model in MODELS:
        for seeds in SEED_COUNTS:
            for shared_sd in (0.0, SHARED_SD):
                rates = null_rates(model, seeds, shared_sd, args.sweeps, args.classes, rng)
                report["null"].append({"model": model, "seeds": seeds,
                                       "shared_sd": shared_sd, **rates})
                cells = [f"{r['any_q_below_0.05']:6.3f} {r['raw_p_below_0.05']:7.4f} "
                         f"{r['p_zero']:6d}" for r in (rates["welch"], rates["paired"])]
                print(f"{model:>11} {seeds:>5} {shared_sd:>6.2f} | {cells[0]:>22} | "
                      f"{cells[1]:>22}", flush=True)
    print(f"\nplanted per-class gain (binomial50, shared seed sd {SHARED_SD}), "
          f"{args.coverage_sweeps} sweeps each: coverage of the oracle-gain interval")
    for gain in (0.015, 0.0):
        for seeds in (2, 6, 20):
            result = planted_gain_coverage(seeds, args.coverage_sweeps, args.classes, gain,
                                           rng)
            report["coverage"].append({"seeds": seeds, **result})
            print(f"  gain {100 * gain:.1f} pts, {seeds:>2} seeds: coverage "
                  f"{result['coverage']:.3f}; lower end - truth "
                  f"{100 * result['mean_lower_minus_truth']:+.2f} pts, upper end - truth "
                  f"{100 * result['mean_upper_minus_truth']:+.2f} pts", flush=True)
    report["seconds"] = time.perf_counter() - start
    print(f"\n{report['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
