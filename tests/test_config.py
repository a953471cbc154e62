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


# --------------------------------------------------------------------------------------
# Issue 31: ffcv-imagenet's own configs, huge counts, the lr schedule computed per step
# --------------------------------------------------------------------------------------

# libffcv/ffcv-imagenet's shipped configs, key for key as their YAML text has them
# (github.com/libffcv/ffcv-imagenet at commit 4dd291a: rn18_configs/rn18_<E>_epochs.yaml
# and rn50_configs/rn50_<E>_epochs.yaml, E in FFCV_IMAGENET_RAMPS). Every file of a family
# holds the keys below plus training.epochs and the ramp's resolution.start_ramp /
# end_ramp; rn18's data.gpu is the one key their trainer never declared.
FFCV_IMAGENET_KEYS = {
    "rn18": {"data.gpu": "0", "data.in_memory": "1", "data.num_workers": "12",
             "dist.world_size": "1", "logging.folder": "/tmp/", "logging.log_level": "0",
             "lr.lr": "0.5", "lr.lr_peak_epoch": "2", "lr.lr_schedule_type": "cyclic",
             "model.arch": "resnet18", "resolution.max_res": "192",
             "resolution.min_res": "160", "training.batch_size": "1024",
             "training.bn_wd": "0", "training.distributed": "0",
             "training.label_smoothing": "0.1", "training.momentum": "0.9",
             "training.optimizer": "sgd", "training.weight_decay": "5e-5",
             "training.use_blurpool": "1", "validation.lr_tta": "true",
             "validation.resolution": "256"},
    "rn50": {"data.in_memory": "1", "data.num_workers": "12", "dist.world_size": "8",
             "logging.folder": "/tmp/", "lr.lr": "1.7", "lr.lr_schedule_type": "cyclic",
             "model.arch": "resnet50", "resolution.max_res": "192",
             "resolution.min_res": "160", "training.batch_size": "512",
             "training.bn_wd": "0", "training.distributed": "1",
             "training.label_smoothing": "0.1", "training.momentum": "0.9",
             "training.optimizer": "sgd", "training.weight_decay": "0.0001",
             "training.use_blurpool": "1", "validation.lr_tta": "true",
             "validation.resolution": "256"},
}
FFCV_IMAGENET_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48),
                       88: (65, 76)}


def ffcv_imagenet_config(folder, family, epochs):
    """The file rn<family>_configs/<family>_<epochs>_epochs.yaml, its keys as theirs are
    laid out (sections in alphabetical order, as their files have them)."""
    start_ramp, end_ramp = FFCV_IMAGENET_RAMPS[epochs]
    keys = {**FFCV_IMAGENET_KEYS[family], "training.epochs": str(epochs),
            "resolution.start_ramp": str(start_ramp), "resolution.end_ramp": str(end_ramp)}
    sections = {}
    for dotted, value in sorted(keys.items()):
        section, key = dotted.split(".")
        sections.setdefault(section, []).append(f"  {key}: {value}")
    path = Path(folder) / f"{family}_{epochs}_epochs.yaml"
    path.write_text("".join(f"{section}:\n" + "\n".join(lines) + "\n"
                            for section, lines in sections.items()))
    return path, keys


@pytest.mark.parametrize("family", sorted(FFCV_IMAGENET_KEYS))
@pytest.mark.parametrize("epochs", sorted(FFCV_IMAGENET_RAMPS))
def test_every_ffcv_imagenet_config_loads_with_its_values(family, epochs, tmp_path, capsys):
    """All 12 files load unchanged, every key with its file's value; the undeclared
    data.gpu is dropped with a one-line note, and nothing else is said."""
    import yaml
    from ffcv_bias.train.config import FFCV_IMAGENET_UNUSED_KEYS
    path, keys = ffcv_imagenet_config(tmp_path, family, epochs)
    betons = placeholder_betons(tmp_path, "imagenet", (10_000, 500), ["a", "b", "c"])
    capsys.readouterr()
    nested = resolve_config(["--config-file", str(path), *data_args(*betons)])
    validate_semantics(nested)  # and passes the trainer's checks as it stands
    ignored = [dotted for dotted in keys if tuple(dotted.split(".")) in FFCV_IMAGENET_UNUSED_KEYS]
    assert ignored == (["data.gpu"] if family == "rn18" else [])
    for dotted, text in keys.items():
        if dotted in ignored:
            continue
        section, key = dotted.split(".")
        value, expected = nested[section][key], yaml.safe_load(text)
        if isinstance(value, bool):
            expected = bool(expected)
        elif isinstance(value, float):
            expected = float(expected)
        assert value == expected, dotted
    assert "gpu" not in nested["data"]
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.strip()]
    assert notes == ([f"note: {path}: ignoring data.gpu: 0 ("
                      f"{FFCV_IMAGENET_UNUSED_KEYS[('data', 'gpu')]})"]
                     if family == "rn18" else []), err


def test_ffcv_imagenet_rn18_config_runs_from_the_command_line(tmp_path):
    """`python train_imagenet.py --config-file rn18_configs/rn18_16_epochs.yaml ...` used
    to stop at "unknown config key 'data.gpu'". Here the run it names is complete, so the
    trainer answers without training: exit 0, the note the only line on stderr."""
    path, _ = ffcv_imagenet_config(tmp_path, "rn18", 16)
    betons = placeholder_betons(tmp_path, "imagenet", (10_000, 500), ["a", "b", "c"])
    args = ["--config-file", str(path), *data_args(*betons),
            f"--logging.folder={tmp_path / 'runs'}"]
    run_dir = tmp_path / "runs" / runs.run_id(resolve_config(args))
    run_dir.mkdir(parents=True)
    (run_dir / runs.SUMMARY_FILE).write_text('{"run_id": "%s"}' % run_dir.name)
    result = subprocess.run([sys.executable, str(REPO / "train_imagenet.py"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"run {run_dir.name} is already complete" in result.stdout
    assert result.stderr.strip().startswith(f"note: {path}: ignoring data.gpu: 0 ("), \
        result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_ignored_ffcv_imagenet_keys_stay_errors_elsewhere(tmp_path):
    """Only a config file may carry data.gpu; on the command line it is a typo as any."""
    with pytest.raises(ConfigError, match="unknown config key 'data.gpu' \\(from command line"):
        resolve_config([*data_args("t", "v"), "--data.gpu=0"])
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  gpus: 0\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.gpus'"):
        resolve_config(["--config-file", str(other), *data_args("t", "v")])


def test_every_count_has_a_bound_and_the_bound_is_inclusive(fake_betons):
    """Each integer key of the trainer is bounded (or is a flag / a seed with its own
    check); the bound itself is accepted, one past it is refused naming key and bound."""
    from ffcv_bias.train.checks import COUNT_BOUNDS, check_numbers
    from ffcv_bias.train.config import Integer
    from fastargs import get_current_config
    integer_keys = {path for path, entry in get_current_config().entries.items()
                    if isinstance(entry.checker, Integer)}
    assert integer_keys - set(COUNT_BOUNDS) == {("training", "seed"), ("logging", "log_level")}
    for (section, key), (low, high) in COUNT_BOUNDS.items():
        at_bound = small_args(fake_betons, "--training.epochs=10000", "--lr.lr_peak_epoch=0",
                              "--resolution.end_ramp=10000", f"--{section}.{key}={high}")
        if (section, key) == ("resolution", "min_res"):
            at_bound.append(f"--resolution.max_res={high}")
        check_numbers(resolve_config(at_bound))
        with pytest.raises(ConfigError, match=f"^{section}.{key}={high + 1} is out of range: "
                                              f"it must be in \\[{low}, {high}\\]$"):
            check_numbers(resolve_config(small_args(fake_betons,
                                                    f"--{section}.{key}={high + 1}")))


def test_the_lr_schedule_is_computed_per_step_not_per_epoch():
    """The trainer's LrSchedule builds nothing proportional to the run's length: a run of
    10**9 epochs x 10**6 steps answers at once, and every rate equals the array's."""
    from ffcv_bias.train.schedules import LrSchedule
    huge = LrSchedule("cosine", lr=1.0, epochs=10 ** 9, iters_per_epoch=10 ** 6,
                      lr_peak_epoch=2)
    assert len(huge) == 10 ** 15 and huge[-1] >= 0 and huge[0] == pytest.approx(1e-4)
    for schedule, options in (("cyclic", {}), ("step", {"step_length": 2}),
                              ("cosine", {"lr_peak_epoch": 1.5}),
                              ("step", {"warmup_epochs": 2, "warmup_start_factor": 0.1}),
                              ("cosine", {"lr_peak_epoch": 0, "warmup_epochs": 1.5})):
        lazy = LrSchedule(schedule, lr=1.7, epochs=6, iters_per_epoch=7, **options)
        array = lr_per_iteration(schedule, lr=1.7, epochs=6, iters_per_epoch=7, **options)
        assert len(lazy) == len(array) == 42
        assert [lazy[i] for i in range(42)] == list(array)  # bit for bit
        assert np.array_equal(lazy[5:30], array[5:30]) and lazy[-1] == array[-1]
        with pytest.raises(IndexError):
            lazy[42]


def test_every_yaml_file_is_read_through_the_strict_loader():
    """Duplicate keys are refused wherever the project reads YAML: no module parses YAML
    but ffcv_bias/common/yaml_files.py (the analysis's --where parses a typed value)."""
    allowed = {"ffcv_bias/common/yaml_files.py", "ffcv_bias/analysis/where.py"}
    offenders = []
    for path in sorted((REPO / "ffcv_bias").rglob("*.py")) + [REPO / "train_imagenet.py",
                                                             REPO / "write_datasets.py"]:
        relative = str(path.relative_to(REPO))
        text = path.read_text()
        if relative not in allowed and ("yaml.safe_load(" in text or "yaml.load(" in text):
            offenders.append(relative)
    assert offenders == []
