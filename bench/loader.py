"""Loader throughput: our seeded decoder vs stock ffcv vs a PyTorch DataLoader vs bare decode.

    python bench/loader.py                      # 2,000 images, 224 px, batch 128, all cores
    python bench/loader.py --images 64 --batch-size 16 --epochs 1   # a quick check

What is measured, in images per second, on the same JPEG images:

  (a) ours   ffcv_bias.loaders.create_train_loader: ffcv Loader + our seeded
             random-resized-crop + flip decoder (per-sample splitmix64 hash).
  (b) ffcv   a stock ffcv Loader: RandomResizedCropRGBImageDecoder, RandomHorizontalFlip,
             ToTensor, ToTorchImage; same beton, batch, workers, RANDOM order, os_cache.
  (c) torch  torch.utils.data.DataLoader with W worker processes over a Dataset that does
             what torchvision's ImageFolder + RandomResizedCrop + RandomHorizontalFlip +
             PILToTensor do (written here: torchvision does not import on this stack):
             PIL decode, crop, BILINEAR resize, flip, uint8 CHW tensor.
  (d) decode the ceiling: cv2.imdecode of every JPEG of the beton (the very bytes (a) and
             (b) decode) in a ThreadPoolExecutor of W threads; no crop, no resize. (A soft
             ceiling: ffcv decodes with libjpeg-turbo's FASTDCT, cv2 with its default DCT.)
  --ablation adds (a0) and (b0): (a) and (b) without their flip, so that (a0)/(b0) compares
             the crop sampling alone (splitmix64 hash vs numba's global RNG).

Why these four: (a)/(b) isolates the cost of making the augmentation reproducible (both
run the same libjpeg-turbo decode and OpenCV INTER_AREA resize from ffcv's C library; only
the crop sampling and the flip differ). (a)/(c) is the reason to use ffcv at all. (x)/(d)
says how close each pipeline gets to the decode work it cannot avoid.

Protocol: the images are synthetic but JPEG-realistic (smooth gradients, shapes, texture and
mild noise, ~400x350 px with size jitter, quality 90: tens of KB each, not noise, not flat),
written to an ImageFolder (read by (c)) and to a beton with write_mode='jpg' (read by (a),
(b), (d); ffcv re-encodes them at the same quality). Every pipeline first runs one warm-up
epoch (numba compiles for ~8-10 s in ffcv's first epoch; the DataLoader forks its workers),
then `--epochs` timed epochs, interleaved (one epoch of each pipeline, round after round) so
that a slow minute on a shared machine hits every pipeline alike. The headline figure is the
median epoch; beside it: the best epoch, and images per CPU second (this process and its
DataLoader workers), which a busy machine disturbs less than wall-clock time. Everything runs
in this one process except the DataLoader's worker processes. Train loaders drop the last
partial batch, so an epoch is floor(images / batch) * batch images; (d) decodes every image.
"""
import argparse
import contextlib
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

# Imported before any ffcv Loader is built: it patches ffcv (without the patch, every Loader
# would also set torch's thread count to its worker count).
from ffcv_bias import loaders  # noqa: I001

import cv2  # noqa: E402
from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage  # noqa: E402
from PIL import Image, ImageDraw, features  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ffcv_bias.atomic import write_json  # noqa: E402
from ffcv_bias.common import env  # noqa: E402
from ffcv_bias.datasets import convert  # noqa: E402

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
JPEG_QUALITY = 90
BASE_SIZE = (350, 400)  # (height, width) around which the image sizes are drawn
SIZE_JITTER = 0.15      # each side drawn uniformly within +-15% of BASE_SIZE

GOAL_OURS_VS_TORCH = 3.0   # (a)/(c)
GOAL_OURS_VS_FFCV = 0.9    # (a)/(b): within 10% of stock ffcv

PIPELINES = {
    "a": "(a) ours: seeded decoder (create_train_loader)",
    "b": "(b) stock ffcv RandomResizedCrop + Flip",
    "c": "(c) torch DataLoader, PIL crop + resize",
    "d": "(d) bare JPEG decode, cv2.imdecode threads",
    # --ablation: both decoders without their flip, to isolate the crop sampling
    "a0": "(a0) ours, flip=False",
    "b0": "(b0) stock ffcv RandomResizedCrop, no Flip",
}


# ==========================================================================================
# Synthetic JPEG images
# ==========================================================================================

def smooth_background(rng, height, width):
    """A linear colour gradient in a random direction plus three slow colour waves.

    Computed on a grid 8x coarser and upsampled (it is smooth: nothing is lost, and the
    full-size trigonometry would dominate the generation time)."""
    coarse_height, coarse_width = height // 8 + 2, width // 8 + 2
    rows, cols = np.mgrid[0:coarse_height, 0:coarse_width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    position = (np.cos(angle) * cols + np.sin(angle) * rows) / max(coarse_height, coarse_width)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = start + (end - start) * position[..., None]
    for _ in range(3):
        cycles_x, cycles_y = rng.uniform(0.5, 6, 2)
        phase = (2 * np.pi) * (cycles_x * cols / coarse_width + cycles_y * rows / coarse_height)
        wave = np.sin(phase + rng.uniform(0, 2 * np.pi))
        image += rng.uniform(5, 25, 3) * wave[..., None]
    coarse = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return np.asarray(coarse.resize((width, height), Image.BILINEAR)).astype(np.float32)


def draw_shapes(rng, image):
    """Paint 4 to 11 flat-coloured ellipses and rectangles (sharp edges cost JPEG bits)."""
    height, width = image.shape[:2]
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(4, 12)):
        left, top = rng.uniform(0, width), rng.uniform(0, height)
        box = [left, top, left + rng.uniform(20, width / 2), top + rng.uniform(20, height / 2)]
        colour = tuple(int(value) for value in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=colour)
    return np.asarray(canvas).astype(np.float32)


def texture_and_noise(rng, height, width):
    """Mid-frequency texture (noise at 1/4 resolution, upsampled) plus mild pixel noise:
    what brings the files to photo-like sizes without making them pure noise."""
    coarse = rng.normal(128, 40, (height // 4 + 1, width // 4 + 1, 3))
    coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    texture = np.asarray(coarse.resize((width, height), Image.BILINEAR)).astype(np.float32)
    return (texture - 128) + 8 * rng.standard_normal((height, width, 3), dtype=np.float32)


def synthetic_image(seed, index):
    """Image `index` of the set: a function of (seed, index) only, whatever the process."""
    rng = np.random.default_rng([seed, index])
    height, width = (int(round(side * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)))
                     for side in BASE_SIZE)
    image = draw_shapes(rng, smooth_background(rng, height, width))
    image += texture_and_noise(rng, height, width)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_one_image(job):
    seed, index, path = job
    synthetic_image(seed, index).save(path, "JPEG", quality=JPEG_QUALITY)
    return os.path.getsize(path)


def write_image_folder(root, num_images, num_classes, seed, workers):
    """root/class_XX/img_XXXXX.jpg, image i in class i % num_classes.

    Returns (paths, labels, mean file size in bytes)."""
    root = Path(root)
    labels = [index % num_classes for index in range(num_images)]
    paths = [root / f"class_{label:02d}" / f"img_{index:05d}.jpg"
             for index, label in enumerate(labels)]
    for label in range(num_classes):
        (root / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [(seed, index, str(path)) for index, path in enumerate(paths)]
    with Pool(workers) as pool:
        sizes = list(tqdm(pool.imap(write_one_image, jobs, chunksize=8), total=num_images,
                          desc="generating JPEGs", unit="img", file=sys.stderr))
    return [str(path) for path in paths], labels, float(np.mean(sizes))


def write_beton(image_root, beton_path, workers):
    """The ImageFolder as a beton of JPEGs (quality 90), through the project's writer."""
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the report only
        convert("imagefolder", "train", image_root, beton_path, num_workers=workers,
                write_mode="jpg", jpeg_quality=JPEG_QUALITY)


def read_beton_jpegs(beton_path):
    """Every image's JPEG bytes, straight from the beton (what (a) and (b) decode)."""
    reader = Reader(str(beton_path))
    image_field = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    if not np.all(image_field["mode"] == IMAGE_MODES["jpg"]):
        raise ValueError(f"{beton_path}: not every image is stored as JPEG")
    size_at = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    blobs = []
    with open(beton_path, "rb") as beton:
        for pointer in image_field["data_ptr"].tolist():
            blobs.append(np.frombuffer(os.pread(beton.fileno(), size_at[pointer], pointer),
                                       dtype=np.uint8))
    return blobs


# ==========================================================================================
# The four pipelines: each is a function that runs one epoch and returns its image count
# ==========================================================================================

def seeded_pipeline(beton_path, args, flip=True):
    loader = loaders.create_train_loader(beton_path, batch_size=args.batch_size,
                                         resolution=args.resolution, seed=0, flip=flip,
                                         min_scale=SCALE[0], num_workers=args.workers)
    epochs_run = [0]

    def run_epoch():
        loader.set_epoch(epochs_run[0])  # new crops every epoch, as in training
        epochs_run[0] += 1
        return sum(len(labels) for _, labels in loader)
    return run_epoch


def stock_ffcv_pipeline(beton_path, args, flip=True):
    image_pipeline = [RandomResizedCropRGBImageDecoder((args.resolution, args.resolution),
                                                       scale=SCALE, ratio=RATIO),
                      *([RandomHorizontalFlip()] if flip else []), ToTensor(), ToTorchImage()]
    loader = Loader(str(beton_path), batch_size=args.batch_size, num_workers=args.workers,
                    order=OrderOption.RANDOM, os_cache=True, drop_last=True, seed=0,
                    pipelines={"image": image_pipeline,
                               "label": [IntDecoder(), ToTensor(), Squeeze(1)]})

    def run_epoch():
        return sum(len(labels) for _, labels in loader)
    return run_epoch


def random_resized_crop_box(height, width, draw=random):
    """(top, left, crop_height, crop_width): torchvision's RandomResizedCrop sampling.

    Up to 10 tries of an area fraction uniform in SCALE and a log-uniform aspect ratio in
    RATIO; a try is kept when the crop fits. Failing that, the largest centred crop whose
    aspect ratio lies within RATIO."""
    area = height * width
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(CROP_TRIES):
        target_area = area * draw.uniform(*SCALE)
        aspect = math.exp(draw.uniform(log_low, log_high))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = draw.randint(0, height - crop_height)
            left = draw.randint(0, width - crop_width)
            return top, left, crop_height, crop_width
    image_aspect = width / height
    if image_aspect < RATIO[0]:      # too tall: full width, height cut to the lowest ratio
        crop_width, crop_height = width, int(round(width / RATIO[0]))
    elif image_aspect > RATIO[1]:    # too wide: full height, width cut to the highest ratio
        crop_width, crop_height = int(round(height * RATIO[1])), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class PilRandomResizedCrop(torch.utils.data.Dataset):
    """ImageFolder-style samples: PIL decode, random resized crop, flip, uint8 CHW tensor.

    The DataLoader seeds Python's `random` in each worker, so the draws differ per worker."""

    def __init__(self, paths, labels, resolution):
        self.paths, self.labels, self.resolution = paths, labels, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as file:
            image = file.convert("RGB")
        top, left, crop_height, crop_width = random_resized_crop_box(image.height, image.width)
        image = image.crop((left, top, left + crop_width, top + crop_height))
        image = image.resize((self.resolution, self.resolution), Image.BILINEAR)
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), self.labels[index]


def torch_pipeline(paths, labels, args):
    # persistent_workers: the worker processes are forked once (in the warm-up epoch, before
    # numba starts its threads) and reused, as a training run would.
    loader = torch.utils.data.DataLoader(
        PilRandomResizedCrop(paths, labels, args.resolution), batch_size=args.batch_size,
        shuffle=True, num_workers=args.workers, drop_last=True, persistent_workers=True)

    def run_epoch():
        return sum(len(batch_labels) for _, batch_labels in loader)
    return run_epoch


def decode_pipeline(beton_path, args):
    blobs = read_beton_jpegs(beton_path)
    pool = ThreadPoolExecutor(max_workers=args.workers)  # cv2.imdecode releases the GIL

    def decode(blob):
        return cv2.imdecode(blob, cv2.IMREAD_COLOR).shape[0]

    def run_epoch():
        return sum(1 for _ in pool.map(decode, blobs))
    return run_epoch


# ==========================================================================================
# Timing
# ==========================================================================================

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    """CPU seconds used so far by this process's live children (the DataLoader workers)."""
    total = 0.0
    for children_file in Path("/proc/self/task").glob("*/children"):
        try:
            child_pids = children_file.read_text().split()
        except OSError:
            continue
        for pid in child_pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # exited meanwhile
                continue
            fields = stat.rsplit(")", 1)[1].split()  # fields from 3 (state) on
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return total


def cpu_seconds():
    """CPU time of this process (all threads) and its live children."""
    return time.process_time() + children_cpu_seconds()


def time_epoch(run_epoch):
    """(images, wall seconds, CPU seconds) of one epoch."""
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    images = run_epoch()
    return images, time.perf_counter() - wall_start, cpu_seconds() - cpu_start


def measure(pipelines, timed_epochs):
    """One warm-up epoch each, then `timed_epochs` interleaved rounds.

    Returns {"rates": {name: [images per wall second, one per timed epoch]},
             "cpu_rates": {name: [images per CPU second, ...]},
             "images_per_epoch": {name: images}, "warmup_seconds": {name: seconds}}."""
    measured = {"rates": {name: [] for name in pipelines},
                "cpu_rates": {name: [] for name in pipelines}, "images_per_epoch": {},
                "warmup_seconds": {}}
    for name, run_epoch in pipelines.items():
        images, seconds, _ = time_epoch(run_epoch)
        measured["warmup_seconds"][name] = seconds
        print(f"warm-up {name}: {images} images in {seconds:.1f} s", file=sys.stderr)
    for _ in tqdm(range(timed_epochs), desc="timed rounds", file=sys.stderr):
        for name, run_epoch in pipelines.items():
            images, seconds, cpu = time_epoch(run_epoch)
            if images == 0:
                raise RuntimeError(f"pipeline {name} yielded no images")
            measured["rates"][name].append(images / seconds)
            measured["cpu_rates"][name].append(images / max(cpu, 1e-9))
            measured["images_per_epoch"][name] = images
    return measured


# ==========================================================================================
# Report
# ==========================================================================================

def machine_lines():
    import ffcv
    import numba
    import PIL
    return [
        f"machine: {os.cpu_count()} cores ({env.usable_cpu_count()} usable), {env.cpu_model()}",
        f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"ffcv {ffcv.__version__}, numba {numba.__version__}, numpy {np.__version__}, "
        f"pillow {PIL.__version__} (libjpeg-turbo: {features.check_feature('libjpeg_turbo')}), "
        f"opencv {cv2.__version__}",
    ]


COMPARISONS = [  # (numerator, denominator, label, goal or None)
    ("a", "c", "(a)/(c) ours vs torch DataLoader", GOAL_OURS_VS_TORCH),
    ("a", "b", "(a)/(b) ours vs stock ffcv", GOAL_OURS_VS_FFCV),
    ("a0", "b0", "(a0)/(b0) crop sampling alone (no flip), ours vs stock", None),
]


def comparison_lines(measured, medians, cpu):
    """One line per ratio of medians (with its goal), one line with its per-round ratios."""
    lines = []
    for top, bottom, label, goal in COMPARISONS:
        if top not in medians:
            continue
        value = medians[top] / medians[bottom]
        line = f"{label} = {value:.2f}"
        if goal is not None:
            verdict = "met" if value >= goal else f"MISSED by {100 * (1 - value / goal):.1f}%"
            line += f"  (goal >= {goal:g}: {verdict})"
        per_round = [x / y for x, y in zip(measured["rates"][top], measured["rates"][bottom])]
        lines += [line, f"    per round: {', '.join(f'{ratio:.2f}' for ratio in per_round)}; "
                        f"in images per CPU second: {cpu[top] / cpu[bottom]:.2f}"]
    return lines


def report(measured, timed_epochs):
    """The table and the ratio lines. Returns (lines, median images/s per pipeline)."""
    medians = {name: statistics.median(values) for name, values in measured["rates"].items()}
    cpu = {name: statistics.median(values) for name, values in measured["cpu_rates"].items()}
    warmup = measured["warmup_seconds"]
    lines = [f"{'pipeline':<48} {'median img/s':>12} {'best img/s':>11} {'vs (d)':>7} "
             f"{'img/CPU-s':>10} {'warm-up s':>10}"]
    for name, label in PIPELINES.items():
        if name not in medians:
            continue
        lines.append(f"{label:<48} {medians[name]:>12.1f} {max(measured['rates'][name]):>11.1f} "
                     f"{medians[name] / medians['d']:>7.2f} {cpu[name]:>10.1f} "
                     f"{warmup[name]:>10.1f}")
    lines += ["", *comparison_lines(measured, medians, cpu), "",
              f"img/s: images per wall-clock second, median (and best) of {timed_epochs} timed "
              f"epochs after one warm-up epoch; ratios of medians; 'per round': the ratio "
              f"within each round of interleaved epochs.",
              "img/CPU-s: images per CPU second of this process and its DataLoader workers "
              "(less sensitive to other load on the machine).",
              "warm-up s: the untimed first epoch, numba compilation included."]
    return lines, medians


# ==========================================================================================
# Main
# ==========================================================================================

def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=positive_int, default=2000,
                        help="number of synthetic JPEG images (default 2000)")
    parser.add_argument("--classes", type=positive_int, default=10,
                        help="ImageFolder classes (default 10)")
    parser.add_argument("--resolution", type=positive_int, default=224,
                        help="output side in pixels (default 224)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--workers", type=positive_int, default=env.usable_cpu_count(),
                        help="threads (ffcv, decode) or processes (torch); default: all cores")
    parser.add_argument("--epochs", type=positive_int, default=3,
                        help="timed epochs per pipeline, after one warm-up epoch (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="write the images and beton here and keep them "
                             "(default: a temporary directory, deleted at the end)")
    parser.add_argument("--ablation", action="store_true",
                        help="also time (a) and (b) without their flip: (a0)/(b0) is the cost "
                             "of the seeded crop sampling alone")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error(f"--images ({args.images}) must be >= --batch-size ({args.batch_size}): "
                     f"the train loaders drop the last partial batch")
    if args.images < args.classes:
        parser.error(f"--images ({args.images}) must be >= --classes ({args.classes})")
    return args


def run(args, workdir):
    """Write the data, build the four pipelines, time them. Returns the measurements."""
    image_root, beton_path = workdir / "imagefolder", workdir / "bench.beton"
    paths, labels, mean_file_bytes = write_image_folder(image_root, args.images, args.classes,
                                                        args.seed, args.workers)
    write_beton(image_root, beton_path, args.workers)
    mean_beton_bytes = float(np.mean([len(blob) for blob in read_beton_jpegs(beton_path)]))
    # (c) first: its workers fork before numba's and ffcv's threads exist.
    pipelines = {"c": torch_pipeline(paths, labels, args),
                 "a": seeded_pipeline(beton_path, args),
                 "b": stock_ffcv_pipeline(beton_path, args),
                 "d": decode_pipeline(beton_path, args)}
    if args.ablation:
        pipelines["a0"] = seeded_pipeline(beton_path, args, flip=False)
        pipelines["b0"] = stock_ffcv_pipeline(beton_path, args, flip=False)
    load_before = os.getloadavg()[0]
    measured = measure(pipelines, args.epochs)
    load_after = os.getloadavg()[0]
    data_line = (f"data: {args.images} JPEGs around {BASE_SIZE[1]}x{BASE_SIZE[0]} "
                 f"(+-{SIZE_JITTER:.0%} per side), quality {JPEG_QUALITY}, {args.classes} "
                 f"classes; mean {mean_file_bytes / 1e3:.1f} KB per file (PIL), "
                 f"{mean_beton_bytes / 1e3:.1f} KB per image in the beton (ffcv/cv2)")
    # Other processes on the machine skew every figure: say how busy it was.
    load_line = (f"1-min load average: {load_before:.2f} before warm-up, "
                 f"{load_after:.2f} after the timed epochs")
    measured["lines"] = [data_line, load_line]
    return measured


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    settings = {"images": args.images, "resolution": args.resolution,
                "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        measured = run(args, workdir)
    table, medians = report(measured, args.epochs)
    command = " ".join(shlex.quote(part) for part in ["python", "bench/loader.py", *argv])
    header = [f"command: {command}", *machine_lines(), *measured["lines"],
              f"settings: resolution {args.resolution}, batch {args.batch_size}, "
              f"workers {args.workers}, {args.epochs} timed epochs + 1 warm-up per pipeline"]
    print("\n".join(header + [""] + table))
    if args.json:
        write_json(args.json, {"settings": settings, "command": command,
                               "images_per_epoch": measured["images_per_epoch"],
                               "images_per_second_median": medians,
                               "images_per_second_epochs": measured["rates"],
                               "images_per_cpu_second_epochs": measured["cpu_rates"],
                               "warmup_seconds": measured["warmup_seconds"]})


if __name__ == "__main__":
    main()
