"""Shared fixtures: tiny real-format betons made from the embedded Fashion-MNIST, and a
warm `python` (tests/warm_python.py) for the tests that start many Python processes."""
import gzip
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path):
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _stratified_subset(labels, per_class, seed=0):
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def write_tiny_beton(path, images, labels, split, write_mode="raw"):
    """Write grey 28x28 images as RGB to an ffcv beton with its classes.json sidecar."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Pairs:
        def __len__(self):
            return len(labels)

        def __getitem__(self, index):
            rgb = np.repeat(images[index][:, :, None], 3, axis=2)
            return rgb, int(labels[index])

    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode=write_mode),
                                       "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset(Pairs())
    sidecar = {"dataset": "fashion-mnist", "split": split, "num_samples": int(len(labels)),
               "num_classes": 10, "classes": FASHION_CLASSES}
    Path(str(path) + ".classes.json").write_text(json.dumps(sidecar))
    return path


def fashion_subset_betons(out, per_class, name="fashion-mnist_{split}.beton"):
    """(train.beton, val.beton) in `out`: class-stratified subsets of the real Fashion-MNIST,
    per_class = {"train": n, "val": m} images of each class."""
    if not FASHION_DIR.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (run `make setup`)")
    paths = []
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        keep = _stratified_subset(labels, per_class[split])
        paths.append(write_tiny_beton(out / name.format(split=split), images[keep],
                                      labels[keep], split))
    return tuple(paths)


@pytest.fixture(scope="session")
def tiny_fashion_betons(tmp_path_factory):
    """(train.beton, val.beton): 60 / 20 images per class of the real Fashion-MNIST."""
    return fashion_subset_betons(tmp_path_factory.mktemp("tiny_fashion"),
                                 {"train": 60, "val": 20})


WARM_PYTHON = Path(__file__).with_name("warm_python.py")
WARM_START_TIMEOUT_S = 300


def warm_up_run(betons, folder):
    """The server's own run: test_train's recipe (ResNet-8, tiny betons) for 1 epoch."""
    from test_train import train_args
    return train_args(betons, folder, "--training.epochs=1")


@pytest.fixture(scope="session")
def warm_python(tiny_fashion_betons):
    """The words of a `python` whose imports (and a first training run's compiles) are
    already paid: one server per test worker. For subprocess calls, or as
    FFCV_BIAS_PYTHON for what ffcv_bias starts."""
    folder = Path(tempfile.mkdtemp(prefix="warm_python"))  # short: a socket path <= 108
    socket_path, log_path = folder / "socket", folder / "server.log"
    # The server's own environment: what a child does not replace at fork (its imports'
    # settings) stays the suite's; PYTHONUNBUFFERED: a killed child's output is not lost.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, str(WARM_PYTHON), "serve", str(socket_path),
             *warm_up_run(tiny_fashion_betons, folder / "runs")],
            stdout=subprocess.PIPE, stderr=log, env=env)
    try:
        wait_for_ready(server, log_path)
        yield [sys.executable, str(WARM_PYTHON), "run", str(socket_path)]
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def wait_for_ready(server, log_path):
    deadline = time.monotonic() + WARM_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if select.select([server.stdout], [], [], 1)[0]:
            if server.stdout.readline().strip() == b"ready":
                return
        if server.poll() is not None:
            break
    raise RuntimeError("the warm python server did not start:\n" + log_path.read_text()[-3000:])


# The files that take longest go first, longest first (the README run, a chain of real
# commands, at the head): under `make test`'s two pytest-xdist workers (--dist loadfile: a
# file stays on one worker) each worker takes the next file when it is free, so the long
# chains start at once and the short files, last, even out the end. Order from the summed
# test time per file (--durations=0 on this project's 2-core machine, 2026-12-06: 101, 104,
# 66, 35, 34, 34, 31, 29, 27, 26, 22, 17, 14, 12, 10, 10, 10, 9, 8 s); the rest is shorter.
LONGEST_FILES_FIRST = (
    "test_readme.py", "test_faults.py", "test_quick_run.py", "test_diet.py",
    "test_gpu_check.py", "test_bench_loader.py", "test_loaders.py", "test_models.py",
    "test_train.py", "test_train_recipes.py", "test_studies.py", "test_sweep.py",
    "test_datasets.py", "test_cuda_paths.py", "test_bad_input.py", "test_decode_fast.py",
    "test_metrics.py", "test_bad_input_cuda.py", "test_protocols.py")


def pytest_configure(config):
    # pytest-xdist (3.x) hands out files with the most tests first unless told not to, which
    # overrides the order below (measured: the README run started after a minute, the
    # quick run last, 456 s where the summed test time would split evenly at 428 s).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST \
            else len(LONGEST_FILES_FIRST)
    items.sort(key=rank)  # stable: within a file, and among the others, collection order
