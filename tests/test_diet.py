"""Data diet (ffcv_bias/studies/diet/): scores, pruning, pruned training, figures.

The per-sample scores are checked against direct computations (EL2N by hand, GraNd against
one backward pass per sample); the score command runs end to end on the tiny Fashion-MNIST
betons (ResNet-8, 1 epoch, 2 runs, 16 px to keep it fast), and its pruned sets are trained
through the generated sweep file.
"""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ffcv_bias import runs
from ffcv_bias.studies import diet

REPO = Path(__file__).resolve().parents[1]
THREADS_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    for name, value in THREADS_ENV.items():
        monkeypatch.setenv(name, value)


def tiny_model(seed=0):
    """ResNet-8 in eval mode with non-trivial BatchNorm running statistics."""
    from ffcv_bias.models import create_model
    torch.manual_seed(seed)
    model = create_model("resnet8", 10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


# --------------------------------------------------------------------------------------
# Per-sample scores
# --------------------------------------------------------------------------------------

def test_el2n_is_the_distance_of_the_softmax_to_the_one_hot_label():
    model = tiny_model()
    images, labels = torch.randn(5, 3, 16, 16), torch.tensor([0, 3, 3, 9, 1])
    names = diet.grand_parameter_names(model, "last")
    el2n, _ = diet.per_sample_scores(model, images, labels, names)
    with torch.no_grad():
        logits = model(images).numpy().astype(np.float64)
    by_hand = []
    for row, label in zip(logits, labels.numpy()):
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        target = np.zeros(10)
        target[label] = 1.0
        by_hand.append(np.sqrt(((probabilities - target) ** 2).sum()))
    np.testing.assert_allclose(el2n.numpy(), by_hand, rtol=1e-5, atol=1e-6)


def backward_grad_norms(model, images, labels, parameter_names):
    """One backward pass per sample: the reference for GraNd."""
    parameters = dict(model.named_parameters())
    norms = []
    for index in range(len(labels)):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[index:index + 1]),
                                                 labels[index:index + 1])
        loss.backward()
        norms.append(torch.sqrt(sum(parameters[n].grad.pow(2).sum() for n in parameter_names)))
    return torch.stack(norms).numpy()


@pytest.mark.parametrize("grand_params", ["all", "last"])
def test_grand_equals_one_backward_pass_per_sample(grand_params):
    model = tiny_model(seed=1)
    images, labels = torch.randn(5, 3, 16, 16), torch.tensor([2, 2, 7, 0, 5])
    names = diet.grand_parameter_names(model, grand_params)
    # chunk_size 2 over 5 samples: vmap's chunks, including a short last one, must agree.
    _, grand = diet.per_sample_scores(model, images, labels, names, chunk_size=2)
    expected = backward_grad_norms(model, images, labels, names)
    np.testing.assert_allclose(grand.numpy(), expected, rtol=1e-4)
    assert names == (["fc.weight", "fc.bias"] if grand_params == "last"
                     else [n for n, _ in model.named_parameters()])


def test_a_sample_score_does_not_depend_on_its_batch():
    model = tiny_model(seed=2)
    images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    names = diet.grand_parameter_names(model, "all")
    el2n, grand = diet.per_sample_scores(model, images, labels, names)
    el2n_alone, grand_alone = diet.per_sample_scores(model, images[3:4], labels[3:4], names)
    np.testing.assert_allclose(el2n[3:4].numpy(), el2n_alone.numpy(), rtol=1e-5)
    np.testing.assert_allclose(grand[3:4].numpy(), grand_alone.numpy(), rtol=1e-4)


def test_scores_refuse_a_model_in_train_mode():
    model = tiny_model().train()
    with pytest.raises(diet.DietError, match="eval mode"):
        diet.per_sample_scores(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]),
                               diet.grand_parameter_names(model, "last"))


# --------------------------------------------------------------------------------------
# Pruning and the keep ratio
# --------------------------------------------------------------------------------------

def test_pruning_keeps_the_right_count_and_the_highest_scores():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 50, size=1001).astype(float)  # many ties
    for sparsity in (0.1, 0.25, 0.5, 0.9):
        kept = diet.keep_indices(scores, sparsity)
        assert len(kept) == round((1 - sparsity) * 1001)
        assert np.all(np.diff(kept) > 0)  # ascending, no repeats
        dropped = np.setdiff1d(np.arange(1001), kept)
        assert scores[kept].min() >= scores[dropped].max()
        # Among the boundary score, the lower indices are the kept ones.
        boundary = scores[kept].min()
        tied_kept = kept[scores[kept] == boundary]
        tied_dropped = dropped[scores[dropped] == boundary]
        if len(tied_dropped):
            assert tied_kept.max() < tied_dropped.min()


def test_equal_scores_keep_the_lowest_indices():
    np.testing.assert_array_equal(diet.keep_indices(np.zeros(10), 0.3), np.arange(7))


def test_bad_sparsities_are_refused():
    for text in ("0", "1", "0.5,0.5", "abc", ""):
        with pytest.raises(diet.DietError):
            diet.parse_sparsities(text)
    assert diet.parse_sparsities("0.5,0.1") == [0.1, 0.5]


def test_keep_ratio_table_sums_to_the_kept_sets():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=200)
    scores = rng.random(200) + 0.5 * (labels == 2)   # class 2 scores higher: kept more
    kept = {s: diet.keep_indices(scores, s) for s in (0.2, 0.6)}
    table = diet.keep_ratio_table(labels, ["a", "b", "c", "d"], kept)
    assert list(table.columns) == ["class", "class_name", "n_total", "kept_0.2", "ratio_0.2",
                                   "kept_0.6", "ratio_0.6"]
    assert table["n_total"].sum() == 200
    for sparsity, indices in kept.items():
        column = table[f"kept_{sparsity:g}"]
        assert column.sum() == len(indices)
        np.testing.assert_array_equal(column, np.bincount(labels[indices], minlength=4))
        np.testing.assert_allclose(table[f"ratio_{sparsity:g}"], column / table["n_total"])
    assert table["ratio_0.6"].idxmax() == 2


# --------------------------------------------------------------------------------------
# The score command end to end (2 trainer subprocesses)
# --------------------------------------------------------------------------------------

def trainer_overrides(betons):
    train, val = betons
    return [f"--data.train_dataset={train}", f"--data.val_dataset={val}",
            "--logging.progress=0", "--model.arch=resnet8", "--training.batch_size=100",
            "--lr.lr=0.4", "--lr.lr_peak_epoch=0.5", "--resolution.min_res=16",
            "--resolution.max_res=16", "--validation.resolution=16",
            "--validation.crop_ratio=1.0", "--validation.batch_size=100",
            "--data.num_workers=1"]


def score_argv(betons, out, *extra):
    return ["score", *trainer_overrides(betons), "--epochs", "1", "--seeds", "2",
            "--out", str(out), "--batch-size", "128", *extra]


@pytest.fixture(scope="module")
def scored(tiny_fashion_betons, tmp_path_factory):
    """(betons, score directory) after `diet score` with ResNet-8, 1 epoch, K=2."""
    saved = {name: os.environ.get(name) for name in THREADS_ENV}
    os.environ.update(THREADS_ENV)
    try:
        out = tmp_path_factory.mktemp("diet") / "scores"
        assert diet.main(score_argv(tiny_fashion_betons, out)) == 0
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return tiny_fashion_betons, out


def test_score_command_writes_whole_consistent_scores(scored):
    from ffcv_bias.loaders import read_labels
    betons, out = scored
    arrays, meta = diet.load_scores(out)
    labels = read_labels(betons[0])
    np.testing.assert_array_equal(arrays["labels"], labels)
    np.testing.assert_array_equal(arrays["indices"], np.arange(len(labels)))
    assert arrays["el2n_runs"].shape == arrays["grand_runs"].shape == (2, len(labels))
    np.testing.assert_allclose(arrays["el2n"], arrays["el2n_runs"].mean(axis=0))
    np.testing.assert_allclose(arrays["grand"], arrays["grand_runs"].mean(axis=0))
    assert np.all((arrays["el2n"] >= 0) & (arrays["el2n"] <= np.sqrt(2) + 1e-6))
    assert np.all(arrays["grand"] > 0)
    assert len(np.unique(arrays["random"])) == len(labels)
    # The two runs are different networks, so their scores differ.
    assert not np.allclose(arrays["el2n_runs"][0], arrays["el2n_runs"][1])
    assert meta["epochs"] == 1 and meta["seeds"] == [0, 1] and meta["grand_params"] == "all"
    assert meta["resolution"] == 16 and meta["num_samples"] == len(labels)
    for run_id in meta["run_ids"]:
        run_dir = out / "runs" / run_id
        assert runs.is_complete(run_dir)
        config = json.loads((run_dir / runs.CONFIG_FILE).read_text())
        assert config["training"]["epochs"] == 1
    table = pd.read_csv(out / "scores.csv")
    assert list(table.columns) == ["index", "label", "class_name", "el2n", "grand", "random"]
    np.testing.assert_allclose(table["el2n"], arrays["el2n"], rtol=1e-6)
    assert table["class_name"][0] == meta["classes"][labels[0]]


def test_scores_are_those_of_the_saved_weights_on_unaugmented_images(scored):
    """EL2N of run 1 recomputed by hand: its weights.pt, the train beton in order, whole
    images (centre crop ratio 1.0) at 16 px, no flip."""
    from ffcv_bias.loaders import create_val_loader, normalize
    betons, out = scored
    arrays, meta = diet.load_scores(out)
    run_dir = out / "runs" / meta["run_ids"][1]
    nested = json.loads((run_dir / runs.CONFIG_FILE).read_text())
    model = diet.build_model(nested, 10, run_dir / runs.WEIGHTS_FILE, "cpu")
    loader = create_val_loader(betons[0], batch_size=64, resolution=16, crop_ratio=1.0,
                               num_workers=1)
    images, labels = next(iter(loader))
    with torch.no_grad():
        probabilities = torch.softmax(model(normalize(images, "cpu")), dim=1)
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    by_hand = (probabilities - one_hot).norm(dim=1).numpy()
    np.testing.assert_allclose(arrays["el2n_runs"][1][:64], by_hand, rtol=1e-4, atol=1e-6)


def test_a_second_score_command_reuses_runs_and_scores(scored, capsys):
    betons, out = scored
    before = (out / "scores.npz").read_bytes()
    assert diet.main(score_argv(betons, out, "--no-train")) == 0
    with np.load(out / "scores.npz") as again, np.load(out / "scores.npz") as first:
        np.testing.assert_array_equal(again["grand_runs"], first["grand_runs"])
    assert (out / "scores.npz").read_bytes() == before


def test_epochs_0_scores_fresh_networks_without_training(tiny_fashion_betons, tmp_path):
    out = tmp_path / "init"
    argv = score_argv(tiny_fashion_betons, out, "--grand-params", "last")
    argv[argv.index("--epochs") + 1] = "0"
    assert diet.main(argv) == 0
    arrays, meta = diet.load_scores(out)
    assert not (out / "runs").exists()
    assert meta["epochs"] == 0 and meta["grand_params"] == "last"
    assert sorted(p.name for p in (out / "per_run").iterdir()) == sorted(
        f"init_{run_id}_grand-last.npz" for run_id in meta["run_ids"])
    # Seeds 0 and 1 are two different initialisations.
    assert not np.allclose(arrays["grand_runs"][0], arrays["grand_runs"][1])


def test_score_command_errors_are_one_line(tiny_fashion_betons, tmp_path, capsys):
    argv = score_argv(tiny_fashion_betons, tmp_path / "s", "--training.seed=3")
    assert diet.main(argv) == 2
    assert capsys.readouterr().err.strip() == ("error: --training.seed is set by the score "
                                               "command: use --seeds")
    assert diet.main(score_argv(tiny_fashion_betons, tmp_path / "s", "--training.wd=1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: trainer config:") and "training.wd" in err
    assert len(err.splitlines()) == 1
    assert diet.main(score_argv(tiny_fashion_betons, tmp_path / "s", "--no-train")) == 2
    assert "not complete" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Prune: index files, keep ratio, sweeps; a pruned run trains on the kept images only
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(scored, tmp_path_factory):
    _, scores_dir = scored
    out = tmp_path_factory.mktemp("pruned") / "el2n"
    assert diet.main(["prune", "--scores", str(scores_dir), "--score", "el2n",
                      "--sparsity", "0.25,0.5", "--out", str(out), "--seeds", "1",
                      "--set", "training.epochs=1"]) == 0
    return scores_dir, out


def test_prune_writes_the_highest_scores_per_sparsity(pruned):
    scores_dir, out = pruned
    arrays, _ = diet.load_scores(scores_dir)
    for sparsity, count in ((0.25, 450), (0.5, 300)):
        kept = np.load(out / f"keep_el2n_{sparsity:g}.npy")
        assert kept.dtype == np.int64 and len(kept) == count
        dropped = np.setdiff1d(np.arange(600), kept)
        assert arrays["el2n"][kept].min() >= arrays["el2n"][dropped].max()
    table = pd.read_csv(out / "keep_ratio.csv")
    assert table["kept_0.25"].sum() == 450 and table["kept_0.5"].sum() == 300
    assert table["n_total"].sum() == 600
    assert (out / "keep_ratio.png").stat().st_size > 0


def test_prune_sweep_points_pair_each_sparsity_with_its_index_file(pruned):
    from ffcv_bias.sweep import load_sweep, plan
    _, out = pruned
    # One sweep for every level: no per-level sweep files, no launcher script.
    assert not (out / "sweeps").exists() and not list(out.glob("*.sh"))
    sweep = load_sweep(out / "sweep.yaml")
    assert sweep.points == [
        {"data.sparsity": 0.0, "data.score": "el2n"},
        {"data.sparsity": 0.25, "data.score": "el2n",
         "data.keep_indices": str((out / "keep_el2n_0.25.npy").resolve())},
        {"data.sparsity": 0.5, "data.score": "el2n",
         "data.keep_indices": str((out / "keep_el2n_0.5.npy").resolve())}]
    assert sweep.seeds == [0] and sweep.name == "diet_el2n"
    planned = plan(sweep)
    assert len(planned) == 3
    seen = {}
    for run in planned:
        data = run.config["data"]
        seen[data["sparsity"]] = data["keep_indices"]
        assert data["score"] == "el2n" and run.config["training"]["epochs"] == 1
        assert run.run_dir.parent == (out / "runs").resolve()
    assert seen == {0.0: "", 0.25: str((out / "keep_el2n_0.25.npy").resolve()),
                    0.5: str((out / "keep_el2n_0.5.npy").resolve())}


def test_a_pruned_run_trains_on_the_kept_indices_only(pruned, monkeypatch):
    """Train the 50% level from the sweep file; spy on the trainer's train loader."""
    from ffcv_bias import train as trainer
    from ffcv_bias.sweep import load_sweep, plan
    _, out = pruned
    kept = np.load(out / "keep_el2n_0.5.npy")
    (run,) = [run for run in plan(load_sweep(out / "sweep.yaml"))
              if run.values["data.sparsity"] == 0.5]
    loaders = []

    def spy(*args, **kwargs):
        loaders.append(create_train_loader(*args, **kwargs))
        return loaders[-1]

    create_train_loader = trainer.create_train_loader
    monkeypatch.setattr(trainer, "create_train_loader", spy)
    assert trainer.main(list(run.config_args)) == 0
    (loader,) = loaders
    assert loader.num_samples == len(kept) == 300
    loader.set_epoch(0)
    order = loader.sample_order()
    assert len(order) == 300  # 3 full batches of 100
    assert set(order.tolist()) == set(kept.tolist())
    assert runs.is_complete(run.run_dir)


def test_prune_refuses_another_training_set(pruned, tiny_fashion_betons, tmp_path, capsys):
    scores_dir, _ = pruned
    argv = ["prune", "--scores", str(scores_dir), "--score", "grand", "--sparsity", "0.5",
            "--out", str(tmp_path / "p"), "--set", f"data.train_dataset={tiny_fashion_betons[1]}"]
    assert diet.main(argv) == 2
    assert "not the scored training set" in capsys.readouterr().err
    assert not (tmp_path / "p" / "keep_grand_0.5.npy").exists()


def test_the_shipped_score_sweep_and_the_score_command_agree_on_run_ids(
        tiny_fashion_betons, tmp_path, monkeypatch):
    """rn50_configs/sweeps/diet_cifar10_resnet18_scores.yaml trains the runs the score
    command looks for (its datasets are data/cifar10_*.beton under the launch directory)."""
    from ffcv_bias.sweep import load_sweep, plan
    (tmp_path / "data").mkdir()
    for source, split in zip(tiny_fashion_betons, ("train", "val")):
        for suffix in ("", ".classes.json"):
            os.symlink(f"{source}{suffix}", tmp_path / "data" / f"cifar10_{split}.beton{suffix}")
    monkeypatch.chdir(tmp_path)
    sweep_runs = plan(load_sweep(REPO / "rn50_configs/sweeps/diet_cifar10_resnet18_scores.yaml"))
    options = diet.build_parser().parse_args(
        ["score", "--config-file", str(REPO / "rn50_configs/cifar10_resnet18.yaml"),
         "--epochs", "20", "--seeds", "10", "--out", "diet/cifar10_resnet18/scores"])
    _, planned = diet.plan_score_runs(options, {}, diet.parse_seeds(options.seeds))
    assert [run.run_dir for run in sweep_runs] == [run_dir for _, _, _, run_dir in planned]


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------

def test_figures_rank_classes_by_the_dense_model(scored, tmp_path):
    from ffcv_bias.analysis.synthetic import make_synthetic_runs
    _, scores_dir = scored
    # class 9 best, class 0 worst when dense; 0.1 apart, far beyond the binomial noise
    base_acc = np.linspace(0.05, 0.95, 10)
    for score in ("el2n", "random"):
        make_synthetic_runs(tmp_path / "runs", settings=[0.0, 0.3, 0.6], seeds=[0, 1],
                            num_classes=10, n_per_class=500, base_acc=base_acc,
                            noise_std=0.0, vary_key="data.sparsity",
                            extra_config={"data.score": score}, seed=len(score))
    out = tmp_path / "figures"
    assert diet.main(["figures", "--runs", str(tmp_path / "runs"), "--scores",
                      str(scores_dir), "--out", str(out), "--top-k", "3"]) == 0
    for name in ("best_worst_el2n.png", "best_worst_random.png", "class_std.png", "top1.png",
                 "keep_ratio_el2n.png", "keep_ratio_random.png"):
        assert (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "best_worst_classes.csv")
    el2n = table[table["score"] == "el2n"]
    best = el2n[el2n["group"] == "best"].drop_duplicates("rank")["class"].tolist()
    worst = el2n[el2n["group"] == "worst"].drop_duplicates("rank")["class"].tolist()
    assert best == [9, 8, 7] and worst == [0, 1, 2]
    assert sorted(el2n["sparsity"].unique()) == [0.0, 0.3, 0.6]
    ratios = pd.read_csv(out / "keep_ratio_el2n.csv")
    assert ratios["kept_0.3"].sum() == 420 and ratios["kept_0.6"].sum() == 240


def test_figures_need_a_dense_reference(tmp_path, capsys):
    from ffcv_bias.analysis.synthetic import make_synthetic_runs
    make_synthetic_runs(tmp_path / "runs", settings=[0.3, 0.6], seeds=[0],
                        vary_key="data.sparsity", extra_config={"data.score": "el2n"})
    assert diet.main(["figures", "--runs", str(tmp_path / "runs"),
                      "--out", str(tmp_path / "f")]) == 2
    assert "no dense run" in capsys.readouterr().err
