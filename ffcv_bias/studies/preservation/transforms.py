"""The label-preservation study's transforms (crop strengths, CutOut, colour jitter) and
their seeded per-image random numbers, in torch: a pure function of (seed, draw, index)."""
import numpy as np
import torch
from numba import njit

from ffcv_bias.data.augment import sample_key, uniform
from ffcv_bias.data.loaders import IMAGENET_MEAN, IMAGENET_STD


DEFAULT_SETTINGS = {
    "crop": (1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.08),   # area fraction kept
    "cutout": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),       # side of the removed square
    "jitter": (0.0, 0.2, 0.4, 0.6, 0.8, 0.9),                 # colour-jitter strength
}
# The setting of each transform that leaves the image as it is.
IDENTITY = {"crop": 1.0, "cutout": 0.0, "jitter": 0.0}
TRANSFORMS = tuple(DEFAULT_SETTINGS)
DEFAULT_LOSS_THRESHOLD = 0.5
# Offsets of the per-sample uniform draws used by cutout and jitter (the crop decoder uses
# draws 0-22 of the same (seed, draw, index) key; these never mix with it).
_CUTOUT_DRAWS = 100
_JITTER_DRAWS = 102
# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)

# ----------------------------------------------------------------------------------------
# Seeded per-image random numbers and the transforms, in torch
# ----------------------------------------------------------------------------------------

@njit(cache=False)
def _per_image_uniforms(seed, draw, indices, first, count):
    """uniform[i, j] = the (first + j)-th draw of image indices[i]: f(seed, draw, index)."""
    out = np.empty((len(indices), count))
    for row in range(len(indices)):
        key = sample_key(seed, draw, indices[row])
        for column in range(count):
            out[row, column] = uniform(key, first + column)
    return out


def per_image_uniforms(seed, draw, indices, first, count, device):
    values = _per_image_uniforms(np.int64(seed), np.int64(draw),
                                 np.ascontiguousarray(indices, dtype=np.int64), first, count)
    return torch.from_numpy(values).to(device=device, dtype=torch.float32)


def cutout(normalized, side_fraction, uniforms):
    """Zero (= the dataset mean) a square of side `side_fraction` x the image side, placed
    uniformly inside each image; uniforms: [B, 2] (row, column)."""
    batch, _, height, width = normalized.shape
    side = int(round(side_fraction * min(height, width)))
    if side == 0:
        return normalized
    top = (uniforms[:, 0] * (height - side + 1)).long()
    left = (uniforms[:, 1] * (width - side + 1)).long()
    rows = torch.arange(height, device=normalized.device)
    columns = torch.arange(width, device=normalized.device)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + side)
    in_columns = (columns[None, :] >= left[:, None]) & (columns[None, :] < left[:, None] + side)
    mask = in_rows[:, None, :, None] & in_columns[:, None, None, :]
    return normalized.masked_fill(mask, 0.0)


def _luma(images):
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def color_jitter(images, strength, uniforms):
    """Brightness, contrast, saturation jitter of `strength` on float images in [0, 255];
    uniforms: [B, 3], one factor each, uniform in [max(0, 1 - s), 1 + s]."""
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    factors = (low + (high - low) * uniforms).view(-1, 3, 1, 1, 1).unbind(dim=1)
    brightness, contrast, saturation = factors
    images = (images * brightness).clamp(0, 255)
    mean_luma = _luma(images).mean(dim=(1, 2, 3), keepdim=True)
    images = (mean_luma + (images - mean_luma) * contrast).clamp(0, 255)
    luma = _luma(images)
    return (luma + (images - luma) * saturation).clamp(0, 255)


_STATS = {}


def normalize_float(images):
    """Float images in [0, 255] -> ImageNet-normalized, channels_last."""
    key = images.device
    if key not in _STATS:
        mean = torch.tensor(IMAGENET_MEAN, device=key).view(1, 3, 1, 1)
        inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=key).view(1, 3, 1, 1)
        _STATS[key] = (mean, inv_std)
    mean, inv_std = _STATS[key]
    return ((images - mean) * inv_std).contiguous(memory_format=torch.channels_last)
