"""Image sources -> datasets: one small reader per on-disk format, a class-stratified
subset, and an up-front decode of image files. The first stage of the data flow:

    read_source(name, data_dir, split) -> (dataset, class_names)
        a dataset is a sequence of (H x W x 3 uint8, int label), picklable for ffcv's
        writer workers (ArrayImages in memory, ImageFiles on disk)
    stratified_subset(labels, size)      a deterministic, class-stratified subset
    check_images(dataset)                files only: decode every image with PIL up front
                                         (16- and 32-bit integer pixels are scaled to 8
                                         bits, said once; float pixels are refused)

data/writer.py turns a dataset into a beton, data/sidecar.py reads and checks one.

Sources:
    fashion-mnist  the IDX files (train-*, t10k-*; .gz or not), 28x28 grey -> RGB
    cifar10        the python pickle batches of cifar-10-batches-py
    cifar100       the python pickles of cifar-100-python (fine labels)
    imagefolder    data_dir/<class>/<image>, torchvision ImageFolder order (ImageNet train/val)
    inaturalist    the 2021 json annotations: data_dir/{train,val}.json, file_name relative
                   to data_dir
"""
import contextlib
import gzip
import json
import multiprocessing
import os
import pickle
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ffcv_bias.common.children import die_with_parent


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


class PixelFormatError(DatasetError):
    """An image whose pixels have no defined 8-bit scale (floats); str() is one line."""


def integer_depth(image):
    """(bits, signed) of a grey image PIL holds in more than 8 bits per pixel (modes I;16*
    and I), None for the 8-bit modes; PixelFormatError for float pixels (mode F) or an
    integer image whose depth its format does not tell."""
    mode = image.mode
    if mode.startswith("I;16"):
        return 16, mode.endswith("S")
    if mode == "I":
        if image.format == "TIFF":  # BitsPerSample (258), SampleFormat (339: 2 = signed)
            bits = image.tag_v2.get(258, (32,))
            sample_format = image.tag_v2.get(339, (1,))
            bits = int(bits[0] if isinstance(bits, tuple) else bits)
            sample_format = int(sample_format[0] if isinstance(sample_format, tuple)
                                else sample_format)
            return bits, sample_format == 2
        if image.format in ("PNG", "PPM"):  # 16-bit grey (PGM: scaled to 16 bits by PIL)
            return 16, False
        raise PixelFormatError(f"its pixels are 32-bit integers (PIL mode I) of unknown depth "
                               f"in a {image.format} file: save it with 8- or 16-bit pixels")
    if mode == "F":
        raise PixelFormatError("its pixels are 32-bit floats (PIL mode F), which have no "
                               "defined 8-bit scale (0..1? 0..255?): save it with 8- or "
                               "16-bit integer pixels")
    return None


def scaled_to_8_bits(pixels, bits, signed):
    """Integer pixels of nominal depth `bits` -> uint8 by their top 8 bits (what PIL does
    for 16-bit RGB; scikit-image's img_as_ubyte rule): 16-bit v -> v >> 8; signed pixels
    keep their non-negative range (negative values become 0)."""
    values = np.asarray(pixels).astype(np.int64)
    if signed:
        values = np.maximum(values, 0)
        bits -= 1
    else:
        values %= 1 << 32  # an unsigned 32-bit TIFF read into PIL's signed int32
    return np.minimum(values >> max(bits - 8, 0), 255).astype(np.uint8)


def describe_depth(mode, bits, signed):
    return f"{bits}-bit {'signed ' if signed else ''}integer pixels (PIL mode {mode})"


def decode_rgb(path):
    """(H x W x 3 uint8, depth) of an image file, decoded completely (a truncated file
    fails here); `depth` describes the pixels when they were deeper than 8 bits and scaled
    (16-bit PNG, 16- or 32-bit TIFF), else None. PIL's own convert("RGB") would clip those
    at 255: a 16-bit PNG came out in 3 or 4 grey levels."""
    from PIL import Image
    with Image.open(path) as image:
        depth = integer_depth(image)
        if depth is None:
            return np.asarray(image.convert("RGB"), dtype=np.uint8), None
        pixels = np.asarray(image)
        grey = scaled_to_8_bits(pixels, *depth)
        if grey.min() == grey.max() and pixels.min() != pixels.max():
            # e.g. 16-bit data saved as int32: the top 8 of 31 bits are all 0
            raise PixelFormatError(
                f"its {describe_depth(image.mode, *depth)} run from {pixels.min()} to "
                f"{pixels.max()}, a sliver of their range: in 8 bits they would all be "
                f"{grey.min()}; save it with pixels of the depth its values use (8 or 16 bit)")
        return (np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)),
                describe_depth(image.mode, *depth))


def load_rgb(path):
    """Decode an image file completely into H x W x 3 uint8 (see decode_rgb)."""
    return decode_rgb(path)[0]


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


def class_list_warnings(class_names, source):
    """Lines for stderr about a class list that is legal but most likely a mistake: a name
    given to two classes (reports could not tell them apart), or one class only."""
    lines = []
    first_label = {}
    repeated = []
    for label, class_name in enumerate(class_names):
        if class_name in first_label:
            repeated.append((class_name, first_label[class_name], label))
        else:
            first_label[class_name] = label
    if repeated:
        name, first, second = repeated[0]
        more = f" (and {len(repeated) - 1} more repeated names)" if len(repeated) > 1 else ""
        lines.append(f"warning: the class list of {source} names {name!r} twice (classes "
                     f"{first} and {second}){more}: they stay separate classes, but the "
                     f"reports cannot tell them apart by name")
    if len(class_names) == 1:
        lines.append(f"warning: {source} has one class only ({class_names[0]!r}): a "
                     f"classifier has nothing to tell apart (an ImageFolder's data_dir holds "
                     f"one folder per class)")
    return lines


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
    """((height, width), None, depth) for a readable image (depth: decode_rgb's), ((0, 0),
    reason, None) otherwise."""
    try:
        image, depth = decode_rgb(path)
        return image.shape[:2], None, depth
    except PixelFormatError as error:
        return (0, 0), str(error), None
    except Exception as error:  # any decoder failure means the file cannot be written
        return (0, 0), one_line(error), None


def depth_note(scaled, dataset):
    """The one stderr line about images scaled down to 8 bits: [(index, depth)] -> text."""
    by_depth = {}
    for index, depth in scaled:
        by_depth.setdefault(depth, []).append(index)
    kinds = "; ".join(f"{len(indices)} with {depth}, e.g. {dataset.describe(indices[0])}"
                      for depth, indices in by_depth.items())
    negative = " (negative values as 0)" if any("signed" in d for d in by_depth) else ""
    return (f"note: {len(scaled)} of {len(dataset)} images have more than 8 bits per "
            f"pixel, scaled to 8 bits by their top 8 bits{negative}: {kinds}")


def check_images(dataset, num_workers=1):
    """Decode every file of an ImageFiles dataset with PIL; record sizes in dataset.sizes.
    Images deeper than 8 bits (scaled to 8 bits when written) are said once on stderr.

    Returns [(index, reason)] for the files that cannot be read."""
    sizes = np.zeros((len(dataset), 2), dtype=np.int64)
    unreadable, scaled = [], []
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(tqdm(total=len(dataset), desc="checking images",
                                            unit="img"))
        if num_workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(
                num_workers, initializer=die_with_parent, initargs=(os.getpid(),)))
            results = pool.imap(probe_image, dataset.paths, chunksize=32)
        else:
            results = map(probe_image, dataset.paths)
        for index, (size, reason, depth) in enumerate(results):
            sizes[index] = size
            if reason is not None:
                unreadable.append((index, reason))
            if depth is not None:
                scaled.append((index, depth))
            progress.update()
    dataset.sizes = sizes
    if scaled:
        print(depth_note(scaled, dataset), file=sys.stderr)
    return unreadable
