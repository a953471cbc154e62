"""Sources -> betons: every reader on tiny data in its real on-disk format, the CLI's bad
input handling, subsets, determinism, and the beton/sidecar checks the loaders rely on."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_datasets import (JPEG_MODE, RAW_MODE, corrupt_folder, decoded,
                               make_cifar10_dir, make_cifar100_dir, make_fashion_dir,
                               make_image_folder, make_inaturalist_tree, read_beton, save_image,
                               smooth_image)
from ffcv_bias.data import sidecar, sources
from ffcv_bias.data.sources import ArrayImages, DatasetError, ImageFiles, stratified_subset
from ffcv_bias.data.sidecar import check_beton, read_classes
from ffcv_bias.data.writer import write_beton
from write_datasets import main

REPO = Path(__file__).resolve().parents[1]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def run_cli(capsys, *args):
    """main(args) in this process: (exit code, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_one_line_error(code, stderr, *needles):
    """A failed run: non-zero exit, its last stderr line the error, no traceback."""
    assert code != 0
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("write_datasets.py: error: "), stderr
    for needle in needles:
        assert needle in last_line, last_line


def assert_nothing_written(write_path):
    """No beton, no sidecar, no temporary file left beside it."""
    folder = Path(write_path).parent
    leftovers = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert not [name for name in leftovers if Path(write_path).name in name], leftovers


# ------------------------------------------------------------------------------------------
# Round trips, one per source
# ------------------------------------------------------------------------------------------

def test_fashion_mnist_round_trip_is_pixel_exact(tmp_path, capsys):
    content = make_fashion_dir(tmp_path / "fashion")
    for split in ("train", "val"):
        out = tmp_path / f"fashion_{split}.beton"
        code, stderr = run_cli(capsys, "--cfg.dataset=fashion-mnist", f"--cfg.split={split}",
                               f"--cfg.data_dir={tmp_path / 'fashion'}", f"--cfg.write_path={out}")
        assert code == 0, stderr
        images, labels, modes = read_beton(out)
        grey, expected_labels = content[split]
        assert np.array_equal(labels, expected_labels)
        assert (modes == RAW_MODE).all()
        for image, expected in zip(images, grey):
            assert image.shape == (28, 28, 3)
            assert all(np.array_equal(image[:, :, c], expected) for c in range(3))
        assert read_classes(out) == {"dataset": "fashion-mnist", "split": split,
                                     "num_samples": len(grey), "num_classes": 10,
                                     "classes": FASHION_CLASSES}
        assert check_beton(out)["num_samples"] == len(grey)


def test_fashion_mnist_reader_accepts_uncompressed_idx(tmp_path):
    content = make_fashion_dir(tmp_path)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        gz_path = tmp_path / f"{stem}.gz"
        (tmp_path / stem).write_bytes(gzip.decompress(gz_path.read_bytes()))
        gz_path.unlink()
    dataset, class_names = sources.read_source("fashion-mnist", tmp_path, "val")
    images, labels = content["val"]
    assert class_names == FASHION_CLASSES and np.array_equal(dataset.labels, labels)
    image, label = dataset[3]
    assert image.shape == (28, 28, 3) and np.array_equal(image[:, :, 1], images[3])
    assert label == labels[3]
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        sources.read_source("mnist", tmp_path, "val")


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_round_trip_is_pixel_exact(tmp_path, capsys, source):
    maker = make_cifar10_dir if source == "cifar10" else make_cifar100_dir
    content = maker(tmp_path / "cifar")
    expected_names = ([f"class_{c}" for c in range(10)] if source == "cifar10"
                      else [f"fine_{c:03d}" for c in range(100)])
    for split in ("train", "val"):
        out = tmp_path / f"{source}_{split}.beton"
        # the parent folder of cifar-10-batches-py / cifar-100-python is accepted
        code, stderr = run_cli(capsys, f"--cfg.dataset={source}", f"--cfg.split={split}",
                               f"--cfg.data_dir={tmp_path / 'cifar'}", f"--cfg.write_path={out}")
        assert code == 0, stderr
        images, labels, _ = read_beton(out)
        expected_images, expected_labels = content[split]
        assert np.array_equal(labels, expected_labels)
        assert np.array_equal(np.stack(images), expected_images)
        classes = check_beton(out)
        assert classes["classes"] == expected_names and classes["split"] == split


def test_imagefolder_round_trip_follows_imagefolder_order(tmp_path, capsys):
    class_names, expected = make_image_folder(tmp_path / "train")
    out = tmp_path / "folder_train.beton"
    code, stderr = run_cli(capsys, "--cfg.dataset=imagefolder", "--cfg.split=train",
                           f"--cfg.data_dir={tmp_path / 'train'}", f"--cfg.write_path={out}")
    assert code == 0, stderr
    images, labels, _ = read_beton(out)
    assert labels.tolist() == [label for _, label in expected]
    for image, (path, _) in zip(images, expected):
        assert np.array_equal(image, decoded(path)), path
    classes = check_beton(out)
    assert classes["classes"] == class_names == ["ant", "moth", "zebra"]
    assert classes["dataset"] == "imagefolder" and classes["num_samples"] == len(expected)
    assert not Path(f"{out}.skipped.txt").exists()


def test_inaturalist_round_trip_ranks_category_ids(tmp_path, capsys):
    class_names, expected = make_inaturalist_tree(tmp_path / "inat", split="val")
    out = tmp_path / "inat_val.beton"
    code, stderr = run_cli(capsys, "--cfg.dataset=inaturalist", "--cfg.split=val",
                           f"--cfg.data_dir={tmp_path / 'inat'}", f"--cfg.write_path={out}")
    assert code == 0, stderr
    images, labels, _ = read_beton(out)
    assert labels.tolist() == [label for _, label in expected]
    for image, (path, _) in zip(images, expected):
        assert np.array_equal(image, decoded(path))
    assert check_beton(out)["classes"] == class_names


def test_ffcv_loader_reads_the_beton(tmp_path):
    """ffcv's own Loader + SimpleRGBImageDecoder sees the same pixels and labels."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(21, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=21)
    out = tmp_path / "arrays.beton"
    write_beton(ArrayImages(images, labels), list("abcd"), out, dataset_name="arrays",
                split="val")
    loader = Loader(str(out), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()],
                                                "label": [IntDecoder()]})
    seen_images, seen_labels = [], []
    for batch_images, batch_labels in loader:  # the loader reuses its buffers: copy
        seen_images.append(np.array(batch_images, copy=True))
        seen_labels.append(np.array(batch_labels, copy=True).reshape(-1))
    assert np.array_equal(np.concatenate(seen_images), images)
    assert np.array_equal(np.concatenate(seen_labels), labels)


def test_jpg_mode_compresses_and_stays_close(tmp_path):
    rng = np.random.default_rng(0)
    images = np.stack([smooth_image(rng, 40, 40) for _ in range(6)])
    out = tmp_path / "jpg.beton"
    write_beton(ArrayImages(images, np.arange(6) % 2), ["a", "b"], out, dataset_name="arrays",
                split="train", write_mode="jpg", jpeg_quality=95)
    read_images, _, modes = read_beton(out)
    assert (modes == JPEG_MODE).all()
    error = np.abs(np.stack(read_images).astype(int) - images.astype(int)).mean()
    assert error < 2.0


def test_smart_mode_compresses_only_images_above_the_threshold(tmp_path):
    rng = np.random.default_rng(0)
    images = np.stack([smooth_image(rng, 16, 16) for _ in range(4)])  # 768 bytes each
    for threshold, expected_mode in ((700, JPEG_MODE), (800, RAW_MODE)):
        out = tmp_path / f"smart{threshold}.beton"
        write_beton(ArrayImages(images, [0, 1, 0, 1]), ["a", "b"], out, dataset_name="arrays",
                    split="train", write_mode="smart", smart_threshold=threshold)
        assert (read_beton(out)[2] == expected_mode).all()


def test_max_resolution_shrinks_the_longest_side(tmp_path):
    rng = np.random.default_rng(0)
    images = np.stack([smooth_image(rng, 40, 60) for _ in range(3)])
    out = tmp_path / "small.beton"
    write_beton(ArrayImages(images, [0, 1, 0]), ["a", "b"], out, dataset_name="arrays",
                split="train", max_resolution=30)
    read_images, _, _ = read_beton(out)
    assert {image.shape for image in read_images} == {(20, 30, 3)}


# ------------------------------------------------------------------------------------------
# Determinism and subsets
# ------------------------------------------------------------------------------------------

def test_same_input_gives_identical_bytes_in_proportion_mode(tmp_path):
    rng = np.random.default_rng(1)
    images = np.stack([smooth_image(rng, 24, 24) for _ in range(300)])
    dataset = ArrayImages(images, np.arange(300) % 3)
    outputs = []
    for attempt, workers in enumerate((1, 1, 2)):
        out = tmp_path / f"run{attempt}.beton"
        write_beton(dataset, ["a", "b", "c"], out, dataset_name="arrays", split="train",
                    write_mode="proportion", compress_probability=0.5, num_workers=workers,
                    chunk_size=16)
        outputs.append(out)
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    # two workers may order ffcv's pages differently, but each sample is the same
    first, second = read_beton(outputs[0]), read_beton(outputs[2])
    assert np.array_equal(first[2], second[2])  # JPEG or raw: decided by the index alone
    assert 0.35 < (first[2] == JPEG_MODE).mean() < 0.65
    assert all(np.array_equal(a, b) for a, b in zip(first[0], second[0]))


def test_stratified_subset_is_deterministic_and_proportional():
    labels = np.repeat([0, 1, 2, 3], [500, 300, 150, 50])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    subset = stratified_subset(labels, 100)
    assert len(subset) == 100 == len(np.unique(subset))
    assert np.array_equal(subset, np.sort(subset))
    assert np.bincount(labels[subset]).tolist() == [50, 30, 15, 5]
    assert np.array_equal(subset, stratified_subset(labels.copy(), 100))
    # remainders: 7 images over 4 classes of shares .5/.3/.15/.05 -> 3.5, 2.1, 1.05, .35
    assert np.bincount(labels[stratified_subset(labels, 7)], minlength=4).tolist() == [4, 2, 1, 0]
    with pytest.raises(DatasetError, match="subset of 1001"):
        stratified_subset(labels, 1001)


def test_cli_subset_writes_a_balanced_subset(tmp_path, capsys):
    make_fashion_dir(tmp_path / "fashion", train_per_class=6)
    written = []
    for attempt in range(2):
        out = tmp_path / f"subset{attempt}.beton"
        code, stderr = run_cli(capsys, "--cfg.split=train", "--cfg.subset=30",
                               f"--cfg.data_dir={tmp_path / 'fashion'}", f"--cfg.write_path={out}")
        assert code == 0, stderr
        written.append(out)
    _, labels, _ = read_beton(written[0])
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
    assert read_classes(written[0])["num_samples"] == 30
    assert written[0].read_bytes() == written[1].read_bytes()


# ------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, nothing at write_path (the list
# of bad inputs, across every CLI, is tests/test_bad_input.py)
# ------------------------------------------------------------------------------------------

def test_skip_corrupt_skips_and_lists_the_files(tmp_path, capsys):
    broken = corrupt_folder(tmp_path / "train")
    _, expected = make_image_folder(tmp_path / "clean")
    out = tmp_path / "folder.beton"
    code, stderr = run_cli(capsys, "--cfg.dataset=imagefolder", "--cfg.split=train",
                           "--cfg.skip_corrupt=1", "--cfg.num_workers=2",
                           f"--cfg.data_dir={tmp_path / 'train'}", f"--cfg.write_path={out}")
    assert code == 0, stderr
    assert all(str(path) in stderr for path in broken)
    listed = Path(f"{out}.skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(path) for path in broken]
    _, labels, _ = read_beton(out)
    assert labels.tolist() == [label for _, label in expected]
    assert check_beton(out)["num_samples"] == len(expected)


def test_image_failing_during_the_write_leaves_nothing(tmp_path):
    """A file whose header reads but whose pixels do not: caught inside ffcv's worker."""
    rng = np.random.default_rng(0)
    good, cut = tmp_path / "good.png", tmp_path / "cut.jpg"
    save_image(good, smooth_image(rng, 30, 30))
    save_image(tmp_path / "whole.jpg", smooth_image(rng, 30, 30))
    data = (tmp_path / "whole.jpg").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out" / "mid.beton"
    with pytest.raises(DatasetError, match=f"cannot read image {cut}"):
        write_beton(ImageFiles([good, cut], [0, 1]), ["a", "b"], out,
                    dataset_name="imagefolder", split="train")
    assert_nothing_written(out)


class FloatImages:
    """A dataset ffcv's encoder rejects inside its worker process (float pixels)."""
    labels = np.zeros(4, dtype=np.int64)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return np.zeros((8, 8, 3), dtype=np.float32), 0

    def describe(self, index):
        return f"sample {index}"

    def largest_image_bytes(self, max_resolution=None):
        return 8 * 8 * 3


def test_dead_writer_worker_is_an_error_not_a_hang(tmp_path):
    out = tmp_path / "dead.beton"
    with pytest.raises(DatasetError, match="writer worker died"):
        write_beton(FloatImages(), ["a"], out, dataset_name="arrays", split="train")
    assert_nothing_written(out)


# Missing and empty data directories and corrupt images: tests/test_bad_input.py.
@pytest.mark.parametrize("case", ["unknown_dataset", "no_data_dir", "unknown_key",
                                  "write_path_with_both", "imagefolder_both", "bad_skip_flag", "subset_too_large",
                                  "corrupt_idx", "cifar_missing_batch", "inat_bad_json",
                                  "loose_images", "bad_num_workers"])
def test_bad_input_is_one_line(tmp_path, capsys, case):
    out = tmp_path / "out" / "x.beton"
    fashion = tmp_path / "fashion"
    make_fashion_dir(fashion)
    args = {
        "unknown_dataset": (["--cfg.dataset=imagenet21k", "--cfg.split=val"], "cfg.dataset"),
        "no_data_dir": (["--cfg.dataset=cifar100", "--cfg.split=val"], "cfg.data_dir"),
        "unknown_key": (["--cfg.dataset=cifar100", "--cfg.datadir=x"], "cfg.datadir"),
        "write_path_with_both": ([f"--cfg.data_dir={fashion}"], "cfg.write_path"),
        "imagefolder_both": (["--cfg.dataset=imagefolder", f"--cfg.data_dir={fashion}"],
                             "cfg.split"),
        "bad_skip_flag": (["--cfg.skip_corrupt=maybe", "--cfg.split=val"], "cfg.skip_corrupt"),
        "subset_too_large": ([f"--cfg.data_dir={fashion}", "--cfg.split=val",
                              "--cfg.subset=21"], "subset of 21"),
        "corrupt_idx": ([f"--cfg.data_dir={fashion}", "--cfg.split=val"], "t10k-images"),
        "cifar_missing_batch": (["--cfg.dataset=cifar10", "--cfg.split=train",
                                 f"--cfg.data_dir={tmp_path / 'cifar'}"], "data_batch_3"),
        "inat_bad_json": (["--cfg.dataset=inaturalist", "--cfg.split=val",
                           f"--cfg.data_dir={tmp_path / 'inat'}"], "val.json"),
        "loose_images": (["--cfg.dataset=imagefolder", "--cfg.split=val",
                          f"--cfg.data_dir={tmp_path / 'loose'}"], "no class folders"),
        "bad_num_workers": (["--cfg.num_workers=0", "--cfg.split=val"], "cfg.num_workers"),
    }
    argv, needle = args[case]
    if case == "corrupt_idx":
        (fashion / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    if case == "cifar_missing_batch":
        make_cifar10_dir(tmp_path / "cifar")
        (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3").unlink()
    if case == "inat_bad_json":
        make_inaturalist_tree(tmp_path / "inat")
        (tmp_path / "inat" / "val.json").write_text('{"images": [], ')
    if case == "loose_images":
        save_image(tmp_path / "loose" / "a.png", np.zeros((4, 4, 3), np.uint8))
    code, stderr = run_cli(capsys, *argv, f"--cfg.write_path={out}")
    assert_one_line_error(code, stderr, needle)
    assert_nothing_written(out)


def test_write_path_that_is_a_directory_is_refused(tmp_path, capsys):
    make_fashion_dir(tmp_path / "fashion")
    (tmp_path / "taken.beton").mkdir()
    code, stderr = run_cli(capsys, "--cfg.split=val", f"--cfg.data_dir={tmp_path / 'fashion'}",
                           f"--cfg.write_path={tmp_path / 'taken.beton'}")
    assert_one_line_error(code, stderr, "is a directory")
    assert not list((tmp_path / "taken.beton").iterdir())
    assert not (tmp_path / "taken.beton.classes.json").exists()


def test_help_lists_every_flag(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["write_datasets.py", "--help"])  # fastargs reads it
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("dataset", "split", "data_dir", "write_path", "max_resolution", "write_mode",
                "compress_probability", "jpeg_quality", "num_workers", "chunk_size", "subset",
                "skip_corrupt"):
        assert f"cfg.{key} " in out


# ------------------------------------------------------------------------------------------
# Sidecar and beton checks
# ------------------------------------------------------------------------------------------

@pytest.fixture
def small_beton(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    out = tmp_path / "small.beton"
    write_beton(ArrayImages(images, np.arange(40) % 4), list("abcd"), out,
                dataset_name="arrays", split="val")
    return out


def edit_sidecar(beton, **changes):
    path = Path(f"{beton}.classes.json")
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


def test_check_beton_accepts_a_good_beton(small_beton):
    assert check_beton(small_beton) == {"dataset": "arrays", "split": "val", "num_samples": 40,
                                        "num_classes": 4, "classes": ["a", "b", "c", "d"]}


def test_file_permissions_follow_the_umask(small_beton):
    umask = os.umask(0)
    os.umask(umask)
    for path in (small_beton, Path(f"{small_beton}.classes.json")):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("cut", ["inside_data", "inside_table", "header_only"])
def test_check_beton_finds_a_truncated_file(small_beton, cut):
    from ffcv.reader import Reader
    table_start = int(Reader(str(small_beton)).header["alloc_table_ptr"])
    size = {"inside_data": table_start - 100, "inside_table": table_start + 30,
            "header_only": 10}[cut]
    with open(small_beton, "r+b") as handle:
        handle.truncate(size)
    with pytest.raises(DatasetError, match="truncated"):
        check_beton(small_beton)


def test_check_beton_finds_a_corrupt_header(small_beton):
    from ffcv.types import HeaderType
    header = np.fromfile(small_beton, dtype=HeaderType, count=1)
    header["num_samples"] = 2 ** 40
    with open(small_beton, "r+b") as handle:
        handle.write(header.tobytes())
    with pytest.raises(DatasetError, match="claims 1099511627776 samples"):
        check_beton(small_beton)


def test_check_beton_finds_a_dropped_allocation_entry(small_beton):
    from ffcv.types import ALLOC_TABLE_TYPE
    with open(small_beton, "r+b") as handle:
        handle.truncate(small_beton.stat().st_size - ALLOC_TABLE_TYPE.itemsize)
    with pytest.raises(DatasetError, match="image data for 39 of 40"):
        check_beton(small_beton)


def test_check_beton_finds_sidecar_disagreements(small_beton):
    edit_sidecar(small_beton, num_samples=41)
    with pytest.raises(DatasetError, match="40 labels but small.beton.classes.json says 41"):
        check_beton(small_beton)
    edit_sidecar(small_beton, num_samples=40, num_classes=3, classes=["a", "b", "c"])
    with pytest.raises(DatasetError, match="labels 0..3 but .* lists 3 classes"):
        check_beton(small_beton)


def test_read_classes_errors(small_beton, tmp_path):
    with pytest.raises(DatasetError, match="class list not found"):
        read_classes(tmp_path / "other.beton")
    edit_sidecar(small_beton, classes=["a", "b"])
    with pytest.raises(DatasetError, match="num_classes is 4 but 2 class names"):
        read_classes(small_beton)
    Path(f"{small_beton}.classes.json").write_text("{not json")
    with pytest.raises(DatasetError, match="corrupt class list"):
        read_classes(small_beton)


def test_check_beton_rejects_a_file_that_is_not_a_beton(tmp_path):
    fake = tmp_path / "fake.beton"
    fake.write_bytes(b"\x07" * 4096)
    with pytest.raises(DatasetError, match="not an ffcv beton"):
        sidecar.inspect_beton(fake)


# ------------------------------------------------------------------------------------------
# The embedded default, end to end (about 20 s: 70,000 images)
# ------------------------------------------------------------------------------------------

def test_embedded_default_writes_both_fashion_mnist_splits(tmp_path):
    if not sources.FASHION_MNIST_DIR.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    result = subprocess.run([sys.executable, str(REPO / "write_datasets.py")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for split, count in (("train", 60000), ("val", 10000)):
        beton = tmp_path / "data" / f"fashion-mnist_{split}.beton"
        classes = check_beton(beton)
        assert classes["num_samples"] == count and classes["classes"] == FASHION_CLASSES
        labels = sidecar.inspect_beton(beton)
        assert np.bincount(labels).tolist() == [count // 10] * 10
