"""Model factory: every architecture the trainer can build, by name.

    model = create_model("resnet50", num_classes=1000, use_blurpool=True)
    optimizer = torch.optim.SGD(weight_decay_groups(model, 5e-5), lr=0.5, momentum=0.9)

ImageNet-size nets keep the state_dict names of their published reference (torchvision
for ResNets, DenseNet and ConvNeXt; timm for ViT), so official weights load with
strict=True; tests/data/<arch>_keys.txt holds those key lists and tests check our models
against them key by key (and against their logits on fixed weights).

Options:
- `dropout` (all): dropout on the pooled features right before the final linear layer
  (adds no state_dict key);
- `use_blurpool` (ResNets, ConvNeXt): blur before every strided conv with >= 16 input
  channels (see blurpool.py); an error for an architecture without such a conv;
- `drop_path` (all but DenseNet, which has no residual branch): stochastic depth, the
  rate rising linearly over the residual blocks from 0 to `drop_path`;
- `zero_init_residual` (ResNets), `img_size` (ViT): see create_model.
Every model has `forward_features(images) -> [B, D]`, the input of its final Linear (for
linear probes), and is built in float32 on the CPU. `eval_logits(model, inputs, amp_dtype)` is the
evaluation forward: the body under autocast, the final Linear in float32 (see there).
"""
from contextlib import nullcontext
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..param_groups import describe_weight_decay, weight_decay_groups
from . import cifar_resnet, convnext, densenet, resnet, vit
from .blurpool import apply_blurpool


class Architecture(NamedTuple):
    builder: Callable       # builder(num_classes, dropout=..., **extra_options) -> nn.Module
    description: str
    extra_options: frozenset  # options beyond dropout / use_blurpool that it takes


RESNET_OPTIONS = frozenset({"drop_path", "zero_init_residual"})
ARCHITECTURES = {
    "resnet18": Architecture(resnet.resnet18, "torchvision ResNet-18, 224 px ImageNet stem",
                             RESNET_OPTIONS),
    "resnet50": Architecture(resnet.resnet50, "torchvision ResNet-50 (v1.5), ImageNet stem",
                             RESNET_OPTIONS),
    "resnet18_cifar": Architecture(resnet.resnet18_cifar, "ResNet-18, 3x3 stride-1 stem, "
                                   "no max-pool (32 px)", RESNET_OPTIONS),
    "resnet50_cifar": Architecture(resnet.resnet50_cifar, "ResNet-50, 3x3 stride-1 stem, "
                                   "no max-pool (32 px)", RESNET_OPTIONS),
    "resnet8": Architecture(cifar_resnet.resnet8, "He et al. CIFAR ResNet-8, widths "
                            "16/32/64 (tiny: tests, demos)", RESNET_OPTIONS),
    "resnet20": Architecture(cifar_resnet.resnet20, "He et al. CIFAR ResNet-20, widths "
                             "16/32/64", RESNET_OPTIONS),
    "resnet32": Architecture(cifar_resnet.resnet32, "He et al. CIFAR ResNet-32, widths "
                             "16/32/64", RESNET_OPTIONS),
    "resnet56": Architecture(cifar_resnet.resnet56, "He et al. CIFAR ResNet-56, widths "
                             "16/32/64", RESNET_OPTIONS),
    "densenet121": Architecture(densenet.densenet121, "torchvision DenseNet-121 (>= 29 px)",
                                frozenset()),
    "convnext_tiny": Architecture(convnext.convnext_tiny, "torchvision ConvNeXt-Tiny",
                                  frozenset({"drop_path"})),
    "vit_small": Architecture(vit.vit_small, "timm vit_small_patch16_224 (ViT-S/16)",
                              frozenset({"drop_path", "img_size"})),
}

__all__ = ["ARCHITECTURES", "create_model", "count_parameters", "weight_decay_groups",
           "describe_weight_decay", "apply_blurpool", "final_linear", "eval_logits"]


def _check_options(arch, num_classes, dropout, drop_path):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")


def create_model(arch, num_classes, *, dropout=0.0, use_blurpool=False, drop_path=0.0,
                 zero_init_residual=False, img_size=None):
    """Build `arch` with a `num_classes`-way classifier, on CPU, in float32, train mode.

    zero_init_residual: ResNets only (gamma = 0 on each residual branch's last BN).
    img_size: ViT only, the input size its position embedding is built for (default 224);
    other sizes are still accepted at run time (the embedding is interpolated).
    An option the architecture does not have (set to a non-default value) is a ValueError.
    """
    _check_options(arch, num_classes, dropout, drop_path)
    architecture = ARCHITECTURES[arch]
    requested = {}  # the options set away from their defaults
    if drop_path != 0.0:
        requested["drop_path"] = drop_path
    if zero_init_residual:
        requested["zero_init_residual"] = True
    if img_size is not None:
        requested["img_size"] = img_size
    unsupported = sorted(set(requested) - architecture.extra_options)
    if unsupported:
        takes = ", ".join(["dropout", *sorted(architecture.extra_options)])
        raise ValueError(f"{arch} has no option {', '.join(unsupported)} (it takes: {takes})")
    model = architecture.builder(num_classes, dropout=dropout, **requested)
    if use_blurpool and not apply_blurpool(model):
        raise ValueError(f"use_blurpool: {arch} has no strided convolution with >= 16 "
                         "input channels to blur")
    return model


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters()
               if p.requires_grad or not trainable_only)


# Where each architecture keeps the Linear that turns forward_features into logits
# (ConvNeXt's `classifier` is LayerNorm, Flatten, Linear: its last module).
FINAL_LINEAR_ATTRIBUTES = ("fc", "head", "classifier")


def final_linear(model):
    """The nn.Linear with model(x) == final_linear(model)(forward_features(x)) in eval mode."""
    for name in FINAL_LINEAR_ATTRIBUTES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Sequential):
            module = module[-1]
        if isinstance(module, nn.Linear):
            return module
    raise TypeError(f"{type(model).__name__} has no final Linear named "
                    f"{' / '.join(FINAL_LINEAR_ATTRIBUTES)}")


def eval_logits(model, inputs, amp_dtype=None):
    """float32 logits of an eval-mode `model`: the body under autocast(amp_dtype) when
    given, the final Linear outside it, on float32 features.

    Under bfloat16 autocast the classifier's output is rounded to 8 significant bits: on
    Gaussian logits 3% of images then have an exact top-2 tie, and which class wins
    depends on the reader's tie rule. In float32 such ties all but vanish, for the price
    of one [B, D] x [D, C] product in float32."""
    autocast = (torch.autocast(inputs.device.type, dtype=amp_dtype) if amp_dtype
                else nullcontext())
    with autocast:
        features = model.forward_features(inputs)
    with torch.autocast(inputs.device.type, enabled=False):
        return final_linear(model)(features.float())
