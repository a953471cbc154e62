"""The CIFAR ResNets of He et al. 2016 (section 4.2): ResNet-8/20/32/56 for 28-32 px inputs.

Depth 6n + 2: a 3x3 stem with 16 channels, three stages of n basic blocks with widths
16 / 32 / 64 (strides 1, 2, 2), global average pooling, a linear classifier. The shortcut
that changes shape is the paper's option A: subsample by the stride and zero-pad the new
channels, so it has no parameters (ResNet-20 at 10 classes: 269,722 parameters, the
paper's "0.27M"). Module names follow torchvision's ResNet (`conv1`, `bn1`,
`layer1.0.conv1`, ..., `fc`), so the same tooling reads both.

28 px (Fashion-MNIST) gives 28 -> 14 -> 7 feature maps; 32 px gives 32 -> 16 -> 8.
"""
import torch.nn.functional as F
from torch import nn

from .layers import GlobalAvgPool, linear_drop_path_rates
from .resnet import BasicBlock, init_resnet_weights


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: keep every `stride`-th pixel, append zero channels."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        # F.pad pads the last dimensions first: (W left, W right, H top, H bottom, C front, C back)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self):
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


CIFAR_STAGE_WIDTHS = (16, 32, 64)


class CifarResNet(nn.Module):
    def __init__(self, depth, num_classes=10, *, dropout=0.0, drop_path=0.0,
                 zero_init_residual=False):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)

        drop_path_rates = iter(linear_drop_path_rates(drop_path, 3 * blocks_per_stage))
        in_channels = 16
        for stage_index, width in enumerate(CIFAR_STAGE_WIDTHS):
            stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_stage):
                block_stride = stride if block_index == 0 else 1
                shortcut = None
                if block_stride != 1 or in_channels != width:
                    shortcut = ZeroPadShortcut(in_channels, width, block_stride)
                blocks.append(BasicBlock(in_channels, width, block_stride, shortcut,
                                         next(drop_path_rates)))
                in_channels = width
            setattr(self, f"layer{stage_index + 1}", nn.Sequential(*blocks))

        self.avgpool = GlobalAvgPool()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        init_resnet_weights(self, zero_init_residual)

    def forward_features(self, x):
        """Pooled, flattened features before the classifier: [B, 64]."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.dropout(self.forward_features(x)))


def resnet8(num_classes=10, **kwargs):
    return CifarResNet(8, num_classes, **kwargs)


def resnet20(num_classes=10, **kwargs):
    return CifarResNet(20, num_classes, **kwargs)


def resnet32(num_classes=10, **kwargs):
    return CifarResNet(32, num_classes, **kwargs)


def resnet56(num_classes=10, **kwargs):
    return CifarResNet(56, num_classes, **kwargs)
