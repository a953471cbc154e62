"""The prune command: kept indices per sparsity, the keep-ratio table and figure, the sweep."""
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ffcv_bias.common import atomic, yaml_files
from ffcv_bias.common.errors import EXIT_FAILURE
from ffcv_bias.common.tables import write_csv
from ffcv_bias.train.fastargs_strict import ConfigError
from ffcv_bias.studies.diet import quota
from ffcv_bias.studies.diet.common import (CLASS_QUOTA_LAPLACE, QUOTA_POLICIES, SCORE_NAMES,
                                           DietError, format_sparsity,
                                           load_scores, parse_seeds, resolve_trainer_config,
                                           trainer_args)

PRUNE_META_FILE = "prune.json"


class NoRoomForPrune(DietError):
    """The disk (or quota) filled up while the prune was written (exit status 1)."""
    exit_code = EXIT_FAILURE


def no_room_message(no_room, out, created, publishing):
    """One line for a full disk: what OUT holds now (the staging folder is gone)."""
    if created:
        kept = "nothing written (the folder is not created)"
    elif not publishing:
        kept = "nothing written there (its earlier files are kept)"
    else:  # a rename can need a directory block: some files are the new ones
        kept = "some of its files are the new ones, some the earlier ones"
    return (f"{no_room.strerror} while writing the pruned sets into {out}: {kept}; free "
            f"space and rerun the prune")


def parse_sparsities(text):
    """'0.1,0.2,0.5' -> [0.1, 0.2, 0.5]: distinct, each in (0, 1)."""
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise DietError(f"--sparsity must be a comma-separated list of numbers, not {text!r}")
    if not values:
        raise DietError("--sparsity lists no value")
    for value in values:
        if not 0 < value < 1:
            raise DietError(f"sparsity {value} is not in (0, 1) (the dense reference, "
                            f"sparsity 0, is always added)")
    if len(set(values)) != len(values):
        raise DietError(f"--sparsity lists a value twice: {text}")
    return sorted(values)


def kept_count(num_samples, sparsity):
    return int(round((1.0 - sparsity) * num_samples))


def keep_indices(scores, sparsity):
    """Indices of the round((1 - sparsity) N) highest scores, ascending.

    Ranking is by score, descending, then by index, ascending: of equal scores the lower
    index is kept, so the choice never depends on the sort algorithm.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise DietError("the scores hold NaN or infinite values")
    count = kept_count(len(scores), sparsity)
    if count < 1:
        raise DietError(f"sparsity {sparsity} keeps no image of {len(scores)}")
    ranking = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(ranking[:count]).astype(np.int64)


def keep_ratio_table(labels, class_names, kept_by_sparsity):
    """One row per class: class, class_name, n_total, then kept_<s>, ratio_<s> per level."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    totals = np.bincount(labels, minlength=num_classes)
    table = pd.DataFrame({"class": np.arange(num_classes),
                          "class_name": list(class_names), "n_total": totals})
    for sparsity, kept in kept_by_sparsity.items():
        counts = np.bincount(labels[kept], minlength=num_classes)
        name = format_sparsity(sparsity)
        table[f"kept_{name}"] = counts
        with np.errstate(invalid="ignore", divide="ignore"):
            table[f"ratio_{name}"] = counts / totals
    return table


def _yaml_value(text):
    """A trainer override's text as the YAML scalar a sweep file holds ('5e-4' stays text
    where YAML would not read it back as the same number)."""
    try:
        value = yaml_files.loads(text)
    except yaml_files.YamlFileError:
        return text
    if isinstance(value, (bool, int, float, str)) and value is not None:
        return value
    return text


def parse_set_options(pairs):
    overrides = {}
    for pair in pairs or []:
        match = re.fullmatch(r"-*([A-Za-z_]\w*\.[A-Za-z_]\w*)=(.*)", pair, flags=re.S)
        if not match:
            raise DietError(f"--set {pair!r}: expected section.key=value")
        overrides[match.group(1)] = match.group(2)
    return overrides


def sweep_points(score, sparsities, keep_files):
    """The settings of the pruned-training sweep: the dense reference, then each level.

    Each point pairs a sparsity with its own keep_indices file, which a cartesian grid
    cannot express (hence the sweep's `points:`). The dense point names no keep_indices
    file: the trainer's default, an empty one, is the whole training set.
    """
    points = [{"data.sparsity": 0.0, "data.score": score}]
    for sparsity in sparsities:
        points.append({"data.sparsity": sparsity,
                       "data.keep_indices": str(keep_files[sparsity].resolve()),
                       "data.score": score})
    return points


def write_sweep(out, points, base, overrides, seeds, folder, name, max_parallel):
    """out/sweep.yaml: every point (dense reference and each level) x every seed."""
    content = {"name": name, "base": str(Path(base).resolve()),
               "folder": str(Path(folder).resolve()),
               "overrides": {key: _yaml_value(value) for key, value in overrides.items()},
               "points": points, "seeds": seeds}
    if max_parallel:
        content["max_parallel"] = max_parallel
    header = (f"# Data-diet sweep, score {points[0]['data.score']}: the dense reference "
              f"(sparsity 0) and {len(points) - 1} pruned level(s), each with its own\n"
              f"# index file. Written by `python -m ffcv_bias.studies.diet prune`.\n")
    path = out / "sweep.yaml"
    atomic.write_text(path, header + yaml.safe_dump(content, sort_keys=False))
    return path


def check_sweep(path, shown=None):
    """Plan the sweep with the sweep package; check each run with the trainer's checks.
    shown=(staging, final): messages name the final paths, not the staging folder."""
    from ffcv_bias.sweep import SweepError, load_sweep, plan
    from ffcv_bias.train.checks import validate_semantics

    def refuse(message):
        if shown:
            message = message.replace(str(shown[0]), str(shown[1]))
        raise DietError(message)

    try:
        planned = plan(load_sweep(path))
    except SweepError as error:
        refuse(f"{path}: {error}")
    for run in planned:
        if run.config_error:
            refuse(f"{path}: the trainer refuses a run: {run.config_error}")
        try:
            validate_semantics(run.config)
        except ConfigError as error:
            refuse(f"{path}: {error}")
    return planned


def _prune_base(options, meta):
    """(base config file, overrides) of the pruned runs; the file is None when the scores
    were made from command-line overrides alone."""
    overrides = {} if options.base_config else dict(meta.get("overrides", {}))
    overrides.update(parse_set_options(options.set))
    for key in ("training.seed", "logging.folder"):
        if key in overrides:
            raise DietError(f"{key} is set by the sweep: use --seeds / --folder")
    for key in ("data.keep_indices", "data.sparsity", "data.score"):
        if key in overrides:
            raise DietError(f"{key} is set by prune for each point, not with --set")
    if options.base_config:
        return Path(options.base_config), overrides
    config_files = meta.get("config_files") or []
    if len(config_files) > 1:
        raise DietError(f"the scores were made with {len(config_files)} config files and a "
                        f"sweep takes one: give --base-config FILE")
    return (Path(config_files[0]) if config_files else None), overrides


def write_empty_base(out):
    """A sweep needs a base config file; with none, an empty one (the overrides say all)."""
    base = out / "base.yaml"
    atomic.write_text(base, "# The scores were made from command-line settings alone: they are "
                            "the overrides\n# of sweep.yaml.\n")
    return base


def check_same_training_set(config_files, overrides, arrays):
    """The pruned runs' train beton must be the scored one (same labels in the same order)."""
    from ffcv_bias.data.loaders import read_labels
    args = trainer_args(config_files, overrides)
    nested = resolve_trainer_config(args, check_files=False)
    train_dataset = nested["data"]["train_dataset"]
    try:
        labels = read_labels(train_dataset)
    except ValueError as error:
        raise DietError(str(error)) from None
    if len(labels) != len(arrays["labels"]) or not np.array_equal(labels, arrays["labels"]):
        raise DietError(f"the pruned runs would train on {train_dataset}, which is not the "
                        f"scored training set ({len(labels)} vs {len(arrays['labels'])} "
                        f"images, or other labels)")


def kept_sets(policy, arrays, meta, sparsities):
    """({sparsity: kept indices}, notes for prune.json) of a policy, all in memory:
    score-top for a score (el2n, grand, input_norm, ...; `random` is random pruning),
    or class quotas from the scores' held-out recalls."""
    if policy in QUOTA_POLICIES:
        return quota_kept_sets(policy, arrays, meta, sparsities)
    if policy not in arrays:
        raise DietError(f"the scores hold no {policy!r} score (they hold "
                        f"{', '.join(n for n in SCORE_NAMES if n in arrays)}): rerun "
                        f"`python -m ffcv_bias.studies.diet score` to add it")
    return {sparsity: keep_indices(arrays[policy], sparsity) for sparsity in sparsities}, {}


def quota_kept_sets(policy, arrays, meta, sparsities):
    """kept_sets of class-quota (the measured recalls) or class-quota-laplace (the recalls
    after Laplace's rule on the error counts; both are recorded)."""
    recall_info = meta.get("class_quota")
    if not recall_info:
        raise DietError(f"the scores hold no held-out class recalls for {policy}: "
                        f"rerun `python -m ffcv_bias.studies.diet score ... "
                        f"--quota-val-fraction 0.1` (a split of the training set)")
    recall = np.asarray(recall_info["recall"], dtype=np.float64)
    notes = {}
    if policy == CLASS_QUOTA_LAPLACE:
        recall = quota.laplace_recall(recall, recall_info["n_val_per_class"])
        notes = {"error_rate": "Laplace: (errors + 1) / (n_val + 2)",
                 "recall_used": [round(float(r), 6) for r in recall]}
    kept, quotas = {}, {}
    for sparsity in sparsities:
        count = kept_count(len(arrays["labels"]), sparsity)
        if count < 1:
            raise DietError(f"sparsity {sparsity} keeps no image of {len(arrays['labels'])}")
        kept[sparsity], class_quota = quota.quota_keep_indices(
            arrays["labels"], recall, arrays["random"], count)
        quotas[format_sparsity(sparsity)] = [int(q) for q in class_quota]
    return kept, {"class_quota": {**recall_info, **notes, "quotas": quotas,
                                  "within_class": "random (the scores' random column)"}}


def write_prune_files(directory, options, arrays, meta, kept_by_sparsity, notes):
    """Every file of a prune into `directory`: keep files, keep_ratio.csv/png, prune.json.
    Returns {sparsity: keep file}."""
    from ffcv_bias.studies.diet.figures import plot_keep_ratio  # figures imports this module
    sparsities = sorted(kept_by_sparsity)
    keep_files = {}
    for sparsity, kept in kept_by_sparsity.items():
        keep_files[sparsity] = directory / f"keep_{options.score}_{format_sparsity(sparsity)}.npy"
        atomic.save_npy(keep_files[sparsity], kept)
    class_names = meta.get("classes") or [f"class_{c}" for c in range(meta["num_classes"])]
    table = keep_ratio_table(arrays["labels"], class_names, kept_by_sparsity)
    write_csv(table, directory / "keep_ratio.csv", float_format="%.6g")
    plot_keep_ratio(table, sparsities, directory / "keep_ratio.png",
                    title=f"class-wise keep ratio ({options.score})")
    atomic.write_json(directory / PRUNE_META_FILE, {
        "policy": options.score, "scores": str(Path(options.scores).resolve()),
        "sparsities": sparsities, "num_samples": int(len(arrays["labels"])),
        "kept": {format_sparsity(s): int(len(k)) for s, k in kept_by_sparsity.items()},
        "score_epochs": meta.get("epochs"), **notes})
    return keep_files


def publish(staging, out):
    """Move every staged file onto its final name (one rename each, same file system)."""
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)


def run_prune(options):
    """The prune command: kept indices, keep ratio table and figure, the sweep.

    Everything is checked before anything in OUT changes: the files are written to a
    hidden staging folder inside OUT, the sweep planned there with the trainer's checks,
    and only then renamed onto their names (a refused prune leaves OUT as it was)."""
    sparsities = parse_sparsities(options.sparsity)
    seeds = parse_seeds(options.seeds)
    arrays, meta = load_scores(options.scores)
    out = Path(options.out)
    base, overrides = _prune_base(options, meta)
    if base is not None and base.is_dir():
        raise DietError(f"--base-config {base} is a directory, not a config YAML file")
    if base is not None and not base.is_file():
        raise DietError(f"base config not found: {base}")
    check_same_training_set([base] if base else [], overrides, arrays)
    kept_by_sparsity, notes = kept_sets(options.score, arrays, meta, sparsities)
    folder = Path(options.folder) if options.folder else out / "runs"
    name = options.name or f"diet_{options.score}"
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a prune killed (SIGKILL) in OUT left its staging folder: removed once it is gone
        atomic.remove_orphaned_temps(out, "prune")
        staging = Path(tempfile.mkdtemp(prefix=atomic.owned_temp_prefix("prune"),
                                        suffix=atomic.TEMP_SUFFIX, dir=out))
    except OSError as error:
        raise DietError(f"cannot create {out}: {error.strerror}") from None
    published = publishing = False
    try:
        def staged_sweep(directory, keep_files, base_file):
            points = sweep_points(options.score, sparsities, keep_files)
            return points, write_sweep(directory, points, base_file, overrides, seeds,
                                       folder, name, options.max_parallel)

        keep_files = write_prune_files(staging, options, arrays, meta, kept_by_sparsity, notes)
        staged_base = base or write_empty_base(staging)
        _, staged_path = staged_sweep(staging, keep_files, staged_base)
        planned = check_sweep(staged_path, shown=(staging, out))
        # The same sweep naming the final paths (same bytes in the keep files: same runs).
        final_keep = {s: out / path.name for s, path in keep_files.items()}
        points, _ = staged_sweep(staging, final_keep, base or out / staged_base.name)
        publishing = True
        publish(staging, out)
        published = True
    except Exception as error:  # a full disk, wherever in the writers it surfaced
        no_room = atomic.no_room_error(error, out)
        if no_room is None:
            raise
        raise NoRoomForPrune(no_room_message(no_room, out, created, publishing)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not published:
            shutil.rmtree(out, ignore_errors=True)  # ours, and empty but for the staging
    sweep_path = out / "sweep.yaml"
    print(f"{len(sparsities)} pruned sets of {len(arrays['labels'])} images by "
          f"{options.score} in {out}; {sweep_path.name}: {len(points)} points x "
          f"{len(seeds)} seed(s) = {len(planned)} runs in {folder}\n"
          f"  launch:   python -m ffcv_bias.sweep launch {sweep_path} [--backend slurm ...]\n"
          f"  analysis: python -m ffcv_bias.analysis {folder} --vary data.sparsity "
          f"--vary data.score --out REPORT_DIR\n  figures:  python -m "
          f"ffcv_bias.studies.diet figures --runs {folder} --scores {options.scores} "
          f"--out FIGURE_DIR")
    return out
