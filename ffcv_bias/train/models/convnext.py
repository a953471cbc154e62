"""ConvNeXt-Tiny (Liu et al. 2022) with torchvision's module tree and state_dict names.

    features.0        stem: 4x4 stride-4 conv (features.0.0) + LayerNorm2d (features.0.1)
    features.1,3,5,7  stages of 3, 3, 9, 3 blocks at 96, 192, 384, 768 channels
    features.2,4,6    downsampling: LayerNorm2d (.0) + 2x2 stride-2 conv (.1)
    classifier        LayerNorm2d (classifier.0), Flatten (1), Linear (classifier.2)

A block (`features.1.0`) is: `block.0` depthwise 7x7 conv, `block.1` to channels-last,
`block.2` LayerNorm, `block.3` Linear to 4x width, `block.4` GELU, `block.5` Linear back,
`block.6` to channels-first; then it is scaled per channel by `layer_scale` (init 1e-6),
dropped by stochastic depth, and added to the block's input. Checked key by key against
tests/data/convnext_tiny_keys.txt.

`drop_path` (torchvision's `stochastic_depth_prob`, 0.1 in its ConvNeXt-T recipe; 0 here
unless asked) rises linearly from 0 on the first block to `drop_path` on the last.
`dropout` acts between the flattened features and the final Linear. `layer_scale` is
listed by `no_weight_decay()` (it is a per-channel gain, like a norm layer's weight).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .layers import DropPath, GlobalAvgPool, linear_drop_path_rates

LAYER_NORM_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (each pixel normalized on its own)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x):
        return x.permute(*self.dims)

    def extra_repr(self):
        return f"dims={self.dims}"


class ConvNeXtBlock(nn.Module):
    def __init__(self, channels, drop_path=0.0, layer_scale_init=1e-6):
        super().__init__()
        # Registered first so that it comes first in the state_dict, as in torchvision.
        self.layer_scale = nn.Parameter(torch.full((channels, 1, 1), layer_scale_init))
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels),
            Permute((0, 2, 3, 1)),
            nn.LayerNorm(channels, eps=LAYER_NORM_EPS),
            nn.Linear(channels, 4 * channels),
            nn.GELU(),
            nn.Linear(4 * channels, channels),
            Permute((0, 3, 1, 2)),
        )
        self.stochastic_depth = DropPath(drop_path)

    def forward(self, x):
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXt(nn.Module):
    def __init__(self, widths=(96, 192, 384, 768), depths=(3, 3, 9, 3), num_classes=1000, *,
                 dropout=0.0, drop_path=0.0):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, widths[0], kernel_size=4, stride=4),
                             LayerNorm2d(widths[0], eps=LAYER_NORM_EPS))
        stages = [stem]
        drop_path_rates = iter(linear_drop_path_rates(drop_path, sum(depths)))
        for stage_index, (width, depth) in enumerate(zip(widths, depths)):
            stages.append(nn.Sequential(*[ConvNeXtBlock(width, next(drop_path_rates))
                                          for _ in range(depth)]))
            if stage_index + 1 < len(widths):
                stages.append(nn.Sequential(
                    LayerNorm2d(width, eps=LAYER_NORM_EPS),
                    nn.Conv2d(width, widths[stage_index + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*stages)
        self.avgpool = GlobalAvgPool()
        self.classifier = nn.Sequential(LayerNorm2d(widths[-1], eps=LAYER_NORM_EPS),
                                        nn.Flatten(1),
                                        nn.Linear(widths[-1], num_classes))
        self.dropout = nn.Dropout(dropout)
        self._init_weights()

    def _init_weights(self):
        # N(0, 0.02). The reference recipes call trunc_normal_(std=0.02) with its default
        # bounds of +-2 in absolute value, i.e. 100 standard deviations: no truncation ever
        # happens, and normal_ is several times faster on 28M parameters.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self):
        return {name for name, _ in self.named_parameters() if name.endswith("layer_scale")}

    def forward_features(self, x):
        """Pooled, normalized, flattened features before the Linear: [B, 768] for Tiny."""
        pooled = self.avgpool(self.features(x))
        return self.classifier[1](self.classifier[0](pooled))

    def forward(self, x):
        return self.classifier[2](self.dropout(self.forward_features(x)))


def convnext_tiny(num_classes=1000, **kwargs):
    return ConvNeXt((96, 192, 384, 768), (3, 3, 9, 3), num_classes, **kwargs)
