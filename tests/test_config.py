"""The trainer's configuration: ffcv-imagenet YAML compatibility, strict keys, semantic checks,
schedules. No training, no torch: these run in a second or two."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffcv_bias.record import runs
from ffcv_bias.train.fastargs_strict import ConfigError
from ffcv_bias.train.schedules import (lr_per_iteration, resolution_at_epoch,
                                       resolution_per_epoch)
from ffcv_bias.train.checks import validate_semantics
from ffcv_bias.train.config import config_dict, replace_values, resolve_config, run_config
from fixtures_datasets import placeholder_betons

REPO = Path(__file__).resolve().parents[1]
RN50_CONFIGS = sorted((REPO / "rn50_configs").glob("rn50_*_epochs.yaml"))


@pytest.fixture
def fake_betons(tmp_path):
    """Two placeholder betons with sidecars: enough for the checks that do not read images."""
    return placeholder_betons(tmp_path, "fake", (100, 20), ["a", "b", "c"])


def data_args(train, val):
    return [f"--data.train_dataset={train}", f"--data.val_dataset={val}"]


def small_args(fake_betons, *extra):
    return data_args(*fake_betons) + ["--training.batch_size=8", "--training.epochs=4",
                                      *extra]


def test_every_ffcv_imagenet_rn50_yaml_loads_unchanged():
    assert len(RN50_CONFIGS) == 6
    for path in RN50_CONFIGS:
        nested = resolve_config(["--config-file", str(path), *data_args("t.beton", "v.beton")])
        epochs = int(path.name.split("_")[1])
        assert nested["training"]["epochs"] == epochs
        assert nested["lr"]["lr"] == 1.7 and nested["lr"]["lr_schedule_type"] == "cyclic"
        assert nested["training"]["batch_size"] == 512
        assert nested["training"]["use_blurpool"] is True
        assert nested["training"]["bn_wd"] is False
        assert nested["validation"]["lr_tta"] is True
        assert nested["validation"]["resolution"] == 256
        assert (nested["resolution"]["min_res"], nested["resolution"]["max_res"]) == (160, 192)
        assert nested["dist"]["world_size"] == 8


def test_cli_overrides_yaml_and_zero_means_off():
    nested = resolve_config(["--config-file", str(RN50_CONFIGS[-1]), "--training.use_blurpool=0",
                             "--validation.lr_tta=false", "--augment.min_scale=0.25",
                             *data_args("t.beton", "v.beton")])
    assert nested["training"]["use_blurpool"] is False
    assert nested["validation"]["lr_tta"] is False
    assert nested["augment"]["min_scale"] == 0.25


def test_unknown_keys_are_errors_in_yaml_and_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="training.wieght_decay"):
        resolve_config([*data_args("t", "v"), "--training.wieght_decay=0"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("training:\n  epochs: 3\n  lr_peak: 2\n")
    with pytest.raises(ConfigError, match="training.lr_peak"):
        resolve_config(["--config-file", str(bad_yaml), *data_args("t", "v")])
    bad_yaml.write_text("augmentation:\n  min_scale: 0.3\n")
    with pytest.raises(ConfigError, match="augmentation"):
        resolve_config(["--config-file", str(bad_yaml), *data_args("t", "v")])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="training.epochs"):
        resolve_config([*data_args("t", "v"), "--training.epochs=1.5"])
    with pytest.raises(ConfigError, match="augment.min_scale"):
        resolve_config([*data_args("t", "v"), "--augment.min_scale=1.5"])
    with pytest.raises(ConfigError, match="lr.lr_schedule_type"):
        resolve_config([*data_args("t", "v"), "--lr.lr_schedule_type=linear"])
    with pytest.raises(ConfigError, match="data.train_dataset"):
        resolve_config(["--data.val_dataset=v"])


def test_run_id_follows_result_values_only(fake_betons):
    base = resolve_config(small_args(fake_betons))
    assert runs.run_id(base) == runs.run_id(resolve_config(small_args(fake_betons)))
    elsewhere = resolve_config(small_args(fake_betons, "--logging.folder=/elsewhere",
                                          "--data.num_workers=7"))
    assert runs.run_id(elsewhere) == runs.run_id(base)
    for change in ("--training.seed=1", "--augment.min_scale=0.5", "--model.dropout=0.1",
                   "--training.weight_decay=0.001"):
        assert runs.run_id(resolve_config(small_args(fake_betons, change))) != runs.run_id(base)


def test_torchrun_world_size_enters_the_config_and_must_match_an_explicit_one(monkeypatch,
                                                                              fake_betons):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_config(small_args(fake_betons))["dist"]["world_size"] == 4
    assert resolve_config(small_args(fake_betons, "--dist.world_size=4"))["dist"]["world_size"] == 4
    with pytest.raises(ConfigError, match="torchrun started 4 processes but dist.world_size=2"):
        resolve_config(small_args(fake_betons, "--dist.world_size=2"))


def test_semantic_checks(fake_betons, tmp_path):
    validate_semantics(resolve_config(small_args(fake_betons)))
    cases = {
        "augment.min_scale=0.9 must be <=": ["--augment.min_scale=0.9", "--augment.max_scale=0.5"],
        "no such file": ["--data.val_dataset=/nonexistent.beton"],
        "lr_peak_epoch": ["--lr.lr_peak_epoch=4"],
        "resolution.min_res": ["--resolution.min_res=64", "--resolution.max_res=32"],
        "fewer than one global batch": ["--training.batch_size=64", "--dist.world_size=2"],
        "data.sparsity > 0 needs": ["--data.sparsity=0.5"],
    }
    for message, extra in cases.items():
        with pytest.raises(ConfigError, match=message):
            validate_semantics(resolve_config(small_args(fake_betons, *extra)))


def test_class_min_scale_and_keep_indices_files(fake_betons, tmp_path):
    good_bounds = tmp_path / "bounds.json"
    good_bounds.write_text("[0.08, 0.5, 1.0]")
    validate_semantics(resolve_config(small_args(fake_betons, f"--augment.class_min_scale={good_bounds}")))
    short_bounds = tmp_path / "short.txt"
    short_bounds.write_text("0.08\n0.5\n")
    with pytest.raises(ConfigError, match="2 values for 3 classes"):
        validate_semantics(resolve_config(small_args(fake_betons, f"--augment.class_min_scale={short_bounds}")))

    kept = tmp_path / "keep.npy"
    np.save(kept, np.arange(0, 100, 2))
    validate_semantics(resolve_config(small_args(fake_betons, f"--data.keep_indices={kept}",
                                                 "--data.sparsity=0.5", "--data.score=el2n")))
    with pytest.raises(ConfigError, match="keeps 50 of 100"):
        validate_semantics(resolve_config(small_args(fake_betons, f"--data.keep_indices={kept}",
                                                     "--data.sparsity=0.3")))
    np.save(kept, np.array([3, 100]))
    with pytest.raises(ConfigError, match="outside"):
        validate_semantics(resolve_config(small_args(fake_betons, f"--data.keep_indices={kept}",
                                                     "--data.sparsity=0.98")))


SHIPPED_CONFIGS = sorted((REPO / "rn50_configs").glob("*.yaml"))


@pytest.mark.parametrize("config_file", SHIPPED_CONFIGS, ids=lambda path: path.name)
def test_the_frozen_run_config_holds_exactly_the_resolved_dict(config_file, fake_betons):
    """run_config(nested) is what the Trainer reads: every key of every section as an
    attribute, nothing writable, and config_dict gives back the very dict (so config.json
    and the run_id, which come from the dict, cannot drift from what trained)."""
    nested = resolve_config(["--config-file", str(config_file), *data_args(*fake_betons)])
    cfg = run_config(nested)
    assert config_dict(cfg) == nested
    assert runs.run_id(config_dict(cfg)) == runs.run_id(nested)
    for section, values in nested.items():
        for key, value in values.items():
            read = getattr(getattr(cfg, section), key)
            assert read == (tuple(value) if isinstance(value, list) else value)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        cfg.training.epochs = 1
    with pytest.raises(AttributeError):
        cfg.training = None


def test_a_run_config_variant_changes_only_the_named_keys(fake_betons):
    nested = resolve_config(small_args(fake_betons))
    cfg = run_config(nested)
    variant = replace_values(cfg, {"training.grad_clip_norm": 0.5, "lr.lr": 0.3})
    assert (variant.training.grad_clip_norm, variant.lr.lr) == (0.5, 0.3)
    assert cfg == run_config(nested)  # the original is untouched
    changed = config_dict(variant)
    changed["training"]["grad_clip_norm"] = nested["training"]["grad_clip_norm"]
    changed["lr"]["lr"] = nested["lr"]["lr"]
    assert changed == nested
    with pytest.raises(ConfigError, match="training.grad_clip: no such config key"):
        replace_values(cfg, {"training.grad_clip": 0.5})


def test_config_module_imports_neither_torch_nor_ffcv():
    code = ("import sys, ffcv_bias.train.config, ffcv_bias.train.schedules; "
            "print(sorted(m for m in ('torch', 'ffcv') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------

def test_cyclic_schedule_matches_ffcv_imagenet_per_iteration_interpolation():
    lrs = lr_per_iteration("cyclic", lr=1.7, epochs=16, iters_per_epoch=10, lr_peak_epoch=2)
    assert lrs.shape == (160,)
    assert lrs[0] == pytest.approx(1.7e-4)
    assert lrs[20] == pytest.approx(1.7)          # first iteration of epoch 2: the peak
    assert lrs[25] == pytest.approx(1.7 * (1 - 0.5 / 14))  # epoch 2.5
    assert lrs[-1] == pytest.approx(1.7 / 14 * 0.1)  # a tenth of the way from epoch 15 to 0
    assert np.all(np.diff(lrs[:20]) > 0) and np.all(np.diff(lrs[20:]) < 0)


def test_step_schedule_slides_during_the_epoch_before_each_step():
    lrs = lr_per_iteration("step", lr=1.0, epochs=4, iters_per_epoch=4, step_ratio=0.1,
                           step_length=2).reshape(4, 4)
    np.testing.assert_allclose(lrs[0], [1, 1, 1, 1])
    np.testing.assert_allclose(lrs[1], [1, 0.775, 0.55, 0.325])
    np.testing.assert_allclose(lrs[2], [0.1, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(lrs[3], [0.1, 0.075, 0.05, 0.025])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    lrs = lr_per_iteration("cosine", lr=2.0, epochs=10, iters_per_epoch=100, lr_peak_epoch=1)
    assert lrs[100] == pytest.approx(2.0)
    assert lrs[550] == pytest.approx(1.0)        # half-way through the cosine
    assert 0 < lrs[-1] < 1e-3
    assert np.argmax(lrs) == 100


def test_progressive_resizing_as_ffcv_imagenet():
    ramp = dict(min_res=160, max_res=192, start_ramp=65, end_ramp=76)
    assert resolution_at_epoch(65, **ramp) == 160
    assert resolution_at_epoch(70, **ramp) == 160   # 174.5 rounds to 5 x 32
    assert resolution_at_epoch(71, **ramp) == 192   # 177.5 rounds to 6 x 32
    assert resolution_at_epoch(76, **ramp) == 192
    assert resolution_per_epoch(3, min_res=32, max_res=32, start_ramp=0, end_ramp=0) == [32] * 3


def test_preflight_answers_bad_configs_and_complete_runs_without_torch(fake_betons, tmp_path):
    args = small_args(fake_betons, f"--logging.folder={tmp_path}")
    run_dir = tmp_path / runs.run_id(resolve_config(args))
    run_dir.mkdir()
    # complete = summary.json parses and names the run (runs.completeness)
    (run_dir / runs.SUMMARY_FILE).write_text('{"run_id": "%s"}' % run_dir.name)
    code = ("import sys; from ffcv_bias.train.checks import preflight; "
            "code, _ = preflight(sys.argv[1:]); print(code, 'torch' in sys.modules)")
    complete = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, check=True)
    assert complete.stdout.splitlines() == [f"run {run_dir.name} is already complete: {run_dir}",
                                            "0 False"]
    bad = subprocess.run([sys.executable, "-c", code, *args, "--augment.min_scale=0"],
                         capture_output=True, text=True, check=True)
    assert bad.stdout.strip() == "2 False"
    assert bad.stderr.strip() == ("error: bad value for 'augment.min_scale': '0' is not "
                                  "a float in (0, 1]")
    (run_dir / runs.SUMMARY_FILE).unlink()
    to_train = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, check=True)
    assert to_train.stdout.strip() == "None False"


def test_keys_added_later_do_not_rename_runs_at_their_defaults():
    from ffcv_bias.record import runs
    before = {"model": {"arch": "resnet8"}, "training": {"seed": 1, "epochs": 3},
              "lr": {"lr": 0.2}}
    after = {"model": {"arch": "resnet8", "drop_path": 0.0},
             "training": {"seed": 1, "epochs": 3, "grad_clip_norm": 0.0, "adam_beta1": 0.9},
             "lr": {"lr": 0.2, "warmup_epochs": 0.0}}
    assert runs.run_id(before) == runs.run_id(after)
    after["lr"]["warmup_epochs"] = 5.0
    assert runs.run_id(before) != runs.run_id(after)


def test_world_size_enters_the_run_id_only_when_not_one():
    from ffcv_bias.record import runs
    single = {"model": {"arch": "resnet50"}, "training": {"seed": 0}, "dist": {"port": 1}}
    eight = {"model": {"arch": "resnet50"}, "training": {"seed": 0},
             "dist": {"world_size": 8, "port": 2}}
    assert runs.run_id(single) == runs.run_id({**single, "dist": {"world_size": 1}})
    assert runs.run_id(single) != runs.run_id(eight)
