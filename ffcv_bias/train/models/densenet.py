"""DenseNet-121 (Huang et al. 2017) with torchvision's module tree and state_dict names.

`features` holds conv0 / norm0 / relu0 / pool0, then denseblock1..4 (6, 12, 24, 16 layers)
with transition1..3 between them, then norm5; `classifier` is the Linear. Each dense layer
is BN-ReLU-conv1x1 (to bn_size * growth_rate = 128 channels) then BN-ReLU-conv3x3 (to
growth_rate = 32 channels), and its output is concatenated to everything before it in the
block. Names (`features.denseblock1.denselayer1.norm1`, `features.transition1.conv`, ...)
match torchvision's, checked key by key against tests/data/densenet121_keys.txt.

DenseNet has no residual branch: `drop_path` is not an option here. `dropout` acts on the
pooled features before `classifier`.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .layers import global_avg_pool


class DenseLayer(nn.Module):
    def __init__(self, in_channels, growth_rate, bn_size):
        super().__init__()
        bottleneck_channels = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bottleneck_channels, growth_rate, kernel_size=3, padding=1,
                               bias=False)

    def forward(self, concatenated_inputs):
        out = self.conv1(self.relu1(self.norm1(concatenated_inputs)))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.Module):
    """`num_layers` DenseLayers; each sees the block input and all earlier layer outputs."""

    def __init__(self, num_layers, in_channels, growth_rate, bn_size):
        super().__init__()
        for index in range(num_layers):
            layer = DenseLayer(in_channels + index * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{index + 1}", layer)

    def forward(self, x):
        features = x
        for layer in self.children():
            features = torch.cat([features, layer(features)], dim=1)
        return features


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (halves the channels), then 2x2 average pooling (halves H and W)."""

    def __init__(self, in_channels, out_channels):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_channels)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
        ]))


class DenseNet(nn.Module):
    def __init__(self, layers_per_block=(6, 12, 24, 16), num_classes=1000, *, growth_rate=32,
                 stem_channels=64, bn_size=4, dropout=0.0):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3,
                                bias=False)),
            ("norm0", nn.BatchNorm2d(stem_channels)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        channels = stem_channels
        for block_index, num_layers in enumerate(layers_per_block):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size)
            self.features.add_module(f"denseblock{block_index + 1}", block)
            channels += num_layers * growth_rate
            if block_index != len(layers_per_block) - 1:
                transition = Transition(channels, channels // 2)
                self.features.add_module(f"transition{block_index + 1}", transition)
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def smallest_map_side(self, input_side):
        """Side of the last feature map for an input side (stem /4, each transition /2)."""
        side = (input_side - 1) // 2 + 1          # conv0: 7x7, stride 2, padding 3
        side = (side - 1) // 2 + 1                # pool0: 3x3, stride 2, padding 1
        num_transitions = sum(1 for name, _ in self.features.named_children()
                              if name.startswith("transition"))
        return side // 2 ** num_transitions       # each transition: 2x2 average pool

    def forward_features(self, x):
        """Pooled, flattened features before the classifier: [B, 1024] for DenseNet-121."""
        if self.smallest_map_side(min(x.shape[-2:])) < 1:  # e.g. 28 px: 14, 7, 3, 1, 0
            raise ValueError(f"input {tuple(x.shape[-2:])} is too small for DenseNet: the "
                             "last transition would pool a 1x1 map (use >= 29 px)")
        x = F.relu(self.features(x))  # norm5 is not followed by a ReLU inside `features`
        return global_avg_pool(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.dropout(self.forward_features(x)))


def densenet121(num_classes=1000, **kwargs):
    return DenseNet((6, 12, 24, 16), num_classes, **kwargs)
