"""Label preservation: at which augmentation strength does each class lose its label?

Balestriero, Bottou & LeCun 2022, Sec. 3.2 and Figs. 5-6: a trained model is evaluated on
test (and train) images transformed with growing strength; a class whose accuracy holds
up under strong crops is one for which the crop is label-preserving, and the strength at
which it falls differs from class to class.

    python -m ffcv_bias.studies.preservation --weights runs/rn50_s0_1a2b3c4d5e6f \\
        --dataset data/imagenet_val.beton [--train-dataset data/imagenet_train.beton \\
        --max-train-images 50000] [--draws 3] [--resolution 224] --out preservation/
    python -m ffcv_bias.studies.preservation --weights resnet50-0676ba61.pth \\
        --arch resnet50 --dataset data/imagenet_val.beton --out preservation_tv/

--weights is a run directory (config.json gives the architecture, dropout, BlurPool and
the validation resolution; weights.pt the weights) or a state_dict file (.pt/.pth:
torchvision-format ResNet-18/50, DenseNet-121, ConvNeXt-Tiny, timm ViT-S/16, or ours;
then --arch, and --num-classes unless the dataset's class count is right).

Transforms (each image, `--draws` seeded draws per strength; the same draws for every
strength of a transform, so the curves differ by the strength only):
  crop    random-resized crop keeping exactly alpha of the image area (aspect ratio
          log-uniform in [3/4, 4/3] as torchvision's RandomResizedCrop; no flip), resized
          to --resolution. Strengths: alpha = 1.0 (the whole image) down to 0.08.
  cutout  a square of side s x the image side, placed uniformly inside the whole image,
          set to the dataset mean (0 after normalization). Strengths: s = 0 ... 0.7.
  jitter  colour jitter of strength s: brightness, then contrast, then saturation, each
          factor uniform in [max(0, 1-s), 1+s] (torchvision's ColorJitter(s, s, s) without
          hue, in a fixed order). Strengths: s = 0 ... 0.9.
The identity (the whole image, nothing done: crop 1.0 = cutout 0 = jitter 0) is
evaluated once and reported under each transform with n_runs 1 and std 0. Every image is
the whole stored image resized to --resolution x --resolution (no centre crop).
Random numbers are a pure function of (--seed, draw, image index): reruns are identical.

Outputs in --out (every file written atomically):
  per_class.csv   split, transform, setting, class, class_name, n_runs (= draws),
                  mean_acc, std_acc (over draws, ddof=1): the analysis command's per_class
                  columns plus split (val / train) and transform.
  mean.csv        split, transform, setting, n_runs, mean_acc (top-1 over images, mean over
                  draws), std_acc.
  label_loss.csv  split, transform, class, class_name, clean_acc, threshold_acc, lost,
                  loss_setting (the first strength, from mild to strong, where the class's
                  accuracy falls below --loss-threshold x its clean accuracy; default 0.5),
                  last_preserving_setting (the strength before it; the strongest one when
                  the label is never lost; empty for a class never recognized clean).
  figures/<split>_<transform>.png  per-class curves with class names and the mean (Fig. 5
                  bottom; beyond 12 classes: every class in grey, and named the 5 least and
                  the 5 most robust ones, robustness = mean of the curve / clean accuracy);
                  figures/mean_curves.png (Fig. 5 middle: val solid, train dashed).
  preservation.json  what was evaluated: model, settings, draws, seed, threshold, timings.

Runs on CUDA when available (channels_last, bf16 autocast), otherwise on CPU (float32).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numba import njit
from tqdm import tqdm

from ffcv_bias.data import ffcv_patches
from ffcv_bias.common import plots
from ffcv_bias.common.errors import EXIT_OK, main_guard
from ffcv_bias.common.tables import write_csv

ffcv_patches.apply()  # before any ffcv import: ffcv would pin torch to one thread

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.transforms import Squeeze, ToTensor, ToTorchImage  # noqa: E402

from ffcv_bias.common.atomic import write_json  # noqa: E402
from ffcv_bias.data.augment import SeededRandomResizedCropDecoder, sample_key, uniform  # noqa: E402
from ffcv_bias.data.loaders import (IMAGENET_MEAN, IMAGENET_STD, BetonError,  # noqa: E402
                                    SeededLoader, read_labels)
from ffcv_bias.train.models import ARCHITECTURES  # noqa: E402
from ffcv_bias.studies.trained import (StudyError, default_workers,  # noqa: E402
                                       inference_setup, load_trained_model, pick_device,
                                       read_class_names)

DEFAULT_SETTINGS = {
    "crop": (1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.08),   # area fraction kept
    "cutout": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),       # side of the removed square
    "jitter": (0.0, 0.2, 0.4, 0.6, 0.8, 0.9),                 # colour-jitter strength
}
# The setting of each transform that leaves the image as it is.
IDENTITY = {"crop": 1.0, "cutout": 0.0, "jitter": 0.0}
TRANSFORMS = tuple(DEFAULT_SETTINGS)
DEFAULT_LOSS_THRESHOLD = 0.5
# Offsets of the per-sample uniform draws used by cutout and jitter (the crop decoder uses
# draws 0-22 of the same (seed, draw, index) key; these never mix with it).
_CUTOUT_DRAWS = 100
_JITTER_DRAWS = 102
# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
NAMED_CLASSES_IN_FIGURE = 12


# ----------------------------------------------------------------------------------------
# Seeded per-image random numbers and the transforms, in torch
# ----------------------------------------------------------------------------------------

@njit(cache=False)
def _per_image_uniforms(seed, draw, indices, first, count):
    """uniform[i, j] = the (first + j)-th draw of image indices[i]: f(seed, draw, index)."""
    out = np.empty((len(indices), count))
    for row in range(len(indices)):
        key = sample_key(seed, draw, indices[row])
        for column in range(count):
            out[row, column] = uniform(key, first + column)
    return out


def per_image_uniforms(seed, draw, indices, first, count, device):
    values = _per_image_uniforms(np.int64(seed), np.int64(draw),
                                 np.ascontiguousarray(indices, dtype=np.int64), first, count)
    return torch.from_numpy(values).to(device=device, dtype=torch.float32)


def cutout(normalized, side_fraction, uniforms):
    """Zero (= the dataset mean) a square of side `side_fraction` x the image side, placed
    uniformly inside each image; uniforms: [B, 2] (row, column)."""
    batch, _, height, width = normalized.shape
    side = int(round(side_fraction * min(height, width)))
    if side == 0:
        return normalized
    top = (uniforms[:, 0] * (height - side + 1)).long()
    left = (uniforms[:, 1] * (width - side + 1)).long()
    rows = torch.arange(height, device=normalized.device)
    columns = torch.arange(width, device=normalized.device)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + side)
    in_columns = (columns[None, :] >= left[:, None]) & (columns[None, :] < left[:, None] + side)
    mask = in_rows[:, None, :, None] & in_columns[:, None, None, :]
    return normalized.masked_fill(mask, 0.0)


def _luma(images):
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def color_jitter(images, strength, uniforms):
    """Brightness, contrast, saturation jitter of `strength` on float images in [0, 255];
    uniforms: [B, 3], one factor each, uniform in [max(0, 1 - s), 1 + s]."""
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    factors = (low + (high - low) * uniforms).view(-1, 3, 1, 1, 1).unbind(dim=1)
    brightness, contrast, saturation = factors
    images = (images * brightness).clamp(0, 255)
    mean_luma = _luma(images).mean(dim=(1, 2, 3), keepdim=True)
    images = (mean_luma + (images - mean_luma) * contrast).clamp(0, 255)
    luma = _luma(images)
    return (luma + (images - luma) * saturation).clamp(0, 255)


_STATS = {}


def normalize_float(images):
    """Float images in [0, 255] -> ImageNet-normalized, channels_last."""
    key = images.device
    if key not in _STATS:
        mean = torch.tensor(IMAGENET_MEAN, device=key).view(1, 3, 1, 1)
        inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=key).view(1, 3, 1, 1)
        _STATS[key] = (mean, inv_std)
    mean, inv_std = _STATS[key]
    return ((images - mean) * inv_std).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------
# The loader: one compiled pipeline for every crop strength
# ----------------------------------------------------------------------------------------

class CropLoader:
    """Sequential loader whose every image is a random-resized crop keeping exactly `alpha`
    of its area, alpha changeable between passes without recompiling.

    The seeded crop decoder reads per-sample lower bounds through their address at run
    time (data/augment.py); with the decoder's own max_scale at or below every alpha, the range
    of each sample is [alpha, alpha]. Writing alpha into that array (in place) between
    passes changes the crop; `set_draw(d)` sets the epoch of the (seed, epoch, index) hash.
    """

    def __init__(self, path, *, resolution, batch_size, seed, smallest_alpha, num_workers,
                 indices=None):
        num_samples = len(read_labels(path))
        self.bounds = np.ones(num_samples, dtype=np.float64)
        self.decoder = SeededRandomResizedCropDecoder(
            (resolution, resolution), seed=seed, min_scale=smallest_alpha,
            max_scale=smallest_alpha, flip=False, sample_min_scale=self.bounds)
        self.bounds = self.decoder.sample_min_scale   # the array the compiled code reads
        pipelines = {"image": [self.decoder, ToTensor(), ToTorchImage(channels_last=True)],
                     "label": [IntDecoder(), ToTensor(), Squeeze(1)]}
        loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                        order=OrderOption.SEQUENTIAL, os_cache=True, drop_last=False,
                        indices=None if indices is None else np.asarray(indices),
                        pipelines=pipelines)
        self.loader = SeededLoader(loader, crop_decoder=self.decoder)
        self.order = self.loader.sample_order()

    def set_alpha(self, alpha):
        self.bounds[:] = float(alpha)

    def set_draw(self, draw):
        self.loader.set_epoch(draw)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        """(uint8 images, labels, dataset indices) per batch; images are reused buffers."""
        start = 0
        for images, labels in self.loader:
            stop = start + len(labels)
            yield images, labels, self.order[start:stop]
            start = stop


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

class Tally:
    """Correct predictions per class for each (transform, setting, draw)."""

    def __init__(self, num_classes, device):
        self.num_classes, self.device = num_classes, device
        self.hits = {}
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def add(self, key, logits, labels):
        correct = labels[logits.argmax(dim=1) == labels]
        hits = torch.bincount(correct, minlength=self.num_classes)
        self.hits[key] = self.hits.get(key, 0) + hits

    def count(self, labels):
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def per_class(self, key):
        counts = self.counts.double().cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits[key].double().cpu().numpy() / counts

    def top1(self, key):
        return float(self.hits[key].sum()) / float(self.counts.sum())


def whole_image_pass(model, loader, tally, autocast, settings, draws, seed, device, progress):
    """Identity, cutout and jitter, all from one decode of each whole image."""
    loader.set_alpha(1.0)
    loader.set_draw(0)
    cutouts = [s for s in settings.get("cutout", ()) if s != IDENTITY["cutout"]]
    jitters = [s for s in settings.get("jitter", ()) if s != IDENTITY["jitter"]]
    with torch.inference_mode(), autocast():
        for images, labels, indices in loader:
            labels = labels.to(device, non_blocking=True)
            raw = images.to(device, non_blocking=True).float()
            clean = normalize_float(raw)
            tally.count(labels)
            tally.add(("identity", None, 0), model(clean), labels)
            for draw in range(draws):
                if cutouts:
                    positions = per_image_uniforms(seed, draw, indices, _CUTOUT_DRAWS, 2,
                                                   device)
                    for side in cutouts:
                        tally.add(("cutout", side, draw),
                                  model(cutout(clean, side, positions)), labels)
                if jitters:
                    factors = per_image_uniforms(seed, draw, indices, _JITTER_DRAWS, 3, device)
                    for strength in jitters:
                        jittered = normalize_float(color_jitter(raw, strength, factors))
                        tally.add(("jitter", strength, draw), model(jittered), labels)
            progress.update(1)


def crop_passes(model, loader, tally, autocast, alphas, draws, device, progress):
    """One pass over the data per (alpha < 1, draw)."""
    for alpha in alphas:
        if alpha == IDENTITY["crop"]:
            continue
        loader.set_alpha(alpha)
        for draw in range(draws):
            loader.set_draw(draw)
            with torch.inference_mode(), autocast():
                for images, labels, _ in loader:
                    labels = labels.to(device, non_blocking=True)
                    inputs = normalize_float(images.to(device, non_blocking=True).float())
                    tally.add(("crop", alpha, draw), model(inputs), labels)
                    progress.update(1)


def evaluate_split(model, path, *, split, settings, draws, seed, resolution, batch_size,
                   num_workers, device, autocast, num_classes, indices=None):
    """Tally of one dataset (split) under every transform and strength."""
    alphas = settings.get("crop", ())
    smallest = min([a for a in alphas] + [1.0])
    loader = CropLoader(path, resolution=resolution, batch_size=batch_size, seed=seed,
                        smallest_alpha=smallest, num_workers=num_workers, indices=indices)
    tally = Tally(num_classes, device)
    crop_count = sum(1 for a in alphas if a != IDENTITY["crop"])
    total = len(loader) * (1 + crop_count * draws)
    with tqdm(total=total, desc=f"{split}: transforms", unit="batch", disable=None) as bar:
        whole_image_pass(model, loader, tally, autocast, settings, draws, seed, device, bar)
        crop_passes(model, loader, tally, autocast, alphas, draws, device, bar)
    labels_seen = tally.counts.cpu().numpy()
    if labels_seen.sum() == 0:
        raise StudyError(f"{path} has no images")
    return tally


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------

def accuracy_rows(tally, split, settings, draws, class_names):
    """(per_class rows, mean rows) for one split."""
    per_class_rows, mean_rows = [], []
    identity_acc = tally.per_class(("identity", None, 0))
    identity_top1 = tally.top1(("identity", None, 0))
    classes = np.arange(len(class_names))
    for transform, values in settings.items():
        for setting in values:
            if setting == IDENTITY[transform]:
                acc = identity_acc[None, :]
                top1 = np.array([identity_top1])
            else:
                keys = [(transform, setting, draw) for draw in range(draws)]
                acc = np.stack([tally.per_class(key) for key in keys])
                top1 = np.array([tally.top1(key) for key in keys])
            n_runs = len(acc)
            std = acc.std(axis=0, ddof=1) if n_runs > 1 else np.zeros(acc.shape[1])
            per_class_rows.append(pd.DataFrame({
                "split": split, "transform": transform, "setting": setting, "class": classes,
                "class_name": class_names, "n_runs": n_runs, "mean_acc": acc.mean(axis=0),
                "std_acc": std}))
            mean_rows.append({"split": split, "transform": transform, "setting": setting,
                              "n_runs": n_runs, "mean_acc": float(top1.mean()),
                              "std_acc": float(top1.std(ddof=1)) if n_runs > 1 else 0.0})
    return per_class_rows, mean_rows


def mild_to_strong(transform, values):
    """Settings of a transform in order of growing strength (crop: alpha falling)."""
    return sorted(values, reverse=(transform == "crop"))


def label_loss_table(per_class, threshold):
    """Per (split, transform, class): the first strength at which the label is lost."""
    rows = []
    for (split, transform), block in per_class.groupby(["split", "transform"], sort=False):
        settings = mild_to_strong(transform, block["setting"].unique())
        by_class = block.pivot(index="class", columns="setting", values="mean_acc")
        names = block.drop_duplicates("class").set_index("class")["class_name"]
        for class_index in by_class.index:
            curve = [by_class.at[class_index, s] for s in settings]
            clean = curve[0]
            row = {"split": split, "transform": transform, "class": int(class_index),
                   "class_name": names[class_index], "clean_acc": clean,
                   "threshold_acc": threshold * clean, "lost": False,
                   "loss_setting": np.nan, "last_preserving_setting": np.nan}
            if clean > 0:
                below = [i for i, acc in enumerate(curve[1:], start=1)
                         if acc < threshold * clean]
                if below:
                    row.update(lost=True, loss_setting=settings[below[0]],
                               last_preserving_setting=settings[below[0] - 1])
                else:
                    row["last_preserving_setting"] = settings[-1]
            rows.append(row)
    columns = ["split", "transform", "class", "class_name", "clean_acc", "threshold_acc",
               "lost", "loss_setting", "last_preserving_setting"]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------

AXIS_LABELS = {"crop": "area kept by the crop (alpha)", "cutout": "CutOut side fraction",
               "jitter": "colour-jitter strength"}


def _named_classes(curves, k=5):
    """Classes drawn with their names: all when few, else the k least and the k most
    robust ones (mean of the curve relative to the clean accuracy)."""
    classes = list(curves.index)
    if len(classes) <= NAMED_CLASSES_IN_FIGURE:
        return classes
    clean = curves.iloc[:, 0]
    recognized = curves[clean > 0]
    robustness = recognized.mean(axis=1) / clean[clean > 0]
    ranked = list(robustness.sort_values(kind="stable").index)
    return list(dict.fromkeys(ranked[:k] + ranked[-k:]))


def plot_transform(block, mean_block, transform, title, path):
    plt = plots.pyplot()

    settings = mild_to_strong(transform, block["setting"].unique())
    positions = np.arange(len(settings))
    curves = block.pivot(index="class", columns="setting", values="mean_acc")[settings]
    names = block.drop_duplicates("class").set_index("class")["class_name"]
    named = _named_classes(curves)
    figure, axis = plt.subplots(figsize=(8, 5))
    for class_index in curves.index:
        if class_index not in named:
            axis.plot(positions, curves.loc[class_index], color="0.8", linewidth=0.6)
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(named), 2)))
    for colour, class_index in zip(colours, named):
        axis.plot(positions, curves.loc[class_index], color=colour, linewidth=1.4,
                  marker="o", markersize=3, label=str(names[class_index]))
    mean_curve = mean_block.set_index("setting").loc[settings, "mean_acc"]
    axis.plot(positions, mean_curve.values, color="black", linewidth=3, label="all images")
    axis.set_xticks(positions, [f"{s:g}" for s in settings])
    axis.set_xlabel(AXIS_LABELS[transform] + "  (stronger to the right)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    plots.save_png(figure, path, dpi=110)


def plot_mean_curves(mean_frame, path):
    plt = plots.pyplot()

    transforms = list(dict.fromkeys(mean_frame["transform"]))
    figure, axes = plt.subplots(1, len(transforms), figsize=(4.5 * len(transforms), 3.8),
                                squeeze=False)
    for axis, transform in zip(axes[0], transforms):
        for split, style in (("val", "-"), ("train", "--")):
            block = mean_frame[(mean_frame["transform"] == transform)
                               & (mean_frame["split"] == split)]
            if block.empty:
                continue
            settings = mild_to_strong(transform, block["setting"].unique())
            means = block.set_index("setting").loc[settings, "mean_acc"]
            axis.plot(np.arange(len(settings)), means.values, style, marker="o",
                      color="black", label=split)
            axis.set_xticks(np.arange(len(settings)), [f"{s:g}" for s in settings])
        axis.set_xlabel(AXIS_LABELS[transform])
        axis.set_ylabel("accuracy")
        axis.set_ylim(-0.02, 1.02)
        axis.legend(fontsize=8)
    figure.tight_layout()
    plots.save_png(figure, path, dpi=110)


def make_figures(per_class, mean_frame, out_dir, model_label):
    figure_dir = Path(out_dir) / "figures"
    written = []
    for (split, transform), block in per_class.groupby(["split", "transform"], sort=False):
        mean_block = mean_frame[(mean_frame["split"] == split)
                                & (mean_frame["transform"] == transform)]
        path = figure_dir / f"{split}_{transform}.png"
        plot_transform(block, mean_block, transform,
                       f"{model_label}: {transform} on {split} images", path)
        written.append(path)
    path = figure_dir / "mean_curves.png"
    plot_mean_curves(mean_frame, path)
    return written + [path]


# ----------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------

def check_settings(settings):
    for transform, values in settings.items():
        if transform not in DEFAULT_SETTINGS:
            raise StudyError(f"unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")
        if not values:
            raise StudyError(f"no strengths given for {transform}")
        if len(set(values)) != len(values):
            raise StudyError(f"{transform} strengths repeat a value: {list(values)}")
        if IDENTITY[transform] not in values:
            raise StudyError(f"{transform} strengths must include the identity "
                             f"{IDENTITY[transform]:g} (the clean accuracy the loss is "
                             f"measured against)")
        low, high = (0.01, 1.0) if transform == "crop" else (0.0, 1.0)
        for value in values:
            if not low <= value <= high:
                raise StudyError(f"{transform} strength {value} outside [{low}, {high}]")


def subset_indices(num_samples, max_images, seed):
    """A seeded random subset of at most `max_images` indices (sorted), or None for all."""
    if not max_images or max_images >= num_samples:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_samples, size=max_images, replace=False))


def run_preservation(model, *, val_dataset, out_dir, class_names, train_dataset=None,
                     settings=None, draws=3, seed=0, resolution=224, batch_size=256,
                     num_workers=2, device=None, loss_threshold=DEFAULT_LOSS_THRESHOLD,
                     max_train_images=0, make_plots=True, model_label="model", meta=None):
    """Evaluate `model` (eval mode) under every transform; write and return the tables."""
    settings = {k: tuple(float(v) for v in vs) for k, vs in (settings or DEFAULT_SETTINGS).items()}
    check_settings(settings)
    if draws < 1:
        raise StudyError(f"--draws must be >= 1, got {draws}")
    if not 0 < loss_threshold <= 1:
        raise StudyError(f"--loss-threshold must be in (0, 1], got {loss_threshold}")
    device = device or pick_device()
    model, autocast = inference_setup(model, device)
    started = time.time()
    splits = [("val", val_dataset, None)]
    if train_dataset:
        num_train = len(read_labels(train_dataset))
        splits.append(("train", train_dataset, subset_indices(num_train, max_train_images, seed)))
    per_class_parts, mean_rows, seconds = [], [], {}
    for split, path, indices in splits:
        split_start = time.time()
        tally = evaluate_split(model, path, split=split, settings=settings, draws=draws,
                               seed=seed, resolution=resolution, batch_size=batch_size,
                               num_workers=num_workers, device=device, autocast=autocast,
                               num_classes=len(class_names), indices=indices)
        parts, means = accuracy_rows(tally, split, settings, draws, class_names)
        per_class_parts += parts
        mean_rows += means
        seconds[split] = round(time.time() - split_start, 2)
    per_class = pd.concat(per_class_parts, ignore_index=True)
    mean_frame = pd.DataFrame(mean_rows)
    label_loss = label_loss_table(per_class, loss_threshold)
    out_dir = Path(out_dir)
    write_csv(per_class, out_dir / "per_class.csv")
    write_csv(mean_frame, out_dir / "mean.csv")
    write_csv(label_loss, out_dir / "label_loss.csv")
    figures = make_figures(per_class, mean_frame, out_dir, model_label) \
        if make_plots else []
    write_json(out_dir / "preservation.json", {
        **(meta or {}), "val_dataset": str(val_dataset),
        "train_dataset": str(train_dataset) if train_dataset else None,
        "max_train_images": max_train_images, "settings": settings, "draws": draws,
        "seed": seed, "resolution": resolution, "loss_threshold": loss_threshold,
        "device": str(device), "seconds": seconds,
        "total_seconds": round(time.time() - started, 2),
        "figures": [str(p.relative_to(out_dir)) for p in figures]})
    return {"per_class": per_class, "mean": mean_frame, "label_loss": label_loss}


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def float_list(text):
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ffcv_bias.studies.preservation",
        description="Per-class accuracy of a trained model on cropped, cut-out and "
                    "colour-jittered images: where each class loses its label.")
    parser.add_argument("--weights", required=True, type=Path,
                        help="a run directory (config.json + weights.pt) or a state_dict file")
    parser.add_argument("--dataset", required=True, type=Path, help="test/val beton")
    parser.add_argument("--train-dataset", type=Path, help="also evaluate on this train beton")
    parser.add_argument("--max-train-images", type=int, default=0,
                        help="evaluate a seeded random subset of the train beton (0 = all)")
    parser.add_argument("--arch", help="architecture of a bare state_dict "
                                       f"({', '.join(ARCHITECTURES)})")
    parser.add_argument("--num-classes", type=int,
                        help="classes of a bare state_dict (default: the dataset's)")
    parser.add_argument("--blurpool", type=int, choices=(0, 1), default=None,
                        help="the state_dict was trained with BlurPool (default: the run's "
                             "config, 0 for a bare state_dict)")
    parser.add_argument("--resolution", type=int,
                        help="image side fed to the model (default: the run's "
                             "validation.resolution; 224 for a bare state_dict)")
    parser.add_argument("--draws", type=int, default=3, help="seeded draws per image and strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transforms", default=",".join(TRANSFORMS),
                        help="comma-separated subset of crop,cutout,jitter")
    for transform, values in DEFAULT_SETTINGS.items():
        parser.add_argument(f"--{transform}", type=float_list, default=values,
                            help=f"{transform} strengths (default: "
                                 f"{','.join(f'{v:g}' for v in values)})")
    parser.add_argument("--loss-threshold", type=float, default=DEFAULT_LOSS_THRESHOLD,
                        help="a class has lost its label once its accuracy falls below this "
                             "fraction of its clean accuracy")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--out", required=True, type=Path)
    return parser


@main_guard(BetonError)
def main(argv=None):
    args = build_parser().parse_args(argv)
    class_names = read_class_names(args.dataset)
    if args.train_dataset and read_class_names(args.train_dataset) != class_names:
        raise StudyError(f"{args.train_dataset} and {args.dataset} list different classes")
    model, info = load_trained_model(args.weights, arch=args.arch,
                                     num_classes=args.num_classes,
                                     use_blurpool=args.blurpool,
                                     default_num_classes=len(class_names))
    if info["num_classes"] != len(class_names):
        raise StudyError(f"the model has {info['num_classes']} classes, {args.dataset} "
                         f"has {len(class_names)}")
    transforms = [t.strip() for t in args.transforms.split(",") if t.strip()]
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise StudyError(f"unknown transform {unknown[0]!r}; known: {', '.join(TRANSFORMS)}")
    settings = {t: getattr(args, t) for t in transforms}
    resolution = args.resolution or info["resolution"] or 224
    label = info["run_id"] or Path(info["weights"]).name
    meta = {"weights": info["weights"], "run_dir": info["run_dir"],
            "run_id": info["run_id"], "arch": info["arch"],
            "num_classes": info["num_classes"], "use_blurpool": info["use_blurpool"],
            "command": [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)}
    frames = run_preservation(
        model, val_dataset=args.dataset, out_dir=args.out, class_names=class_names,
        train_dataset=args.train_dataset, settings=settings, draws=args.draws,
        seed=args.seed, resolution=resolution, batch_size=args.batch_size,
        num_workers=args.workers, device=pick_device(args.device),
        loss_threshold=args.loss_threshold, max_train_images=args.max_train_images,
        make_plots=not args.no_figures, model_label=f"{info['arch']} {label}", meta=meta)
    print(summary_text(frames, args.out))
    return EXIT_OK


def summary_text(frames, out_dir):
    lines = [f"label preservation written to {out_dir}"]
    for (split, transform), block in frames["mean"].groupby(["split", "transform"], sort=False):
        settings = mild_to_strong(transform, block["setting"].unique())
        means = block.set_index("setting").loc[settings, "mean_acc"]
        curve = "  ".join(f"{s:g}:{m:.3f}" for s, m in zip(settings, means))
        lost = frames["label_loss"]
        lost = lost[(lost["split"] == split) & (lost["transform"] == transform)]
        lines.append(f"  {split} {transform}: {curve}   ({int(lost['lost'].sum())}/{len(lost)} "
                     f"classes lose their label)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
