"""Loader throughput: our seeded decoder (exact and fast decode) vs stock ffcv vs a PyTorch
DataLoader vs bare decode, over output sizes, crop scales and image sizes, in one run.

    python bench/loader.py                    # 512 images per set, 160/192/224 px, tau 1/0.35/0.08
    python bench/loader.py --images 64 --batch-size 16 --epochs 1 --resolutions 32 --taus 0.08
                                              # a quick check

What is measured, in images per second and per CPU second, on the same JPEG images:

  (a)  ours, exact  ffcv_bias.data.loaders.create_train_loader(decode='exact'): ffcv Loader + our
                    seeded random-resized-crop + flip decoder; full JPEG decode, then
                    INTER_AREA resize of the crop (ffcv's way).
  (a') ours, fast   the same with decode='fast' (augment.decode=fast): only the crop is
                    decoded, DCT-scaled by 1/2, 1/4 or 1/8 when it is at least that many
                    times the output (ffcv_bias/data/fast_decode.py). The same crops as (a).
  (b)  ffcv         a stock ffcv Loader: RandomResizedCropRGBImageDecoder(scale=(tau, 1)),
                    RandomHorizontalFlip, ToTensor, ToTorchImage; same beton, batch, workers,
                    RANDOM order, os_cache.
  (c)  torch        torch.utils.data.DataLoader with W worker processes over a Dataset that
                    does what torchvision's ImageFolder + RandomResizedCrop(scale=(tau, 1)) +
                    RandomHorizontalFlip + PILToTensor do (written here: torchvision does
                    not import on this stack): PIL decode, crop, BILINEAR resize, flip.
  (d)  decode       the floor of the exact path: libffcv's imdecode (libjpeg-turbo,
                    FASTDCT: the exact path's decode) of every full JPEG of the beton, in a
                    ThreadPoolExecutor of W threads; no crop, no resize. Independent of the
                    output size and tau, so timed once per round.

Grid: every output size of --resolutions x every crop lower bound tau of --taus (the crop's
area fraction is drawn in [tau, 1]; tau decides how much the fast path can skip) x every
image set of --max-sides (synthetic photo-like JPEGs, quality 90, about 500x375 for max
side 512, the ffcv-imagenet beton setting; about 250x188 for 256). The loaders are built
once per set and switched between cells without recompiling (ours: the output size and the
per-sample crop bounds are read live; stock ffcv: one loader per tau, output size set per
cell; torch: the settings sit in shared memory its workers read).

Protocol: data first, then every DataLoader forks its workers (before numba starts its
threads), then one warm-up epoch per loader (numba compiles), then --epochs rounds; each
round times one epoch of every pipeline in every cell, interleaved, so that a slow minute
on a shared machine hits every pipeline alike. Figures are medians over the rounds; ratios
are ratios of those medians, measured in the same run. Images per CPU second (this process
and its DataLoader workers) is the headline: on a shared machine it is disturbed far less
than wall-clock time. Train loaders drop the last partial batch; (d) decodes every image.

Fidelity: after the timing, (a) and (a') run one more epoch each with the same seed and
epoch in every cell (the same crops and flips) and the mean absolute difference of their
images is reported (0-255 scale): 0 where the crop is under twice the output (scale 1 is
bit-identical), the resampling difference elsewhere.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

# Imported before any ffcv Loader is built: it patches ffcv (without the patch, every Loader
# would also set torch's thread count to its worker count).
from ffcv_bias.data import loaders  # noqa: I001

import cv2  # noqa: E402
from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage  # noqa: E402
from PIL import Image, ImageDraw, features  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ffcv_bias.data import fast_decode  # noqa: E402
from ffcv_bias.common.atomic import write_json  # noqa: E402
from ffcv_bias.common import env  # noqa: E402
from ffcv_bias.data.writer import convert

RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
JPEG_QUALITY = 90
ASPECT = 0.75           # height / width of the base size: 500x375 for max side 512
BASE_FILL = 500 / 512   # the base width as a fraction of the max side
SIZE_JITTER = 0.10      # each side drawn within +-10% of the base size, then capped

# Goals (issue 16), in images per CPU second, at GOAL_RESOLUTION px for every tau.
GOAL_RESOLUTION = 160
GOAL_FAST_VS_FFCV = 1.5    # (a')/(b)
GOAL_FAST_VS_TORCH = 3.0   # (a')/(c)
GOAL_FAST_VS_DECODE = 1 / 1.2   # (a') within 1.2x of (d), at tau 1.0

PIPELINES = {
    "a": "(a) ours exact",
    "af": "(a') ours fast",
    "b": "(b) stock ffcv",
    "c": "(c) torch+PIL",
    "d": "(d) bare decode",
}
CELL_PIPELINES = ("a", "af", "b", "c")   # (d) does not depend on the cell


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


def image_size(rng, max_side):
    """(height, width) around ASPECT x BASE_FILL x max_side, jittered, capped at max_side."""
    width = BASE_FILL * max_side * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    height = ASPECT * BASE_FILL * max_side * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    shrink = min(1.0, max_side / max(width, height))
    return int(round(height * shrink)), int(round(width * shrink))


def synthetic_image(seed, index, max_side):
    """Image `index` of a set: a function of (seed, index, max_side) only."""
    rng = np.random.default_rng([seed, index, max_side])
    height, width = image_size(rng, max_side)
    image = draw_shapes(rng, smooth_background(rng, height, width))
    image += texture_and_noise(rng, height, width)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_one_image(job):
    seed, index, max_side, path = job
    synthetic_image(seed, index, max_side).save(path, "JPEG", quality=JPEG_QUALITY)
    return os.path.getsize(path)


def write_image_folder(root, num_images, num_classes, seed, max_side, workers):
    """root/class_XX/img_XXXXX.jpg, image i in class i % num_classes.

    Returns (paths, labels, mean file size in bytes)."""
    root = Path(root)
    labels = [index % num_classes for index in range(num_images)]
    paths = [root / f"class_{label:02d}" / f"img_{index:05d}.jpg"
             for index, label in enumerate(labels)]
    for label in range(num_classes):
        (root / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [(seed, index, max_side, str(path)) for index, path in enumerate(paths)]
    with Pool(workers) as pool:
        sizes = list(tqdm(pool.imap(write_one_image, jobs, chunksize=8), total=num_images,
                          desc=f"generating JPEGs (max side {max_side})", unit="img",
                          file=sys.stderr))
    return [str(path) for path in paths], labels, float(np.mean(sizes))


def write_beton(image_root, beton_path, max_side, workers):
    """The ImageFolder as a beton of JPEGs (quality 90, max side as ffcv-imagenet's)."""
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the report only
        convert("imagefolder", "train", image_root, beton_path, num_workers=workers,
                write_mode="jpg", jpeg_quality=JPEG_QUALITY, max_resolution=max_side)


def read_beton_jpegs(beton_path):
    """Every image's (JPEG bytes, height, width), straight from the beton."""
    reader = Reader(str(beton_path))
    image_field = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    if not np.all(image_field["mode"] == IMAGE_MODES["jpg"]):
        raise ValueError(f"{beton_path}: not every image is stored as JPEG")
    size_at = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    images = []
    with open(beton_path, "rb") as beton:
        for pointer, height, width in zip(image_field["data_ptr"].tolist(),
                                          image_field["height"].tolist(),
                                          image_field["width"].tolist()):
            blob = np.frombuffer(os.pread(beton.fileno(), size_at[pointer], pointer),
                                 dtype=np.uint8)
            images.append((blob, int(height), int(width)))
    return images


# ==========================================================================================
# The pipelines: each `run_epoch(cell)` runs one epoch in a cell (resolution, tau)
# ==========================================================================================

class SeededPipeline:
    """(a) or (a'): one loader for every cell. The crop bound goes in through per-sample
    bounds (read live by the compiled decoder), the resolution through set_resolution."""

    def __init__(self, beton_path, args, decode, num_classes):
        self.loader = loaders.create_train_loader(
            beton_path, batch_size=args.batch_size, resolution=args.resolutions[0], seed=0,
            class_min_scale=np.full(num_classes, args.taus[0]), num_workers=args.workers,
            decode=decode)
        self.epochs_run = 0

    def set_cell(self, resolution, tau):
        self.loader.set_resolution(resolution)
        self.loader.crop_decoder.sample_min_scale[:] = tau

    def run_epoch(self, cell):
        self.set_cell(*cell)
        self.loader.set_epoch(self.epochs_run)  # new crops every epoch, as in training
        self.epochs_run += 1
        return sum(len(labels) for _, labels in self.loader)

    def epoch_images(self, cell, epoch):
        """Copies of every image of one epoch (for the fidelity comparison)."""
        self.set_cell(*cell)
        self.loader.set_epoch(epoch)
        return torch.cat([images.clone() for images, _ in self.loader])


class StockFfcvPipeline:
    """(b): stock ffcv, one loader per tau (its crop scale is compiled in)."""

    def __init__(self, beton_path, args):
        self.loaders = {}
        for tau in args.taus:
            decoder = RandomResizedCropRGBImageDecoder(
                (args.resolutions[0], args.resolutions[0]), scale=(tau, 1.0), ratio=RATIO)
            loader = Loader(str(beton_path), batch_size=args.batch_size,
                            num_workers=args.workers, order=OrderOption.RANDOM, os_cache=True,
                            drop_last=True, seed=0,
                            pipelines={"image": [decoder, RandomHorizontalFlip(), ToTensor(),
                                                 ToTorchImage()],
                                       "label": [IntDecoder(), ToTensor(), Squeeze(1)]})
            self.loaders[tau] = (decoder, loader)

    def run_epoch(self, cell):
        resolution, tau = cell
        decoder, loader = self.loaders[tau]
        decoder.output_size = (resolution, resolution)
        return sum(len(labels) for _, labels in loader)


def random_resized_crop_box(height, width, scale, draw):
    """(top, left, crop_height, crop_width): torchvision's RandomResizedCrop sampling.

    Up to 10 tries of an area fraction uniform in `scale` and a log-uniform aspect ratio in
    RATIO; a try is kept when the crop fits. Failing that, the largest centred crop whose
    aspect ratio lies within RATIO."""
    area = height * width
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(CROP_TRIES):
        target_area = area * draw.uniform(*scale)
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

    `settings` is a shared-memory tensor [resolution, tau] that the parent sets per cell
    and the (persistent, forked) workers read per sample. The DataLoader seeds Python's
    `random` in each worker, so the draws differ per worker."""

    def __init__(self, paths, labels, settings):
        self.paths, self.labels, self.settings = paths, labels, settings

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        resolution, tau = int(self.settings[0]), float(self.settings[1])
        with Image.open(self.paths[index]) as file:
            image = file.convert("RGB")
        top, left, crop_height, crop_width = random_resized_crop_box(
            image.height, image.width, (tau, 1.0), random)
        image = image.crop((left, top, left + crop_width, top + crop_height))
        image = image.resize((resolution, resolution), Image.BILINEAR)
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), self.labels[index]


class TorchPipeline:
    """(c): one DataLoader with persistent workers for every cell."""

    def __init__(self, paths, labels, args):
        self.settings = torch.zeros(2, dtype=torch.float64).share_memory_()
        self.settings[0], self.settings[1] = args.resolutions[0], args.taus[0]
        self.loader = torch.utils.data.DataLoader(
            PilRandomResizedCrop(paths, labels, self.settings), batch_size=args.batch_size,
            shuffle=True, num_workers=args.workers, drop_last=True, persistent_workers=True)

    def run_epoch(self, cell):
        self.settings[0], self.settings[1] = cell
        return sum(len(batch_labels) for _, batch_labels in self.loader)


class DecodePipeline:
    """(d): libffcv's full decode of every JPEG (ctypes releases the GIL)."""

    def __init__(self, beton_path, args):
        self.images = read_beton_jpegs(beton_path)
        self.pool = ThreadPoolExecutor(max_workers=args.workers)
        self.largest = max(height * width for _, height, width in self.images)
        self.per_thread = threading.local()   # one decode buffer per pool thread

    def decode(self, item):
        blob, height, width = item
        if not hasattr(self.per_thread, "buffer"):
            self.per_thread.buffer = np.empty(3 * self.largest, np.uint8)
        imdecode(blob, self.per_thread.buffer, height, width, height, width, 0, 0, 1, 1,
                 False, False)
        return 1

    def run_epoch(self, cell=None):
        return sum(self.pool.map(self.decode, self.images))


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


def time_epoch(run_epoch, cell):
    """(images, wall seconds, CPU seconds) of one epoch."""
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    images = run_epoch(cell)
    return images, time.perf_counter() - wall_start, cpu_seconds() - cpu_start


def record(measured, key, images, seconds, cpu):
    if images == 0:
        raise RuntimeError(f"pipeline {key} yielded no images")
    measured["rates"].setdefault(key, []).append(images / seconds)
    measured["cpu_rates"].setdefault(key, []).append(images / max(cpu, 1e-9))
    measured["images_per_epoch"][key] = images


def cell_key(side, cell, name):
    resolution, tau = cell
    return f"{side}/{resolution}/{tau:g}/{name}"


def measure(sets, cells, rounds):
    """One warm-up epoch per loader, then `rounds` interleaved rounds over sets and cells.

    Returns {"rates": {key: [images per wall second per round]}, "cpu_rates": {...},
             "images_per_epoch": {key: images}, "warmup_seconds": {label: seconds}},
    keys "<max side>/<resolution>/<tau>/<pipeline>" ((d): "<max side>/-/-/d")."""
    measured = {"rates": {}, "cpu_rates": {}, "images_per_epoch": {}, "warmup_seconds": {}}
    for side, pipelines in sets.items():
        for name, pipeline in pipelines.items():
            if name == "b":  # one loader per tau, each compiles on its first epoch
                for tau in {tau for _, tau in cells}:
                    images, seconds, _ = time_epoch(pipeline.run_epoch, (cells[0][0], tau))
                    measured["warmup_seconds"][f"{side}/{name}/tau {tau:g}"] = seconds
            else:
                images, seconds, _ = time_epoch(pipeline.run_epoch, cells[0])
                measured["warmup_seconds"][f"{side}/{name}"] = seconds
            print(f"warm-up {side}/{name}: {images} images in {seconds:.1f} s", file=sys.stderr)
    for _ in tqdm(range(rounds), desc="timed rounds", file=sys.stderr):
        for side, pipelines in sets.items():
            record(measured, f"{side}/-/-/d", *time_epoch(pipelines["d"].run_epoch, None))
            for cell in cells:
                for name in CELL_PIPELINES:
                    record(measured, cell_key(side, cell, name),
                           *time_epoch(pipelines[name].run_epoch, cell))
    return measured


def fidelity(sets, cells):
    """{key "<side>/<res>/<tau>": (mean abs difference of (a') vs (a), share identical)}."""
    found = {}
    for side, pipelines in sets.items():
        for cell in cells:
            exact = pipelines["a"].epoch_images(cell, epoch=10_000).int()
            fast = pipelines["af"].epoch_images(cell, epoch=10_000).int()
            per_image = (fast - exact).abs().float().mean(dim=(1, 2, 3))
            found[cell_key(side, cell, "")[:-1]] = (float(per_image.mean()),
                                                     float((per_image == 0).float().mean()))
    return found


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


def medians(measured, kind):
    return {key: statistics.median(values) for key, values in measured[kind].items()}


def cell_table(side, cells, cpu, wall, similar):
    """One row per (resolution, tau): img/CPU-s of each pipeline, the ratios, fidelity."""
    columns = (["res", "tau", "|"] + [f"({name})" for name in ("a", "a'", "b", "c", "d")]
               + ["|", "a'/a", "a'/b", "a'/c", "a'/d", "|", "wall a'/b", "|", "MAE", "same"])
    widths = [4, 5, 1, 6, 6, 6, 6, 6, 1, 5, 5, 5, 5, 1, 9, 1, 5, 5]
    lines = [" ".join(f"{column:>{width}}" for column, width in zip(columns, widths))]
    decode = cpu[f"{side}/-/-/d"]
    for cell in cells:
        rate = {name: cpu[cell_key(side, cell, name)] for name in CELL_PIPELINES}
        wall_ratio = wall[cell_key(side, cell, "af")] / wall[cell_key(side, cell, "b")]
        error, identical = similar[cell_key(side, cell, "")[:-1]]
        lines.append(
            f"{cell[0]:>4} {cell[1]:>5g} | {rate['a']:>6.0f} {rate['af']:>6.0f} "
            f"{rate['b']:>6.0f} {rate['c']:>6.0f} {decode:>6.0f} | "
            f"{rate['af'] / rate['a']:>5.2f} {rate['af'] / rate['b']:>5.2f} "
            f"{rate['af'] / rate['c']:>5.2f} {rate['af'] / decode:>5.2f} | "
            f"{wall_ratio:>9.2f} | {error:>5.2f} {identical:>5.0%}")
    return lines


def verdict(value, goal):
    if value >= goal:
        return "met"
    return f"MISSED by {100 * (1 - value / goal):.1f}%"


def goal_lines(side, cells, cpu):
    """The issue's goals at GOAL_RESOLUTION px, one line per tau, each met or MISSED."""
    lines = []
    decode = cpu[f"{side}/-/-/d"]
    for resolution, tau in cells:
        if resolution != GOAL_RESOLUTION:
            continue
        fast = cpu[cell_key(side, (resolution, tau), "af")]
        versus_ffcv = fast / cpu[cell_key(side, (resolution, tau), "b")]
        versus_torch = fast / cpu[cell_key(side, (resolution, tau), "c")]
        line = (f"  {resolution} px, tau {tau:g}: (a')/(b) = {versus_ffcv:.2f} (goal >= "
                f"{GOAL_FAST_VS_FFCV:g}: {verdict(versus_ffcv, GOAL_FAST_VS_FFCV)}); "
                f"(a')/(c) = {versus_torch:.2f} (goal >= {GOAL_FAST_VS_TORCH:g}: "
                f"{verdict(versus_torch, GOAL_FAST_VS_TORCH)})")
        if tau == 1.0:
            versus_decode = fast / decode
            line += (f"; (a')/(d) = {versus_decode:.2f} (goal: within 1.2x of (d), i.e. >= "
                     f"{GOAL_FAST_VS_DECODE:.2f}: {verdict(versus_decode, GOAL_FAST_VS_DECODE)})")
        lines.append(line)
    return lines


def report(measured, similar, cells, set_lines):
    """The tables, one per image set, and the goal lines."""
    cpu, wall = medians(measured, "cpu_rates"), medians(measured, "rates")
    lines = []
    for side, description in set_lines.items():
        lines += ["", f"max side {side}: {description}",
                  *cell_table(side, cells, cpu, wall, similar)]
        goals = goal_lines(side, cells, cpu)
        if goals:
            lines += [f"goals at {GOAL_RESOLUTION} px, images per CPU second:", *goals]
    lines += ["",
              "(a)..(d): images per CPU second (this process and its DataLoader workers), "
              "median of the timed rounds; ratios of those medians, from this one run.",
              "wall a'/b: the same ratio in images per wall-clock second. MAE: mean "
              "absolute difference (0-255) of (a') vs (a) images with the same crops; "
              "same: share of images bit-identical."]
    return lines


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


def number_list(kind, check):
    def parse(text):
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
        if not values or not all(check(value) for value in values):
            raise argparse.ArgumentTypeError(f"out of range: {text!r}")
        return values
    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=positive_int, default=512,
                        help="synthetic JPEG images per image set (default 512)")
    parser.add_argument("--classes", type=positive_int, default=10,
                        help="ImageFolder classes (default 10)")
    parser.add_argument("--resolutions", type=number_list(int, lambda v: v >= 8),
                        default=[160, 192, 224], help="output sides, comma-separated "
                                                      "(default 160,192,224)")
    parser.add_argument("--taus", type=number_list(float, lambda v: 0 < v <= 1),
                        default=[1.0, 0.35, 0.08],
                        help="crop lower bounds tau in (0, 1] (default 1.0,0.35,0.08)")
    parser.add_argument("--max-sides", type=number_list(int, lambda v: v >= 32),
                        default=[512, 256],
                        help="image sets by their max side (default 512,256)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--workers", type=positive_int, default=env.usable_cpu_count(),
                        help="threads (ffcv, decode) or processes (torch); default: all cores")
    parser.add_argument("--epochs", type=positive_int, default=3,
                        help="timed rounds, after one warm-up epoch per loader (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="write the images and betons here and keep them "
                             "(default: a temporary directory, deleted at the end)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every round's figures to this JSON file")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error(f"--images ({args.images}) must be >= --batch-size ({args.batch_size}): "
                     f"the train loaders drop the last partial batch")
    if args.images < args.classes:
        parser.error(f"--images ({args.images}) must be >= --classes ({args.classes})")
    return args


def run(args, workdir):
    """Write the data, build every pipeline, time them. Returns (measured, fidelity,
    {max side: description line})."""
    data, set_lines = {}, {}
    for side in args.max_sides:
        image_root, beton_path = workdir / f"side{side}" / "imagefolder", workdir / f"side{side}.beton"
        paths, labels, mean_file_bytes = write_image_folder(
            image_root, args.images, args.classes, args.seed, side, args.workers)
        write_beton(image_root, beton_path, side, args.workers)
        stored = read_beton_jpegs(beton_path)
        set_lines[side] = (
            f"{args.images} JPEGs, mean {np.mean([w for _, _, w in stored]):.0f}x"
            f"{np.mean([h for _, h, _ in stored]):.0f} px (+-{SIZE_JITTER:.0%} per side), "
            f"quality {JPEG_QUALITY}; mean {mean_file_bytes / 1e3:.1f} KB per file (PIL), "
            f"{np.mean([len(blob) for blob, _, _ in stored]) / 1e3:.1f} KB in the beton")
        data[side] = (paths, labels, beton_path)
    # Every DataLoader first: their workers fork before numba's and ffcv's threads exist.
    sets = {side: {"c": TorchPipeline(paths, labels, args)}
            for side, (paths, labels, _) in data.items()}
    for pipelines in sets.values():
        pipelines["c"].run_epoch((args.resolutions[0], args.taus[0]))   # forks the workers
    for side, (_, _, beton_path) in data.items():
        sets[side].update(a=SeededPipeline(beton_path, args, "exact", args.classes),
                          af=SeededPipeline(beton_path, args, "fast", args.classes),
                          b=StockFfcvPipeline(beton_path, args),
                          d=DecodePipeline(beton_path, args))
    cells = [(resolution, tau) for resolution in args.resolutions for tau in args.taus]
    load_before = os.getloadavg()[0]
    measured = measure(sets, cells, args.epochs)
    load_after = os.getloadavg()[0]
    similar = fidelity(sets, cells)
    fast_state = [f"fast decoder: {'active' if p['af'].loader.fast_decode_active else 'NOT ACTIVE'}"
                  f", fallbacks {p['af'].loader.decode_fallbacks or 'none'}"
                  for p in sets.values()]
    if not all(p["af"].loader.fast_decode_active for p in sets.values()):
        fast_state.append(f"  ({fast_decode.unavailable_reason()})")
    measured["lines"] = [
        f"1-min load average: {load_before:.2f} before warm-up, {load_after:.2f} after the "
        f"timed rounds", *fast_state]
    return measured, similar, set_lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    settings = {"images": args.images, "resolutions": args.resolutions, "taus": args.taus,
                "max_sides": args.max_sides, "batch_size": args.batch_size,
                "workers": args.workers, "epochs": args.epochs}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        measured, similar, set_lines = run(args, workdir)
    command = " ".join(shlex.quote(part) for part in ["python", "bench/loader.py", *argv])
    header = [f"command: {command}", *machine_lines(), *measured["lines"],
              f"settings: batch {args.batch_size}, workers {args.workers}, {args.epochs} "
              f"timed rounds + 1 warm-up epoch per loader; whole run "
              f"{time.perf_counter() - started:.0f} s"]
    print("\n".join(header + report(measured, similar, [(r, t) for r in args.resolutions
                                                          for t in args.taus], set_lines)))
    if args.json:
        write_json(args.json, {"settings": settings, "command": command,
                               "images_per_epoch": measured["images_per_epoch"],
                               "images_per_second_rounds": measured["rates"],
                               "images_per_cpu_second_rounds": measured["cpu_rates"],
                               "images_per_cpu_second_median": medians(measured, "cpu_rates"),
                               "fidelity_mae_identical": similar,
                               "warmup_seconds": measured["warmup_seconds"]})


if __name__ == "__main__":
    main()
