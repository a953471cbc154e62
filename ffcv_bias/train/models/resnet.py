"""ResNet-18/50 with torchvision's module tree and state_dict names, in plain PyTorch.

Names and shapes are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ...,
`layer2.0.downsample.0` (1x1 conv) / `layer2.0.downsample.1` (BatchNorm), `fc`), so
torchvision's checkpoints load with `strict=True`; tests/data/resnet{18,50}_keys.txt is the
published key list that tests compare against key by key. ResNet-50 is "v1.5" like
torchvision's: the stride of a bottleneck sits on its 3x3 conv, not on the first 1x1.

Extras, none of which adds a state_dict key:
- `dropout`: an `nn.Dropout` applied in `forward` between the pooled features and `fc`.
- `drop_path`: stochastic depth on each residual branch, rising linearly from 0 on the
  first block to `drop_path` on the last.
- `zero_init_residual`: the last BatchNorm of each residual branch starts at gamma = 0, so
  each block starts as the identity (Goyal et al. 2017). Off by default, as in torchvision.
- `stem="cifar"`: `resnet18_cifar` / `resnet50_cifar` for 32 px inputs: a 3x3 stride-1
  `conv1` and no max-pool (the usual CIFAR variant, e.g. in the data-diet paper); only
  `conv1.weight` changes shape ([64, 3, 3, 3]), every name stays.
"""
from torch import nn

from .layers import DropPath, GlobalAvgPool, linear_drop_path_rates


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1,
                     bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; used by ResNet-18/34."""
    expansion = 1

    def __init__(self, in_channels, width, stride=1, downsample=None, drop_path=0.0):
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def last_norm(self):
        return self.bn2

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; used by ResNet-50/101/152."""
    expansion = 4

    def __init__(self, in_channels, width, stride=1, downsample=None, drop_path=0.0):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def last_norm(self):
        return self.bn3

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + shortcut)


STAGE_WIDTHS = (64, 128, 256, 512)


class ResNet(nn.Module):
    def __init__(self, block, blocks_per_stage, num_classes=1000, *, stem="imagenet",
                 dropout=0.0, drop_path=0.0, zero_init_residual=False):
        super().__init__()
        if stem == "imagenet":   # 224 px: 7x7 stride-2 conv then max-pool, /4 before layer1
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":    # 32 px: keep full resolution into layer1
            self.conv1 = conv3x3(3, 64)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown ResNet stem {stem!r} (use 'imagenet' or 'cifar')")
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        drop_path_rates = iter(linear_drop_path_rates(drop_path, sum(blocks_per_stage)))
        in_channels = 64
        for stage_index, (width, num_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
            stride = 1 if stage_index == 0 else 2
            stage = self._make_stage(block, in_channels, width, num_blocks, stride,
                                     drop_path_rates)
            setattr(self, f"layer{stage_index + 1}", stage)
            in_channels = width * block.expansion

        self.avgpool = GlobalAvgPool()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights(zero_init_residual)

    @staticmethod
    def _make_stage(block, in_channels, width, num_blocks, stride, drop_path_rates):
        out_channels = width * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride),
                                       nn.BatchNorm2d(out_channels))
        blocks = [block(in_channels, width, stride, downsample, next(drop_path_rates))]
        for _ in range(1, num_blocks):
            blocks.append(block(out_channels, width, drop_path=next(drop_path_rates)))
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual):
        init_resnet_weights(self, zero_init_residual)

    def forward_features(self, x):
        """Pooled, flattened features before the classifier: [B, 512 * expansion]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.dropout(self.forward_features(x)))


def resnet18(num_classes=1000, **kwargs):
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, **kwargs)


def resnet50(num_classes=1000, **kwargs):
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, **kwargs)


def resnet18_cifar(num_classes=10, **kwargs):
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, stem="cifar", **kwargs)


def resnet50_cifar(num_classes=100, **kwargs):
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, stem="cifar", **kwargs)


def init_resnet_weights(model, zero_init_residual):
    """torchvision's init: He (fan_out) for convs, identity BN; Linear keeps its default.
    Shared by the ImageNet and the CIFAR ResNets."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_norm().weight)
