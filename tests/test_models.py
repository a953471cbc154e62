"""Models: published state_dict names and shapes, parameter counts, outputs equal to the
reference implementations, BlurPool, dropout / drop path, weight-decay groups, and one
CPU training step per architecture (channels_last).

tests/data/<arch>_keys.txt are the state_dict key lists of torchvision 0.29.2 / timm
1.0.31; tests/data/model_reference_logits.json holds those libraries' logits for weights
and images made by tests/deterministic_weights.py (see make_model_reference.py there).
"""
import functools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deterministic_weights import deterministic_images, deterministic_state_dict
from ffcv_bias.train.models import (ARCHITECTURES, apply_blurpool, count_parameters,
                                    create_model, describe_weight_decay, weight_decay_groups)
from ffcv_bias.train.models.blurpool import BlurConv2d
from ffcv_bias.train.models.layers import DropPath

DATA_DIR = Path(__file__).parent / "data"
PUBLISHED_ARCHS = ["resnet18", "resnet50", "densenet121", "convnext_tiny", "vit_small"]
RESNETS = ["resnet18", "resnet50", "resnet18_cifar", "resnet50_cifar",
           "resnet8", "resnet20", "resnet32", "resnet56"]


# ---------------------------------------------------------------------------- helpers

def read_key_list(arch):
    """{state_dict key: shape} from tests/data/<arch>_keys.txt, in file order."""
    shapes = {}
    for line in (DATA_DIR / f"{arch}_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = tuple(json.loads(shape))
    return shapes


@functools.lru_cache(maxsize=None)
def published_model(arch):
    """A 1000-class model, built once per session; tests must not modify it."""
    return create_model(arch, 1000)


# ------------------------------------------------------- published names, counts, outputs

@pytest.mark.parametrize("arch", PUBLISHED_ARCHS)
def test_state_dict_keys_and_shapes_match_published_list(arch):
    ours = [(key, tuple(value.shape)) for key, value in published_model(arch).state_dict().items()]
    published = list(read_key_list(arch).items())
    missing = sorted(set(k for k, _ in published) - set(k for k, _ in ours))
    unexpected = sorted(set(k for k, _ in ours) - set(k for k, _ in published))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert ours == published  # same order, same shapes


@pytest.mark.parametrize("arch,use_blurpool", [(arch, False) for arch in PUBLISHED_ARCHS]
                         + [("resnet50", True)])
def test_published_state_dict_loads_strict(arch, use_blurpool):
    """A state_dict with exactly the published keys and shapes loads, every value lands."""
    published = read_key_list(arch)
    state_dict = {key: torch.full(shape, float(index)) for index, (key, shape)
                  in enumerate(published.items())}  # num_batches_tracked becomes an int
    model = create_model(arch, 1000, use_blurpool=use_blurpool)
    model.load_state_dict(state_dict, strict=True)
    for index, (key, value) in enumerate(model.state_dict().items()):
        assert torch.all(value == index), key


@pytest.mark.parametrize("arch,num_classes,expected", [
    ("resnet18", 1000, 11_689_512),        # torchvision's published counts
    ("resnet50", 1000, 25_557_032),
    ("densenet121", 1000, 7_978_856),
    ("convnext_tiny", 1000, 28_589_128),
    ("vit_small", 1000, 22_050_664),       # timm vit_small_patch16_224
    ("resnet20", 10, 269_722),             # He et al. 2016: "0.27M"
    ("resnet32", 10, 464_154),             # "0.46M"
    ("resnet56", 10, 853_018),             # "0.85M"
    ("resnet18_cifar", 10, 11_173_962),    # the common CIFAR ResNet-18
    ("resnet50_cifar", 100, 23_705_252),
])
def test_parameter_counts(arch, num_classes, expected):
    model = published_model(arch) if num_classes == 1000 else create_model(arch, num_classes)
    assert count_parameters(model) == expected


def reference_cases():
    """The recorded cases, one pytest param per model (arch + options): a list of cases."""
    cases = json.loads((DATA_DIR / "model_reference_logits.json").read_text())["cases"]
    grouped = {}
    for case in cases:
        key = (case["arch"], case["num_classes"], json.dumps(case["model_options"]))
        grouped.setdefault(key, []).append(case)
    return [pytest.param(group, id=arch) for (arch, _, _), group in grouped.items()]


@pytest.mark.parametrize("cases", reference_cases())
def test_outputs_equal_reference_implementation(cases):
    """Same weights, same images -> the same logits as torchvision / timm (float64)."""
    first = cases[0]
    model = create_model(first["arch"], first["num_classes"], **first["model_options"])
    model = model.double().eval()
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    model.load_state_dict(deterministic_state_dict(shapes), strict=True)
    for case in cases:
        with torch.no_grad():
            logits = model(deterministic_images(case["input_size"]))
        expected = torch.tensor(case["logits"], dtype=torch.float64)
        # atol 1e-9 (exact up to summation order) except where timm resizes pos_embed in
        # float32 (1e-6); the logits themselves are of order 1.
        torch.testing.assert_close(logits, expected, rtol=0, atol=case["atol"],
                                   msg=f"{case['arch']} at {case['input_size']} px")


# ---------------------------------------------------------------------- options, errors

def test_unknown_architecture_names_it_and_lists_known():
    with pytest.raises(ValueError, match="resnet51") as error:
        create_model("resnet51", 10)
    assert all(name in str(error.value) for name in ARCHITECTURES)


@pytest.mark.parametrize("arch,options,message", [
    ("resnet18", {"num_classes": 0}, "num_classes"),
    ("resnet18", {"dropout": 1.0}, "dropout"),
    ("resnet18", {"drop_path": -0.1}, "drop_path"),
    ("resnet18", {"img_size": 64}, "img_size"),
    ("densenet121", {"drop_path": 0.1}, "drop_path"),
    ("densenet121", {"use_blurpool": True}, "use_blurpool"),
    ("vit_small", {"use_blurpool": True}, "use_blurpool"),
    ("vit_small", {"img_size": 40}, "img_size"),
])
def test_invalid_options_are_value_errors(arch, options, message):
    options = {"num_classes": 10, **options}
    with pytest.raises(ValueError, match=message):
        create_model(arch, options.pop("num_classes"), **options)


def test_dropout_adds_no_state_dict_key_and_acts_only_in_training():
    plain = create_model("resnet18", 10)
    with_dropout = create_model("resnet18", 10, dropout=0.5)
    assert list(plain.state_dict()) == list(with_dropout.state_dict())
    with_dropout.load_state_dict(plain.state_dict())
    images = torch.randn(4, 3, 32, 32)
    plain.eval()
    with_dropout.eval()
    with torch.no_grad():
        assert torch.equal(plain(images), with_dropout(images))
        with_dropout.dropout.train()  # BN stays in eval, only the dropout samples
        assert not torch.allclose(plain(images), with_dropout(images))


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    out = drop(torch.ones(4000, 3, 2, 2))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert abs(out.mean().item() - 1.0) < 0.05
    drop.eval()
    assert torch.equal(drop(torch.ones(3, 2)), torch.ones(3, 2))


def test_drop_path_rises_linearly_over_the_blocks():
    model = create_model("resnet50", 10, drop_path=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == 16 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates)


@pytest.mark.parametrize("arch,last_norms", [("resnet18", 8), ("resnet50", 16), ("resnet20", 9)])
def test_zero_init_residual_zeroes_the_last_bn_of_each_branch(arch, last_norms):
    model = create_model(arch, 10, zero_init_residual=True)
    last_norm_name = "bn3" if arch == "resnet50" else "bn2"
    zeroed = [name for name, p in model.named_parameters()
              if name.endswith("weight") and p.dim() == 1 and torch.all(p == 0)]
    assert len(zeroed) == last_norms
    assert all(name.endswith(f"{last_norm_name}.weight") for name in zeroed)
    default = create_model(arch, 10)
    assert all(torch.all(m.weight == 1) for m in default.modules()
               if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------------------- BlurPool

def blur_by_shifting(x):
    """[1,2,1] x [1,2,1] / 16 blur with zero padding, written as a sum of shifted copies."""
    padded = F.pad(x, (1, 1, 1, 1))
    taps = (1.0, 2.0, 1.0)
    height, width = x.shape[-2:]
    return sum(taps[dy] * taps[dx] / 16.0 * padded[..., dy:dy + height, dx:dx + width]
               for dy in range(3) for dx in range(3))


def test_blur_conv_is_the_conv_of_the_blurred_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, kernel_size=3, stride=2, padding=1)
    blurred_conv = BlurConv2d.from_conv(conv)
    images = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(blurred_conv(images), conv(blur_by_shifting(images)))
    assert blurred_conv.weight is conv.weight and blurred_conv.bias is conv.bias
    assert list(blurred_conv.state_dict()) == ["weight", "bias"]  # the filter is not saved


@pytest.mark.parametrize("arch,expected_swapped", [
    ("resnet50", [f"layer{i}.0.{conv}" for i in (2, 3, 4) for conv in ("conv2", "downsample.0")]),
    ("resnet18", [f"layer{i}.0.{conv}" for i in (2, 3, 4) for conv in ("conv1", "downsample.0")]),
    ("resnet20", ["layer2.0.conv1", "layer3.0.conv1"]),
    ("convnext_tiny", ["features.2.1", "features.4.1", "features.6.1"]),
])
def test_blurpool_swaps_strided_convs_and_keeps_state_dict_keys(arch, expected_swapped):
    model = create_model(arch, 10)
    keys_before = {key: tuple(v.shape) for key, v in model.state_dict().items()}
    swapped = apply_blurpool(model)
    assert sorted(swapped) == sorted(expected_swapped)  # never the 3-channel stem
    assert {key: tuple(v.shape) for key, v in model.state_dict().items()} == keys_before
    assert apply_blurpool(model) == []  # idempotent
    plain = create_model(arch, 10)
    model.load_state_dict(plain.state_dict(), strict=True)


# ------------------------------------------------------------------ weight-decay groups

# Written from the names alone (not from module types): what must decay, per architecture.
DECAYED_WEIGHTS = {
    "resnet": r"(^conv1|\.conv\d|\.downsample\.0|^fc)\.weight$",
    "densenet121": r"(\.conv\d?|^classifier)\.weight$",
    "convnext_tiny":  # stem conv, downsampling convs, depthwise conv, MLP, classifier
        r"(^features\.0\.0|^features\.[246]\.1|\.block\.[035]|^classifier\.2)\.weight$",
    "vit_small": r"(patch_embed\.proj|attn\.qkv|attn\.proj|mlp\.fc\d|^head)\.weight$",
}
NEVER_DECAYED = {
    "resnet50": ["bn1.weight", "layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias",
                 "layer4.2.bn3.bias", "fc.bias"],
    "densenet121": ["features.norm0.weight", "features.transition3.norm.bias",
                    "features.norm5.weight", "classifier.bias"],
    "convnext_tiny": ["features.1.0.layer_scale", "features.1.0.block.2.weight",
                      "features.2.0.weight", "classifier.0.weight", "features.0.0.bias"],
    "vit_small": ["pos_embed", "cls_token", "blocks.0.norm1.weight", "norm.bias",
                  "blocks.3.attn.qkv.bias", "head.bias"],
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_weight_decay_split_per_architecture(arch):
    model = create_model(arch, 10)
    decayed, not_decayed = describe_weight_decay(model)
    pattern = DECAYED_WEIGHTS["resnet" if arch in RESNETS else arch]
    all_names = [name for name, _ in model.named_parameters()]
    assert decayed == [name for name in all_names if re.search(pattern, name)]
    assert not_decayed == [name for name in all_names if not re.search(pattern, name)]
    assert set(NEVER_DECAYED.get(arch, [])) <= set(not_decayed)


def test_shortcut_batchnorms_are_caught_where_a_bn_name_filter_misses_them():
    """ffcv-imagenet exempts names containing 'bn'; ResNet-50's 4 shortcut BNs are not."""
    model = published_model("resnet50")
    _, not_decayed = describe_weight_decay(model)
    shortcut_bn = [name for name, _ in model.named_parameters() if ".downsample.1." in name]
    assert len(shortcut_bn) == 8
    assert not any("bn" in name for name in shortcut_bn)  # what a name filter would decay
    assert set(shortcut_bn) <= set(not_decayed)


def test_bn_weight_decay_decays_norm_parameters_but_not_other_biases():
    model = create_model("resnet50", 10)
    decayed, not_decayed = describe_weight_decay(model, bn_weight_decay=True)
    assert {"bn1.weight", "bn1.bias", "layer1.0.downsample.1.bias"} <= set(decayed)
    assert not_decayed == ["fc.bias"]
    vit = create_model("vit_small", 10, img_size=32)
    vit_decayed, vit_not_decayed = describe_weight_decay(vit, bn_weight_decay=True)
    assert {"norm.weight", "blocks.0.norm2.bias"} <= set(vit_decayed)
    assert {"pos_embed", "cls_token", "head.bias"} <= set(vit_not_decayed)


def test_no_weight_decay_declarations_survive_wrapping_and_are_checked():
    class Probe(nn.Module):  # a wrapper, as DDP's `module.` or a linear probe
        def __init__(self):
            super().__init__()
            self.module = create_model("vit_small", 10, img_size=32)

    _, not_decayed = describe_weight_decay(Probe())
    assert {"module.pos_embed", "module.cls_token"} <= set(not_decayed)

    class Misdeclared(nn.Linear):
        def no_weight_decay(self):
            return {"scale"}

    with pytest.raises(ValueError, match="scale"):
        describe_weight_decay(Misdeclared(2, 2))


def test_weight_decay_groups_drive_sgd():
    """With zero gradients, decayed weights shrink by lr * wd; norms and biases stay."""
    model = create_model("resnet8", 10)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1.0)
    groups = weight_decay_groups(model, 0.1)
    assert [(g["group_name"], g["weight_decay"]) for g in groups] == [("decay", 0.1),
                                                                      ("no_decay", 0.0)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.SGD(groups, lr=0.5)
    (0.0 * model(torch.randn(2, 3, 28, 28)).sum()).backward()
    optimizer.step()
    assert model.conv1.weight.unique().tolist() == [pytest.approx(0.95)]
    assert model.fc.weight.unique().tolist() == [pytest.approx(0.95)]
    assert model.bn1.weight.unique().tolist() == [1.0]
    assert model.fc.bias.unique().tolist() == [1.0]


def test_weight_decay_groups_skip_frozen_parameters_and_empty_groups():
    model = create_model("resnet8", 10)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("fc.")
    groups = weight_decay_groups(model, 1e-4)
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert groups[0]["params"][0] is model.fc.weight
    model.fc.bias.requires_grad = False
    assert [g["group_name"] for g in weight_decay_groups(model, 1e-4)] == ["decay"]
    with pytest.raises(ValueError, match="weight_decay"):
        weight_decay_groups(model, -1.0)


# ------------------------------------------------------------------ training on the CPU

def small_model_options(arch):
    options = {"dropout": 0.1}
    if arch != "densenet121":
        options["drop_path"] = 0.1
    if arch == "vit_small":
        options["img_size"] = 32
    return options


def small_input(arch):
    """(side, batch) that keep a step cheap. ImageNet stems reach 1x1 maps at 32 px, where
    BN over a batch of 4 gives huge first gradients (ResNet-50's conv1: ~1e3): batch 8."""
    if arch in ("resnet18_cifar", "resnet50_cifar"):
        return 16, 2  # no stem downsampling: 16 px still ends on 2x2 maps
    if arch in ("resnet8", "resnet20", "resnet32", "resnet56"):
        return 28, 4
    if arch == "densenet121":
        return 32, 4  # its slowest step; batch 4 stays finite here
    return 32, 8


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_train_step_on_cpu_channels_last(arch):
    torch.manual_seed(0)
    model = create_model(arch, 10, **small_model_options(arch))
    model = model.to(memory_format=torch.channels_last).train()
    side, batch = small_input(arch)
    images = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch)
    optimizer = torch.optim.SGD(weight_decay_groups(model, 5e-4), lr=0.01, momentum=0.9)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()

    assert logits.shape == (batch, 10) and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # every decayed weight moves (ConvNeXt's norm gains behind layer_scale=1e-6 get
    # gradients ~1e-9, too small to change a float32 1.0: no check on those)
    decayed, _ = describe_weight_decay(model)
    assert [name for name in decayed if torch.equal(model.get_parameter(name), before[name])] == []
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


@pytest.mark.parametrize("arch", ["resnet8", "resnet20"])
@pytest.mark.parametrize("size", [28, 32])
def test_cifar_resnets_take_28_and_32_px(arch, size):
    model = create_model(arch, 10).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, size, size))
    assert features.shape == (2, 64)


def test_vit_resizes_its_position_embedding_and_rejects_partial_patches():
    model = create_model("vit_small", 10, img_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 48)).shape == (2, 10)
    with pytest.raises(ValueError, match="patch size"):
        model(torch.randn(2, 3, 40, 40))


def test_densenet_names_the_smallest_input_it_takes():
    model = create_model("densenet121", 10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 29, 29)).shape == (1, 10)
        with pytest.raises(ValueError, match="too small"):
            model(torch.randn(1, 3, 28, 28))
