"""Optimizer parameter groups: weight decay on weights, not on norms (and biases, embeddings).

`exempt` names the set of parameters kept off weight decay (training.wd_exempt):
- "norm_bias_embed" (the default, timm-style, and this project's only behaviour before
  the key existed): norm layers, every bias, and no_weight_decay() parameters;
- "norm" (the paper's: decay applies "to all the DNN parameters except for the ones of
  batch-normalization layers"): norm layers only; biases, ViT's pos_embed / cls_token and
  ConvNeXt's layer_scale decay like any weight.

Which parameters decay (with `bn_weight_decay=False`, the default, and
exempt="norm_bias_embed"):
- decayed: the weights of convolutions and linear layers (and any other parameter not
  listed below);
- not decayed: every parameter of a normalization layer (BatchNorm, SyncBatchNorm,
  InstanceNorm, LayerNorm and its subclasses such as LayerNorm2d, GroupNorm), found by
  MODULE TYPE; every parameter named `bias`; and the parameters that a module lists in
  its `no_weight_decay()` method, relative to itself (ViT: `pos_embed`, `cls_token`;
  ConvNeXt: its `layer_scale`s), found in any submodule, so wrappers (DDP's `module.`,
  a probe around a backbone) keep them exempt.

Why by type: ffcv-imagenet keeps decay off the parameters whose name contains "bn", which
misses the BatchNorm inside every ResNet shortcut (`layer1.0.downsample.1.weight`), so
those BNs get decayed. Testing `isinstance(module, _NormBase | LayerNorm | GroupNorm)`
catches every norm layer whatever its name.

`bn_weight_decay=True` (ffcv-imagenet's `bn_wd=1`): norm-layer weights AND biases decay
with the rest, as ffcv-imagenet's flag decays all its "bn" parameters. Biases of
convolutions and linear layers, and `no_weight_decay()` parameters, still follow `exempt`:
the flag is about normalization layers only (with exempt="norm" everything then decays).

Frozen parameters (requires_grad False) are left out of the groups, so a linear probe over
a frozen backbone gets only its head.
"""
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

# _NormBase is the base of BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm1d/2d/3d.
NORM_LAYER_TYPES = (_NormBase, nn.LayerNorm, nn.GroupNorm)
# exempt set -> whether biases and no_weight_decay() parameters are exempt too (norm
# layers always are, unless bn_weight_decay). train/config.py WD_EXEMPT_SETS lists the names.
EXEMPT_SETS = {"norm": False, "norm_bias_embed": True}
DEFAULT_EXEMPT = "norm_bias_embed"


def _declared_no_decay_names(model):
    """Full names of the parameters that some submodule's no_weight_decay() lists."""
    names = set()
    for module_name, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name in declared())
    return names


def _norm_layer_param_names(model):
    """Names of the parameters that belong directly to a normalization layer."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYER_TYPES):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name, _ in module.named_parameters(recurse=False))
    return names


def _split_by_decay(model, bn_weight_decay, exempt):
    """(decayed, not_decayed): lists of (name, parameter), in model.named_parameters order."""
    if exempt not in EXEMPT_SETS:
        raise ValueError(f"exempt must be one of {', '.join(EXEMPT_SETS)}, got {exempt!r}")
    exempt_beyond_norms = EXEMPT_SETS[exempt]
    all_names = {name for name, _ in model.named_parameters()}
    explicit_no_decay = _declared_no_decay_names(model)
    if explicit_no_decay - all_names:
        raise ValueError("no_weight_decay() names unknown parameters: "
                         f"{sorted(explicit_no_decay - all_names)}")
    norm_names = _norm_layer_param_names(model)

    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():  # a shared parameter comes once
        if not parameter.requires_grad:
            continue
        if name in norm_names:
            decays = bn_weight_decay
        else:
            is_bias = name.rsplit(".", 1)[-1] == "bias"
            decays = not (exempt_beyond_norms and (is_bias or name in explicit_no_decay))
        (decayed if decays else not_decayed).append((name, parameter))
    return decayed, not_decayed


def weight_decay_groups(model, weight_decay, bn_weight_decay=False, exempt=DEFAULT_EXEMPT):
    """Optimizer param groups: [{"params", "weight_decay", "group_name"}, ...].

    Empty groups are dropped (torch optimizers reject them). `group_name` is "decay" or
    "no_decay", handy in logs; torch keeps extra group keys untouched.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decayed, not_decayed = _split_by_decay(model, bn_weight_decay, exempt)
    groups = [
        {"params": [p for _, p in decayed], "weight_decay": float(weight_decay),
         "group_name": "decay"},
        {"params": [p for _, p in not_decayed], "weight_decay": 0.0,
         "group_name": "no_decay"},
    ]
    return [group for group in groups if group["params"]]


def describe_weight_decay(model, bn_weight_decay=False, exempt=DEFAULT_EXEMPT):
    """(decayed_names, not_decayed_names): the parameter names in each group, for tests/logs."""
    decayed, not_decayed = _split_by_decay(model, bn_weight_decay, exempt)
    return [name for name, _ in decayed], [name for name, _ in not_decayed]
