"""Tiny datasets in the real on-disk formats, and a beton reader, for tests/test_datasets.py."""
import gzip
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# ffcv's RGBImageField stores each image as JPEG (mode 0) or raw pixels (mode 1)
JPEG_MODE, RAW_MODE = 0, 1


def write_idx(path, array):
    """An unsigned-byte IDX file, gzip-compressed: 0, 0, 0x08, ndim, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def make_fashion_dir(root, train_per_class=3, val_per_class=2, seed=0):
    """A Fashion-MNIST folder (train-*/t10k-* idx.gz). Returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    content = {}
    for split, prefix, per_class in (("train", "train", train_per_class),
                                     ("val", "t10k", val_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        content[split] = (images, labels)
    return content


def cifar_rows(images):
    """[N, 32, 32, 3] -> CIFAR's [N, 3072]: the R plane, then G, then B, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)


def dump_pickle(path, content):
    with open(path, "wb") as handle:
        pickle.dump(content, handle)


def make_cifar10_dir(root, per_batch=4, test_size=5, seed=0):
    """cifar-10-batches-py under root. Returns {split: (images [N,32,32,3], labels)}."""
    rng = np.random.default_rng(seed)
    batch_dir = root / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True)
    names = [f"class_{c}".encode() for c in range(10)]
    dump_pickle(batch_dir / "batches.meta",
                {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    content = {"train": ([], []), "val": ([], [])}
    batches = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)]
    for file_name, split, size in batches + [("test_batch", "val", test_size)]:
        images = rng.integers(0, 256, size=(size, 32, 32, 3), dtype=np.uint8)
        labels = [int(label) for label in rng.integers(0, 10, size=size)]
        dump_pickle(batch_dir / file_name, {b"batch_label": file_name.encode(),
                                            b"labels": labels, b"data": cifar_rows(images),
                                            b"filenames": [b"x.png"] * size})
        content[split][0].append(images)
        content[split][1].extend(labels)
    return {split: (np.concatenate(images), np.array(labels))
            for split, (images, labels) in content.items()}


def make_cifar100_dir(root, train_size=12, test_size=6, seed=0):
    """cifar-100-python under root (train/test/meta, fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    batch_dir = root / "cifar-100-python"
    batch_dir.mkdir(parents=True)
    dump_pickle(batch_dir / "meta", {
        b"fine_label_names": [f"fine_{c:03d}".encode() for c in range(100)],
        b"coarse_label_names": [f"coarse_{c:02d}".encode() for c in range(20)]})
    content = {}
    for file_name, split, size in (("train", "train", train_size), ("test", "val", test_size)):
        images = rng.integers(0, 256, size=(size, 32, 32, 3), dtype=np.uint8)
        fine = [int(label) for label in rng.integers(0, 100, size=size)]
        coarse = [label // 5 for label in fine]
        dump_pickle(batch_dir / file_name, {b"filenames": [b"x.png"] * size,
                                            b"fine_labels": fine, b"coarse_labels": coarse,
                                            b"data": cifar_rows(images)})
        content[split] = (images, np.array(fine))
    return content


def smooth_image(rng, height, width):
    """A smooth random image (compresses like a photo, so JPEG stays close to it)."""
    corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float64)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    image = (corners[0, 0] * (1 - y) * (1 - x) + corners[0, 1] * (1 - y) * x
             + corners[1, 0] * y * (1 - x) + corners[1, 1] * y * x)
    return image.round().astype(np.uint8)


def save_image(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(pixels).save(path, format=Image.registered_extensions()[path.suffix.lower()],
                                 **options)


def make_image_folder(root, seed=0):
    """An ImageFolder of JPEG and PNG files of various sizes (one nested, one upper-case
    extension, one non-image file). Returns (class names, [(path, label)] in the expected
    order)."""
    rng = np.random.default_rng(seed)
    layout = {  # folder names deliberately not in sorted order here
        "zebra": ["b.png", "a.JPG", "sub/c.jpeg"],
        "ant": ["x.jpg", "y.png"],
        "moth": ["m1.png", "m2.jpg"],
    }
    class_names = sorted(layout)
    expected = []
    for label, class_name in enumerate(class_names):
        for file_name in sorted(layout[class_name]):
            path = root / class_name / file_name
            height, width = rng.integers(20, 48, size=2)
            save_image(path, smooth_image(rng, int(height), int(width)))
            expected.append((path, label))
    (root / "ant" / "notes.txt").write_text("not an image")
    return class_names, expected


def corrupt_folder(root):
    """An ImageFolder with one file that is not an image and one truncated JPEG."""
    make_image_folder(root)
    (root / "moth" / "broken.jpg").write_bytes(b"this is not a JPEG")
    good = (root / "zebra" / "sub" / "c.jpeg").read_bytes()
    (root / "zebra" / "cut.jpg").write_bytes(good[: len(good) // 2])
    return [root / "moth" / "broken.jpg", root / "zebra" / "cut.jpg"]


def make_inaturalist_tree(root, split="val", seed=0):
    """An iNaturalist 2021 style tree: <split>.json plus images under <split>/.
    Category ids are sparse and listed out of order. Returns (class names in label order,
    [(path, label)] in the json's image order)."""
    rng = np.random.default_rng(seed)
    categories = [{"id": 40, "name": "Zygaena filipendulae", "supercategory": "Animalia"},
                  {"id": 7, "name": "Abies alba", "supercategory": "Plantae"},
                  {"id": 15, "name": "Bombus terrestris", "supercategory": "Animalia"}]
    label_of_id = {7: 0, 15: 1, 40: 2}
    images, annotations, expected = [], [], []
    for image_id, category_id in enumerate([40, 7, 15, 7, 40, 15, 15], start=100):
        file_name = f"{split}/{category_id:05d}_species/{image_id}.jpg"
        save_image(root / file_name, smooth_image(rng, 30, 40))
        images.append({"id": image_id, "file_name": file_name, "width": 40, "height": 30})
        annotations.append({"id": image_id + 1000, "image_id": image_id,
                            "category_id": category_id})
        expected.append((root / file_name, label_of_id[category_id]))
    annotations.reverse()  # annotation order must not matter
    (root / f"{split}.json").write_text(json.dumps(
        {"info": {"year": 2021}, "images": images, "annotations": annotations,
         "categories": categories, "licenses": []}))
    return ["Abies alba", "Bombus terrestris", "Zygaena filipendulae"], expected


def read_beton(path):
    """(list of H x W x 3 uint8 images, int64 labels, modes) read straight from the file."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    columns = reader.metadata.dtype.names  # unnamed columns (f0, f1), in field order
    image_meta = reader.metadata[columns[reader.field_names.index("image")]]
    labels = np.array(reader.metadata[columns[reader.field_names.index("label")]], np.int64)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    file_bytes = np.memmap(path, dtype=np.uint8, mode="r")
    images = []
    for meta in image_meta:
        pointer = int(meta["data_ptr"])
        data = np.array(file_bytes[pointer: pointer + sizes[pointer]])
        height, width = int(meta["height"]), int(meta["width"])
        if meta["mode"] == RAW_MODE:
            images.append(data[: height * width * 3].reshape(height, width, 3))
        else:
            images.append(np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB")))
    return images, labels, np.array(image_meta["mode"])


def decoded(path):
    """What PIL makes of an image file, as RGB uint8."""
    with Image.open(Path(path)) as image:
        return np.asarray(image.convert("RGB"))


def placeholder_betons(root, dataset, counts, classes):
    """Empty (train, val) betons with real sidecars: enough for every config check that
    reads only the .classes.json, never the images."""
    paths = []
    for split, count in zip(("train", "val"), counts):
        path = Path(root) / f"{dataset}_{split}.beton"
        path.write_bytes(b"")
        sidecar = {"dataset": dataset, "split": split, "num_samples": count,
                   "num_classes": len(classes), "classes": list(classes)}
        Path(f"{path}.classes.json").write_text(json.dumps(sidecar))
        paths.append(path)
    return paths
