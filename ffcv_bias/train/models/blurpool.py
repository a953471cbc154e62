"""BlurPool: low-pass filter the input of every strided convolution (anti-aliasing).

Zhang, "Making Convolutional Networks Shift-Invariant Again" (ICML 2019); ffcv-imagenet
trains its ResNets with it (`use_blurpool=1`) and it is part of the recipe that the
class-dependent-regularization paper reproduces.

What it does here (our own implementation, same recipe as ffcv-imagenet's):
- every `nn.Conv2d` with stride > 1 and at least 16 input channels (so not the RGB stem)
  first blurs its input with the fixed, normalized binomial filter [1,2,1] x [1,2,1] / 16,
  depthwise, stride 1, zero padding 1; then it runs the original strided convolution.
- the blurred conv is a subclass of `nn.Conv2d` (`BlurConv2d`) that keeps the conv's own
  `weight` / `bias` parameters and stores the filter as a NON-persistent buffer. So the
  state_dict keys are exactly those of the model without BlurPool: `layer2.0.conv2.weight`
  stays `layer2.0.conv2.weight` (ffcv-imagenet wraps the conv, which renames it to
  `...conv2.conv.weight` and adds a `...blur_filter` key). Weights trained with or without
  BlurPool (torchvision's included) load into either model with strict=True; the key
  mapping is the identity.
"""
import torch
import torch.nn.functional as F
from torch import nn

MIN_BLURRED_IN_CHANNELS = 16  # ffcv-imagenet's threshold: leaves the 3-channel stem alone


def binomial_blur_kernel(channels, dtype=torch.float32, device=None):
    """The depthwise [1,2,1] x [1,2,1] / 16 filter, shape [channels, 1, 3, 3]."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=dtype, device=device)
    kernel_2d = torch.outer(taps, taps) / 16.0
    return kernel_2d.expand(channels, 1, 3, 3).clone()


class BlurConv2d(nn.Conv2d):
    """A Conv2d that blurs its input (stride 1, depthwise, zero padding) before convolving."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kernel = binomial_blur_kernel(self.in_channels, self.weight.dtype, self.weight.device)
        self.register_buffer("blur_kernel", kernel, persistent=False)

    @classmethod
    def from_conv(cls, conv):
        """A BlurConv2d with `conv`'s hyper-parameters and (shared) parameters."""
        blurred = cls(conv.in_channels, conv.out_channels, conv.kernel_size,
                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      groups=conv.groups, bias=conv.bias is not None,
                      padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
        blurred.weight = conv.weight
        blurred.bias = conv.bias
        return blurred

    def forward(self, x):
        blurred = F.conv2d(x, self.blur_kernel.to(x.dtype), stride=1, padding=1,
                           groups=self.in_channels)
        return super().forward(blurred)


def should_blur(module):
    return (isinstance(module, nn.Conv2d) and not isinstance(module, BlurConv2d)
            and max(module.stride) > 1 and module.in_channels >= MIN_BLURRED_IN_CHANNELS)


def apply_blurpool(model):
    """Swap every strided conv with >= 16 input channels for its BlurConv2d, in place.

    Returns the names of the swapped convs (empty when the model has none). Idempotent.
    """
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if should_blur(child):
                setattr(parent, child_name, BlurConv2d.from_conv(child))
                swapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return swapped
