"""`python -m ffcv_bias.studies.preservation`: the study from a run (or a state_dict) to its
tables and figures (docs/DESIGN.md, "Label preservation")."""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ffcv_bias.common.atomic import write_json
from ffcv_bias.common.errors import EXIT_OK, OneLineArgumentParser, main_guard
from ffcv_bias.common.output_paths import creation_problem, path_arg
from ffcv_bias.common.tables import write_csv
from ffcv_bias.data.loaders import BetonError, read_labels
from ffcv_bias.studies.preservation.evaluation import evaluate_split
from ffcv_bias.studies.preservation.figures import make_figures
from ffcv_bias.studies.preservation.tables import (accuracy_rows, label_loss_table,
                                                   mild_to_strong)
from ffcv_bias.studies.preservation.transforms import (DEFAULT_LOSS_THRESHOLD,
                                                       DEFAULT_SETTINGS, IDENTITY,
                                                       TRANSFORMS)
from ffcv_bias.studies.trained import (StudyError, default_workers, inference_setup,
                                       load_trained_model, pick_device, read_class_names)
from ffcv_bias.train.models import ARCHITECTURES


# ----------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------

def check_settings(settings):
    for transform, values in settings.items():
        if transform not in DEFAULT_SETTINGS:
            raise StudyError(f"unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")
        if not values:
            raise StudyError(f"no strengths given for {transform}")
        low, high = (0.01, 1.0) if transform == "crop" else (0.0, 1.0)
        for value in values:  # the range first: `--crop 0,1.5` is out of range, twice
            if not low <= value <= high:
                raise StudyError(f"{transform} strength {value:g} outside [{low:g}, {high:g}]"
                                 f" (--{transform} {','.join(f'{v:g}' for v in values)})")
        if len(set(values)) != len(values):
            raise StudyError(f"{transform} strengths repeat a value: {list(values)}")
        if IDENTITY[transform] not in values:
            raise StudyError(f"{transform} strengths must include the identity "
                             f"{IDENTITY[transform]:g} (the clean accuracy the loss is "
                             f"measured against)")


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
    parser = OneLineArgumentParser(
        prog="python -m ffcv_bias.studies.preservation",
        description="Per-class accuracy of a trained model on cropped, cut-out and "
                    "colour-jittered images: where each class loses its label.")
    parser.add_argument("--weights", required=True, type=path_arg,
                        help="a run directory (config.json + weights.pt) or a state_dict file")
    parser.add_argument("--dataset", required=True, type=path_arg, help="test/val beton")
    parser.add_argument("--train-dataset", type=path_arg,
                        help="also evaluate on this train beton")
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
    parser.add_argument("--out", required=True, type=path_arg)
    return parser


def check_request(args):
    """Everything about the request that can be refused before the model is loaded and
    the images evaluated: the transforms, their strengths, the counts, --out."""
    transforms = [t.strip() for t in args.transforms.split(",") if t.strip()]
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise StudyError(f"unknown transform {unknown[0]!r}; known: {', '.join(TRANSFORMS)}")
    if not transforms:
        raise StudyError(f"--transforms names no transform; known: {', '.join(TRANSFORMS)}")
    settings = {t: tuple(float(v) for v in getattr(args, t)) for t in transforms}
    check_settings(settings)
    if args.draws < 1:
        raise StudyError(f"--draws must be >= 1, got {args.draws}")
    if not 0 < args.loss_threshold <= 1:
        raise StudyError(f"--loss-threshold must be in (0, 1], got {args.loss_threshold}")
    for flag, value, minimum in (("--batch-size", args.batch_size, 1),
                                 ("--workers", args.workers, 1),
                                 ("--max-train-images", args.max_train_images, 0)):
        if value < minimum:
            raise StudyError(f"{flag} must be >= {minimum}, got {value}")
    problem = creation_problem(args.out)
    if problem:
        raise StudyError(f"--out: cannot create {args.out}: {problem}")
    return settings


@main_guard(BetonError)
def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = check_request(args)
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

