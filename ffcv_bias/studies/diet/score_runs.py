"""The score command: train the score runs, score every training image, write the files."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ffcv_bias import atomic, runs
from ffcv_bias.studies.diet.common import (DietError, TrainingFailed, _save_npz,
                                           parse_seeds, resolve_trainer_config, trainer_args)
from ffcv_bias.studies.diet.scores import (build_model, default_grand_chunk,
                                           grand_parameter_names, score_dataset)

# Keys the score command sets itself; in the user's overrides they would be overwritten.
RESERVED_SCORE_KEYS = {"training.epochs": "--epochs", "training.seed": "--seeds",
                       "logging.folder": "--out"}
TRAIN_SCRIPT = Path(__file__).resolve().parents[3] / "train_imagenet.py"


def score_run_args(base_args, epochs, seed, runs_folder):
    return base_args + [f"--training.epochs={epochs}", f"--training.seed={seed}",
                        f"--logging.folder={Path(runs_folder).resolve()}"]


def check_schedule_prefix(full_config, epochs):
    """A note when the T-epoch score runs do not follow the full run's first T epochs.

    The trainer stretches its schedule over training.epochs: a cyclic or cosine schedule
    of a T-epoch run is not the start of the full run's. A step schedule whose first step
    comes after T differs only in its last epoch (the trainer slides the rate to 0 there).
    """
    from ffcv_bias.schedules import lr_per_iteration
    lr, full_epochs = full_config["lr"], full_config["training"]["epochs"]
    if epochs >= full_epochs:
        return None
    options = dict(lr=lr["lr"], iters_per_epoch=8, lr_peak_epoch=lr["lr_peak_epoch"],
                   step_ratio=lr["step_ratio"], step_length=lr["step_length"])
    short = lr_per_iteration(lr["lr_schedule_type"], epochs=epochs, **options)
    full = lr_per_iteration(lr["lr_schedule_type"], epochs=full_epochs, **options)[:len(short)]
    differs = ~np.isclose(short, full, rtol=1e-9, atol=0)
    if not differs.any():
        return None
    first_epoch = int(np.argmax(differs)) // 8
    return (f"note: the {epochs}-epoch score runs' learning rate departs from the first "
            f"{epochs} epochs of the {full_epochs}-epoch run from epoch {first_epoch} on "
            f"(lr.lr_schedule_type={lr['lr_schedule_type']}); "
            + ("only the last epoch differs (the trainer slides the rate to 0 in a run's "
               "final epoch)" if lr["lr_schedule_type"] == "step" and first_epoch == epochs - 1
               else "the scores come from networks trained on a compressed schedule"))


def train_score_run(args, run_dir):
    """Train one score run in a child trainer (it resumes a started run)."""
    if runs.is_complete(run_dir):
        return
    command = [sys.executable, str(TRAIN_SCRIPT), *args]
    print(f"training score run {run_dir.name}", flush=True)
    returncode = subprocess.call(command, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if returncode != 0 or not runs.is_complete(run_dir):
        error_file = run_dir / runs.ERROR_FILE
        reason = error_file.read_text().splitlines()[0] if error_file.is_file() else ""
        raise TrainingFailed(f"score run {run_dir} did not finish (trainer exit status "
                             f"{returncode}){': ' + reason if reason else ''}; rerun the "
                             f"same command to resume it")


def score_resolution(nested, epochs):
    """The training resolution of the run's last epoch (its first for --epochs 0)."""
    from ffcv_bias.schedules import resolution_at_epoch
    resolution = nested["resolution"]
    return resolution_at_epoch(max(epochs - 1, 0), min_res=resolution["min_res"],
                               max_res=resolution["max_res"],
                               start_ramp=resolution["start_ramp"],
                               end_ramp=resolution["end_ramp"])


def _weights_identity(weights_path):
    """sha256 of a run's weights.pt ('init' for a fresh network): a retrained run's new
    weights must not reuse the old scores."""
    if weights_path is None:
        return "init"
    import hashlib
    digest = hashlib.sha256()
    with open(weights_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


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
    from ffcv_bias.loaders import create_val_loader
    try:
        device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    if not options.config_file and "data.train_dataset" not in overrides:
        raise DietError("give the trainer's config: --config-file FILE and/or "
                        "--section.key=value overrides")


def plan_score_runs(options, overrides, seeds):
    """[(seed, trainer args, nested config, run_dir)] of the score runs, checked."""
    base_args = trainer_args(options.config_file, overrides)
    runs_folder = Path(options.out) / "runs"
    planned = []
    for seed in seeds:
        # --epochs 0 trains nothing; the config is checked as a 1-epoch run.
        args = score_run_args(base_args, max(options.epochs, 1), seed, runs_folder)
        nested = resolve_trainer_config(args)
        if nested["data"]["keep_indices"]:
            raise DietError("scores must cover the whole training set: the score runs' "
                            "config sets data.keep_indices")
        planned.append((seed, args, nested, runs_folder.resolve() / runs.run_id(nested)))
    return base_args, planned


def train_score_runs(options, planned, full_config):
    """Train the score runs that are not complete (none for --epochs 0)."""
    if options.epochs == 0:
        return
    note = check_schedule_prefix(full_config, options.epochs)
    if note:
        print(note, file=sys.stderr, flush=True)
    for _, args, _, run_dir in planned:
        if options.no_train and not runs.is_complete(run_dir):
            raise DietError(f"--no-train: score run {run_dir} is not complete")
        train_score_run(args, run_dir)


def score_all_runs(options, planned, setup, cache_dir):
    """(EL2N [K, N], GraNd [K, N], run ids) of the K score runs."""
    el2n_runs, grand_runs, run_ids = [], [], []
    for seed, _, run_nested, run_dir in planned:
        if options.epochs == 0:
            label, weights, init_seed = f"init_{run_dir.name}", None, seed
        else:
            label, weights, init_seed = run_dir.name, run_dir / runs.WEIGHTS_FILE, None
        label = f"{label}_grand-{options.grand_params}"
        el2n, grand = score_one_model(label, run_nested, weights, init_seed, setup, cache_dir)
        el2n_runs.append(el2n)
        grand_runs.append(grand)
        run_ids.append(run_dir.name)
    return np.stack(el2n_runs), np.stack(grand_runs), run_ids


def run_scores(options, overrides):
    """The score command: train the K runs, score the training set, write the files."""
    from ffcv_bias.loaders import read_labels
    from ffcv_bias.train_config import read_sidecar
    _check_score_options(options, overrides)
    seeds = parse_seeds(options.seeds)
    out = Path(options.out)
    base_args, planned = plan_score_runs(options, overrides, seeds)
    full_config = resolve_trainer_config(base_args, check_files=False)
    train_score_runs(options, planned, full_config)

    nested = planned[0][2]
    train_dataset = nested["data"]["train_dataset"]
    sidecar = read_sidecar(train_dataset, "data.train_dataset")
    labels = read_labels(train_dataset)
    resolution = score_resolution(nested, options.epochs)
    setup = _score_setup(nested, options, resolution, int(sidecar["num_classes"]), labels)
    el2n_runs, grand_runs, run_ids = score_all_runs(options, planned, setup, out / "per_run")
    meta = {"config_files": [str(Path(p).resolve()) for p in options.config_file],
            "overrides": overrides, "epochs": options.epochs,
            "full_epochs": full_config["training"]["epochs"], "seeds": seeds,
            "run_ids": run_ids, "runs_folder": str((out / "runs").resolve()),
            "grand_params": options.grand_params, "resolution": resolution,
            "crop_ratio": 1.0, "loss": "cross-entropy, no label smoothing",
            "batchnorm": "eval (running statistics)", "random_seed": options.random_seed,
            "train_dataset": train_dataset, "num_samples": int(len(labels)),
            "num_classes": int(sidecar["num_classes"]), "classes": sidecar.get("classes"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_scores(out, labels, el2n_runs, grand_runs, meta)
    print(f"scores of {len(labels)} training images from {len(run_ids)} run(s) in {out}",
          flush=True)
    return out


def write_scores(out, labels, el2n_runs, grand_runs, meta):
    """scores.npz, scores.csv and scores.json (last: its presence means the set is whole)."""
    out = Path(out)
    indices = np.arange(len(labels), dtype=np.int64)
    random_scores = np.random.default_rng(meta["random_seed"]).random(len(labels))
    scores = {"el2n": el2n_runs.mean(axis=0), "grand": grand_runs.mean(axis=0),
              "random": random_scores}
    _save_npz(out / "scores.npz", indices=indices, labels=labels, **scores,
              el2n_runs=el2n_runs, grand_runs=grand_runs, seeds=np.array(meta["seeds"]),
              run_ids=np.array(meta["run_ids"]))
    names = meta.get("classes") or [f"class_{c}" for c in range(meta["num_classes"])]
    table = pd.DataFrame({"index": indices, "label": labels,
                          "class_name": np.array(names, dtype=object)[labels], **scores})
    with atomic.atomic_path(out / "scores.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.8g")
    atomic.write_json(out / "scores.json", meta)
