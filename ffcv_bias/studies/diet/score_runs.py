"""The score command: train the score runs on their normal schedule, score every training
image from the weights each run kept at the scoring epoch, add the baselines (input norm,
random), the rank correlations between all scores and, on request, the held-out class
recalls of class-quota pruning."""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ffcv_bias.common import atomic
from ffcv_bias.record import runs
from ffcv_bias.common import env
from ffcv_bias.common.tables import write_csv
from ffcv_bias.common.output_paths import creation_problem
from ffcv_bias.studies.diet import quota
from ffcv_bias.studies.diet.common import (DietError, TrainingFailed, _save_npz,
                                           parse_seeds, resolve_trainer_config, trainer_args)
from ffcv_bias.studies.diet.scores import (build_model, default_grand_chunk,
                                           grand_parameter_names, input_norms, predict,
                                           score_dataset, spearman_matrix)

# Keys the score command sets itself; in the user's overrides they would be overwritten.
RESERVED_SCORE_KEYS = {"training.save_weights_at": "--epochs", "training.seed": "--seeds",
                       "logging.folder": "--out"}
# Column order of scores.csv and of the correlation table.
PER_RUN_SCORES = ("el2n", "grand", "el2n_init", "grand_init")
BASELINE_SCORES = ("input_norm", "random")
CORRELATIONS_FILE = "correlations.csv"


@dataclass
class ScoreRun:
    """One run the score command needs: the fields TrainerPool reads (index, config_args,
    run_dir, run_id, config_error) and what scoring needs (seed, config, purpose)."""
    index: int
    seed: int
    config_args: list
    config: dict
    run_dir: Path
    purpose: str = "score"        # "score" or quota.HOLDOUT_SCORE
    config_error: str = ""

    @property
    def run_id(self):
        # TrainerPool checks completeness against the run_id (a summary of another run
        # in this directory is not this run's); the directory is named after it.
        return self.run_dir.name


def weights_at(run, epoch):
    """The weights a score run kept after `epoch` epochs of its normal schedule."""
    return run.run_dir / runs.epoch_weights_file(epoch)


def score_run_args(base_args, epoch, seed, runs_folder):
    """A score run is a run of the config's own schedule that also keeps its weights after
    epoch `epoch` (nothing extra for epoch 0: those networks are never trained)."""
    args = base_args + [f"--training.seed={seed}",
                        f"--logging.folder={Path(runs_folder).resolve()}"]
    return args + ([f"--training.save_weights_at={epoch}"] if epoch > 0 else [])


def score_resolution(nested, epochs):
    """The training resolution of the run's last epoch (its first for --epochs 0)."""
    from ffcv_bias.train.schedules import resolution_at_epoch
    resolution = nested["resolution"]
    return resolution_at_epoch(max(epochs - 1, 0), min_res=resolution["min_res"],
                               max_res=resolution["max_res"],
                               start_ramp=resolution["start_ramp"],
                               end_ramp=resolution["end_ramp"])


def _sha256(path):
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_identity(weights_path):
    """sha256 of a run's weights.pt ('init' for a fresh network): a retrained run's new
    weights must not reuse the old scores."""
    if weights_path is None:
        return "init"
    return _sha256(weights_path)


def _load_cached_scores(path, grand_params, num_samples, weights_id):
    if not path.is_file():
        return None
    with np.load(path) as cached:
        if (str(cached["grand_params"]) != grand_params or len(cached["el2n"]) != num_samples
                or str(cached["weights"]) != weights_id):
            return None
        return cached["el2n"], cached["grand"]


def score_one_model(label, nested, weights_path, init_seed, setup, cache_dir):
    """(EL2N, GraNd) of one run's model over the training set, cached in per_run/."""
    cache_path = cache_dir / f"{label}.npz"
    weights_id = _weights_identity(weights_path)
    cached = _load_cached_scores(cache_path, setup["grand_params"], setup["num_samples"],
                                 weights_id)
    if cached is not None:
        return cached
    model = build_model(nested, setup["num_classes"], weights_path, setup["device"],
                        seed=init_seed)
    names = grand_parameter_names(model, setup["grand_params"])
    chunk = setup["grand_chunk"] or default_grand_chunk(model, names, setup["batch_size"],
                                                        setup["device"])
    el2n, grand, labels = score_dataset(model, setup["loader"], setup["device"], names, chunk,
                                        description=f"scoring {label}")
    if not np.array_equal(labels, setup["labels"]):
        raise DietError(f"the score loader did not yield {nested['data']['train_dataset']} "
                        f"in its order (labels differ)")
    _save_npz(cache_path, el2n=el2n, grand=grand, grand_params=np.array(setup["grand_params"]),
              weights=np.array(weights_id))
    return el2n, grand


def _score_setup(nested, options, resolution, num_classes, labels):
    import torch
    from ffcv_bias.data.loaders import create_val_loader
    try:
        device = torch.device(options.device) if options.device else env.default_device()
    except RuntimeError as error:
        raise DietError(f"--device {options.device}: {error}") from None
    # The val-style loader over the TRAIN beton: sequential, whole image, no augmentation.
    loader = create_val_loader(nested["data"]["train_dataset"], batch_size=options.batch_size,
                               resolution=resolution, crop_ratio=1.0,
                               num_workers=nested["data"]["num_workers"],
                               in_memory=bool(nested["data"]["in_memory"]))
    return {"device": device, "loader": loader, "grand_params": options.grand_params,
            "grand_chunk": options.grand_chunk, "batch_size": options.batch_size,
            "num_samples": len(labels), "num_classes": num_classes, "labels": labels}


def _check_score_options(options, overrides):
    for key, flag in RESERVED_SCORE_KEYS.items():
        if key in overrides:
            raise DietError(f"--{key} is set by the score command: use {flag}")
    if options.epochs < 0:
        raise DietError(f"--epochs must be >= 0, not {options.epochs}")
    if options.batch_size < 1:
        raise DietError(f"--batch-size must be >= 1, not {options.batch_size}")
    if options.grand_chunk is not None and options.grand_chunk < 1:
        raise DietError(f"--grand-chunk must be >= 1, not {options.grand_chunk}")
    if options.max_parallel < 1:
        raise DietError(f"--max-parallel must be >= 1, not {options.max_parallel}")
    if options.quota_val_fraction and not 0 < options.quota_val_fraction < 1:
        raise DietError(f"--quota-val-fraction must be in (0, 1), not "
                        f"{options.quota_val_fraction}")
    if not options.config_file and "data.train_dataset" not in overrides:
        raise DietError("give the trainer's config: --config-file FILE and/or "
                        "--section.key=value overrides")


def _planned_run(index, seed, args, runs_folder, purpose="score"):
    nested = resolve_trainer_config(args)
    return ScoreRun(index=index, seed=seed, config_args=args, config=nested,
                    run_dir=Path(runs_folder).resolve() / runs.run_id(nested), purpose=purpose)


def plan_score_runs(options, overrides, seeds):
    """(trainer args of the config, [ScoreRun]) of the score runs, each config checked."""
    base_args = trainer_args(options.config_file, overrides)
    runs_folder = Path(options.out) / "runs"
    planned = []
    for index, seed in enumerate(seeds):
        run = _planned_run(index, seed, score_run_args(base_args, options.epochs, seed,
                                                       runs_folder), runs_folder)
        if run.config["data"]["keep_indices"]:
            raise DietError("scores must cover the whole training set: the score runs' "
                            "config sets data.keep_indices")
        planned.append(run)
    return base_args, planned


def plan_holdout_run(options, base_args, seed, labels, index):
    """The run behind class-quota pruning: the score config trained on the training set
    minus a stratified held-out split (written to OUT as two index files), whose recalls
    on that split set the quotas. The test set plays no part."""
    out = Path(options.out)
    train, val = quota.holdout_split(labels, options.quota_val_fraction, options.random_seed)
    out.mkdir(parents=True, exist_ok=True)
    # Same labels, fraction and seed give the same bytes, so a rerun finds the same run.
    atomic.save_npy(out / quota.TRAIN_INDICES_FILE, train)
    atomic.save_npy(out / quota.VAL_INDICES_FILE, val)
    args = base_args + [f"--data.keep_indices={(out / quota.TRAIN_INDICES_FILE).resolve()}",
                        f"--data.sparsity={len(val) / len(labels)!r}",
                        f"--data.score={quota.HOLDOUT_SCORE}"]
    args = score_run_args(args, 0, seed, out / "runs")
    return _planned_run(index, seed, args, out / "runs", purpose=quota.HOLDOUT_SCORE), val


def _missing_weights(options, run):
    """The weights file scoring needs from this run and does not find (None if there)."""
    if run.purpose == quota.HOLDOUT_SCORE:
        needed = run.run_dir / runs.WEIGHTS_FILE
    elif options.epochs == 0:
        return None
    else:
        needed = weights_at(run, options.epochs)
    return None if needed.is_file() else needed


def check_runs_can_give_weights(options, planned):
    """Before training anything: a complete run without the needed weights cannot make
    them (it trained without training.save_weights_at), and --no-train trains nothing."""
    for run in planned:
        missing = _missing_weights(options, run)
        if missing is None:
            continue
        if options.no_train:
            raise DietError(f"--no-train: score run {run.run_dir} is not complete "
                            f"(no {missing.name})")
        if runs.is_complete(run.run_dir):
            raise DietError(f"score run {run.run_dir} is complete but kept no {missing.name} "
                            f"(trained without training.save_weights_at={options.epochs}): "
                            f"move it aside to retrain it, or score another epoch")


def train_score_runs(options, planned):
    """Train the runs whose weights are missing, --max-parallel at a time, through the
    sweep's TrainerPool (resumable, one lock per run, train.log in each run)."""
    from ffcv_bias.sweep.runner import TrainerPool, detect_gpus
    check_runs_can_give_weights(options, planned)
    to_train = [run for run in planned if _missing_weights(options, run) is not None]
    if not to_train:
        return

    def report(outcome):
        print(f"{outcome.run.purpose} run {outcome.run.run_dir.name}: {outcome.status}"
              f"{' (' + outcome.message + ')' if outcome.message else ''}", flush=True)

    print(f"training {len(to_train)} run(s), {options.max_parallel} at a time", flush=True)
    outcomes = TrainerPool().train_all(to_train, options.max_parallel, gpus=detect_gpus(),
                                       on_done=report)
    failed = [outcome for outcome in outcomes if outcome.status != "complete"]
    if failed:
        first = failed[0]
        raise TrainingFailed(f"{len(failed)} of {len(to_train)} run(s) did not finish, e.g. "
                             f"{first.run.run_dir} ({first.status}: {first.message}); rerun "
                             f"the same command to resume them")


def _score_label(run, epoch, grand_params):
    return (f"init_{run.run_dir.name}" if epoch == 0
            else f"{run.run_dir.name}_epoch{epoch}") + f"_grand-{grand_params}"


def score_all_runs(options, planned, setup, cache_dir):
    """{score name: [K, N]} of the K score runs: EL2N and GraNd at --epochs (at
    initialisation for 0), and with --also-init those of the same seeds' initial networks."""
    wanted = [(options.epochs, "")]
    if options.also_init and options.epochs > 0:
        wanted.append((0, "_init"))
    per_run = {}
    for epoch, suffix in wanted:
        for run in planned:
            weights, init_seed = (None, run.seed) if epoch == 0 else (weights_at(run, epoch), None)
            el2n, grand = score_one_model(_score_label(run, epoch, options.grand_params),
                                          run.config, weights, init_seed, setup, cache_dir)
            per_run.setdefault(f"el2n{suffix}", []).append(el2n)
            per_run.setdefault(f"grand{suffix}", []).append(grand)
    return {name: np.stack(values) for name, values in per_run.items()}


def holdout_recall(holdout_run, val_indices, setup, options):
    """{'recall', 'n_val', ...} of the held-out run on its validation split, predicted on
    the TRAINING beton (the score loader's images, the run's final weights)."""
    model = build_model(holdout_run.config, setup["num_classes"],
                        holdout_run.run_dir / runs.WEIGHTS_FILE, setup["device"])
    predictions, labels = predict(model, setup["loader"], setup["device"])
    if not np.array_equal(labels, setup["labels"]):
        raise DietError("the score loader did not yield the training set in its order")
    recall, n_val = quota.class_recall(predictions, labels, val_indices, setup["num_classes"])
    out = Path(options.out)
    return {"policy": quota.POLICY, "run_id": holdout_run.run_dir.name,
            "run_dir": str(holdout_run.run_dir), "source": holdout_run.config["data"][
                "train_dataset"], "val_fraction": options.quota_val_fraction,
            "split_seed": options.random_seed, "n_val": int(len(val_indices)),
            "val_indices_file": str((out / quota.VAL_INDICES_FILE).resolve()),
            "train_indices_file": str((out / quota.TRAIN_INDICES_FILE).resolve()),
            "val_indices_sha256": _sha256(out / quota.VAL_INDICES_FILE),
            "recall": [float(r) for r in recall], "n_val_per_class": [int(n) for n in n_val]}


def run_scores(options, overrides):
    """The score command: train the runs, score the training set, write the files."""
    from ffcv_bias.data.loaders import read_labels
    from ffcv_bias.train.config import read_sidecar
    _check_score_options(options, overrides)
    seeds = parse_seeds(options.seeds)
    out = Path(options.out)
    problem = creation_problem(out)
    if problem:  # before any run is planned or trained: --out holds them all
        raise DietError(f"--out: cannot create {out}: {problem}")
    base_args, planned = plan_score_runs(options, overrides, seeds)
    nested = planned[0].config
    train_dataset = nested["data"]["train_dataset"]
    sidecar = read_sidecar(train_dataset, "data.train_dataset")
    labels = read_labels(train_dataset)
    holdout = None
    if options.quota_val_fraction:
        holdout = plan_holdout_run(options, base_args, seeds[0], labels, len(planned))
    to_train = planned + ([holdout[0]] if holdout else [])
    if options.epochs > 0 or holdout:
        train_score_runs(options, to_train)

    resolution = score_resolution(nested, options.epochs)
    setup = _score_setup(nested, options, resolution, int(sidecar["num_classes"]), labels)
    per_run = score_all_runs(options, planned, setup, out / "per_run")
    meta = {"config_files": [str(Path(p).resolve()) for p in options.config_file],
            "overrides": overrides, "epochs": options.epochs,
            "full_epochs": nested["training"]["epochs"], "seeds": seeds,
            "weights": (runs.epoch_weights_file(options.epochs) if options.epochs
                        else "initialisation"),
            "run_ids": [run.run_dir.name for run in planned],
            "runs_folder": str((out / "runs").resolve()),
            "grand_params": options.grand_params, "resolution": resolution,
            "crop_ratio": 1.0, "loss": "cross-entropy, no label smoothing",
            "batchnorm": "eval (running statistics)", "random_seed": options.random_seed,
            "train_dataset": train_dataset, "num_samples": int(len(labels)),
            "num_classes": int(sidecar["num_classes"]), "classes": sidecar.get("classes"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if holdout:
        meta["class_quota"] = holdout_recall(holdout[0], holdout[1], setup, options)
    baselines = {"input_norm": input_norms(setup["loader"], setup["device"])}
    write_scores(out, labels, per_run, baselines, meta)
    print(f"scores of {len(labels)} training images from {len(planned)} run(s) in {out}",
          flush=True)
    return out


def score_label(name, epoch):
    """The name a reader knows a score by: EL2N@20, GraNd@init, input norm, ..."""
    at = f"@{epoch}" if epoch else "@init"
    labels = {"el2n": f"EL2N{at}", "grand": f"GraNd{at}", "el2n_init": "EL2N@init",
              "grand_init": "GraNd@init", "input_norm": "input norm", "random": "random"}
    return labels.get(name, name)


def correlation_table(scores, epoch):
    """Spearman rank correlation between every pair of scores (one row per score)."""
    names = list(scores)
    matrix = spearman_matrix(np.column_stack([scores[name] for name in names]))
    table = pd.DataFrame(matrix, columns=names)
    table.insert(0, "label", [score_label(name, epoch) for name in names])
    table.insert(0, "score", names)
    return table


def print_correlations(table, num_samples):
    labels = list(table["label"])
    width = max(len(label) for label in labels) + 2
    print(f"Spearman rank correlation between the scores (n = {num_samples} training "
          f"images):\n" + " " * width + "".join(f"{label:>{width}}" for label in labels))
    for row, label in zip(table[list(table["score"])].to_numpy(), labels):
        print(f"{label:<{width}}" + "".join(f"{value:>{width}.3f}" for value in row))


def write_scores(out, labels, per_run, baselines, meta):
    """scores.npz, scores.csv, correlations.csv and scores.json (last: its presence means
    the set is whole)."""
    out = Path(out)
    indices = np.arange(len(labels), dtype=np.int64)
    random_scores = np.random.default_rng(meta["random_seed"]).random(len(labels))
    scores = {name: per_run[name].mean(axis=0) for name in PER_RUN_SCORES if name in per_run}
    scores.update(baselines)
    scores["random"] = random_scores
    _save_npz(out / "scores.npz", indices=indices, labels=labels, **scores,
              **{f"{name}_runs": values for name, values in per_run.items()},
              seeds=np.array(meta["seeds"]), run_ids=np.array(meta["run_ids"]))
    names = meta.get("classes") or [f"class_{c}" for c in range(meta["num_classes"])]
    table = pd.DataFrame({"index": indices, "label": labels,
                          "class_name": np.array(names, dtype=object)[labels], **scores})
    write_csv(table, out / "scores.csv", float_format="%.8g")
    correlations = correlation_table(scores, meta["epochs"])
    write_csv(correlations, out / CORRELATIONS_FILE, float_format="%.6f")
    if "class_quota" in meta:
        write_recall_table(out, meta["class_quota"], names)
    meta["scores"] = list(scores)
    atomic.write_json(out / "scores.json", meta)
    print_correlations(correlations, len(labels))


def write_recall_table(out, class_quota, class_names):
    table = pd.DataFrame({"class": np.arange(len(class_names)), "class_name": class_names,
                          "n_val": class_quota["n_val_per_class"],
                          "recall": class_quota["recall"]})
    write_csv(table, out / quota.RECALL_FILE, float_format="%.6f")
