"""augment.decode=fast (ffcv_bias/data/fast_decode.py) against the exact path, on real JPEGs
written here: every subsampling, progressive, greyscale, CMYK, truncated.

The bounds: at DCT scale 1 the fast path must equal the exact path bit for bit. When it
decodes DCT-scaled (crop >= 2x the output), its image differs from the exact one by a mean
absolute difference (0-255 scale, per output image) below MAE_BOUND = 20, and the median
over an encoding's scaled crops stays below MEDIAN_MAE_BOUND = 10. Measured here (363
scaled crops): worst 18.9 and median 9.1 for the 4:1:1 file (chroma at 1/4 width), medians
2.3 (greyscale) to 4.9 (4:2:2) for the others. These test images are deliberately harsh:
4x4-pixel texture blocks, sharp-edged rectangles and pixel noise, where rounding the crop
to the scaled pixel grid (up to half an output pixel) and a scaled IDCT instead of an area
average differ most. On the bench's photo-like images the difference is far smaller
(BENCHMARKS.md, "Loader", Fidelity: at most 3.05 per cell).
"""
import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ffcv_bias.train import config as train_config
from ffcv_bias.record import runs
from ffcv_bias.data import fast_decode
from ffcv_bias.data.augment import sample_crop
from ffcv_bias.train.fastargs_strict import ConfigError
from ffcv_bias.data.loaders import create_train_loader, create_val_loader

MAE_BOUND = 20.0
MEDIAN_MAE_BOUND = 10.0
LOG_RATIO = (np.log(3 / 4), np.log(4 / 3))


@pytest.fixture(scope="module", autouse=True)
def extension_built():
    """These tests are about the extension: without it they fail, saying how to build it."""
    if fast_decode.region_decoder() is None:
        pytest.fail(f"fast decoder unavailable: {fast_decode.unavailable_reason()} "
                    f"(in a checkout: python setup.py build_ext --inplace)")


# ------------------------------------------------------------------------------------------
# Test images and their JPEG encodings
# ------------------------------------------------------------------------------------------

def make_image(height, width, seed):
    """A smooth gradient, flat rectangles with sharp edges, texture and mild noise:
    JPEG-realistic content, asymmetric (so that a flip shows)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([255 * cols / width, 255 * rows / height,
                      128 + 100 * np.sin(cols / 9 + rows / 23)], axis=-1)
    for _ in range(5):
        top, left = rng.integers(0, height), rng.integers(0, width)
        image[top:top + rng.integers(4, height // 2 + 5),
              left:left + rng.integers(4, width // 2 + 5)] = rng.uniform(0, 255, 3)
    coarse = rng.normal(0, 25, (height // 4 + 1, width // 4 + 1, 3))
    image += np.kron(coarse, np.ones((4, 4, 1)))[:height, :width]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def pil_jpeg(image, mode="RGB", **options):
    buffer = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def cv2_jpeg(image, sampling):
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                               [int(cv2.IMWRITE_JPEG_QUALITY), 90,
                                int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR), sampling])
    assert ok
    return encoded.tobytes()


ENCODINGS = {
    "4:2:0": lambda image: pil_jpeg(image, subsampling=2),
    "4:2:2": lambda image: pil_jpeg(image, subsampling=1),
    "4:4:4": lambda image: pil_jpeg(image, subsampling=0),
    "4:1:1": lambda image: cv2_jpeg(image, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411),
    "4:4:0": lambda image: cv2_jpeg(image, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440),
    "progressive 4:2:0": lambda image: pil_jpeg(image, subsampling=2, progressive=True),
    "greyscale": lambda image: pil_jpeg(image, mode="L"),
}
SIZES = [(375, 500), (333, 517), (97, 130), (40, 29)]


def as_array(blob):
    return np.frombuffer(blob, dtype=np.uint8).copy()


# ------------------------------------------------------------------------------------------
# The crop-resize functions themselves, on chosen rectangles
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resizers():
    fast, active = fast_decode.compile_crop_resizer("fast")
    exact, _ = fast_decode.compile_crop_resizer("exact")
    assert active
    return fast, exact


def rectangles(height, width, rng):
    """(top, left, crop_height, crop_width): the whole image, one touching each border,
    the corners, one smaller than an MCU (also one inside a single MCU), one starting on
    the MCU grid, and random ones."""
    h, w = max(1, height // 3), max(1, width // 3)
    chosen = [(0, 0, height, width),
              (0, width // 3, h, w), (height - h, width // 3, h, w),     # top, bottom
              (height // 3, 0, h, w), (height // 3, width - w, h, w),    # left, right
              (height - h, width - w, h, w),                             # bottom-right corner
              (min(17, height - 5), min(9, width - 3), 5, 3),            # < one MCU, across
              (min(1, height - 4), min(2, width - 4), 4, 4),             # inside one MCU
              (min(16, height - h), min(16, width - w), h, w)]           # on the MCU grid
    for _ in range(4):
        crop_h, crop_w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        chosen.append((rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1),
                       crop_h, crop_w))
    return [tuple(int(value) for value in rect) for rect in chosen]


def crop_both_ways(resizers, blob, height, width, rect, output):
    fast, exact = resizers
    temp = np.zeros(height * width * 3, np.uint8)
    fast_out = np.zeros((output, output, 3), np.uint8)
    exact_out = np.zeros((output, output, 3), np.uint8)
    status = fast(blob, temp, height, width, *rect, fast_out)
    exact(blob, temp, height, width, *rect, exact_out)
    return status, fast_out, exact_out


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_fast_matches_exact_on_every_rectangle(resizers, encoding):
    rng = np.random.default_rng(7)
    scaled_errors = []
    for seed, (height, width) in enumerate(SIZES):
        blob = as_array(ENCODINGS[encoding](make_image(height, width, seed)))
        for rect in rectangles(height, width, rng):
            for output in (16, 48, 160):
                status, fast_out, exact_out = crop_both_ways(resizers, blob, height, width,
                                                             rect, output)
                assert status == fast_decode.FAST_DECODED, (encoding, rect, status)
                denominator = fast_decode.scaled_crop(*rect, height, width, output, output)[0]
                if denominator == 1:  # the same pixels, resized the same way
                    assert np.array_equal(fast_out, exact_out), (encoding, height, width, rect,
                                                                  output)
                else:
                    error = np.abs(fast_out.astype(int) - exact_out).mean()
                    assert error < MAE_BOUND, (encoding, height, width, rect, output, error)
                    scaled_errors.append(error)
    assert len(scaled_errors) > 20  # the scaled path was exercised, not only scale 1
    assert np.median(scaled_errors) < MEDIAN_MAE_BOUND


def test_scale_is_the_coarsest_that_covers_the_output():
    # 375x500 image, 160 px output: crop sides decide the scale through the shorter ratio.
    assert fast_decode.scaled_crop(0, 0, 375, 500, 375, 500, 160, 160)[0] == 2
    assert fast_decode.scaled_crop(0, 0, 319, 500, 375, 500, 160, 160)[0] == 1
    assert fast_decode.scaled_crop(0, 0, 375, 500, 375, 500, 40, 40)[0] == 8
    assert fast_decode.scaled_crop(0, 0, 375, 500, 375, 500, 90, 90)[0] == 4
    # The scaled rectangle stays inside the scaled image (ceil(375 / 8) = 47 rows).
    denominator, y0, y1, x0, x1 = fast_decode.scaled_crop(7, 3, 368, 497, 375, 500, 40, 40)
    assert (denominator, y0, y1, x0, x1) == (8, 1, 47, 0, 63)


# ------------------------------------------------------------------------------------------
# Through the loaders, on a beton holding these JPEGs as they are
# ------------------------------------------------------------------------------------------

def write_jpeg_beton(path, entries, monkeypatch):
    """A beton whose images are the given JPEG bytes, unchanged: ffcv's writer re-encodes
    every image with OpenCV (always 4:2:0 baseline), so its encoder is swapped for a look-up
    of the bytes made for that image. entries: [(RGB array, JPEG bytes)]."""
    import ffcv.fields.rgb_image as rgb_image
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    by_pixels = {hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest(): blob
                 for image, blob in entries}
    monkeypatch.setattr(rgb_image, "encode_jpeg", lambda image, quality: as_array(
        by_pixels[hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()]))

    class Images:
        def __len__(self):
            return len(entries)

        def __getitem__(self, index):
            return entries[index][0], index % 4

    DatasetWriter(str(path), {"image": RGBImageField(write_mode="jpg"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Images())
    Path(f"{path}.classes.json").write_text(json.dumps(
        {"dataset": "test", "split": "train", "num_samples": len(entries), "num_classes": 4,
         "classes": ["a", "b", "c", "d"]}))
    return path


@pytest.fixture(scope="module")
def mixed_beton(tmp_path_factory):
    """Three images of every encoding, in three sizes: 21 JPEGs."""
    entries = []
    for encoding in sorted(ENCODINGS):
        for seed, (height, width) in enumerate([(375, 500), (201, 157), (97, 130)]):
            image = make_image(height, width, 100 + seed + 10 * len(entries))
            entries.append((image, ENCODINGS[encoding](image)))
    with pytest.MonkeyPatch.context() as patch:
        return write_jpeg_beton(tmp_path_factory.mktemp("mixed") / "mixed.beton", entries,
                                patch), entries


def one_epoch(path, *, decode, num_workers=1, epoch=0, resolution=48, **options):
    loader = create_train_loader(path, batch_size=7, resolution=resolution, seed=3,
                                 min_scale=0.08, num_workers=num_workers, decode=decode,
                                 **options)
    loader.set_epoch(epoch)
    images = torch.cat([batch.clone() for batch, _ in loader])
    return loader, loader.sample_order(), images


@pytest.fixture(scope="module")
def mixed_epochs(mixed_beton):
    """one_epoch of the mixed beton per (decode, workers), built once: each loader costs
    seconds of numba compilation, and several tests compare the same epochs."""
    path, _ = mixed_beton
    cache = {}

    def epoch_of(decode, num_workers=1):
        if (decode, num_workers) not in cache:
            cache[decode, num_workers] = one_epoch(path, decode=decode,
                                                   num_workers=num_workers)
        return cache[decode, num_workers]
    return epoch_of


def test_train_loader_fast_is_close_to_exact_with_the_same_crops_and_flips(mixed_beton,
                                                                          mixed_epochs):
    _, entries = mixed_beton
    _, order, exact = mixed_epochs("exact")
    fast_loader, fast_order, fast = mixed_epochs("fast")
    assert fast_loader.fast_decode_active and fast_loader.decode_fallbacks == {}
    assert np.array_equal(order, fast_order)
    scales = []
    for index, exact_image, fast_image in zip(order.tolist(), exact.int(), fast.int()):
        height, width = entries[index][0].shape[:2]
        top, left, crop_h, crop_w, _ = sample_crop(3, 0, index, height, width, 0.08, 1.0,
                                                   *LOG_RATIO)
        scales.append(fast_decode.scaled_crop(top, left, crop_h, crop_w, height, width,
                                              48, 48)[0])
        if scales[-1] == 1:  # a crop under 2x the output: the exact path's pixels
            assert torch.equal(fast_image, exact_image), index
        error = (fast_image - exact_image).abs().float().mean()
        assert error < MAE_BOUND, (index, float(error))
        # Same flip: the exact image mirrored is much further away than the exact image.
        mirrored = (fast_image - exact_image.flip(-1)).abs().float().mean()
        assert mirrored > 2 * error + 2, (index, float(error), float(mirrored))
    assert 1 in scales and max(scales) > 1  # both kinds of crop were seen


def test_same_batches_whatever_the_worker_count_in_both_modes(mixed_epochs):
    for decode in ("exact", "fast"):
        _, order_1, images_1 = mixed_epochs(decode, num_workers=1)
        _, order_2, images_2 = mixed_epochs(decode, num_workers=2)
        assert np.array_equal(order_1, order_2) and torch.equal(images_1, images_2), decode


def test_validation_centre_crop_fast_matches_exact(mixed_beton):
    path, _ = mixed_beton
    val_loaders = {decode: create_val_loader(path, batch_size=8, resolution=40,
                                             num_workers=1, decode=decode)
                   for decode in ("exact", "fast")}
    for resolution in (40, 160):  # 40 px: most crops DCT-scaled; 160 px: most at scale 1
        results = {}
        for decode, loader in val_loaders.items():
            loader.set_resolution(resolution)
            results[decode] = torch.cat([images.clone() for images, _ in loader]).int()
        assert loader.fast_decode_active and loader.decode_fallbacks == {}
        errors = (results["fast"] - results["exact"]).abs().float().mean(dim=(1, 2, 3))
        assert float(errors.max()) < MAE_BOUND
        if resolution == 160:
            assert int((errors == 0).sum()) >= 7  # the 97x130 ones at least: scale 1


# ------------------------------------------------------------------------------------------
# Fallbacks
# ------------------------------------------------------------------------------------------

def test_undecodable_images_fall_back_to_the_exact_path_and_are_counted(tmp_path,
                                                                        monkeypatch):
    normal = [make_image(120, 160, seed) for seed in range(5)]
    cmyk = [make_image(120, 160, 10 + seed) for seed in range(2)]
    truncated = make_image(120, 160, 20)
    entries = ([(image, ENCODINGS["4:2:0"](image)) for image in normal]
               + [(image, pil_jpeg(image, mode="CMYK")) for image in cmyk]
               + [(truncated, ENCODINGS["4:2:0"](truncated)[:3000])])
    path = write_jpeg_beton(tmp_path / "odd.beton", entries, monkeypatch)
    exact_loader, order, exact = one_epoch(path, decode="exact", resolution=32,
                                           drop_last=False)
    fast_loader, _, fast = one_epoch(path, decode="fast", resolution=32, drop_last=False)
    assert sorted(order.tolist()) == list(range(8))
    assert fast_loader.decode_fallbacks == {"colour space": 2, "libjpeg warning": 1}
    assert exact_loader.decode_fallbacks == {}
    # The truncated JPEG is decoded by the exact path: the same pixels as there. (CMYK
    # cannot be decoded to RGB by either path: ffcv's tjDecompress2 fails on it too.)
    truncated_at = order.tolist().index(7)
    assert torch.equal(fast[truncated_at], exact[truncated_at])
    # Counts accumulate over epochs.
    fast_loader.set_epoch(1)
    for _ in fast_loader:
        pass
    assert fast_loader.decode_fallbacks == {"colour space": 4, "libjpeg warning": 2}


def test_without_the_extension_fast_warns_once_and_decodes_exactly(mixed_beton, mixed_epochs,
                                                                   monkeypatch):
    path, _ = mixed_beton
    _, _, exact = mixed_epochs("exact")
    monkeypatch.setattr(fast_decode, "_library_state",
                        {"function": None, "problem": "test: extension hidden"})
    with pytest.warns(RuntimeWarning, match="test: extension hidden"):
        loader, order, fast = one_epoch(path, decode="fast")
    assert not loader.fast_decode_active
    assert torch.equal(fast, exact)


# ------------------------------------------------------------------------------------------
# The config key and the run record
# ------------------------------------------------------------------------------------------

def test_decode_key_keeps_old_run_ids_and_rejects_bad_values(tmp_path):
    from fixtures_datasets import placeholder_betons
    train, val = placeholder_betons(tmp_path, "fake", (100, 20), ["a", "b", "c"])
    args = [f"--data.train_dataset={train}", f"--data.val_dataset={val}"]
    default = train_config.resolve_config(args)
    assert default["augment"]["decode"] == "exact"
    assert train_config.DECODE_MODES == fast_decode.DECODE_MODES
    # A config from before the key existed has the same run_id as one saying 'exact'.
    old = json.loads(json.dumps(default))
    del old["augment"]["decode"]
    assert runs.run_id(old) == runs.run_id(default)
    fast = train_config.resolve_config(args + ["--augment.decode=fast"])
    assert runs.run_id(fast) != runs.run_id(default)
    with pytest.raises(ConfigError, match="augment.decode"):
        train_config.resolve_config(args + ["--augment.decode=turbo"])
