"""The config's cross-field checks, and the checks made before anything is written (the
output folder, a batch's memory, a changed beton); `preflight`, which runs them for the
CLI before torch is imported. Like train/config.py, imports neither torch nor ffcv.
"""
import os
import sys
from pathlib import Path

from ffcv_bias.common.errors import EXIT_OK
from ffcv_bias.common.errors import EXIT_USAGE as EXIT_CONFIG
from ffcv_bias.data.sources import DatasetError
from ffcv_bias.record import runs
from ffcv_bias.record.protocols import complete_run_hint
from ffcv_bias.train.config import (read_class_min_scale, read_keep_indices, read_sidecar,
                                    resolve_config)
from ffcv_bias.train.fastargs_strict import ConfigError

# ---------------------------------------------------------------------------------------
# Cross-field checks
# ---------------------------------------------------------------------------------------

def _require(condition, message):
    if not condition:
        raise ConfigError(message)


# Sane bounds of every count in the config: far beyond any real run, and low enough that
# a slip of the keyboard (--training.epochs=99999999999999999999) is refused at once, in
# one line naming the key, instead of a trainer that hangs building per-epoch state or
# spawns a million processes. The lower bounds that had messages of their own keep them
# (check_numbers asks those first).
MAX_EPOCHS = 10_000           # ImageNet's longest published schedules are ~1600 epochs
MAX_BATCH_SIZE = 10 ** 9      # per process; the memory check below refuses far less
MAX_RESOLUTION = 65_535       # JPEG's largest side
MAX_WORKERS = 1_024           # loader threads per process
MAX_WORLD_SIZE = 4_096        # processes (GPUs) of one run
MAX_BN_RECOMPUTE_BATCHES = 100_000
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600  # seconds a collective may wait: a week
COUNT_BOUNDS = {
    ("training", "epochs"): (1, MAX_EPOCHS),
    ("training", "batch_size"): (1, MAX_BATCH_SIZE),
    ("training", "checkpoint_every"): (1, MAX_EPOCHS),
    ("training", "bn_recompute_batches"): (0, MAX_BN_RECOMPUTE_BATCHES),
    ("validation", "batch_size"): (1, MAX_BATCH_SIZE),
    ("validation", "resolution"): (1, MAX_RESOLUTION),
    ("resolution", "min_res"): (1, MAX_RESOLUTION),
    ("resolution", "max_res"): (1, MAX_RESOLUTION),
    ("resolution", "start_ramp"): (0, MAX_EPOCHS),
    ("resolution", "end_ramp"): (0, MAX_EPOCHS),
    ("lr", "step_length"): (1, MAX_EPOCHS),
    ("data", "num_workers"): (0, MAX_WORKERS),
    ("dist", "world_size"): (1, MAX_WORLD_SIZE),
    ("dist", "timeout"): (1, MAX_DIST_TIMEOUT_S),
}


def _check_count_bounds(nested, upper_only=False):
    """Every count within COUNT_BOUNDS (training.save_weights_at, lr.lr_peak_epoch and
    lr.warmup_epochs are bounded by training.epochs). The upper bounds are asked first
    (a huge value is named as such, not through a check across keys it breaks)."""
    for (section, key), (low, high) in COUNT_BOUNDS.items():
        value = nested[section][key]
        _require((upper_only or low <= value) and value <= high,
                 f"{section}.{key}={value} is out of range: it must be in [{low}, {high}]")


def check_numbers(nested):
    """The cross-field checks of numbers alone (no file is read): what `sweep plan` can
    check on a login node that may not see the betons."""
    training, lr, resolution = nested["training"], nested["lr"], nested["resolution"]
    _check_count_bounds(nested, upper_only=True)
    _require(training["epochs"] >= 1, "training.epochs must be >= 1")
    _require(0 <= training["seed"] < 2 ** 32,  # numpy's and torch's seeds are unsigned 32-bit
             f"training.seed={training['seed']} must be in [0, 2**32)")
    _require(nested["logging"]["folder"].strip() != "",
             "logging.folder is empty: name the folder runs go to (default: runs)")
    _require(training["batch_size"] >= 1, "training.batch_size must be >= 1")
    _require(nested["validation"]["batch_size"] >= 1, "validation.batch_size must be >= 1")
    _require(lr["lr"] > 0, "lr.lr must be > 0")
    _check_peak_epoch(lr, training["epochs"])
    _require(lr["step_length"] >= 1, "lr.step_length must be >= 1")
    _require(0 <= training["momentum"] < 1, "training.momentum must be in [0, 1)")
    _require(training["weight_decay"] >= 0, "training.weight_decay must be >= 0")
    _require(training["label_smoothing"] < 1, "training.label_smoothing must be < 1")
    _require(nested["model"]["dropout"] < 1, "model.dropout must be < 1")
    _require(training["checkpoint_every"] >= 1, "training.checkpoint_every must be >= 1")
    _require(training["bn_recompute_batches"] >= 0,
             "training.bn_recompute_batches must be >= 0")
    _require(not training["save_weights_at"] or max(training["save_weights_at"])
             <= training["epochs"], f"training.save_weights_at={training['save_weights_at']} "
             f"names an epoch after training.epochs={training['epochs']}")
    _require(0 < resolution["min_res"] <= resolution["max_res"],
             f"resolution.min_res={resolution['min_res']} must be in "
             f"(0, max_res={resolution['max_res']}]")
    _require(resolution["start_ramp"] <= resolution["end_ramp"],
             "resolution.start_ramp must be <= resolution.end_ramp")
    _require(nested["validation"]["resolution"] > 0, "validation.resolution must be > 0")
    _require(nested["augment"]["min_scale"] <= nested["augment"]["max_scale"],
             f"augment.min_scale={nested['augment']['min_scale']} must be <= "
             f"augment.max_scale={nested['augment']['max_scale']}")
    _require(nested["dist"]["world_size"] >= 1, "dist.world_size must be >= 1")
    _check_optimizer(training)
    _check_warmup(lr, training["epochs"])
    _check_drop_path(nested["model"])
    _require(nested["data"]["num_workers"] >= 0, "data.num_workers must be >= 0 (0 = auto)")
    _require(nested["logging"]["log_level"] in (0, 1), "logging.log_level must be 0 or 1")
    _check_count_bounds(nested)


def _check_peak_epoch(lr, epochs):
    """The warm-up must end before the run does; the message names the flags to change."""
    peak, schedule = lr["lr_peak_epoch"], lr["lr_schedule_type"]
    if schedule == "step" or peak < epochs:
        return
    if schedule == "cyclic" and epochs == 1:
        # The cyclic schedule is interpolated between epoch boundaries (ffcv-imagenet's):
        # a peak inside a 1-epoch run is never reached (the rate stays ~lr * 1e-4).
        raise ConfigError(
            f"lr.lr_peak_epoch={peak} must be < training.epochs=1, and the cyclic schedule "
            f"changes only at epoch boundaries: for 1 epoch set --lr.lr_schedule_type=cosine "
            f"--lr.lr_peak_epoch=0.3 (a per-step warm-up over 30% of the run) or "
            f"--lr.lr_peak_epoch=0 (no warm-up)")
    raise ConfigError(f"lr.lr_peak_epoch={peak} must be < training.epochs={epochs}: set "
                      f"--lr.lr_peak_epoch={epochs / 3:.2g} or more epochs")


def _check_optimizer(training):
    for key in ("adam_beta1", "adam_beta2"):
        _require(0 <= training[key] < 1, f"training.{key}={training[key]} must be in [0, 1)")
    _require(training["adam_eps"] > 0, "training.adam_eps must be > 0")


def _check_warmup(lr, epochs):
    warmup_epochs = lr["warmup_epochs"]
    if warmup_epochs == 0:
        return
    _require(lr["lr_schedule_type"] in ("cosine", "step"),
             f"lr.warmup_epochs needs lr.lr_schedule_type cosine or step (cyclic warms up "
             f"to lr.lr_peak_epoch), got {lr['lr_schedule_type']}")
    _require(warmup_epochs < epochs,
             f"lr.warmup_epochs={warmup_epochs} must be < training.epochs={epochs}")
    _require(lr["lr_schedule_type"] != "step" or float(warmup_epochs).is_integer(),
             f"lr.warmup_epochs={warmup_epochs}: before the step schedule the warm-up must "
             f"last whole epochs")
    _require(lr["lr_schedule_type"] != "cosine" or lr["lr_peak_epoch"] == 0,
             "lr.warmup_epochs and lr.lr_peak_epoch would both warm up the cosine schedule: "
             "set lr.lr_peak_epoch=0")


# Architectures without residual branches, so without stochastic depth. Kept here because
# this module must not import torch; tests check it against ffcv_bias.train.models.ARCHITECTURES.
ARCHS_WITHOUT_DROP_PATH = frozenset({"densenet121"})


def _check_drop_path(model):
    _require(model["drop_path"] < 1, "model.drop_path must be < 1")
    _require(model["drop_path"] == 0 or model["arch"] not in ARCHS_WITHOUT_DROP_PATH,
             f"model.drop_path={model['drop_path']}: {model['arch']} has no residual "
             f"branches to drop (set model.drop_path=0)")


def _check_datasets(nested):
    """Both betons exist, with sidecars that agree on the classes. Returns the sidecars."""
    sidecars = {}
    for key in ("train_dataset", "val_dataset"):
        path = nested["data"][key]
        _require(str(path).strip() != "", f"data.{key} is empty: name the beton file (an "
                                          f"unset shell variable?)")
        _require(not Path(path).is_dir(), f"data.{key}: {path} is a directory, not a beton "
                                          f"file")
        _require(Path(path).is_file(), f"data.{key}: no such file {path}")
        _require(not str(path).endswith(".classes.json"),
                 f"data.{key}: {path} is a beton's class list; name the beton itself "
                 f"({str(path)[:-len('.classes.json')]})")
        sidecars[key] = read_sidecar(path, f"data.{key}")
    _check_not_the_training_set(nested["data"])
    _check_same_classes(nested["data"], sidecars["train_dataset"]["classes"],
                        sidecars["val_dataset"]["classes"])
    return sidecars


def _check_not_the_training_set(data):
    """Accuracy on the training images is no validation accuracy: a copy-paste slip in a
    config would otherwise give a paper's table of near-100% numbers."""
    train, val = data["train_dataset"], data["val_dataset"]
    _require(not os.path.samefile(train, val),
             f"data.val_dataset {val} is the training beton data.train_dataset {train}: "
             f"validate on a held-out split")


def _check_same_classes(data, train_classes, val_classes):
    """The model's output size comes from the train sidecar: the val set must use the
    same labels, or its accuracy would be computed against other classes."""
    train, val = data["train_dataset"], data["val_dataset"]
    _require(len(train_classes) == len(val_classes),
             f"data.val_dataset {val} has {len(val_classes)} classes but data.train_dataset "
             f"{train} has {len(train_classes)} (see their .classes.json)")
    differing = [(index, a, b) for index, (a, b) in enumerate(zip(train_classes, val_classes))
                 if a != b]
    if differing:
        index, train_name, val_name = differing[0]
        raise ConfigError(f"data.train_dataset {train} and data.val_dataset {val} have "
                          f"different class lists: class {index} is {train_name!r} in one, "
                          f"{val_name!r} in the other")


def _check_pruning(nested, num_train):
    data = nested["data"]
    if not data["keep_indices"]:
        _require(data["sparsity"] == 0, "data.sparsity > 0 needs data.keep_indices")
        return
    kept = read_keep_indices(data["keep_indices"], num_train)
    actual_sparsity = 1 - len(kept) / num_train
    # Pruning code rounds the kept count; allow that much slack.
    _require(abs(actual_sparsity - data["sparsity"]) <= 0.005 + 1 / num_train,
             f"data.sparsity={data['sparsity']} but {data['keep_indices']} keeps "
             f"{len(kept)} of {num_train} images (sparsity {actual_sparsity:.4f})")
    _require(len(kept) >= nested["training"]["batch_size"] * nested["dist"]["world_size"],
             f"data.keep_indices keeps {len(kept)} images, fewer than one global batch")


def validate_semantics(nested):
    """Cross-field checks the per-key checkers cannot make; raises ConfigError."""
    check_numbers(nested)
    _check_batch_memory(nested)
    sidecars = _check_datasets(nested)
    num_classes = int(sidecars["train_dataset"]["num_classes"])
    num_train = int(sidecars["train_dataset"]["num_samples"])
    if nested["augment"]["class_min_scale"]:
        read_class_min_scale(nested["augment"]["class_min_scale"], num_classes)
    _check_pruning(nested, num_train)
    if not nested["data"]["keep_indices"]:
        global_batch = nested["training"]["batch_size"] * nested["dist"]["world_size"]
        _require(num_train >= global_batch,
                 f"the training set has {num_train} images, fewer than one global batch "
                 f"({global_batch}): no step would run")


# ---------------------------------------------------------------------------------------
# Before anything is written: the output folder, a batch's memory, a changed beton
# ---------------------------------------------------------------------------------------

# ffcv's Loader keeps batches_ahead + 2 batch buffers of uint8 images (ffcv/loader/
# epoch_iterator.py; ours use batches_ahead=3), and the step converts one batch to float32.
LOADER_BATCH_BUFFERS = 5
FLOAT32_BYTES = 4


def batch_memory_bytes(batch_size, side):
    """Host memory one loader's batches need: its uint8 buffers plus one float32 copy."""
    image_bytes = side * side * 3
    return batch_size * image_bytes * (LOADER_BATCH_BUFFERS + FLOAT32_BYTES)


def physical_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_batch_memory(nested):
    """Refuse an image side or batch size whose batches cannot fit in this machine's memory
    (validation.resolution=20000 would ask for terabytes), naming the key, before training
    or even building the loaders. A lower bound: the model's activations come on top."""
    available = physical_memory_bytes()
    if not available:
        return
    training, validation = nested["training"], nested["validation"]
    for side_key, side, batch_key, batch in (
            ("resolution.max_res", nested["resolution"]["max_res"], "training.batch_size",
             training["batch_size"]),
            ("validation.resolution", validation["resolution"], "validation.batch_size",
             validation["batch_size"])):
        needed = batch_memory_bytes(batch, side)
        _require(needed <= available,
                 f"{side_key}={side} with {batch_key}={batch}: the loader's batches need "
                 f"about {needed / 1e9:,.0f} GB of memory (uint8 images x {LOADER_BATCH_BUFFERS} "
                 f"buffers + a float32 copy), this machine has {available / 1e9:,.0f} GB; "
                 f"lower {side_key} or {batch_key}")


def check_output_folder(nested):
    """logging.folder must be a directory we can create run directories in."""
    from ffcv_bias.common.output_paths import OutputPathError, require_creatable_dir
    try:
        require_creatable_dir(nested["logging"]["folder"])
    except OutputPathError as error:
        raise ConfigError(f"logging.folder: {error}") from None


# How a user goes on when a run's betons changed (README, "Bad input"): the run is never
# retrained in place, since that would overwrite a result of other data.
CHANGED_BETON_REMEDY = ("to train on the new beton use another logging.folder (sweeps: "
                        "--folder); to reuse the run, restore the beton it was trained on")


def check_recorded_betons(run_dir, nested):
    """Refuse to reuse or resume a run whose config.json records other betons than the
    ones the config names now (records without fingerprints are not checked)."""
    from ffcv_bias.data.fingerprint import (change_message, current_fingerprints,
                                            first_change, recorded_fingerprints)
    recorded = recorded_fingerprints(runs.read_json_object(Path(run_dir) / runs.CONFIG_FILE))
    if not recorded:
        return
    try:
        current = current_fingerprints(nested)
    except DatasetError:
        return  # a beton missing now: the trainer's own checks name it, status says why not
    change = first_change(recorded, current)
    if change:
        raise ConfigError(change_message(Path(run_dir), nested, change, CHANGED_BETON_REMEDY))


def checked_config(argv=None):
    """The config of `argv` resolved and checked, short of opening the betons (the
    trainer's check_betons needs ffcv): raises ConfigError naming the problem."""
    nested = resolve_config(argv)
    validate_semantics(nested)
    check_output_folder(nested)
    check_recorded_betons(Path(nested["logging"]["folder"]) / runs.run_id(nested), nested)
    return nested


def preflight(argv=None):
    """The checks that need no torch, for the CLI to run before importing the trainer:
    a bad config or an already complete run costs a fraction of a second, not the
    several seconds of importing torch and ffcv. Returns (exit code to stop with, None),
    or (None, the checked config) to go on and train it (launch.main(nested=...): the
    config is parsed and checked once)."""
    try:
        nested = checked_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG, None
    if said_complete(nested):
        return EXIT_OK, None
    return None, nested


def said_complete(nested):
    """True when the run of `nested` is complete, having said so on stdout (with what a
    newer config asks of it, e.g. a protocol to add): the answer before the run's lock is
    taken. The lock holder asks again (launch.complete_once_locked)."""
    run_id = runs.run_id(nested)
    run_dir = Path(nested["logging"]["folder"]) / run_id
    if not runs.is_complete(run_dir, run_id):
        return False
    print(f"run {run_id} is already complete: {run_dir}", flush=True)
    hint = complete_run_hint(run_dir, nested)
    if hint:
        print(hint, flush=True)
    return True
