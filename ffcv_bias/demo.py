"""`make demo`: the main job on the embedded default (Fashion-MNIST from Debian's package).

Stage 1 (this module today): write the default betons if they are missing, then read one
epoch back through the seeded training pipeline and print what came out.
"""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA_DIR = Path("data")
TRAIN_BETON = DATA_DIR / "fashion-mnist_train.beton"
VAL_BETON = DATA_DIR / "fashion-mnist_val.beton"


def ensure_default_betons():
    """Write both splits with `python write_datasets.py` unless they are already there."""
    if TRAIN_BETON.is_file() and VAL_BETON.is_file():
        print(f"[demo] betons present: {TRAIN_BETON}, {VAL_BETON}")
        return
    print("[demo] writing the Fashion-MNIST betons (python write_datasets.py)")
    subprocess.run([sys.executable, "write_datasets.py"], check=True)


def read_one_epoch(path, resolution=32, batch_size=512, min_scale=0.25, seed=0):
    """One epoch through the seeded train loader: counts per class and images/second."""
    from tqdm import tqdm

    from ffcv_bias.loaders import create_train_loader

    loader = create_train_loader(path, batch_size=batch_size, resolution=resolution, seed=seed,
                                 min_scale=min_scale, drop_last=False)
    loader.set_epoch(0)
    counts = None
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc=f"reading {path.name}", unit="batch"):
        batch_counts = np.bincount(labels.numpy(), minlength=10)
        counts = batch_counts if counts is None else counts + batch_counts
    seconds = time.perf_counter() - start
    return counts, tuple(images.shape[1:]), seconds


def main():
    from ffcv_bias.datasets import read_classes

    ensure_default_betons()
    for path in (TRAIN_BETON, VAL_BETON):
        classes = read_classes(path)["classes"]
        counts, image_shape, seconds = read_one_epoch(path)
        print(f"[demo] {path}: {counts.sum()} images of shape {image_shape} in {seconds:.1f} s "
              f"(first epoch includes numba compilation)")
        for name, count in zip(classes, counts):
            print(f"         {name:<12} {count}")


if __name__ == "__main__":
    main()
