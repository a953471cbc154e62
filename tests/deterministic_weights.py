"""Weights and images fixed by a formula (no RNG): the same on every machine and library.

tests/data/make_model_reference.py feeds them to torchvision / timm to record reference
logits; tests/test_models.py feeds them to our models and compares.
"""
import math
import zlib

import torch

GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


def deterministic_tensor(name, shape):
    """A weight-like float64 tensor fixed by (name, shape): no RNG, same on every machine."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros((), dtype=torch.int64)
    # A golden-ratio (low-discrepancy) sequence in [-1, 1), offset per name: well spread,
    # exact in float64, and cheap on 28M values when computed in place.
    offset = zlib.crc32(name.encode()) / 2**32
    values = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    values.mul_(GOLDEN_FRACTION).add_(offset).frac_().mul_(2.0).sub_(1.0)
    if leaf == "running_mean":
        return values.mul_(0.1)
    if leaf == "running_var":
        return values.abs_().mul_(0.5).add_(1.0)
    if leaf == "bias":
        return values.mul_(0.1)
    if leaf == "weight" and len(shape) == 1:  # a norm layer's gain
        return values.mul_(0.2).add_(1.0)
    if leaf in ("layer_scale", "cls_token", "pos_embed"):
        return values.mul_(0.5)
    fan_in = values.numel() // shape[0]
    return values.mul_(math.sqrt(3.0 / fan_in))  # variance 1 / fan_in


def deterministic_state_dict(shapes):
    return {name: deterministic_tensor(name, tuple(shape)) for name, shape in shapes.items()}


def deterministic_images(size, batch=2):
    count = batch * 3 * size * size
    values = 2.0 * torch.frac(torch.arange(count, dtype=torch.float64) * GOLDEN_FRACTION) - 1.0
    return values.reshape(batch, 3, size, size)
