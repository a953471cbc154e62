"""training.wd_exempt: the weight-decay exemption set is explicit, recorded, and the
default reproduces the runs made before the key (their run_ids stay)."""
from pathlib import Path

import pytest

from ffcv_bias.record import runs
from ffcv_bias.train.fastargs_strict import ConfigError
from ffcv_bias.train.models import create_model, describe_weight_decay, weight_decay_groups
from ffcv_bias.train.param_groups import EXEMPT_SETS, NORM_LAYER_TYPES
from ffcv_bias.sweep.spec import load_sweep
from ffcv_bias.train.checks import validate_semantics
from ffcv_bias.train.config import WD_EXEMPT_DEFAULT, WD_EXEMPT_SETS, resolve_config
from fixtures_datasets import placeholder_betons

REPO = Path(__file__).resolve().parents[1]
# The paper's ResNet-50 / DenseNet-121 sweeps (Table 1 and the ResNet-50 studies that
# share its reference runs) use the paper's exemption; every other shipped sweep keeps
# the default (the demo's and the reference result's run_ids are unchanged).
PAPER_EXEMPT_SWEEPS = {"rn50_crop", "rn50_weight_decay", "rn50_dropout",
                       "rn50_class_dependent_crop", "rn50_preservation_bounds",
                       "table1_densenet121_crop", "table1_densenet121_weight_decay"}


def test_config_names_and_param_groups_agree():
    assert set(WD_EXEMPT_SETS) == set(EXEMPT_SETS) and WD_EXEMPT_DEFAULT in EXEMPT_SETS
    assert runs.LATER_KEY_DEFAULTS[("training", "wd_exempt")] == WD_EXEMPT_DEFAULT


# The parameters each model lists in no_weight_decay().
EMBEDDINGS = {"resnet8": lambda name: False, "densenet121": lambda name: False,
              "vit_small": lambda name: name in ("pos_embed", "cls_token"),
              "convnext_tiny": lambda name: name.endswith(".layer_scale")}


@pytest.mark.parametrize("arch", sorted(EMBEDDINGS))
def test_norm_exempts_norm_layers_only(arch):
    model = create_model(arch, 10)
    embeddings = {name for name, _ in model.named_parameters() if EMBEDDINGS[arch](name)}
    norm_params = {name for module_name, module in model.named_modules()
                   if isinstance(module, NORM_LAYER_TYPES)
                   for name in (f"{module_name}.{p}" for p, _ in module.named_parameters(
                       recurse=False))}
    decayed, exempt = describe_weight_decay(model, exempt="norm")
    assert set(exempt) == norm_params
    assert embeddings <= set(decayed) and any(name.endswith(".bias") for name in decayed)
    # The default is the behaviour from before the key: every bias and the embeddings too.
    today_decayed, today_exempt = describe_weight_decay(model)
    assert (today_decayed, today_exempt) == describe_weight_decay(model,
                                                                  exempt="norm_bias_embed")
    assert set(today_exempt) == norm_params | embeddings | {
        name for name, _ in model.named_parameters() if name.endswith(".bias")}


def test_bn_weight_decay_with_norm_decays_everything():
    model = create_model("resnet8", 10)
    groups = weight_decay_groups(model, 1e-4, bn_weight_decay=True, exempt="norm")
    assert [group["group_name"] for group in groups] == ["decay"]
    with pytest.raises(ValueError, match="exempt must be one of"):
        weight_decay_groups(model, 1e-4, exempt="all")


@pytest.fixture
def betons(tmp_path):
    return placeholder_betons(tmp_path, "imagenet", (1281167, 50000),
                              [f"c{i}" for i in range(1000)])


def resolve(betons, *extra):
    train, val = betons
    nested = resolve_config([f"--data.train_dataset={train}", f"--data.val_dataset={val}",
                             *extra])
    validate_semantics(nested)
    return nested


def test_the_default_keeps_run_ids_and_norm_changes_them(betons):
    default = resolve(betons)
    assert default["training"]["wd_exempt"] == "norm_bias_embed"
    written_before_the_key = {section: dict(values) for section, values in default.items()}
    del written_before_the_key["training"]["wd_exempt"]
    assert runs.run_id(written_before_the_key) == runs.run_id(default)
    paper = resolve(betons, "--training.wd_exempt=norm")
    assert paper["training"]["wd_exempt"] == "norm"
    assert runs.run_id(paper) != runs.run_id(default)


def test_an_unknown_exemption_set_is_a_one_line_config_error(betons):
    with pytest.raises(ConfigError, match="wd_exempt") as error:
        resolve(betons, "--training.wd_exempt=bias")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("sweep_file", sorted((REPO / "rn50_configs" / "sweeps").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_shipped_sweeps_use_the_documented_exemption(sweep_file):
    sweep = load_sweep(sweep_file)
    overrides = sweep.overrides
    expected = "norm" if sweep_file.stem in PAPER_EXEMPT_SWEEPS else None
    assert overrides.get("training.wd_exempt") == expected
