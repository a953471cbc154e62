"""Image sources -> FFCV .beton files with a classes.json sidecar.

The flow for one split (`convert`):

    read_source(name, data_dir, split)     one small reader per on-disk format, returning
        -> (dataset, class_names)           a dataset of (H x W x 3 uint8, int label) pairs
    stratified_subset(labels, size)         optional: a deterministic, class-stratified subset
    check_images(dataset)                   files only: decode every image with PIL up front
    write_beton(dataset, class_names, ...)  ffcv's DatasetWriter into a temporary file, the
                                            sidecar, then a rename onto write_path

Every beton has the fields `image` (RGBImageField) and `label` (IntField), as in
ffcv-imagenet, and a sidecar `<beton>.classes.json`:
`{"dataset", "split", "num_samples", "num_classes", "classes": [names in label order]}`.
`read_classes` reads the sidecar; `check_beton` verifies that a beton is whole and agrees
with it (for the loaders to call before training).

Sources:
    fashion-mnist  the IDX files (train-*, t10k-*; .gz or not), 28x28 grey -> RGB
    cifar10        the python pickle batches of cifar-10-batches-py
    cifar100       the python pickles of cifar-100-python (fine labels)
    imagefolder    data_dir/<class>/<image>, torchvision ImageFolder order (ImageNet train/val)
    inaturalist    the 2021 json annotations: data_dir/{train,val}.json, file_name relative
                   to data_dir
"""
import contextlib
import functools
import gzip
import json
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ffcv_bias.atomic import NO_ROOM_ERRNOS, atomic_path, write_json, write_text


class DatasetError(ValueError):
    """Bad input data or a bad beton: the message is one line naming the file or value."""


SOURCES = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "inaturalist")
SPLITS = ("train", "val")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# The extensions torchvision's ImageFolder accepts (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# 'smart' mode stores an image as JPEG when its raw pixels exceed this many bytes (256x256
# RGB). ffcv's own default (None) never compresses, which makes 'smart' the same as 'raw'.
DEFAULT_SMART_THRESHOLD = 3 * 256 * 256


def one_line(error):
    """An exception as one line: 'TypeName: message'."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------
# Datasets: sequences of (H x W x 3 uint8 array, int label), picklable for ffcv's workers
# ---------------------------------------------------------------------------------------

def stored_shape(height, width, max_resolution):
    """(height, width) of an image after ffcv's RGBImageField resize (longest side capped)."""
    if not max_resolution or max_resolution <= 0:
        return height, width
    ratio = max_resolution / max(height, width)
    if ratio >= 1:
        return height, width
    # ffcv computes the new size as int(ratio * size) per side
    return int(ratio * height), int(ratio * width)


class ArrayImages:
    """Images held in memory: uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB), int labels [N]."""

    def __init__(self, images, labels):
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if image.ndim == 2:  # grey: three equal channels
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image, dtype=np.uint8), int(self.labels[index])

    def describe(self, index):
        return f"sample {index}"

    def subset(self, indices):
        return ArrayImages(self.images[indices], self.labels[indices])

    def largest_image_bytes(self, max_resolution=None):
        if len(self.labels) == 0:
            return 0
        height, width = stored_shape(*self.images.shape[1:3], max_resolution)
        return 3 * height * width


def load_rgb(path):
    """Decode an image file completely (a truncated file fails here) into H x W x 3 uint8."""
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class ImageFiles:
    """Image files on disk with their labels; `sizes` ([N, 2] height, width) once known."""

    def __init__(self, paths, labels, sizes=None):
        if len(paths) != len(labels):
            raise DatasetError(f"{len(paths)} image files but {len(labels)} labels")
        self.paths = [str(path) for path in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sizes = sizes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return load_rgb(self.paths[index]), int(self.labels[index])

    def describe(self, index):
        return self.paths[index]

    def subset(self, indices):
        sizes = None if self.sizes is None else self.sizes[indices]
        return ImageFiles([self.paths[i] for i in indices], self.labels[indices], sizes)

    def largest_image_bytes(self, max_resolution=None):
        if self.sizes is None:
            self.sizes = read_image_sizes(self.paths)
        shapes = [stored_shape(int(h), int(w), max_resolution) for h, w in self.sizes]
        return max((3 * h * w for h, w in shapes), default=0)


def read_image_sizes(paths):
    """[N, 2] (height, width) from the image headers only (no decoding)."""
    from PIL import Image
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    with tqdm(paths, desc="reading image sizes", unit="img") as progress:
        for index, path in enumerate(progress):
            try:
                with Image.open(path) as image:
                    sizes[index] = image.size[1], image.size[0]
            except Exception as error:
                raise DatasetError(f"cannot read image {path}: {one_line(error)}") from None
    return sizes


# ---------------------------------------------------------------------------------------
# Readers: (data_dir, split) -> (dataset, class names)
# ---------------------------------------------------------------------------------------

def require_dir(data_dir, what):
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DatasetError(f"{what} directory not found: {data_dir}")
    if not data_dir.is_dir():
        raise DatasetError(f"{what} path is not a directory: {data_dir}")
    if not any(data_dir.iterdir()):
        raise DatasetError(f"{what} directory is empty: {data_dir}")
    return data_dir


def read_idx(path):
    """An IDX file (the MNIST format; gzip-compressed when the name ends in .gz) as uint8."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read IDX file {path}: {one_line(error)}") from None
    # header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"not an unsigned-byte IDX file: {path}")
    ndim = data[3]
    header_bytes = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header_bytes + int(np.prod(shape)):
        raise DatasetError(f"IDX file {path} holds {len(data) - header_bytes} bytes of data, "
                           f"its header says shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape)


def find_idx_file(data_dir, stem):
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DatasetError(f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}")


def read_fashion_mnist(data_dir, split):
    data_dir = require_dir(data_dir, "Fashion-MNIST")
    prefix = "train" if split == "train" else "t10k"
    image_file = find_idx_file(data_dir, f"{prefix}-images-idx3-ubyte")
    label_file = find_idx_file(data_dir, f"{prefix}-labels-idx1-ubyte")
    # the bar closes before an error message is printed: `with`, not a bare loop
    with tqdm([image_file, label_file], desc=f"reading fashion-mnist {split}",
              unit="file") as progress:
        images, labels = [read_idx(path) for path in progress]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{image_file} and {label_file} disagree: images {images.shape}, "
                           f"labels {labels.shape}")
    check_label_range(labels, len(FASHION_MNIST_CLASSES), label_file)
    return ArrayImages(images, labels), list(FASHION_MNIST_CLASSES)


def check_label_range(labels, num_classes, source):
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"labels in {source} run from {labels.min()} to {labels.max()}, "
                           f"outside 0..{num_classes - 1}")


def load_pickle(path):
    """A CIFAR python batch (pickled with Python 2: byte-string keys)."""
    if not path.is_file():
        raise DatasetError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as handle:
            content = pickle.load(handle, encoding="bytes")
    except Exception as error:
        raise DatasetError(f"cannot read CIFAR pickle {path}: {one_line(error)}") from None
    if not isinstance(content, dict):
        raise DatasetError(f"CIFAR pickle {path} does not hold a dict")
    return content


def pickle_value(content, key, path):
    if key not in content:
        found = ", ".join(repr(k) for k in content)
        raise DatasetError(f"CIFAR pickle {path} has no key {key!r} (found {found})")
    return content[key]


def read_cifar_batches(batch_dir, batch_names, label_key, split, name):
    """Concatenate CIFAR batches: b'data' uint8 [N, 3072] as R, G, B planes of 32x32 rows."""
    images, labels = [], []
    with tqdm(batch_names, desc=f"reading {name} {split}", unit="file") as progress:
        for batch_name in progress:
            path = batch_dir / batch_name
            batch = load_pickle(path)
            data = np.asarray(pickle_value(batch, b"data", path), dtype=np.uint8)
            batch_labels = np.asarray(pickle_value(batch, label_key, path), dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
                raise DatasetError(f"CIFAR pickle {path}: data {data.shape} and "
                                   f"{len(batch_labels)} labels, expected [N, 3072] and N")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def cifar_dir(data_dir, folder_name):
    """Accept the batches folder itself or the folder that holds it."""
    data_dir = require_dir(data_dir, "CIFAR")
    return data_dir / folder_name if (data_dir / folder_name).is_dir() else data_dir


def read_cifar10(data_dir, split):
    batch_dir = cifar_dir(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    meta_path = batch_dir / "batches.meta"
    class_names = [n.decode() for n in pickle_value(load_pickle(meta_path), b"label_names",
                                                    meta_path)]
    images, labels = read_cifar_batches(batch_dir, names, b"labels", split, "cifar10")
    check_label_range(labels, len(class_names), batch_dir)
    return ArrayImages(images, labels), class_names


def read_cifar100(data_dir, split):
    batch_dir = cifar_dir(data_dir, "cifar-100-python")
    meta_path = batch_dir / "meta"
    class_names = [n.decode() for n in pickle_value(load_pickle(meta_path),
                                                    b"fine_label_names", meta_path)]
    name = "train" if split == "train" else "test"
    images, labels = read_cifar_batches(batch_dir, [name], b"fine_labels", split, "cifar100")
    check_label_range(labels, len(class_names), batch_dir)
    return ArrayImages(images, labels), class_names


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root):
    """(class names, paths, labels) in torchvision ImageFolder's order: classes sorted by
    folder name, then each class folder walked recursively in sorted order."""
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not class_names:
        raise DatasetError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    paths, labels, not_images = [], [], []
    for label, class_name in enumerate(class_names):
        count_before = len(paths)
        for folder, _, file_names in sorted(os.walk(root / class_name, followlinks=True)):
            for name in sorted(file_names):
                (paths if is_image_file(name) else not_images).append(os.path.join(folder, name))
        if len(paths) == count_before:
            raise DatasetError(f"class folder {root / class_name} holds no image files "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
        labels.extend([label] * (len(paths) - count_before))
    if not_images:  # said once, so a folder of .webp or .tif images is not lost unnoticed
        print(f"skipping {len(not_images)} files that are not images by extension "
              f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {not_images[0]}", file=sys.stderr)
    return class_names, paths, labels


def read_imagefolder(data_dir, split):
    root = require_dir(data_dir, "image folder")
    class_names, paths, labels = list_image_folder(root)
    return ImageFiles(paths, labels), class_names


def read_json(path):
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"annotation file {path} is not valid JSON: {one_line(error)}") \
            from None


def read_inaturalist(data_dir, split):
    """iNaturalist 2021: {"images": [{id, file_name}], "annotations": [{image_id,
    category_id}], "categories": [{id, name}]}; labels are category ids ranked 0..C-1."""
    data_dir = require_dir(data_dir, "iNaturalist")
    json_path = data_dir / f"{split}.json"
    content = read_json(json_path)
    try:
        categories = sorted(content["categories"], key=lambda category: category["id"])
        label_of_category = {category["id"]: label for label, category in enumerate(categories)}
        class_names = [str(category["name"]) for category in categories]
        category_of_image = {}
        for annotation in content["annotations"]:
            image_id = annotation["image_id"]
            if image_id in category_of_image:
                raise DatasetError(f"{json_path}: image id {image_id} has two annotations")
            category_of_image[image_id] = annotation["category_id"]
        paths, labels = [], []
        for image in content["images"]:
            category = category_of_image.get(image["id"])
            if category is None:
                raise DatasetError(f"{json_path}: image id {image['id']} has no annotation")
            if category not in label_of_category:
                raise DatasetError(f"{json_path}: image id {image['id']} has category "
                                   f"{category}, not among the categories")
            paths.append(data_dir / image["file_name"])
            labels.append(label_of_category[category])
    except (KeyError, TypeError) as error:
        raise DatasetError(f"{json_path} is not in the iNaturalist 2021 format "
                           f"(missing {one_line(error)})") from None
    if not paths:
        raise DatasetError(f"{json_path} lists no images")
    return ImageFiles(paths, labels), class_names


READERS = {
    "fashion-mnist": read_fashion_mnist,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "imagefolder": read_imagefolder,
    "inaturalist": read_inaturalist,
}


def read_source(name, data_dir, split):
    """(dataset, class names) for one split of a source in SOURCES."""
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r}: expected one of {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: expected train or val")
    return READERS[name](Path(data_dir), split)


# ---------------------------------------------------------------------------------------
# Subset and validation
# ---------------------------------------------------------------------------------------

def stratified_subset(labels, size, seed=0):
    """Sorted indices of `size` samples whose class proportions match `labels`.

    Each class gets floor(size * share); the leftover samples go to the classes with the
    largest remainders (ties: lower label first). Within a class the samples are drawn
    with a fixed-seed generator, so the same labels always give the same subset.
    """
    labels = np.asarray(labels)
    if not 1 <= size <= len(labels):
        raise DatasetError(f"subset of {size} images asked for, the split has {len(labels)}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / len(labels)
    quotas = np.floor(exact).astype(np.int64)
    leftover = size - int(quotas.sum())
    by_remainder = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    quotas[by_remainder[:leftover]] += 1
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == label))[:quota]
             for label, quota in zip(classes, quotas)]
    return np.sort(np.concatenate(picks))


def probe_image(path):
    """((height, width), None) for a readable image, ((0, 0), reason) otherwise."""
    try:
        image = load_rgb(path)
        return image.shape[:2], None
    except Exception as error:  # any decoder failure means the file cannot be written
        return (0, 0), one_line(error)


def check_images(dataset, num_workers=1):
    """Decode every file of an ImageFiles dataset with PIL; record sizes in dataset.sizes.

    Returns [(index, reason)] for the files that cannot be read."""
    sizes = np.zeros((len(dataset), 2), dtype=np.int64)
    unreadable = []
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(tqdm(total=len(dataset), desc="checking images",
                                            unit="img"))
        if num_workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(num_workers))
            results = pool.imap(probe_image, dataset.paths, chunksize=32)
        else:
            results = map(probe_image, dataset.paths)
        for index, (size, reason) in enumerate(results):
            sizes[index] = size
            if reason is not None:
                unreadable.append((index, reason))
            progress.update()
    dataset.sizes = sizes
    return unreadable


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

class WriterSource:
    """What ffcv's writer workers index: the dataset, made reproducible and failure-safe.

    - In 'proportion' mode ffcv draws np.random.rand() for each image to decide JPEG or raw.
      Seeding numpy from the sample index just before ffcv encodes the sample makes that
      decision a function of the index alone, whichever worker writes it.
    - A sample that fails to load is logged to `error_log` and replaced by a 1x1 black
      image: ffcv's writer waits forever for a worker that raised, so raising is not an
      option. write_beton reads the log afterwards and discards the file.
    """

    def __init__(self, dataset, error_log, seed_per_sample):
        self.dataset = dataset
        self.error_log = str(error_log)
        self.seed_per_sample = seed_per_sample

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if self.seed_per_sample:
            np.random.seed(index)
        try:
            return self.dataset[index]
        except Exception as error:
            with open(self.error_log, "a") as log:
                log.write(f"{self.dataset.describe(index)}\t{one_line(error)}\n")
            return np.zeros((1, 1, 3), dtype=np.uint8), 0


class WriterWorkerDied(Exception):
    """Raised in the main thread (through SIGUSR1) when a writer worker process died."""


class WorkerWatchdog(threading.Thread):
    """Signals the main thread when a writer worker dies (disk full, killed, a bug).

    ffcv's DatasetWriter polls a shared counter until every sample is written and has no
    timeout: without this, a dead worker means a process that hangs forever. The signal
    (SIGUSR1, sent to this process) interrupts ffcv's polling loop; the handler set by
    `watching_workers` turns it into WriterWorkerDied.
    """

    def __init__(self, workers, poll_seconds=0.2):
        super().__init__(daemon=True)
        self.workers = workers  # filled by recording_writer_processes as ffcv starts them
        self.poll_seconds = poll_seconds
        self.dead_exitcode = None
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.poll_seconds):
            for worker in list(self.workers):
                if worker.exitcode not in (None, 0):
                    self.dead_exitcode = worker.exitcode
                    os.kill(os.getpid(), signal.SIGUSR1)
                    return

    def stop(self):
        self.stopped.set()
        if self.is_alive():
            self.join()

    def terminate_workers(self):
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)


@contextlib.contextmanager
def recording_writer_processes():
    """Yield the list of worker processes ffcv's DatasetWriter starts meanwhile, each
    running under writer_worker.

    ffcv keeps its workers in a local variable; wrapping the `Process` name its writer
    module uses is the one way to see them (their exit codes) from outside."""
    import ffcv.writer
    started = []
    original = ffcv.writer.Process

    def start_recorded(*args, target=None, **kwargs):
        process = original(*args, target=functools.partial(writer_worker, target), **kwargs)
        started.append(process)
        return process

    ffcv.writer.Process = start_recorded
    try:
        yield started
    finally:
        ffcv.writer.Process = original


def release_shared_memory(writer):
    """ffcv frees its shared metadata buffer only on success; free it on failure too."""
    from multiprocessing import shared_memory
    buffer = getattr(writer, "metadata_sm", None)
    if isinstance(buffer, shared_memory.SharedMemory):
        with contextlib.suppress(Exception):
            buffer.close()
        with contextlib.suppress(Exception):
            buffer.unlink()


@contextlib.contextmanager
def watching_workers():
    """Yield a WorkerWatchdog over the writer processes started meanwhile; its alarm
    raises WriterWorkerDied here. Signal handlers can only be set from the main thread:
    elsewhere the watchdog only records the workers."""
    with recording_writer_processes() as workers:
        watchdog = WorkerWatchdog(workers)
        if threading.current_thread() is not threading.main_thread():
            yield watchdog
            return
        previous_handler = signal.getsignal(signal.SIGUSR1)

        def on_alarm(signum, frame):
            if watchdog.dead_exitcode is not None:
                raise WriterWorkerDied(watchdog.dead_exitcode)
            if callable(previous_handler):  # a SIGUSR1 from someone else
                previous_handler(signum, frame)

        signal.signal(signal.SIGUSR1, on_alarm)
        watchdog.start()
        try:
            yield watchdog
        finally:
            watchdog.stop()
            signal.signal(signal.SIGUSR1, previous_handler)


def writer_worker(target, *args):
    """An ffcv writer worker that, on a full disk, exits with the errno as its exit code
    (no traceback): run_writer then names the beton and the reason in one line."""
    try:
        target(*args)
    except OSError as error:
        if error.errno not in NO_ROOM_ERRNOS:
            raise
        sys.stderr.flush()
        os._exit(error.errno)


def run_writer(writer, source, chunk_size):
    with watching_workers() as watchdog:
        try:
            writer.from_indexed_dataset(source, chunksize=chunk_size)
        except BaseException as error:
            watchdog.stop()
            watchdog.terminate_workers()
            release_shared_memory(writer)
            for progress_bar in list(getattr(tqdm, "_instances", ())):  # ffcv's bar, left open
                progress_bar.close()
            if isinstance(error, WriterWorkerDied) and error.args[0] in NO_ROOM_ERRNOS:
                # atomic_path turns it into "no space left on device while writing <beton>"
                raise OSError(error.args[0], os.strerror(error.args[0])) from None
            if isinstance(error, WriterWorkerDied):
                raise DatasetError(f"an ffcv writer worker died (exit code {error.args[0]}; "
                                   f"its error is printed above, e.g. disk full)") from None
            raise


def choose_page_size(largest_image_bytes):
    """ffcv's default page (8 MiB), doubled until the largest image fits twice over
    (a JPEG can be larger than raw pixels for tiny or noisy images)."""
    from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE
    page_size = 4 * MIN_PAGE_SIZE
    while page_size < 2 * largest_image_bytes + (1 << 16):
        page_size *= 2
    if page_size >= MAX_PAGE_SIZE:
        raise DatasetError(f"an image of {largest_image_bytes} bytes is too large for an ffcv "
                           f"page; set max_resolution")
    return page_size


def read_failures(error_log):
    if not error_log.is_file():
        return []
    return [line.split("\t", 1) for line in error_log.read_text().splitlines() if line]


def write_beton(dataset, class_names, write_path, *, dataset_name, split, write_mode="raw",
                max_resolution=None, jpeg_quality=90, compress_probability=0.5,
                smart_threshold=DEFAULT_SMART_THRESHOLD, num_workers=1, chunk_size=100):
    """Write `dataset` to `write_path` (fields image, label) plus its classes.json sidecar.

    The beton is written under a temporary name and renamed at the end: a failure leaves
    nothing at write_path. With num_workers=1 the same input gives the same bytes; with
    more workers the samples are the same but ffcv's page order depends on timing.
    Returns the sidecar dict.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in WRITE_MODES:
        raise DatasetError(f"unknown write mode {write_mode!r}: expected one of "
                           f"{', '.join(WRITE_MODES)}")
    if len(dataset) == 0:
        raise DatasetError(f"no images to write to {write_path}")
    if Path(write_path).is_dir():
        raise DatasetError(f"write path {write_path} is a directory, not a .beton file name")
    check_label_range(dataset.labels, len(class_names), f"the {dataset_name} {split} split")
    max_resolution = max_resolution if max_resolution and max_resolution > 0 else None
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    page_size = choose_page_size(dataset.largest_image_bytes(max_resolution))
    sidecar = {"dataset": dataset_name, "split": split, "num_samples": len(dataset),
               "num_classes": len(class_names), "classes": list(class_names)}
    with atomic_path(write_path) as tmp_path:
        error_log = Path(f"{tmp_path}.errors")
        try:
            source = WriterSource(dataset, error_log, seed_per_sample=write_mode == "proportion")
            writer = DatasetWriter(str(tmp_path), fields, page_size=page_size,
                                   num_workers=num_workers)
            run_writer(writer, source, chunk_size)
            failures = read_failures(error_log)
        finally:
            error_log.unlink(missing_ok=True)
        if failures:
            path, reason = failures[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise DatasetError(f"cannot read image {path}: {reason}{more}")
        inspect_beton(tmp_path, expected_samples=len(dataset))
        write_json(classes_path(write_path), sidecar)
    return sidecar


# ---------------------------------------------------------------------------------------
# Sidecar and beton checks
# ---------------------------------------------------------------------------------------

def classes_path(beton_path):
    return Path(f"{beton_path}.classes.json")


def skipped_path(beton_path):
    return Path(f"{beton_path}.skipped.txt")


def read_classes(beton_path):
    """The sidecar of a beton: {"dataset", "split", "num_samples", "num_classes", "classes"}."""
    path = classes_path(beton_path)
    if not path.is_file():
        raise DatasetError(f"class list not found: {path} (write_datasets.py writes it "
                           f"beside each beton)")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"corrupt class list {path}: {one_line(error)}") from None
    problem = sidecar_problem(content)
    if problem:
        raise DatasetError(f"corrupt class list {path}: {problem}")
    return content


def sidecar_problem(content):
    """What is wrong with a sidecar's content, or None."""
    if not isinstance(content, dict):
        return "not a JSON object"
    types = {"dataset": str, "split": str, "num_samples": int, "num_classes": int,
             "classes": list}
    for key, expected in types.items():
        if not isinstance(content.get(key), expected) or isinstance(content.get(key), bool):
            return f"'{key}' missing or not a {expected.__name__}"
    if content["split"] not in SPLITS:
        return f"split {content['split']!r} is not train or val"
    if len(content["classes"]) != content["num_classes"]:
        return (f"num_classes is {content['num_classes']} but {len(content['classes'])} "
                f"class names are listed")
    if not all(isinstance(name, str) for name in content["classes"]):
        return "class names must be strings"
    return None


def inspect_beton(path, expected_samples=None):
    """Check that a beton file is whole; return its labels (int64 [num_samples]).

    Catches what a plain ffcv Reader lets through silently: a file cut short (the
    allocation table or image data missing), a write that never finished, a
    sample without its image data.
    """
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"beton not found: {path}")
    file_size = path.stat().st_size
    if file_size < HeaderType.itemsize:
        raise DatasetError(f"truncated beton {path}: {file_size} bytes, shorter than its header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise DatasetError(f"{path} is not an ffcv beton (format version "
                           f"{int(header['version'])}, expected {CURRENT_VERSION})")
    if int(header["num_samples"]) > file_size:  # every sample has metadata in the file
        raise DatasetError(f"corrupt beton {path}: its header claims {int(header['num_samples'])} "
                           f"samples in {file_size} bytes")
    table_start = int(header["alloc_table_ptr"])
    table_bytes = file_size - table_start
    if table_start == 0 or table_bytes < 0 or table_bytes % ALLOC_TABLE_TYPE.itemsize:
        raise DatasetError(f"truncated or unfinished beton {path}: its header puts the "
                           f"allocation table at byte {table_start}, the file has "
                           f"{file_size} bytes")
    try:
        reader = Reader(str(path))
    except Exception as error:
        raise DatasetError(f"corrupt beton {path}: ffcv cannot read it ({one_line(error)})") \
            from None
    num_samples = int(reader.num_samples)
    if len(reader.metadata) != num_samples:
        raise DatasetError(f"truncated beton {path}: metadata for {len(reader.metadata)} of "
                           f"{num_samples} samples")
    if not {"image", "label"} <= set(reader.field_names):
        raise DatasetError(f"beton {path} has fields {reader.field_names}, expected 'image' "
                           f"and 'label'")
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_start:
        raise DatasetError(f"corrupt beton {path}: image data runs past its allocation table")
    samples_with_data = len(np.unique(table["sample_id"]))
    if samples_with_data != num_samples:
        raise DatasetError(f"corrupt beton {path}: image data for {samples_with_data} of "
                           f"{num_samples} samples")
    if expected_samples is not None and num_samples != expected_samples:
        raise DatasetError(f"beton {path} holds {num_samples} samples, expected {expected_samples}")
    # the metadata's columns are unnamed (f0, f1, ...) in field order
    label_column = reader.metadata.dtype.names[reader.field_names.index("label")]
    return np.array(reader.metadata[label_column], dtype=np.int64)


def check_beton(beton_path):
    """Check a beton and its sidecar agree; return the sidecar dict (see read_classes)."""
    classes = read_classes(beton_path)
    labels = inspect_beton(beton_path)
    if len(labels) != classes["num_samples"]:
        raise DatasetError(f"beton {beton_path} holds {len(labels)} labels but "
                           f"{classes_path(beton_path).name} says {classes['num_samples']}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes["num_classes"]):
        raise DatasetError(f"beton {beton_path} has labels {labels.min()}..{labels.max()} but "
                           f"{classes_path(beton_path).name} lists {classes['num_classes']} "
                           f"classes")
    return classes


# ---------------------------------------------------------------------------------------
# One split, end to end
# ---------------------------------------------------------------------------------------

def drop_unreadable(dataset, unreadable, skip_corrupt):
    """Raise on unreadable images, or (skip_corrupt) list them on stderr and drop them.

    Returns (dataset to write, lines "path<TAB>reason" of the skipped files)."""
    if not unreadable:
        return dataset, []
    first_index, first_reason = unreadable[0]
    if not skip_corrupt:
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise DatasetError(f"cannot read image {dataset.describe(first_index)}: {first_reason}"
                           f"{more}; skip_corrupt=1 skips unreadable images")
    skipped = {index for index, _ in unreadable}
    keep = np.array([i for i in range(len(dataset)) if i not in skipped], dtype=np.int64)
    lines = [f"{dataset.describe(index)}\t{reason}" for index, reason in unreadable]
    print(f"skipping {len(lines)} unreadable images:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    return dataset.subset(keep), lines


def convert(dataset_name, split, data_dir, write_path, *, subset=-1, skip_corrupt=False,
            num_workers=1, chunk_size=100, **image_options):
    """Read one split of a source, check it, and write it to `write_path`.

    image_options: write_mode, max_resolution, jpeg_quality, compress_probability,
    smart_threshold (see write_beton). Skipped files (skip_corrupt) are listed in
    <write_path>.skipped.txt. Returns the sidecar dict.
    """
    started = time.time()
    dataset, class_names = read_source(dataset_name, data_dir, split)
    if subset != -1:
        dataset = dataset.subset(stratified_subset(dataset.labels, subset))
    skipped_lines = []
    if isinstance(dataset, ImageFiles):
        unreadable = check_images(dataset, num_workers)
        dataset, skipped_lines = drop_unreadable(dataset, unreadable, skip_corrupt)
    print(f"writing {len(dataset)} images of {dataset_name} {split} to {write_path}",
          file=sys.stderr)
    sidecar = write_beton(dataset, class_names, write_path, dataset_name=dataset_name,
                          split=split, num_workers=num_workers, chunk_size=chunk_size,
                          **image_options)
    if skipped_lines:
        write_text(skipped_path(write_path), "\n".join(skipped_lines) + "\n")
        print(f"skipped files listed in {skipped_path(write_path)}", file=sys.stderr)
    else:
        skipped_path(write_path).unlink(missing_ok=True)  # a stale list would mislead
    megabytes = Path(write_path).stat().st_size / 1e6
    print(f"wrote {write_path}: {sidecar['num_samples']} images, {sidecar['num_classes']} "
          f"classes, {megabytes:.1f} MB in {time.time() - started:.1f} s")
    return sidecar
