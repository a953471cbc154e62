"""Small building blocks shared by several architectures (none of them holds parameters)."""
import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch for whole samples.

    In training, each sample's branch output is zeroed with probability `drop_prob` and the
    kept ones are scaled by 1 / (1 - drop_prob), so the expected output is unchanged and
    evaluation needs no rescaling. With `drop_prob == 0` (or in eval mode) it is the identity.
    """

    def __init__(self, drop_prob=0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, branch):
        if self.drop_prob == 0.0 or not self.training:
            return branch
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (branch.shape[0],) + (1,) * (branch.dim() - 1)
        keep_mask = torch.empty(mask_shape, dtype=branch.dtype, device=branch.device)
        keep_mask.bernoulli_(keep_prob)
        return branch * keep_mask / keep_prob

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


def linear_drop_path_rates(max_rate, num_blocks):
    """Per-block stochastic-depth rates rising linearly from 0 (first) to max_rate (last)."""
    if num_blocks == 1:
        return [0.0]
    return [max_rate * index / (num_blocks - 1) for index in range(num_blocks)]


def global_avg_pool(x):
    """[B, C, H, W] -> [B, C, 1, 1], the mean over each feature map.

    On CUDA under torch.use_deterministic_algorithms (training.deterministic=1) it is a
    mean, whose backward is deterministic: adaptive_avg_pool2d's CUDA backward has no
    deterministic kernel and would stop such a run with an error. Everywhere else it is
    adaptive_avg_pool2d, bit for bit what every run recorded so far computed."""
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return x.mean(dim=(2, 3), keepdim=True)
    return nn.functional.adaptive_avg_pool2d(x, 1)


class GlobalAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d(1) that stays usable in deterministic CUDA runs."""

    def forward(self, x):
        return global_avg_pool(x)
