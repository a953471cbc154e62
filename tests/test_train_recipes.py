"""Training recipes beyond SGD: AdamW, warm-up, gradient clipping, stochastic depth, and the
DenseNet-121 / ConvNeXt-Tiny / ViT-Small configs and Table-1 sweeps that use them.

Config and schedule tests need no torch; the trainer tests build the real Trainer on the
tiny Fashion-MNIST betons at 32 px (one torch thread, as tests/test_train.py).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from ffcv_bias.train.fastargs_strict import ConfigError
from ffcv_bias.train.schedules import lr_per_iteration
from ffcv_bias.sweep.spec import load_sweep, plan
from ffcv_bias.common.errors import EXIT_OK
from ffcv_bias.train.checks import ARCHS_WITHOUT_DROP_PATH, validate_semantics
from ffcv_bias.train.config import replace_values, resolve_config
from fixtures_datasets import placeholder_betons

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"densenet121_88_epochs.yaml": ("densenet121", "sgd", 88),
           "convnext_tiny_300_epochs.yaml": ("convnext_tiny", "adamw", 300),
           "vit_small_300_epochs.yaml": ("vit_small", "adamw", 300)}
SWEEP_GRIDS = {"crop": ("augment", "min_scale"), "weight_decay": ("training", "weight_decay")}


@pytest.fixture
def imagenet_like_betons(tmp_path):
    """Empty betons with ImageNet-sized sidecars: enough for every check but reading images."""
    return placeholder_betons(tmp_path, "imagenet", (1281167, 50000),
                              [f"c{i}" for i in range(1000)])


def data_args(betons):
    train, val = betons
    return [f"--data.train_dataset={train}", f"--data.val_dataset={val}"]


def check(betons, *extra):
    """resolve + validate a small config with `extra` overrides; returns the nested config."""
    nested = resolve_config([*data_args(betons), "--training.batch_size=8",
                             "--training.epochs=10", *extra])
    validate_semantics(nested)
    return nested


# --------------------------------------------------------------------------------------
# Config keys
# --------------------------------------------------------------------------------------

def test_new_keys_parse_with_documented_defaults(imagenet_like_betons):
    defaults = check(imagenet_like_betons)
    assert defaults["training"]["optimizer"] == "sgd"
    assert (defaults["training"]["adam_beta1"], defaults["training"]["adam_beta2"],
            defaults["training"]["adam_eps"]) == (0.9, 0.999, 1e-8)
    assert defaults["training"]["grad_clip_norm"] == 0.0
    assert defaults["lr"]["warmup_epochs"] == 0.0 and defaults["lr"]["warmup_start_factor"] == 0
    assert defaults["model"]["drop_path"] == 0.0
    nested = check(imagenet_like_betons, "--training.optimizer=adamw",
                   "--training.adam_beta2=0.95", "--training.adam_eps=1e-6",
                   "--training.grad_clip_norm=1.0", "--lr.lr_schedule_type=cosine",
                   "--lr.lr_peak_epoch=0", "--lr.warmup_epochs=2.5",
                   "--lr.warmup_start_factor=0.01", "--model.arch=vit_small",
                   "--model.drop_path=0.1")
    assert nested["training"]["optimizer"] == "adamw"
    assert nested["training"]["adam_beta2"] == 0.95 and nested["training"]["adam_eps"] == 1e-6
    assert nested["lr"]["warmup_epochs"] == 2.5 and nested["model"]["drop_path"] == 0.1


def test_an_unknown_optimizer_is_a_one_line_error(imagenet_like_betons):
    with pytest.raises(ConfigError, match="training.optimizer") as error:
        check(imagenet_like_betons, "--training.optimizer=lamb")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("extra, names", [
    (["--lr.warmup_epochs=2"], "lr.warmup_epochs needs lr.lr_schedule_type"),  # cyclic
    (["--lr.lr_schedule_type=cosine", "--lr.warmup_epochs=2"], "set lr.lr_peak_epoch=0"),
    (["--lr.lr_schedule_type=step", "--lr.warmup_epochs=10"], "lr.warmup_epochs=10.0 must"),
    (["--lr.lr_schedule_type=step", "--lr.warmup_epochs=0.5"], "whole epochs"),
    (["--lr.warmup_start_factor=1.5"], "lr.warmup_start_factor"),
    (["--training.adam_beta1=1.0"], "training.adam_beta1"),
    (["--training.adam_eps=0"], "training.adam_eps"),
    (["--training.grad_clip_norm=-1"], "training.grad_clip_norm"),
    (["--model.drop_path=1.0"], "model.drop_path must be < 1"),
    (["--model.arch=densenet121", "--model.drop_path=0.1"], "densenet121 has no residual"),
])
def test_bad_recipe_settings_are_one_line_config_errors(imagenet_like_betons, extra, names):
    with pytest.raises(ConfigError, match=names) as error:
        check(imagenet_like_betons, *extra)
    assert "\n" not in str(error.value)


def test_warmup_with_step_and_drop_path_on_residual_nets_are_accepted(imagenet_like_betons):
    check(imagenet_like_betons, "--lr.lr_schedule_type=step", "--lr.warmup_epochs=2")
    for arch in ("resnet50", "convnext_tiny", "vit_small"):
        check(imagenet_like_betons, f"--model.arch={arch}", "--model.drop_path=0.2")


def test_archs_without_drop_path_agree_with_the_model_factory():
    from ffcv_bias.train.models import ARCHITECTURES
    lacking = {name for name, arch in ARCHITECTURES.items()
               if "drop_path" not in arch.extra_options}
    assert lacking == ARCHS_WITHOUT_DROP_PATH


# --------------------------------------------------------------------------------------
# Recipes and sweeps
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_architecture_recipe_resolves_and_validates(name, imagenet_like_betons):
    arch, optimizer, epochs = RECIPES[name]
    nested = resolve_config(["--config-file", str(REPO / "rn50_configs" / name),
                             *data_args(imagenet_like_betons)])
    validate_semantics(nested)
    assert nested["model"]["arch"] == arch and nested["training"]["optimizer"] == optimizer
    assert nested["training"]["epochs"] == epochs and nested["dist"]["world_size"] == 8
    assert nested["training"]["label_smoothing"] == 0.1
    if optimizer == "adamw":
        assert nested["training"]["weight_decay"] == 0.05
        assert nested["lr"]["lr_schedule_type"] == "cosine" and nested["model"]["drop_path"] == 0.1
        assert nested["lr"]["warmup_epochs"] == {"convnext_tiny": 20, "vit_small": 5}[arch]


@pytest.mark.parametrize("arch", ["densenet121", "convnext_tiny", "vit_small"])
@pytest.mark.parametrize("kind", sorted(SWEEP_GRIDS))
def test_each_table1_sweep_plans(arch, kind, tmp_path):
    sweep = load_sweep(REPO / "rn50_configs" / "sweeps" / f"table1_{arch}_{kind}.yaml")
    planned = plan(sweep, folder=str(tmp_path))
    assert len(planned) == 2 * 20 and not any(run.config_error for run in planned)
    assert {run.config["model"]["arch"] for run in planned} == {arch}
    section, key = SWEEP_GRIDS[kind]
    values = sorted({run.config[section][key] for run in planned})
    # the unregularized reference and the recipe's own value
    recipe_decay = 1e-4 if arch == "densenet121" else 0.05
    assert values == ([0.08, 1.0] if kind == "crop" else [0.0, recipe_decay])
    assert len({run.run_id for run in planned}) == 40


def test_the_sweep_cli_plans_a_table1_sweep():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "ffcv_bias.sweep", "plan",
                             "rn50_configs/sweeps/table1_vit_small_crop.yaml"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "40 runs" in result.stdout


# --------------------------------------------------------------------------------------
# Schedules with warm-up
# --------------------------------------------------------------------------------------

BASE_SCHEDULES = [("cyclic", dict(lr_peak_epoch=2)), ("step", dict(step_length=3)),
                  ("cosine", dict(lr_peak_epoch=1)), ("cosine", dict(lr_peak_epoch=0))]


@pytest.mark.parametrize("schedule, options", BASE_SCHEDULES)
def test_no_warmup_leaves_every_schedule_unchanged(schedule, options):
    before = lr_per_iteration(schedule, lr=1.7, epochs=8, iters_per_epoch=7, **options)
    after = lr_per_iteration(schedule, lr=1.7, epochs=8, iters_per_epoch=7, warmup_epochs=0,
                             warmup_start_factor=0.3, **options)
    assert np.array_equal(before, after)


def test_cosine_with_warmup_ramps_linearly_then_decays_over_the_remaining_epochs():
    lr, epochs, per_epoch, warmup = 4e-3, 10, 20, 2
    lrs = lr_per_iteration("cosine", lr=lr, epochs=epochs, iters_per_epoch=per_epoch,
                           lr_peak_epoch=0, warmup_epochs=warmup, warmup_start_factor=0.0)
    end = warmup * per_epoch  # first iteration after the warm-up
    assert lrs.shape == (epochs * per_epoch,)
    assert lrs[0] == 0.0 and lrs[per_epoch] == pytest.approx(lr / 2)
    assert lrs[end] == pytest.approx(lr) and lrs.max() == pytest.approx(lr)
    assert np.all(np.diff(lrs[:end + 1]) > 0) and np.all(np.diff(lrs[end:]) < 0)
    # the cosine spans the 8 epochs after the warm-up, as a run of 8 epochs would
    np.testing.assert_allclose(lrs[end:], lr_per_iteration(
        "cosine", lr=lr, epochs=epochs - warmup, iters_per_epoch=per_epoch, lr_peak_epoch=0))
    assert 0 < lrs[-1] < lr * 1e-3


def test_warmup_start_factor_and_the_cosine_own_ramp_agree():
    # lr_peak_epoch=W is the same as warmup_epochs=W starting from 1e-4 x lr
    own = lr_per_iteration("cosine", lr=2.0, epochs=6, iters_per_epoch=9, lr_peak_epoch=1.5)
    warm = lr_per_iteration("cosine", lr=2.0, epochs=6, iters_per_epoch=9, lr_peak_epoch=0,
                            warmup_epochs=1.5, warmup_start_factor=1e-4)
    np.testing.assert_allclose(own, warm, rtol=1e-12)


def test_step_with_warmup_counts_its_steps_from_the_warmup_end():
    lrs = lr_per_iteration("step", lr=1.0, epochs=5, iters_per_epoch=4, step_ratio=0.1,
                           step_length=2, warmup_epochs=1, warmup_start_factor=0.2)
    np.testing.assert_allclose(lrs[:4], [0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(lrs[4:], lr_per_iteration(
        "step", lr=1.0, epochs=4, iters_per_epoch=4, step_ratio=0.1, step_length=2))
    assert lrs[-1] == pytest.approx(0.1 * 0.25)  # the last epoch slides to 0
    with pytest.raises(ValueError, match="whole epochs"):
        lr_per_iteration("step", lr=1.0, epochs=3, iters_per_epoch=4, warmup_epochs=0.5)


def test_warmup_refuses_cyclic_and_too_long_warmups():
    with pytest.raises(ValueError, match="cosine and step"):
        lr_per_iteration("cyclic", lr=1.0, epochs=4, iters_per_epoch=2, warmup_epochs=1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        lr_per_iteration("cosine", lr=1.0, epochs=4, iters_per_epoch=2, warmup_epochs=4)


# --------------------------------------------------------------------------------------
# The trainer: AdamW groups, clipping, real short runs
# --------------------------------------------------------------------------------------

def test_adamw_decays_only_the_weights_of_vit_small():
    import torch

    from ffcv_bias.train.models import create_model, describe_weight_decay, weight_decay_groups
    from ffcv_bias.train.optimizer import build_optimizer
    model = create_model("vit_small", 10, img_size=32, drop_path=0.1)
    training = resolve_config(["--data.train_dataset=t", "--data.val_dataset=v",
                               "--training.optimizer=adamw",
                               "--training.adam_beta2=0.95"])["training"]
    optimizer = build_optimizer("adamw", weight_decay_groups(model, 0.05), training)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups
                for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(decay_of) == len(named)
    decayed, not_decayed = describe_weight_decay(model)
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
                 "norm.weight", "head.bias"):
        assert name in not_decayed and decay_of[id(named[name])] == 0.0
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                 "blocks.11.mlp.fc2.weight", "head.weight"):
        assert name in decayed and decay_of[id(named[name])] == 0.05
    # every 2-D+ weight but the embeddings decays; nothing 1-D does
    assert all(named[name].ndim >= 2 for name in decayed)


def tiny_args(betons, folder, arch, *extra):
    """2 epochs of 6 steps on half the tiny training set (CPU time is the test's cost),
    validated once, without the mirror-image pass."""
    train, val = betons
    keep = Path(folder) / "keep_half.json"
    keep.write_text(json.dumps(list(range(0, 600, 2))))
    return [f"--data.train_dataset={train}", f"--data.val_dataset={val}",
            f"--data.keep_indices={keep}", "--data.sparsity=0.5",
            f"--logging.folder={folder}", "--logging.progress=0", "--logging.log_level=0",
            "--validation.lr_tta=0", f"--model.arch={arch}",
            "--training.epochs=2", "--training.batch_size=50", "--data.num_workers=1",
            "--training.optimizer=adamw", "--training.weight_decay=0.05",
            "--lr.lr=1e-3", "--lr.lr_schedule_type=cosine", "--lr.lr_peak_epoch=0",
            "--lr.warmup_epochs=1", "--lr.warmup_start_factor=0.1",
            "--training.grad_clip_norm=1.0", "--model.drop_path=0.1",
            "--resolution.min_res=32", "--resolution.max_res=32",
            "--validation.resolution=32", "--validation.crop_ratio=1.0",
            "--validation.batch_size=200", *extra]


@pytest.fixture
def one_torch_thread(monkeypatch):
    """One torch thread: on 2 shared cores a second thread mostly waits (as test_train.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def global_grad_norm(model):
    import torch
    return float(torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))


def test_vit_small_trains_with_adamw_warmup_and_clipping(tiny_fashion_betons, tmp_path,
                                                         one_torch_thread):
    import torch

    from ffcv_bias.train.launch import trainer_in_this_process
    nested = resolve_config(tiny_args(tiny_fashion_betons, tmp_path, "vit_small"))
    validate_semantics(nested)
    (tmp_path / "run").mkdir()
    with trainer_in_this_process(nested, tmp_path / "run") as trainer:
        assert isinstance(trainer.optimizer, torch.optim.AdamW)
        steps = len(trainer.train_loader)
        assert steps == 6  # 300 kept images / 50
        np.testing.assert_allclose(trainer.lr_schedule[:steps],
                                   1e-3 * (0.1 + 0.9 * np.arange(steps) / steps))
        assert trainer.lr_schedule[steps] == pytest.approx(1e-3)
        assert trainer.model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)

        # one real batch (the loader reuses its buffers: clone, and finish the epoch);
        # lr 0 so the weights stay put between the steps
        trainer.train_loader.set_epoch(0)
        batches = [(images.clone(), labels) for images, labels in trainer.train_loader]
        images, labels = batches[0]
        trainer.cfg = replace_values(trainer.cfg, {"training.grad_clip_norm": 0.0})
        trainer.train_step(images, labels, 0.0)
        raw_norm = global_grad_norm(trainer.model)
        limit = raw_norm / 10
        trainer.cfg = replace_values(trainer.cfg, {"training.grad_clip_norm": limit})
        trainer.train_step(images, labels, 0.0)
        assert global_grad_norm(trainer.model) == pytest.approx(limit, rel=1e-4)

        # with a GradScaler the limit holds for the unscaled gradient
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        trainer.train_step(images, labels, 0.0)
        assert global_grad_norm(trainer.model) == pytest.approx(limit, rel=1e-4)
        trainer.scaler = None
        trainer.cfg = replace_values(trainer.cfg, {"training.grad_clip_norm": 1.0})

        summary = trainer.fit()
    assert summary["epochs"] == 2 and len(summary["per_class_acc"]) == 10
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["lr"] for entry in log] == pytest.approx(
        [trainer.lr_schedule[steps - 1], trainer.lr_schedule[-1]])
    assert all(np.isfinite(entry["train_loss"]) for entry in log)


def test_convnext_tiny_runs_end_to_end_with_adamw(tiny_fashion_betons, tmp_path,
                                                 one_torch_thread):
    from ffcv_bias.record import runs
    from ffcv_bias.train.launch import main
    args = tiny_args(tiny_fashion_betons, tmp_path, "convnext_tiny")
    assert main(args) == EXIT_OK
    run_dir = tmp_path / runs.run_id(resolve_config(args))
    summary = json.loads((run_dir / runs.SUMMARY_FILE).read_text())
    assert summary["epochs"] == 2 and 0 <= summary["top1"] <= 1
    config = json.loads((run_dir / runs.CONFIG_FILE).read_text())
    assert config["training"]["optimizer"] == "adamw"
    assert config["lr"]["warmup_epochs"] == 1.0 and config["training"]["grad_clip_norm"] == 1.0
