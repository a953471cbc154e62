"""Seeded crop/flip decoder and loaders: determinism, crop statistics, class-conditional crop."""
import gc
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ffcv_bias.data import ffcv_patches
from ffcv_bias.data.augment import sample_crop
from ffcv_bias.data.loaders import (BetonError, create_train_loader, create_val_loader, normalize,
                                    read_labels)
from ffcv_bias.train.config import read_class_min_scale

LOG_RATIO = (np.log(3 / 4), np.log(4 / 3))


def epoch_batches(path, *, epoch=0, seed=0, num_workers=1, batch_size=50, **options):
    """All (order, images, labels) of one epoch, copied out of the loader's buffers."""
    options.setdefault("min_scale", 0.25)
    loader = create_train_loader(path, batch_size=batch_size, resolution=32, seed=seed,
                                 num_workers=num_workers, **options)
    loader.set_epoch(epoch)
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(batch_images.clone())
        labels.append(batch_labels)
    return loader.sample_order(), torch.cat(images), torch.cat(labels)


def by_index(order, images):
    return {int(index): image for index, image in zip(order, images)}


def test_same_seed_same_batches_whatever_the_worker_count(tiny_fashion_betons):
    train, _ = tiny_fashion_betons
    order_a, images_a, labels_a = epoch_batches(train, num_workers=1)
    order_b, images_b, labels_b = epoch_batches(train, num_workers=2)
    assert np.array_equal(order_a, order_b)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    # Labels come out right (and are not clobbered by the loader's buffer reuse).
    assert np.array_equal(read_labels(train)[order_a], labels_a.numpy())


def test_augmentation_depends_on_sample_not_on_batch_or_order(tiny_fashion_betons):
    train, _ = tiny_fashion_betons
    order_a, images_a, _ = epoch_batches(train, batch_size=50)
    order_b, images_b, _ = epoch_batches(train, batch_size=64, seed=0)
    per_sample_a, per_sample_b = by_index(order_a, images_a), by_index(order_b, images_b)
    common = set(per_sample_a) & set(per_sample_b)
    assert len(common) > 500
    assert all(torch.equal(per_sample_a[i], per_sample_b[i]) for i in common)


def test_other_seed_or_epoch_gives_other_crops(tiny_fashion_betons):
    train, _ = tiny_fashion_betons
    order, images, _ = epoch_batches(train)
    for changed in ({"seed": 1}, {"epoch": 1}):
        other_order, other_images, _ = epoch_batches(train, **changed)
        assert not np.array_equal(order, other_order)
        same_sample = by_index(other_order, other_images)
        differing = sum(not torch.equal(image, same_sample[int(i)])
                        for i, image in zip(order, images) if int(i) in same_sample)
        assert differing > 0.8 * len(order)


def test_jpeg_and_raw_betons_decode(tiny_fashion_betons, tmp_path):
    from conftest import write_tiny_beton
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 10
    jpg = write_tiny_beton(tmp_path / "jpg.beton", images, labels, "train", write_mode="jpg")
    _, decoded, decoded_labels = epoch_batches(jpg, batch_size=16)
    assert decoded.shape == (32, 3, 32, 32) and decoded.dtype == torch.uint8
    assert decoded.is_contiguous(memory_format=torch.channels_last)
    assert set(decoded_labels.tolist()) <= set(range(10))


def test_loaders_share_one_compiled_decode_chain_and_leave_numbas_types_alone(tmp_path):
    """The JPEG decode chain is compiled once per process, not once per loader (patch 9);
    that needs patch 8: ffcv's memory manager used to flag numba's interned uint8[::1]
    read-only, changing its hash, and the chain's table of compiled signatures then failed
    with KeyError in the second loader's thread."""
    import numba
    from conftest import write_tiny_beton
    from ffcv_bias.data import fast_decode
    interned, its_hash = numba.uint8[::1], hash(numba.uint8[::1])
    images = np.random.default_rng(1).integers(0, 255, size=(24, 28, 28), dtype=np.uint8)
    jpg = write_tiny_beton(tmp_path / "jpg.beton", images, np.arange(24) % 10, "train",
                           write_mode="jpg")
    chain, _ = fast_decode.compile_crop_resizer("exact")
    _, first, _ = epoch_batches(jpg, batch_size=8)
    _, again, _ = epoch_batches(jpg, batch_size=8)           # a second loader, same seed
    _, other, _ = epoch_batches(jpg, batch_size=8, seed=1)
    val = create_val_loader(jpg, batch_size=8, resolution=28, crop_ratio=1.0, num_workers=1)
    assert sum(len(images) for images, _ in val) == 24
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert fast_decode.compile_crop_resizer("exact")[0] is chain
    assert len(chain.signatures) == 1          # one compile served all four loaders
    assert numba.uint8[::1] is interned and interned.mutable and hash(interned) == its_hash


def end_loader_threads():
    from warm_python import join_loader_threads
    join_loader_threads()
    gc.collect()


def test_a_loader_like_one_before_it_compiles_nothing(tiny_fashion_betons):
    """Patch 9 + FixedRows: once a train and a val loader were built and collected, a new
    pair with the same settings reuses all their compiled code (a trainer in a warm or
    long-lived process pays ffcv's pipeline compile once)."""
    from numba.core import event
    train, val = tiny_fashion_betons

    def one_epoch_each():
        images = [epoch_batches(train, batch_size=16)[1]]
        loader = create_val_loader(val, batch_size=16, resolution=28, crop_ratio=1.0,
                                   num_workers=1)
        images += [batch.clone() for batch, _ in loader]
        return images

    first = one_epoch_each()
    end_loader_threads()
    with event.install_recorder("numba:compile") as compiles:
        again = one_epoch_each()
    compiled = [ev.data["dispatcher"].py_func.__qualname__ for _, ev in compiles.buffer
                if ev.is_start]
    assert compiled == []
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_the_compile_memo_keys_on_code_and_closure_and_never_on_arrays():
    from ffcv.pipeline.compiler import Compiler
    ffcv_patches.apply()

    def add(amount):
        def adder(value):
            return value + amount
        return adder
    assert Compiler.compile(add(1)) is Compiler.compile(add(1))
    three, four = Compiler.compile(add(3)), Compiler.compile(add(4))
    assert three is not four and (three(1), four(1)) == (4, 5)
    table = np.array([10])
    before = Compiler.compile(add(table))
    assert before(1)[0] == 11
    table[0] = 20   # numba froze the first array's contents: a new closure must see 20
    assert Compiler.compile(add(table)) is not before and Compiler.compile(add(table))(1)[0] == 21


def test_stopping_early_ends_ffcvs_loader_thread(tiny_fashion_betons):
    from ffcv.loader.epoch_iterator import EpochIterator

    def loader_threads():
        return [t for t in threading.enumerate() if isinstance(t, EpochIterator)]
    end_loader_threads()
    loader = create_train_loader(tiny_fashion_betons[0], batch_size=8, resolution=28, seed=0,
                                 num_workers=1)
    for step, _ in enumerate(loader):
        if step == 1:
            break   # as the BatchNorm check does
    threads = loader_threads()
    for thread in threads:
        thread.join(timeout=5)
    assert threads and not any(thread.is_alive() for thread in threads)


def test_crop_area_stays_within_bounds_and_covers_them():
    height, width = 350, 400
    for min_scale, max_scale in ((0.08, 1.0), (0.5, 1.0), (0.3, 0.6), (1.0, 1.0)):
        crops = np.array([sample_crop(7, 3, index, height, width, min_scale, max_scale,
                                      *LOG_RATIO)[:4] for index in range(4000)])
        fraction = crops[:, 2] * crops[:, 3] / (height * width)
        tolerance = 0.01  # rounding of the crop side lengths to whole pixels
        assert fraction.min() >= min_scale - tolerance
        assert fraction.max() <= max_scale + tolerance
        assert fraction.min() <= min_scale + 0.03 and fraction.max() >= max_scale - 0.05
        top, left, crop_h, crop_w = crops.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + crop_h <= height).all() and (left + crop_w <= width).all()


def test_flip_is_a_fair_coin_and_crop_is_a_pure_function():
    flips = [sample_crop(0, 0, index, 28, 28, 0.08, 1.0, *LOG_RATIO)[4] for index in range(4000)]
    assert 0.45 < np.mean(flips) < 0.55
    assert sample_crop(3, 2, 17, 28, 28, 0.2, 1.0, *LOG_RATIO) == \
        sample_crop(3, 2, 17, 28, 28, 0.2, 1.0, *LOG_RATIO)


def test_class_conditional_crop_leaves_chosen_classes_uncropped(tiny_fashion_betons):
    train, _ = tiny_fashion_betons
    bounds = np.array([1.0] * 5 + [0.08] * 5)  # classes 0-4 never cropped
    order, images, labels = epoch_batches(train, class_min_scale=bounds, flip=False)
    whole = create_val_loader(train, batch_size=100, resolution=32, crop_ratio=1.0)
    whole_images = torch.cat([batch.clone() for batch, _ in whole])
    uncropped = labels < 5
    assert torch.equal(images[uncropped], whole_images[order[uncropped.numpy()]])
    cropped_same = [torch.equal(image, whole_images[index])
                    for image, index in zip(images[~uncropped], order[~uncropped.numpy()])]
    assert np.mean(cropped_same) < 0.1


def test_per_class_bounds_are_honoured_by_the_sampler():
    bounds = {0: 0.9, 1: 0.2}
    for label, low in bounds.items():
        fractions = [np.prod(sample_crop(0, 0, i, 300, 300, low, 1.0, *LOG_RATIO)[2:4]) / 300 ** 2
                     for i in range(2000)]
        assert min(fractions) >= low - 0.01


def test_class_min_scale_file_formats(tmp_path):
    (tmp_path / "b.txt").write_text("1.0\n0.5\n0.08\n")
    (tmp_path / "b.json").write_text("[1.0, 0.5, 0.08]")
    np.save(tmp_path / "b.npy", np.array([1.0, 0.5, 0.08]))
    for name in ("b.txt", "b.json", "b.npy"):
        assert np.allclose(read_class_min_scale(tmp_path / name, 3), [1.0, 0.5, 0.08])
    with pytest.raises(ValueError, match="3 values for 10 classes"):
        read_class_min_scale(tmp_path / "b.txt", 10)
    (tmp_path / "bad.txt").write_text("1.5\n0.5\n0.2\n")
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        read_class_min_scale(tmp_path / "bad.txt", 3)


def test_bad_crop_bounds_are_rejected(tiny_fashion_betons):
    train, _ = tiny_fashion_betons
    for low, high in ((0.0, 1.0), (0.5, 0.4), (0.2, 1.2)):
        with pytest.raises(ValueError, match="min_scale"):
            create_train_loader(train, batch_size=8, resolution=32, seed=0,
                                min_scale=low, max_scale=high)


def test_missing_and_truncated_betons_give_clear_errors(tiny_fashion_betons, tmp_path):
    with pytest.raises(BetonError, match="not found"):
        create_val_loader(tmp_path / "nope.beton", batch_size=8, resolution=28)
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(open(tiny_fashion_betons[1], "rb").read()[:300])
    with pytest.raises(BetonError, match="truncated or corrupt"):
        create_val_loader(truncated, batch_size=8, resolution=28)


def test_validation_loader_is_sequential_and_complete(tiny_fashion_betons):
    _, val = tiny_fashion_betons
    loader = create_val_loader(val, batch_size=64, resolution=28, crop_ratio=1.0)
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert np.array_equal(labels.numpy(), read_labels(val))  # 200 = 3 full batches + 8
    assert np.array_equal(loader.sample_order(), np.arange(200))


def test_normalize_gives_float_channels_last():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(images, "cpu")
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([(1 - .485) / .229, (1 - .456) / .224,
                                                         (1 - .406) / .225]), atol=1e-5)


def test_loader_does_not_change_torch_thread_count(tmp_path):
    # In a fresh process: importing ffcv and iterating a loader with 1 worker must leave
    # torch's thread count as the user set it.
    script = """
import torch
torch.set_num_threads(2)
import ffcv_bias.data.loaders as L
from ffcv.pipeline.compiler import Compiler
Compiler.set_num_threads(1)
print(torch.get_num_threads())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == "2"


def test_stage_grouping_terminates_on_jit_torch_jit():
    # ffcv issue 396: a JIT -> torch -> JIT chain looped forever in group_operations.
    class Node:
        def __init__(self, is_jitted):
            self.is_jitted = is_jitted

    nodes = [Node(True), Node(False), Node(True)]  # decode -> ToTorchImage -> normalize
    graph = SimpleNamespace(root_nodes={nodes[0]: "image"},
                            adjacency_list={nodes[0]: [nodes[1]], nodes[1]: [nodes[2]],
                                            nodes[2]: []},
                            node_to_id={node: i for i, node in enumerate(nodes)})
    assert ffcv_patches._group_operations(graph) == [[0], [1], [2]]


@pytest.mark.timeout(300)   # the failure this guards against is a hang
def test_an_error_in_ffcvs_loader_thread_is_raised_in_the_loop_not_a_hang(
        tiny_fashion_betons, monkeypatch):
    """Patch 7: the thread's exception ends the epoch and comes out of the iteration."""
    _, val = tiny_fashion_betons
    loader = create_val_loader(val, batch_size=8, resolution=28, crop_ratio=1.0,
                               num_workers=1)
    first = [images.clone() for images, _ in loader][0]   # a working loader ...
    calls = []

    def fail_on_the_third_batch(self, b_ix, *args):
        calls.append(b_ix)
        if b_ix == 2:
            raise ValueError("no room in the pinned buffer")
        return original(self, b_ix, *args)
    original = ffcv_patches._ORIGINAL_RUN_PIPELINE
    monkeypatch.setattr(ffcv_patches, "_ORIGINAL_RUN_PIPELINE", fail_on_the_third_batch)
    batches = []
    with pytest.raises(ffcv_patches.LoaderThreadError,
                       match="^ffcv's loader thread failed: ValueError: no room in the "
                             "pinned buffer$") as raised:
        for images, _ in loader:   # ... whose thread fails at the third batch
            batches.append(images.clone())
    assert isinstance(raised.value.__cause__, ValueError)
    assert len(batches) == 2 and torch.equal(batches[0], first) and calls == [0, 1, 2]
    monkeypatch.undo()
    assert len(list(loader)) == len(loader)   # the next epoch runs again


IMPORT_PROBE = """
import sys
{first}
import numba.typed, numba.typed.typeddict
import ffcv
from ffcv.fields import rgb_image
print(type(rgb_image.IMAGE_MODES).__name__, sorted(rgb_image.IMAGE_MODES.items()),
      numba.typed.Dict is numba.typed.typeddict.Dict)
"""


@pytest.mark.parametrize("first, table", [
    ("import ffcv_bias.data", "dict"),           # ours: the plain table, no numba compile
    ("", "Dict"),                                # ffcv imported alone: its typed Dict
    ("import ffcv; import ffcv_bias.data", "Dict"),   # too late to change: left alone
])
def test_ffcv_imports_without_compiling_its_image_mode_table(first, table):
    """ffcv's IMAGE_MODES is a plain dict with ffcv's own two entries once ffcv_bias.data
    is imported first, numba's typed Dict class is left as it was, and importing in the
    other order changes nothing. (That jpg and raw betons still decode:
    test_jpeg_and_raw_betons_decode.)"""
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(first=first)],
                         capture_output=True, text=True, check=True).stdout.split("\n")[-2]
    assert out == f"{table} [('jpg', 0), ('raw', 1)] True"
