"""The trainer's configuration: fastargs sections, the resolved nested config, small input files.

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
- `data.gpu` appears in their rn18_configs/*.yaml but their trainer never declared it
  (fastargs dropped it without a word): in a config file it is ignored with a note
  (FFCV_IMAGENET_UNUSED_KEYS); anywhere else an undeclared key stays an error.
"""
import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np
from fastargs import Param, Section, get_current_config
from fastargs.validation import Checker

from ffcv_bias.train.fastargs_strict import (ConfigError, EpochList, FloatInRange, OneOf,
                                             StrictBool, config_to_dict, parse_config)
from ffcv_bias.data.sources import DatasetError
from ffcv_bias.data.sidecar import read_classes
from ffcv_bias.record.protocols import ProtocolError
from ffcv_bias.record.protocols import canonical as canonical_protocols

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

# dist.timeout's default, in seconds (train/distributed.py): longer than torch.compile's
# first graphs of a ResNet-50 on 8 ranks at once (minutes, at the start and at each new
# resolution of the ramp), short enough that a rank that died is noticed within the hour.
# Outside the run_id, as the whole dist section but world_size is.
DIST_TIMEOUT_DEFAULT_S = 30 * 60


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
                                               "GradScaler and the fused optimizer); CPU "
                                               "trains in fp32",
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
    Section("dist", "distributed launch (world_size, address, port: without torchrun)").params(
        world_size=Param(Integer(), "processes (GPUs) to train with; > 1 spawns them",
                         default=1),
        address=Param(Text(), "rendezvous address", default="localhost"),
        port=Param(Text(), "rendezvous port; auto: a free port picked by the launching "
                           "process (torchrun uses its own MASTER_PORT)", default="auto"),
        timeout=Param(Integer(), "seconds a rank waits in a collective for the others before "
                                 "the run fails (torchrun too; NCCL's own 600 s can expire "
                                 "while 8 ranks compile with training.compile=1)",
                      default=DIST_TIMEOUT_DEFAULT_S),
    )


# The keys of ffcv-imagenet's shipped YAML files (libffcv/ffcv-imagenet rn18_configs/ and
# rn50_configs/, every *.yaml) that this trainer does not declare, with why they are
# ignored. All their other keys are declared here, with the same meaning.
FFCV_IMAGENET_UNUSED_KEYS = {
    ("data", "gpu"): "a key of ffcv-imagenet's rn18 configs that its trainer never "
                     "declared or read; choose GPUs with CUDA_VISIBLE_DEVICES or "
                     "dist.world_size",
}


def resolve_config(argv=None):
    """Parse `--config-file` YAML + `--section.key=value` into the nested config dict.

    Raises ConfigError (one line naming the key) on unknown keys or bad values. Under
    torchrun the world size comes from the environment and enters the config (and so the
    run_id: the global batch changes the result); an explicit dist.world_size must agree.
    """
    declare_sections()
    config = parse_config(argv, description=DESCRIPTION,
                          ignored_file_keys=FFCV_IMAGENET_UNUSED_KEYS)
    nested = config_to_dict(config)
    adopt_torchrun_world_size(nested)
    expand_home(nested)
    return nested


# Path keys in which a leading ~ is the home directory, as the other commands read it: a
# value typed as --logging.folder=~/runs reaches the program unexpanded (no shell expands
# ~ after `=`), and a folder literally named ~ in the working directory is never meant.
HOME_PATH_KEYS = (("logging", "folder"), ("data", "train_dataset"), ("data", "val_dataset"))


def expand_home(nested):
    """Expand a leading ~ of the HOME_PATH_KEYS in place (run_ids name betons by file
    name and leave logging.* out, so no run_id changes)."""
    for section, key in HOME_PATH_KEYS:
        value = nested.get(section, {}).get(key)
        if isinstance(value, str) and value.startswith("~"):
            nested[section][key] = os.path.expanduser(value)


# ---------------------------------------------------------------------------------------
# The run config: the resolved dict, frozen, as the Trainer reads it
# ---------------------------------------------------------------------------------------

def run_config(nested):
    """The resolved config as one frozen object: `cfg.training.epochs`.

    What the Trainer reads, instead of fastargs' global state: a spawned worker, a test
    or a notebook builds a Trainer from the dict alone, and nothing can change a run's
    config behind its back. Each section is a frozen dataclass whose fields are its keys,
    typed as the fastargs checkers left the values; lists become tuples.
    `config_dict(cfg)` gives `nested` back (config.json and the run_id come from it)."""
    return _frozen("RunConfig", {name: _frozen(f"{name.capitalize()}Config", values)
                                 for name, values in nested.items()})


def config_dict(cfg):
    """The nested dict `run_config` was built from (equal to it: tuples back to lists)."""
    return {name: {key: _thaw(value) for key, value in vars(section).items()}
            for name, section in vars(cfg).items()}


def replace_values(cfg, changes):
    """A copy of `cfg` with `{"training.grad_clip_norm": 0.0, ...}` changed (a variant of
    a run, e.g. in a test); an unknown key is a ConfigError."""
    nested = config_dict(cfg)
    for path, value in changes.items():
        section, _, key = path.partition(".")
        if key not in nested.get(section, {}):
            raise ConfigError(f"{path}: no such config key")
        nested[section][key] = value
    return run_config(nested)


def _frozen(name, values):
    frozen = {key: _freeze(value) for key, value in values.items()}
    fields = tuple((key, type(value)) for key, value in frozen.items())
    return _frozen_class(name, fields)(**frozen)


@functools.lru_cache(maxsize=None)
def _frozen_class(name, fields):
    # One class per shape of section, so that two configs of one shape compare equal.
    return dataclasses.make_dataclass(name, list(fields), frozen=True)


def _freeze(value):
    if isinstance(value, dict):
        raise TypeError(f"a config value must not be a dict: {value!r}")
    return tuple(_freeze(item) for item in value) if isinstance(value, list) else value


def _thaw(value):
    return [_thaw(item) for item in value] if isinstance(value, tuple) else value


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
    checks (train/checks.py) read num_classes / num_samples, so a malformed one is a
    one-line error naming the config key, not a KeyError later."""
    try:
        return read_classes(beton_path)
    except DatasetError as error:
        raise ConfigError(f"{key}: {error}") from None
