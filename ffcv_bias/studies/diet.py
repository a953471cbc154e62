"""Data diet: EL2N and GraNd scores early in training, pruned training sets, and what pruning
does to each class (Paul et al. 2021, "Deep Learning on a Data Diet"; Pote et al.,
"Classification Bias on a Data Diet").

Three commands, in the order of the flow (scores -> pruned sets -> runs -> figures):

score
    python -m ffcv_bias.studies.diet score --config-file rn50_configs/cifar10_resnet18.yaml \\
        [--section.key=value ...] --epochs 20 --seeds 10 --out diet/cifar10/scores \\
        [--grand-params all|last] [--batch-size 256] [--grand-chunk N] [--device cuda] \\
        [--random-seed 0] [--no-train]

  Trains K short runs (seeds 0..K-1, or a list "0,3,7"; T epochs each) as ordinary run
  records: `python train_imagenet.py --config-file ... --training.epochs=T
  --training.seed=k --logging.folder=SCORES_DIR/runs` (a rerun skips complete runs and
  resumes started ones; a sweep that trains the same runs in parallel, e.g.
  rn50_configs/sweeps/diet_cifar10_resnet18_scores.yaml, makes this step a no-op). Then it
  scores every training image with each run's final weights and averages over the runs:
    EL2N   || softmax(f(x)) - onehot(y) ||_2
    GraNd  || d loss(f(x), y) / d theta ||_2, one gradient per image, vectorized with
           torch.func (functional_call + vmap(grad)), in chunks of --grand-chunk images
           (default: as many as 1 GiB of gradients on CPU, 1/8 of the free GPU memory)
  Images are read without augmentation: the training beton in its own order, the centre
  crop of ratio 1.0 (the whole image), at the resolution of the run's last epoch. The loss
  is plain cross-entropy (no label smoothing), as in Paul et al. BatchNorm uses its running
  statistics (eval mode), so an image's gradient is that of its own loss alone (in train
  mode its output would depend on the rest of its batch); dropout is off.
  --grand-params all (default, as Paul et al.) differentiates every parameter; `last` only
  the final linear layer (a cheap option for ImageNet-size models). --epochs 0 scores
  freshly initialised networks (Paul et al.'s GraNd at initialisation): nothing is trained.
  --no-train scores runs trained elsewhere and fails if one is not complete.
  Outputs in SCORES_DIR (all written atomically):
    scores.npz   indices, labels, el2n, grand, random ([N], means over the runs; random is
                 a seeded uniform baseline), el2n_runs, grand_runs ([K, N]), seeds, run_ids
    scores.csv   index, label, class_name, el2n, grand, random
    scores.json  how they were made: config file, overrides, epochs, seeds, run ids,
                 resolution, grand_params, the train beton and its class names
    per_run/     each run's scores (a rerun after a crash reuses them, unless the run's
                 weights.pt changed)
    runs/        the K run records

prune
    python -m ffcv_bias.studies.diet prune --scores SCORES_DIR --score el2n \\
        --sparsity 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 --out DIR [--seeds 3] \\
        [--base-config FILE] [--set section.key=value ...] [--folder RUNS_DIR] \\
        [--max-parallel N] [--name NAME]

  Keeps, for each sparsity s, the round((1 - s) N) highest-scoring training images (ties
  go to the lower index) and writes the sweep that trains on them. The base config is the
  one the scores were made with (its overrides included, minus training.epochs), unless
  --base-config is given; --set adds or replaces overrides. The train beton must be the
  scored one (checked through its labels). Outputs in DIR:
    keep_<score>_<s>.npy  the kept indices (int64, ascending), one file per sparsity
    sweep.yaml            one sweep whose `points:` are the dense reference (sparsity 0,
                          no keep_indices) and then each sparsity with its own index file;
                          every point sets data.sparsity and data.score (= the score, also
                          on the dense point, so the analysis pools each score's runs with
                          its own reference; each score's sweep thus trains its own dense
                          runs), each point x `seeds` seeds, all runs in one folder
                          (--folder, default DIR/runs). Launch it as any sweep:
                            python -m ffcv_bias.sweep launch DIR/sweep.yaml [options]
                          (also `plan`, `status`)
    base.yaml             an empty base config, only when the scores were made from
                          command-line settings alone (they become the overrides)
    keep_ratio.csv        class, class_name, n_total, kept_<s> and ratio_<s> per sparsity
    keep_ratio.png        class-wise keep ratio vs sparsity (Pote et al. Fig. 6)
  The sweep is planned with the sweep package and every run's config is checked with the
  trainer's own checks before prune returns.

figures
    python -m ffcv_bias.studies.diet figures --runs RUNS_DIR --out OUT \\
        [--scores SCORES_DIR] [--top-k 10]

  Reads the pruned runs (every data.score found in RUNS_DIR, each with its dense
  reference) through the analysis package (`--vary data.sparsity --vary data.score`), and
  writes to OUT:
    best_worst_<score>.png   the top-k best and worst classes of the dense model vs
                             sparsity (Pote et al. Fig. 4; k is at most half the classes,
                             so with 10 classes the two panels hold all of them: Fig. 3)
    class_std.png            std of per-class accuracy vs sparsity, mean +- sd over seeds
                             (Fig. 5)
    top1.png                 top-1 vs sparsity (Figs. 1-2)
    best_worst_classes.csv   those classes' mean accuracy at every sparsity
    keep_ratio_<score>.png/.csv  with --scores: the keep ratio at the runs' sparsities
  The full per-class analysis (Welch tests, tables, HTML report) is the analysis command:
    python -m ffcv_bias.analysis RUNS_DIR --vary data.sparsity --vary data.score --out OUT

Exit status: 0 done, 1 a training run failed, 2 bad input (one line on stderr).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from ffcv_bias import atomic, runs
from ffcv_bias.config import ConfigError

SCORE_NAMES = ("el2n", "grand", "random")
GRAND_PARAMS = ("all", "last")
# Keys the score command sets itself; in the user's overrides they would be overwritten.
RESERVED_SCORE_KEYS = {"training.epochs": "--epochs", "training.seed": "--seeds",
                       "logging.folder": "--out"}
# Per-sample gradients of one vmap chunk are all alive at once: chunk x parameters floats.
# The default chunk keeps them within 1 GiB on CPU, 1/8 of the free memory on a GPU (the
# rest is left to the chunk's activations).
CPU_GRAND_CHUNK_BYTES = 1 << 30
GPU_GRAND_CHUNK_FRACTION = 1 / 8
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train_imagenet.py"


class DietError(Exception):
    """Bad input or a failed step; the message is one line naming the problem."""


class TrainingFailed(DietError):
    """A score run's trainer exited with an error (exit status 1)."""


# ======================================================================================
# Per-sample scores of one model (torch only here; imported lazily by the callers)
# ======================================================================================

def classifier_parameter_names(model):
    """Names of the parameters of the model's last nn.Linear (its classifier)."""
    import torch
    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        raise DietError(f"{type(model).__name__} has no nn.Linear layer: "
                        f"--grand-params last needs a linear classifier")
    return [f"{last}.{name}" for name, _ in model.get_submodule(last).named_parameters()]


def grand_parameter_names(model, grand_params):
    if grand_params == "last":
        return classifier_parameter_names(model)
    return [name for name, _ in model.named_parameters()]


def default_grand_chunk(model, parameter_names, batch_size, device="cpu"):
    """Images per vmap chunk so that their per-sample gradients fit the memory budget."""
    import torch
    device = torch.device(device)
    budget = CPU_GRAND_CHUNK_BYTES
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = int(free_bytes * GPU_GRAND_CHUNK_FRACTION)
    parameters = dict(model.named_parameters())
    floats_per_image = sum(parameters[name].numel() for name in parameter_names)
    return int(max(1, min(batch_size, budget // (4 * floats_per_image))))


def el2n_from_logits(logits, labels):
    """|| softmax(logits) - onehot(labels) ||_2 per row."""
    import torch
    probabilities = torch.softmax(logits.float(), dim=1)
    one_hot = torch.nn.functional.one_hot(labels, probabilities.shape[1]).to(probabilities)
    return (probabilities - one_hot).norm(dim=1)


def per_sample_scores(model, inputs, labels, parameter_names, chunk_size=None):
    """(EL2N [B], GraNd [B]) of a batch, for a model in eval mode.

    GraNd is the L2 norm of the gradient of each sample's own cross-entropy loss with
    respect to `parameter_names` (the other parameters and the buffers are constants).
    vmap runs the per-sample gradients `chunk_size` samples at a time; the norm is taken
    inside the vmapped function, so at most one chunk of gradients exists at once.
    """
    import torch
    from torch.func import functional_call, grad, vmap

    if model.training:
        raise DietError("per-sample scores need the model in eval mode (BatchNorm running "
                        "statistics): call model.eval()")
    names = set(parameter_names)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    differentiated = {name: parameters[name] for name in parameter_names}
    constants = {name: p for name, p in parameters.items() if name not in names}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_and_logits(params, image, label):
        logits = functional_call(model, ({**constants, **params}, buffers),
                                 (image.unsqueeze(0),))
        loss = torch.nn.functional.cross_entropy(logits, label.unsqueeze(0))
        return loss, logits.squeeze(0)

    def squared_norm_and_logits(params, image, label):
        gradients, logits = grad(loss_and_logits, has_aux=True)(params, image, label)
        squared = sum(g.pow(2).sum() for g in gradients.values())
        return squared, logits

    per_sample = vmap(squared_norm_and_logits, in_dims=(None, 0, 0), chunk_size=chunk_size)
    squared_norms, logits = per_sample(differentiated, inputs, labels)
    return el2n_from_logits(logits, labels), squared_norms.sqrt()


def score_dataset(model, loader, device, parameter_names, chunk_size, description="scoring"):
    """(EL2N, GraNd, labels) of every sample the loader yields, in its order (numpy)."""
    import torch
    from ffcv_bias.loaders import normalize

    el2n, grand, labels_seen = [], [], []
    for images, labels in tqdm(loader, desc=description, unit="batch", leave=False,
                               disable=None):
        # normalize returns a new tensor: the loader's reused image buffer is not kept.
        inputs = normalize(images, device, channels_last=False)
        with torch.no_grad():  # grad() inside still differentiates; no graph outside it
            batch_el2n, batch_grand = per_sample_scores(
                model, inputs, labels.to(device), parameter_names, chunk_size)
        el2n.append(batch_el2n.cpu().numpy())
        grand.append(batch_grand.cpu().numpy())
        labels_seen.append(labels.numpy().copy())
    return (np.concatenate(el2n).astype(np.float64), np.concatenate(grand).astype(np.float64),
            np.concatenate(labels_seen).astype(np.int64))


# ======================================================================================
# The score runs: arguments, training, weights
# ======================================================================================

def parse_seeds(text):
    """'10' -> [0..9]; '0,3,7' -> [0, 3, 7]."""
    text = str(text).strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(count))
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DietError(f"--seeds must be a count >= 1 or a list like 0,3,7, not {text!r}")
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise DietError(f"--seeds must list distinct non-negative seeds, not {text!r}")
    return seeds


def parse_overrides(extra_args):
    """['--a.b=v', ...] -> {'a.b': 'v'} (order kept); anything else is an error."""
    overrides = {}
    for arg in extra_args:
        match = re.fullmatch(r"--([A-Za-z_]\w*\.[A-Za-z_]\w*)=(.*)", arg, flags=re.S)
        if not match:
            raise DietError(f"unexpected argument '{arg}' (trainer overrides are written "
                            f"--section.key=value)")
        overrides[match.group(1)] = match.group(2)
    return overrides


def trainer_args(config_files, overrides):
    args = []
    for path in config_files:
        args += ["--config-file", str(Path(path).resolve())]
    return args + [f"--{key}={value}" for key, value in overrides.items()]


def resolve_trainer_config(args, check_files=True):
    """The trainer's nested config for `args` (its own parser and, optionally, checks)."""
    from ffcv_bias.train_config import resolve_config, validate_semantics
    try:
        nested = resolve_config(list(args))
        if check_files:
            validate_semantics(nested)
    except ConfigError as error:
        raise DietError(f"trainer config: {error}") from None
    return nested


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


def build_model(nested, num_classes, weights_path, device, seed=None):
    """The run's architecture with its final weights (or a seeded fresh init), eval mode."""
    import torch
    from ffcv_bias.models import create_model
    if seed is not None:
        torch.manual_seed(seed)
    model = create_model(nested["model"]["arch"], num_classes,
                         dropout=nested["model"]["dropout"],
                         use_blurpool=bool(nested["training"]["use_blurpool"]))
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.to(device).eval()


def score_resolution(nested, epochs):
    """The training resolution of the run's last epoch (its first for --epochs 0)."""
    from ffcv_bias.schedules import resolution_at_epoch
    resolution = nested["resolution"]
    return resolution_at_epoch(max(epochs - 1, 0), min_res=resolution["min_res"],
                               max_res=resolution["max_res"],
                               start_ramp=resolution["start_ramp"],
                               end_ramp=resolution["end_ramp"])


# ======================================================================================
# The score command
# ======================================================================================

def _save_npz(path, **arrays):
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a file object: np.savez would add ".npz" to a name
            np.savez(handle, **arrays)


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


def load_scores(scores_dir):
    """(arrays of scores.npz as a dict, scores.json) of a score directory."""
    scores_dir = Path(scores_dir)
    meta_path, npz_path = scores_dir / "scores.json", scores_dir / "scores.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        raise DietError(f"{scores_dir} holds no scores (scores.json and scores.npz): run "
                        f"`python -m ffcv_bias.studies.diet score ... --out {scores_dir}`")
    with np.load(npz_path) as content:
        arrays = {name: content[name] for name in content.files}
    return arrays, json.loads(meta_path.read_text())


# ======================================================================================
# Pruning: kept indices, keep ratio, sweeps
# ======================================================================================

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


def format_sparsity(sparsity):
    return f"{sparsity:g}"


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
        value = yaml.safe_load(text)
    except yaml.YAMLError:
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


def check_sweep(path):
    """Plan the sweep with the sweep package; check each run with the trainer's checks."""
    from ffcv_bias.sweep import SweepError, load_sweep, plan
    from ffcv_bias.train_config import validate_semantics
    try:
        planned = plan(load_sweep(path))
    except SweepError as error:
        raise DietError(f"{path}: {error}") from None
    for run in planned:
        if run.config_error:
            raise DietError(f"{path}: the trainer refuses a run: {run.config_error}")
        try:
            validate_semantics(run.config)
        except ConfigError as error:
            raise DietError(f"{path}: {error}") from None
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
    from ffcv_bias.loaders import read_labels
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


def run_prune(options):
    """The prune command: kept indices, keep ratio table and figure, the sweep."""
    if options.score not in SCORE_NAMES:
        raise DietError(f"--score must be one of {', '.join(SCORE_NAMES)}")
    sparsities = parse_sparsities(options.sparsity)
    seeds = parse_seeds(options.seeds)
    arrays, meta = load_scores(options.scores)
    out = Path(options.out)
    base, overrides = _prune_base(options, meta)
    if base is not None and not base.is_file():
        raise DietError(f"base config not found: {base}")
    check_same_training_set([base] if base else [], overrides, arrays)
    base = base or write_empty_base(out)
    kept_by_sparsity, keep_files = {}, {}
    for sparsity in sparsities:
        kept = keep_indices(arrays[options.score], sparsity)
        path = out / f"keep_{options.score}_{format_sparsity(sparsity)}.npy"
        atomic.save_npy(path, kept)
        kept_by_sparsity[sparsity], keep_files[sparsity] = kept, path

    class_names = meta.get("classes") or [f"class_{c}" for c in range(meta["num_classes"])]
    table = keep_ratio_table(arrays["labels"], class_names, kept_by_sparsity)
    with atomic.atomic_path(out / "keep_ratio.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    plot_keep_ratio(table, sparsities, out / "keep_ratio.png",
                    title=f"class-wise keep ratio ({options.score})")

    points = sweep_points(options.score, sparsities, keep_files)
    folder = Path(options.folder) if options.folder else out / "runs"
    name = options.name or f"diet_{options.score}"
    sweep_path = write_sweep(out, points, base, overrides, seeds, folder, name,
                             options.max_parallel)
    planned = check_sweep(sweep_path)
    print(f"{len(sparsities)} pruned sets of {len(arrays['labels'])} images by "
          f"{options.score} in {out}; {sweep_path.name}: {len(points)} points x "
          f"{len(seeds)} seed(s) = {len(planned)} runs in {folder}\n"
          f"  launch:   python -m ffcv_bias.sweep launch {sweep_path} [--backend slurm ...]\n"
          f"  analysis: python -m ffcv_bias.analysis {folder} --vary data.sparsity "
          f"--vary data.score --out REPORT_DIR\n  figures:  python -m "
          f"ffcv_bias.studies.diet figures --runs {folder} --scores {options.scores} "
          f"--out FIGURE_DIR")
    return out


# ======================================================================================
# Figures
# ======================================================================================

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(figure, path):
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    _pyplot().close(figure)


def _highlighted_classes(final_values, count=5):
    """Rows to label: every class when few, else the `count` highest and lowest."""
    order = np.argsort(final_values, kind="stable")
    if len(order) <= 2 * count:
        return list(order)
    return list(order[-count:][::-1]) + list(order[:count])


def plot_keep_ratio(table, sparsities, path, title="class-wise keep ratio"):
    """Keep ratio of each class vs sparsity (Pote et al. Fig. 6); with many classes only
    the five that keep most and the five that keep least are coloured and named."""
    plt = _pyplot()
    x = [0.0] + list(sparsities)
    ratios = np.column_stack([np.ones(len(table))] +
                             [table[f"ratio_{format_sparsity(s)}"].to_numpy() for s in sparsities])
    labelled = _highlighted_classes(ratios[:, -1])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in range(len(table)):
        if row not in labelled:
            axis.plot(x, ratios[row], color="0.8", linewidth=0.8, zorder=1)
    for row in labelled:
        axis.plot(x, ratios[row], marker="o", markersize=3, linewidth=1.4, zorder=2,
                  label=f"{table['class'][row]}: {table['class_name'][row]}")
    axis.plot(x, 1 - np.array(x), color="black", linestyle="--", linewidth=1,
              label="1 - sparsity (no class bias)")
    axis.set_xlabel("data sparsity")
    axis.set_ylabel("kept / class size")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save_figure(figure, path)


def diet_frames(runs_dir):
    """(per_class, settings) frames of the analysis package, by data.score and sparsity."""
    from ffcv_bias.analysis.analyze import run_analysis
    from ffcv_bias.analysis.records import AnalysisError
    try:
        frames = run_analysis([runs_dir], ["data.sparsity", "data.score"], out_dir=None)
    except AnalysisError as error:
        raise DietError(str(error)) from None
    return frames["per_class"], frames["settings"]


def best_worst_classes(per_class, k):
    """{'best': [...], 'worst': [...]} class ids of the dense model (sparsity 0), by mean
    accuracy over its seeds (ties: lower class id first)."""
    dense = per_class[per_class["setting"] == 0].sort_values("class")
    if dense.empty:
        raise DietError("no dense run (data.sparsity 0): the best and worst classes are "
                        "those of the dense model")
    accuracy, classes = dense["mean_acc"].to_numpy(), dense["class"].to_numpy()
    k = min(k, len(classes) // 2) or 1
    best = classes[np.lexsort((classes, -accuracy))][:k]
    worst = classes[np.lexsort((classes, accuracy))][:k]
    return {"best": list(best), "worst": list(worst)}


def plot_best_worst(per_class, chosen, score, path):
    """Pote et al. Fig. 4: accuracy of the dense model's best and worst classes vs sparsity."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, group in zip(axes, ("best", "worst")):
        for class_id in chosen[group]:
            rows = per_class[per_class["class"] == class_id].sort_values("setting")
            axis.plot(rows["setting"], rows["mean_acc"], marker="o", markersize=3,
                      label=f"{class_id}: {rows['class_name'].iloc[0]}")
        axis.set_title(f"{len(chosen[group])} {group} classes of the dense model ({score})")
        axis.set_xlabel("data sparsity")
        axis.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    _save_figure(figure, path)


def plot_by_score(settings, column, ylabel, title, path):
    """One line per score of a settings-table statistic vs sparsity, +- sd over seeds."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for score, rows in settings.groupby("data.score", sort=True):
        rows = rows.sort_values("setting")
        axis.errorbar(rows["setting"], rows[f"{column}_mean"],
                      yerr=rows[f"{column}_sd"].fillna(0.0), marker="o", markersize=3,
                      capsize=3, label=str(score) or "(none)")
    axis.set_xlabel("data sparsity")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(title="score")
    _save_figure(figure, path)


def best_worst_table(per_class, chosen, score):
    rows = []
    for group, class_ids in chosen.items():
        for rank, class_id in enumerate(class_ids, start=1):
            for _, row in per_class[per_class["class"] == class_id].sort_values(
                    "setting").iterrows():
                rows.append({"score": score, "group": group, "rank": rank,
                             "class": class_id, "class_name": row["class_name"],
                             "sparsity": row["setting"], "n_runs": row["n_runs"],
                             "mean_acc": row["mean_acc"], "std_acc": row["std_acc"]})
    return pd.DataFrame(rows)


def keep_ratio_for_runs(scores_dir, score, sparsities, out):
    """keep_ratio_<score>.csv/.png from the scores, at the sparsities the runs used."""
    arrays, meta = load_scores(scores_dir)
    class_names = meta.get("classes") or [f"class_{c}" for c in range(meta["num_classes"])]
    kept = {s: keep_indices(arrays[score], s) for s in sparsities}
    table = keep_ratio_table(arrays["labels"], class_names, kept)
    with atomic.atomic_path(out / f"keep_ratio_{score}.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    plot_keep_ratio(table, sparsities, out / f"keep_ratio_{score}.png",
                    title=f"class-wise keep ratio ({score})")


def run_figures(options):
    """The figures command: Figs. 4, 5, 1-2 (and 6 with --scores) from pruned runs."""
    if options.top_k < 1:
        raise DietError(f"--top-k must be >= 1, not {options.top_k}")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    per_class, settings = diet_frames(options.runs)
    tables = []
    for score, score_rows in per_class.groupby("data.score", sort=True):
        chosen = best_worst_classes(score_rows, options.top_k)
        plot_best_worst(score_rows, chosen, score or "(no score)",
                        out / f"best_worst_{score or 'none'}.png")
        tables.append(best_worst_table(score_rows, chosen, score))
        sparsities = sorted(s for s in score_rows["setting"].unique() if s > 0)
        if options.scores and score in SCORE_NAMES and sparsities:
            keep_ratio_for_runs(options.scores, score, sparsities, out)
    with atomic.atomic_path(out / "best_worst_classes.csv") as tmp:
        pd.concat(tables, ignore_index=True).to_csv(tmp, index=False, float_format="%.6g")
    plot_by_score(settings, "class_std", "std of per-class accuracy",
                  "class-wise accuracy spread vs sparsity", out / "class_std.png")
    plot_by_score(settings, "top1", "top-1 accuracy", "accuracy vs sparsity", out / "top1.png")
    print(f"figures in {out}: " + ", ".join(sorted(p.name for p in out.glob("*.png"))))
    return out


# ======================================================================================
# Command line
# ======================================================================================

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ffcv_bias.studies.diet",
        description="Data diet: EL2N/GraNd scores, pruned training sets, class-wise bias.")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="train K short runs and score every training "
                                              "image (EL2N, GraNd); other --section.key=value "
                                              "arguments go to the trainer")
    score.add_argument("--config-file", "-C", action="append", default=[],
                       help="the trainer's YAML config (repeatable, later files win)")
    score.add_argument("--epochs", type=int, required=True,
                       help="epochs of each score run (the paper's early epoch, e.g. 20); "
                            "0 = score freshly initialised networks")
    score.add_argument("--seeds", default="10", help="runs averaged: a count K (seeds "
                                                     "0..K-1) or a list 0,3,7 (default 10)")
    score.add_argument("--out", required=True, help="the score directory")
    score.add_argument("--grand-params", choices=GRAND_PARAMS, default="all",
                       help="GraNd over all parameters (default) or the last layer only")
    score.add_argument("--batch-size", type=int, default=256, help="images per loader batch")
    score.add_argument("--grand-chunk", type=int, default=None,
                       help="images per vmap chunk of per-sample gradients (default: as many "
                            "as fit 1 GiB of gradients on CPU, 1/8 of the free GPU memory)")
    score.add_argument("--device", default=None, help="torch device (default: cuda if there)")
    score.add_argument("--random-seed", type=int, default=0,
                       help="seed of the random-score baseline")
    score.add_argument("--no-train", action="store_true",
                       help="only score: every score run must already be complete")

    prune = commands.add_parser("prune", help="pruned index files, keep ratio, the sweep")
    prune.add_argument("--scores", required=True, help="a score directory")
    prune.add_argument("--score", required=True, choices=SCORE_NAMES)
    prune.add_argument("--sparsity", required=True,
                       help="fractions pruned away, e.g. 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    prune.add_argument("--out", required=True, help="where the index files and the sweep go")
    prune.add_argument("--seeds", default="3", help="training seeds per sparsity (count or "
                                                    "list; default 3)")
    prune.add_argument("--base-config", default=None,
                       help="the pruned runs' config (default: the scores' config and "
                            "overrides)")
    prune.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="an override for every pruned run (repeatable)")
    prune.add_argument("--folder", default=None, help="run folder (default: OUT/runs)")
    prune.add_argument("--max-parallel", type=int, default=None,
                       help="max_parallel of the sweep")
    prune.add_argument("--name", default=None, help="sweep name (default diet_SCORE)")

    figures = commands.add_parser("figures", help="Figs. 4-6 of Pote et al. from pruned runs")
    figures.add_argument("--runs", required=True, help="folder of the pruned runs")
    figures.add_argument("--out", required=True, help="where the figures go")
    figures.add_argument("--scores", default=None,
                         help="score directory: also draw the keep ratio (Fig. 6)")
    figures.add_argument("--top-k", type=int, default=10,
                         help="best and worst classes of the dense model drawn (default 10)")
    return parser


def main(argv=None):
    parser = build_parser()
    options, extra = parser.parse_known_args(argv)
    try:
        if options.command == "score":
            run_scores(options, parse_overrides(extra))
        elif extra:
            raise DietError(f"unexpected argument '{extra[0]}'")
        elif options.command == "prune":
            run_prune(options)
        else:
            run_figures(options)
    except TrainingFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except DietError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
