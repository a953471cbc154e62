"""The trainer's configuration: fastargs sections, cross-field checks, small input files.

This module imports neither torch nor ffcv, so the sweep launcher can resolve hundreds of
configs (and their run_ids) in a fraction of a second without starting a run:

    nested = resolve_config(["--config-file", "rn50_configs/rn50_88_epochs.yaml",
                             "--training.seed=3"])
    run_dir = Path(nested["logging"]["folder"]) / runs.run_id(nested)

Keys shared with ffcv-imagenet's `train_imagenet.py` keep their names and meaning, so its
`rn50_configs/*.yaml` load unchanged:

- `lr.lr` is the absolute peak learning rate (ffcv-imagenet does NOT rescale it by batch
  size: its 8-GPU ResNet-50 recipes use lr 1.7 with 512 images per GPU).
- `training.batch_size` is per process (per GPU): the global batch is batch_size x world_size.
- `lr.lr_schedule_type` 'cyclic' / 'step' are their schedules; 'cosine' is new
  (see ffcv_bias/train/schedules.py for the exact formulas).
- Their 0/1 integer flags (`use_blurpool`, `distributed`, `lr_tta`, `in_memory`) accept
  0/1 and true/false here, and `--x=0` means off (fastargs' own bool would read it as on).
- `training.bn_wd` appears in their YAML files but their trainer never read it (it always
  excluded parameters named '*bn*' from weight decay). Here it is honoured: it is a second
  spelling of `training.bn_weight_decay`; either one set to 1 turns decay on for norm layers.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
from fastargs import Param, Section, get_current_config
from fastargs.validation import Checker

from ffcv_bias.train.fastargs_strict import (ConfigError, EpochList, FloatInRange, OneOf,
                                             StrictBool, config_to_dict, parse_config)
from ffcv_bias.data.sources import DatasetError
from ffcv_bias.data.sidecar import read_classes
from ffcv_bias.record.protocols import ProtocolError, complete_run_hint
from ffcv_bias.record.protocols import canonical as canonical_protocols
# Exit codes of train_imagenet.py (the sweep launcher reads them): common/errors.py.
from ffcv_bias.common.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED
from ffcv_bias.common.errors import EXIT_USAGE as EXIT_CONFIG

DESCRIPTION = "Train one classifier on FFCV betons and write its run record."


class Integer(Checker):
    """An int that refuses to round: fastargs' `int` turns 1.7 from a YAML file into 1."""

    def check(self, value):
        if isinstance(value, bool):
            raise ValueError(f"not an integer: {value!r}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        return int(str(value).strip())

    def help(self):
        return "an integer"


class Text(Checker):
    """A string; YAML may hand over a number (a port, a score name): take its text."""

    def check(self, value):
        if value is None or isinstance(value, (dict, list)):
            raise ValueError(f"not a string: {value!r}")
        return str(value)

    def help(self):
        return "a string"


# training.wd_exempt: which parameters weight decay skips (param_groups.EXEMPT_SETS has
# their meaning). The default is the behaviour from before the key existed, so that
# finished runs keep their run_id (runs.LATER_KEY_DEFAULTS); the paper's ResNet/DenseNet
# sweeps set "norm" explicitly.
WD_EXEMPT_SETS = ("norm", "norm_bias_embed")
WD_EXEMPT_DEFAULT = "norm_bias_embed"

# augment.decode (ffcv_bias/data/fast_decode.py, which imports ffcv and numba: this module
# loads those only when needed, hence the copy of its DECODE_MODES, checked equal by the
# tests). The default stays 'exact': a new default would enter the run_id of every planned
# run (runs.LATER_KEY_DEFAULTS keeps only the old behaviour's value out of it) and a
# relaunched sweep would train its finished runs again. 'fast' is chosen per config;
# README "Fast decoding" has the measurements.
DECODE_MODES = ("exact", "fast")
DECODE_DEFAULT = "exact"


# The names of ffcv_bias.train.models.ARCHITECTURES, kept here because this module must not
# import torch (tests check the two agree). Checked when the config is parsed, so the
# trainer and `sweep plan` refuse a misspelt architecture before anything is written.
KNOWN_ARCHS = ("resnet18", "resnet50", "resnet18_cifar", "resnet50_cifar", "resnet8",
               "resnet20", "resnet32", "resnet56", "densenet121", "convnext_tiny", "vit_small")


class ArchName(Checker):
    def check(self, value):
        name = Text().check(value)
        if name not in KNOWN_ARCHS:
            raise ValueError(f"unknown architecture {name!r} (known: {', '.join(KNOWN_ARCHS)})")
        return name

    def help(self):
        return "one of " + ", ".join(KNOWN_ARCHS)


class ProtocolList(Checker):
    """validation.protocols: a comma-separated string or a YAML list of RES@CROP_RATIO,
    stored as the canonical comma-separated string."""

    def check(self, value):
        try:
            return canonical_protocols(value)
        except ProtocolError as error:
            raise ValueError(str(error)) from None

    def help(self):
        return "comma-separated RESOLUTION@CROP_RATIO test protocols (e.g. 40@1.0,32@0.875)"


def _flag(doc, default):
    return Param(StrictBool(), doc + " (0/1)", default=default)


def declare_sections():
    """Declare the trainer's fastargs sections (idempotent: a second call does nothing)."""
    config = get_current_config()
    if ("training", "seed") in config.entries:
        return

    Section("data", "the datasets (FFCV betons with a .classes.json sidecar)").params(
        train_dataset=Param(Text(), "training beton", required=True),
        val_dataset=Param(Text(), "validation beton", required=True),
        num_workers=Param(Integer(), "loader threads per process (0 = auto: the CPUs this "
                                     "process may use, shared among the node's processes, "
                                     "minus one for the training loop)", default=0),
        in_memory=_flag("read the whole beton into RAM (1) or page it from disk (0)", 1),
        keep_indices=Param(Text(), "file of training-set indices to train on (.npy, .json "
                                   "list or .txt one per line; empty = the whole set); "
                                   "a data-diet pruned set", default=""),
        sparsity=Param(FloatInRange(0, 1, low_inclusive=True),
                       "fraction of the training set pruned away (data-diet bookkeeping; "
                       "checked against keep_indices)", default=0.0),
        score=Param(Text(), "name of the pruning score that chose keep_indices (el2n, grand, "
                            "random, ...; bookkeeping)", default=""),
    )
    Section("lr", "learning-rate schedule (per iteration)").params(
        lr=Param(float, "peak learning rate, absolute (not scaled by batch size)", default=0.5),
        lr_schedule_type=Param(OneOf("cyclic", "step", "cosine"),
                               "cyclic: linear up to lr_peak_epoch then linear down to 0; "
                               "step: x step_ratio every step_length epochs; cosine: linear "
                               "warm-up to lr_peak_epoch then half-cosine to 0",
                               default="cyclic"),
        lr_peak_epoch=Param(FloatInRange(0, 1e9, low_inclusive=True),
                            "epoch at which the learning rate peaks (cyclic, cosine)",
                            default=2.0),
        step_ratio=Param(float, "learning-rate factor at each step (step schedule)",
                         default=0.1),
        step_length=Param(Integer(), "epochs between steps (step schedule)", default=30),
        warmup_epochs=Param(FloatInRange(0, 1e9, low_inclusive=True),
                            "linear warm-up epochs in front of the cosine or step schedule, "
                            "which then runs over the remaining epochs (0 = none; with "
                            "cosine set lr_peak_epoch=0; with step, whole epochs)",
                            default=0.0),
        warmup_start_factor=Param(FloatInRange(0, 1, low_inclusive=True),
                                  "the warm-up starts at this fraction of lr (0: from zero, "
                                  "as ConvNeXt and DeiT; torchvision uses 0.01)",
                                  default=0.0),
    )
    Section("training", "optimisation").params(
        seed=Param(Integer(), "seed of everything: data order, crops, init, dropout", default=0),
        epochs=Param(Integer(), "number of epochs", default=30),
        batch_size=Param(Integer(), "training batch size per process (per GPU)", default=512),
        optimizer=Param(OneOf("sgd", "adamw"),
                        "sgd: SGD with momentum and L2 weight decay; adamw: torch AdamW, "
                        "decoupled weight decay (scaled by the current lr)", default="sgd"),
        momentum=Param(float, "SGD momentum (sgd only)", default=0.9),
        nesterov=_flag("Nesterov momentum (sgd only)", 0),
        adam_beta1=Param(float, "AdamW beta1: decay of the gradient average (adamw only)",
                         default=0.9),
        adam_beta2=Param(float, "AdamW beta2: decay of the squared-gradient average "
                                "(adamw only)", default=0.999),
        adam_eps=Param(float, "AdamW epsilon added to the denominator (adamw only)",
                       default=1e-8),
        grad_clip_norm=Param(FloatInRange(0, 1e9, low_inclusive=True),
                             "clip the global gradient L2 norm to this before each step "
                             "(0 = off)", default=0.0),
        weight_decay=Param(float, "weight decay of conv/linear weights (L2 for sgd, "
                                  "decoupled for adamw)", default=4e-5),
        bn_weight_decay=_flag("also decay norm-layer weights and biases", 0),
        wd_exempt=Param(OneOf(*WD_EXEMPT_SETS),
                        "parameters kept off weight decay: 'norm' = norm layers only (the "
                        "paper's), 'norm_bias_embed' = norm layers, every bias and the "
                        "model's no_weight_decay() list (ViT pos_embed / cls_token, "
                        "ConvNeXt layer_scale; timm-style)",
                        default=WD_EXEMPT_DEFAULT),
        bn_wd=_flag("ffcv-imagenet's spelling of bn_weight_decay", 0),
        label_smoothing=Param(FloatInRange(0, 1, low_inclusive=True),
                              "label smoothing of the training loss", default=0.1),
        use_blurpool=_flag("anti-aliased (BlurPool) strided convolutions", 0),
        distributed=_flag("DistributedDataParallel (implied by dist.world_size > 1 "
                          "or a torchrun launch)", 0),
        amp_dtype=Param(OneOf("bf16", "fp16"), "autocast dtype on CUDA (fp16 adds a "
                                               "GradScaler); CPU trains in fp32",
                        default="bf16"),
        deterministic=_flag("deterministic CUDA kernels, cudnn.benchmark off (CPU runs "
                            "are always deterministic)", 0),
        checkpoint_every=Param(Integer(), "write checkpoint.pt every this many epochs "
                                          "(and after the last)", default=1),
        compile=_flag("torch.compile the training step's model (one graph per "
                      "resolution of the ramp; validation stays eager)", 0),
        fused_optimizer=_flag("torch's fused SGD / AdamW kernel (one launch for all "
                              "parameters; rounds differently from the default)", 0),
        restart=_flag("a checkpoint.pt that cannot be read is moved aside to "
                      "checkpoint.pt.unreadable and the run trains from scratch (a readable "
                      "one is always resumed); not part of the run_id", 0),
        bn_recompute_batches=Param(Integer(), "after the last step, replace BatchNorm's "
                                              "running statistics by exact averages over "
                                              "this many training batches under the final "
                                              "weights (0 = keep the running averages)",
                                   default=0),
        save_weights_at=Param(EpochList(), "also keep the weights after these epochs of the "
                                           "normal schedule as weights_epoch<k>.pt (e.g. 20 "
                                           "for data-diet scores; empty = none)", default=""),
    )
    Section("augment", "training augmentation").params(
        min_scale=Param(FloatInRange(0, 1), "random-resized-crop lower bound tau on the "
                                            "crop's area fraction", default=0.08),
        max_scale=Param(FloatInRange(0, 1), "upper bound on the crop's area fraction",
                        default=1.0),
        flip=_flag("random horizontal flip", 1),
        class_min_scale=Param(Text(), "file of per-class crop lower bounds, one per class "
                                      "(.json list, .txt one per line or .npy); replaces "
                                      "min_scale class by class; empty = off", default=""),
        decode=Param(OneOf(*DECODE_MODES), "JPEG decoding of training and validation images: "
                                           "'exact' = the whole image, then resize the crop; "
                                           "'fast' = only the crop, DCT-scaled when it is >= "
                                           "2x the output (same crops, slightly different "
                                           "resampling; README 'Fast decoding')",
                     default=DECODE_DEFAULT),
    )
    Section("model", "the network").params(
        arch=Param(ArchName(), "architecture (ffcv_bias.train.models: resnet18, resnet50, "
                           "resnet20, resnet8, ...)", default="resnet50"),
        dropout=Param(FloatInRange(0, 1, low_inclusive=True),
                      "dropout before the classifier", default=0.0),
        drop_path=Param(FloatInRange(0, 1, low_inclusive=True),
                        "stochastic depth: the drop rate of the last residual block, rising "
                        "linearly from 0 over the blocks (not densenet121)", default=0.0),
    )
    Section("resolution", "progressive resizing of training images").params(
        min_res=Param(Integer(), "training resolution up to start_ramp", default=160),
        max_res=Param(Integer(), "training resolution from end_ramp on", default=160),
        start_ramp=Param(Integer(), "last epoch at min_res", default=0),
        end_ramp=Param(Integer(), "first epoch at max_res", default=0),
    )
    Section("validation", "evaluation after each epoch").params(
        batch_size=Param(Integer(), "validation batch size per process", default=512),
        resolution=Param(Integer(), "validation image side", default=224),
        crop_ratio=Param(FloatInRange(0, 1), "side of the centre crop / shorter image side",
                         default=224 / 256),
        lr_tta=_flag("average the logits of each image and its mirror image", 1),
        protocols=Param(ProtocolList(), "extra test protocols RES@CROP_RATIO, comma-separated "
                                        "(e.g. 40@1.0,32@0.875): the final model is also "
                                        "evaluated under each (not part of the run_id)",
                        default=""),
    )
    Section("logging", "where and how much to write (not part of the run_id)").params(
        folder=Param(Text(), "runs go to <folder>/<run_id>/", default="runs"),
        log_level=Param(Integer(), "1: validate every epoch; 0: only after the last",
                        default=1),
        progress=_flag("a tqdm progress bar per epoch", 1),
    )
    Section("dist", "distributed launch (without torchrun)").params(
        world_size=Param(Integer(), "processes (GPUs) to train with; > 1 spawns them",
                         default=1),
        address=Param(Text(), "rendezvous address", default="localhost"),
        port=Param(Text(), "rendezvous port; auto: a free port picked by the launching "
                           "process (torchrun uses its own MASTER_PORT)", default="auto"),
    )


def resolve_config(argv=None):
    """Parse `--config-file` YAML + `--section.key=value` into the nested config dict.

    Raises ConfigError (one line naming the key) on unknown keys or bad values. Under
    torchrun the world size comes from the environment and enters the config (and so the
    run_id: the global batch changes the result); an explicit dist.world_size must agree.
    """
    declare_sections()
    config = parse_config(argv, description=DESCRIPTION)
    nested = config_to_dict(config)
    adopt_torchrun_world_size(nested)
    return nested


def adopt_torchrun_world_size(nested):
    """Under torchrun, dist.world_size = WORLD_SIZE unless the config names another size."""
    launched = os.environ.get("WORLD_SIZE")
    if launched is None or "RANK" not in os.environ:
        return
    configured = nested["dist"]["world_size"]
    if configured == 1:  # the default: the user let torchrun decide
        nested["dist"]["world_size"] = int(launched)
    elif configured != int(launched):
        raise ConfigError(f"torchrun started {launched} processes but "
                          f"dist.world_size={configured}: drop --dist.world_size or pass "
                          f"--dist.world_size={launched}")


def is_distributed(nested):
    return bool(nested["training"]["distributed"]) or nested["dist"]["world_size"] > 1


def wd_exempt(nested):
    """The weight-decay exemption set (a config written before the key: today's default)."""
    return nested["training"].get("wd_exempt", WD_EXEMPT_DEFAULT)


def bn_weight_decay(nested):
    training = nested["training"]
    return bool(training["bn_weight_decay"] or training["bn_wd"])


# ---------------------------------------------------------------------------------------
# Small input files: per-class crop bounds and kept training indices
# ---------------------------------------------------------------------------------------

def read_number_file(path, key=None):
    """A 1-D array from a .npy file, a .json list or a .txt file with one number per line.
    `key` (the config key naming the file) starts the error message when given."""
    path = Path(path)
    named = f"{key}: " if key else ""
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "file not found"
        raise ConfigError(f"{named}{what}: {path}")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            content = json.loads(path.read_text())
            if isinstance(content, dict):  # {"min_scale": [...], ...} as the loaders accept
                content = content.get("min_scale", content.get("indices"))
            values = np.asarray(content, dtype=np.float64)
        else:
            values = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (ValueError, TypeError, OSError) as error:
        # np.loadtxt's message is long and names the first bad row: its first sentence.
        reason = str(error).split(". ")[0].rstrip(".")
        raise ConfigError(f"{named}cannot read numbers from {path} (.npy, .json list, or "
                          f"one number per line): {reason}") from None
    if values.ndim != 1:
        raise ConfigError(f"{named}{path} must hold a flat list of numbers, got shape "
                          f"{values.shape}")
    return values


def read_keep_indices(path, num_train):
    """The training indices of a pruned set: unique integers in [0, num_train)."""
    values = read_number_file(path, "data.keep_indices")
    indices = values.astype(np.int64)
    if not np.array_equal(indices, values):
        raise ConfigError(f"data.keep_indices: {path} holds non-integer values")
    if len(indices) == 0:
        raise ConfigError(f"data.keep_indices: {path} is empty")
    if indices.min() < 0 or indices.max() >= num_train:
        raise ConfigError(f"data.keep_indices: {path} has indices outside [0, {num_train})")
    if len(np.unique(indices)) != len(indices):
        raise ConfigError(f"data.keep_indices: {path} repeats indices")
    return np.sort(indices)


def read_class_min_scale(path, num_classes):
    """Per-class crop lower bounds: num_classes floats in (0, 1]. A class whose bound is
    above augment.max_scale is cropped in [bound, bound]; 1.0 = never cropped."""
    bounds = read_number_file(path, "augment.class_min_scale").astype(np.float64)
    if len(bounds) != num_classes:
        raise ConfigError(f"augment.class_min_scale: {path} has {len(bounds)} values for "
                          f"{num_classes} classes")
    if not np.all((bounds > 0) & (bounds <= 1)):
        raise ConfigError(f"augment.class_min_scale: {path} has values outside (0, 1]")
    return bounds


def read_sidecar(beton_path, key):
    """The beton's .classes.json sidecar (written by write_datasets.py), checked: the
    checks below read num_classes / num_samples, so a malformed one is a one-line error
    naming the config key, not a KeyError later."""
    try:
        return read_classes(beton_path)
    except DatasetError as error:
        raise ConfigError(f"{key}: {error}") from None


# ---------------------------------------------------------------------------------------
# Cross-field checks
# ---------------------------------------------------------------------------------------

def _require(condition, message):
    if not condition:
        raise ConfigError(message)


def check_numbers(nested):
    """The cross-field checks of numbers alone (no file is read): what `sweep plan` can
    check on a login node that may not see the betons."""
    training, lr, resolution = nested["training"], nested["lr"], nested["resolution"]
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
    from ffcv_bias.record import runs
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


def preflight(argv=None):
    """The checks that need no torch, for the CLI to run before importing the trainer:
    a bad config or an already complete run costs a fraction of a second, not the
    several seconds of importing torch and ffcv. Returns an exit code to stop with, or
    None to go on and train."""
    from ffcv_bias.record import runs
    try:
        nested = resolve_config(argv)
        validate_semantics(nested)
        check_output_folder(nested)
        run_id = runs.run_id(nested)
        run_dir = Path(nested["logging"]["folder"]) / run_id
        check_recorded_betons(run_dir, nested)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if runs.is_complete(run_dir, run_id):
        print(f"run {run_id} is already complete: {run_dir}", flush=True)
        hint = complete_run_hint(run_dir, nested)
        if hint:
            print(hint, flush=True)
        return EXIT_OK
    return None
