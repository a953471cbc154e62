"""Train and validation FFCV loaders, seeded per run and epoch, working with or without CUDA.

    train = create_train_loader('data/fashion-mnist_train.beton', batch_size=128,
                                resolution=32, seed=run_seed, min_scale=0.25)
    for epoch in range(epochs):
        train.set_epoch(epoch)          # order AND crops of this epoch: f(seed, epoch)
        for images, labels in train:     # images: uint8 [B,3,H,W] channels_last, reused!
            x = normalize(images, device)  # float, on device

Pipelines end in torch (uint8 NCHW channels-last tensors); normalization happens in
`normalize`, in the training step. That keeps the pipeline JIT -> torch (no JIT stage
after a torch stage: upstream issue 396, and no cupy on CPU) and costs nothing on a GPU,
where the float conversion runs on the device.

On CUDA (`device=` a CUDA device) the pipelines copy each batch to the GPU themselves
(ffcv's ToDevice after ToTensor, as ffcv-imagenet does), on the batch slot's own stream
right after decoding: the loader then yields GPU tensors. Copying later, in the training
step, would read ffcv's pinned host buffer asynchronously on the compute stream, behind
the queued steps, while the loader thread is already decoding a later batch into that
same buffer: a step could see another batch's pixels with this batch's labels.
`ffcv_patches` also makes the loader thread wait for a slot's copy before reusing its
host buffer. On CPU the pipelines are unchanged.

The loaders reuse their batch buffers: an image tensor yielded here is overwritten a few
batches later. Labels are copied before they are yielded; images are not (too costly):
`.clone()` what you keep.
"""
from pathlib import Path

import numpy as np
import torch

from ffcv_bias.data import ffcv_patches

ffcv_patches.apply()

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402

from ffcv_bias.data.augment import (CenterCropDecoder, SeededRandomResizedCropDecoder,  # noqa: E402
                                    per_sample_min_scale)

# ImageNet statistics on the 0-255 scale, as in ffcv-imagenet.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
DEFAULT_CROP_RATIO = 224 / 256


class BetonError(ValueError):
    """A missing, truncated or corrupt beton: the message names the file."""


def open_reader(path):
    """ffcv's Reader with a one-line error instead of a numpy traceback on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise BetonError(f"beton not found: {path}")
    try:
        reader = Reader(str(path))
    except Exception as error:
        raise BetonError(f"cannot read beton {path} (truncated or corrupt?): "
                         f"{type(error).__name__}: {error}") from None
    if "image" not in reader.handlers or "label" not in reader.handlers:
        raise BetonError(f"beton {path} has fields {list(reader.handlers)}; "
                         f"expected 'image' and 'label'")
    return reader


def read_labels(path):
    """All labels of a beton, in its order, straight from its metadata (no decoding)."""
    reader = open_reader(path)
    field_index = list(reader.handlers).index("label")
    return np.asarray(reader.metadata[f"f{field_index}"], dtype=np.int64).reshape(-1).copy()


class SeededLoader:
    """An ffcv Loader whose sample order and augmentation are functions of (seed, epoch).

    ffcv's Loader advances its own epoch counter at every `iter()`; here the caller says
    which epoch it is (`set_epoch`), so a resumed run sees exactly the order and crops the
    uninterrupted run saw.
    """

    def __init__(self, loader, crop_decoder=None, resolution_decoder=None):
        self.loader = loader
        self.crop_decoder = crop_decoder
        self.resolution_decoder = resolution_decoder or crop_decoder
        self.epoch = 0

    @property
    def decode_fallbacks(self):
        """{reason: images} the fast decoder handed to the exact path so far (augment.decode
        =fast; empty when none, or in exact mode)."""
        return self.resolution_decoder.fallback.fallbacks

    @property
    def fast_decode_active(self):
        """True when images are decoded the fast way (asked for, and the extension loads);
        known once the loader has compiled its pipeline (its first batch)."""
        return self.resolution_decoder.fallback.fast_active

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def set_resolution(self, resolution):
        """Output resolution from the next epoch on (progressive resizing; no recompile)."""
        self.resolution_decoder.output_size = (int(resolution), int(resolution))

    @property
    def resolution(self):
        return self.resolution_decoder.output_size[0]

    @property
    def num_samples(self):
        return len(self.loader.indices)

    def sample_order(self):
        """Dataset indices this process sees in the current epoch, in yield order."""
        order = self.loader.traversal_order.sample_order(self.epoch)
        if self.loader.drop_last:
            order = order[:len(self) * self.loader.batch_size]
        return np.asarray(order, dtype=np.int64)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.loader.next_epoch = self.epoch
        if self.crop_decoder is not None:
            self.crop_decoder.set_epoch(self.epoch)
        batches = iter(self.loader)
        try:
            for images, labels in batches:
                yield images, labels.clone()
        finally:
            # A consumer that stops early (the BatchNorm check reads a few batches) would
            # leave ffcv's loader thread offering the next batch forever, holding the loader
            # and its buffers; after a whole epoch the thread has ended and this is a no-op.
            batches.terminate_event.set()


def _to_device_ops(device):
    """[ToDevice] for a CUDA device, [] for the CPU (or None): where the copy to the GPU
    sits in a pipeline, right after ToTensor (see the module docstring)."""
    if device is None or torch.device(device).type != "cuda":
        return []
    return [ToDevice(torch.device(device), non_blocking=True)]


def _label_pipeline(device=None):
    return [IntDecoder(), ToTensor(), Squeeze(1)] + _to_device_ops(device)


def _image_tail(device=None):
    return [ToTensor()] + _to_device_ops(device) + [ToTorchImage(channels_last=True)]


def create_train_loader(path, *, batch_size, resolution, seed, min_scale=0.08, max_scale=1.0,
                        ratio=(3 / 4, 4 / 3), flip=True, class_min_scale=None, num_workers=2,
                        distributed=False, indices=None, in_memory=True, drop_last=True,
                        batches_ahead=3, device=None, decode="exact"):
    """Training loader: random order seeded by (seed, epoch), seeded crop + flip.
    `device`: a CUDA device makes it yield tensors already on that GPU. `decode`: 'exact'
    (full JPEG decode, then resize) or 'fast' (decode the crop only; augment.decode).

    `class_min_scale`: None, or a vector of per-class lower bounds (looked up through each
    sample's label; 1.0 = that class is never cropped). `indices`: train on a subset.
    """
    open_reader(path)
    sample_bounds = None
    if class_min_scale is not None:
        sample_bounds = per_sample_min_scale(read_labels(path), class_min_scale)
    decoder = SeededRandomResizedCropDecoder((resolution, resolution), seed=seed,
                                             min_scale=min_scale, max_scale=max_scale,
                                             ratio=ratio, flip=flip,
                                             sample_min_scale=sample_bounds, decode=decode)
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                    order=OrderOption.RANDOM, os_cache=in_memory, distributed=distributed,
                    seed=int(seed), indices=None if indices is None else np.asarray(indices),
                    drop_last=drop_last, batches_ahead=batches_ahead,
                    pipelines={"image": [decoder] + _image_tail(device),
                               "label": _label_pipeline(device)})
    return SeededLoader(loader, crop_decoder=decoder)


def create_val_loader(path, *, batch_size, resolution, crop_ratio=DEFAULT_CROP_RATIO,
                      num_workers=2, distributed=False, in_memory=True, batches_ahead=3,
                      device=None, decode="exact"):
    """Validation loader: beton order, centre crop of `crop_ratio` of the short side, no drop.
    `decode` as in create_train_loader ('exact' is ffcv's CenterCropRGBImageDecoder)."""
    open_reader(path)
    decoder = CenterCropDecoder((resolution, resolution), ratio=crop_ratio, decode=decode)
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                    order=OrderOption.SEQUENTIAL, os_cache=in_memory, distributed=distributed,
                    seed=0, drop_last=False, batches_ahead=batches_ahead,
                    pipelines={"image": [decoder] + _image_tail(device),
                               "label": _label_pipeline(device)})
    return SeededLoader(loader, resolution_decoder=decoder)


_NORMALIZERS = {}


def normalize(images, device, channels_last=True, dtype=torch.float32):
    """uint8 [B,3,H,W] -> normalized float on `device` (ImageNet mean/std, 0-255 scale).

    The loaders built with a CUDA device yield GPU tensors, so `.to` below is a no-op and
    this is a device-side float conversion; a CPU tensor given for a CUDA device is copied
    synchronously (its host buffer may be reused by the loader right after this returns)."""
    device = torch.device(device)
    key = (device, dtype)
    if key not in _NORMALIZERS:
        mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        _NORMALIZERS[key] = (mean, 1.0 / std)
    mean, inv_std = _NORMALIZERS[key]
    images = images.to(device, non_blocking=False)
    out = (images.float() - mean) * inv_std
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(dtype)
