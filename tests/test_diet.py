"""Data diet (ffcv_bias/studies/diet/): scores, pruning, pruned training, figures.

The per-sample scores are checked against direct computations (EL2N by hand, GraNd against
one backward pass per sample); the score command runs end to end on the tiny Fashion-MNIST
betons (ResNet-8, 1 epoch, 2 runs, 16 px to keep it fast), and its pruned sets are trained
through the generated sweep file.
"""
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ffcv_bias.common import env
from ffcv_bias.record import runs
from ffcv_bias.studies import diet

REPO = Path(__file__).resolve().parents[1]
THREADS_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    for name, value in THREADS_ENV.items():
        monkeypatch.setenv(name, value)


def tiny_model(seed=0):
    """ResNet-8 in eval mode with non-trivial BatchNorm running statistics."""
    from ffcv_bias.train.models import create_model
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
            "--data.num_workers=1", "--training.epochs=2"]


def score_argv(betons, out, *extra):
    """Score at epoch 1 of the runs' 2-epoch schedule, K=2."""
    return ["score", *trainer_overrides(betons), "--epochs", "1", "--seeds", "2",
            "--out", str(out), "--batch-size", "128", *extra]


QUOTA_FRACTION = 0.2


@pytest.fixture(scope="module")
def scored(tiny_fashion_betons, tmp_path_factory, warm_python):
    """(betons, score directory) after `diet score` with ResNet-8, K=2 runs of 2 epochs
    scored at epoch 1, and the held-out run of class-quota pruning (3 runs, 2 at once).
    The trainers start from conftest's warm python."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in THREADS_ENV.items():
            patch.setenv(name, value)
        patch.setenv(env.PYTHON_ENV_VAR, shlex.join(warm_python))
        out = tmp_path_factory.mktemp("diet") / "scores"
        assert diet.main(score_argv(tiny_fashion_betons, out, "--max-parallel", "2",
                                    "--quota-val-fraction", str(QUOTA_FRACTION))) == 0
    return tiny_fashion_betons, out


def test_score_command_writes_whole_consistent_scores(scored):
    from ffcv_bias.data.loaders import read_labels
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
    assert meta["full_epochs"] == 2 and meta["weights"] == "weights_epoch1.pt"
    assert meta["resolution"] == 16 and meta["num_samples"] == len(labels)
    for run_id in meta["run_ids"]:
        run_dir = out / "runs" / run_id
        # A score run is a run of the normal (2-epoch) schedule that kept its epoch-1 weights.
        assert runs.is_complete(run_dir) and (run_dir / "weights_epoch1.pt").is_file()
        config = json.loads((run_dir / runs.CONFIG_FILE).read_text())
        assert config["training"]["epochs"] == 2
        assert config["training"]["save_weights_at"] == [1]
    table = pd.read_csv(out / "scores.csv")
    assert list(table.columns) == ["index", "label", "class_name", "el2n", "grand",
                                   "input_norm", "random"]
    correlations = pd.read_csv(out / "correlations.csv")
    names = ["el2n", "grand", "input_norm", "random"]
    assert list(correlations["score"]) == names
    assert list(correlations["label"]) == ["EL2N@1", "GraNd@1", "input norm", "random"]
    matrix = correlations[names].to_numpy()
    np.testing.assert_allclose(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    from scipy.stats import spearmanr
    assert matrix[0, 1] == pytest.approx(spearmanr(arrays["el2n"], arrays["grand"])[0])
    np.testing.assert_allclose(table["el2n"], arrays["el2n"], rtol=1e-6)
    assert table["class_name"][0] == meta["classes"][labels[0]]


def test_scores_are_those_of_the_saved_weights_on_unaugmented_images(scored):
    """EL2N of run 1 recomputed by hand: its epoch-1 weights, the train beton in order,
    whole images (centre crop ratio 1.0) at 16 px, no flip."""
    from ffcv_bias.data.loaders import create_val_loader, normalize
    betons, out = scored
    arrays, meta = diet.load_scores(out)
    run_dir = out / "runs" / meta["run_ids"][1]
    nested = json.loads((run_dir / runs.CONFIG_FILE).read_text())
    model = diet.build_model(nested, 10, run_dir / "weights_epoch1.pt", "cpu")
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
    assert diet.main(score_argv(betons, out, "--no-train", "--quota-val-fraction",
                                str(QUOTA_FRACTION))) == 0
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
    from ffcv_bias.sweep import load_sweep, plan
    from ffcv_bias.train import launch, loop
    _, out = pruned
    kept = np.load(out / "keep_el2n_0.5.npy")
    (run,) = [run for run in plan(load_sweep(out / "sweep.yaml"))
              if run.values["data.sparsity"] == 0.5]
    loaders = []

    def spy(*args, **kwargs):
        loaders.append(create_train_loader(*args, **kwargs))
        return loaders[-1]

    create_train_loader = loop.create_train_loader
    monkeypatch.setattr(loop, "create_train_loader", spy)
    assert launch.main(list(run.config_args)) == 0
    (loader,) = loaders
    assert loader.num_samples == len(kept) == 300
    loader.set_epoch(0)
    order = loader.sample_order()
    assert len(order) == 300  # 3 full batches of 100
    assert set(order.tolist()) == set(kept.tolist())
    assert runs.is_complete(run.run_dir)


def test_the_pruning_sweep_is_analysed_like_a_regularization_sweep(pruned, tmp_path,
                                                                   warm_python, monkeypatch):
    """Launch the whole pruned sweep (dense, 25%, 50%; the 50% run may be done already;
    trainers from the warm python), then the analysis with sparsity as the varied key:
    Welch tests and Table 1 per level."""
    from ffcv_bias.analysis.__main__ import main as analysis_main
    from ffcv_bias.sweep.cli import main as sweep_main
    monkeypatch.setenv(env.PYTHON_ENV_VAR, shlex.join(warm_python))
    _, out = pruned
    assert sweep_main(["launch", str(out / "sweep.yaml"), "--max-parallel", "2"]) == 0
    report = tmp_path / "report"
    assert analysis_main([str(out / "runs"), "--vary", "data.sparsity", "--out",
                          str(report)]) == 0
    welch = pd.read_csv(report / "welch.csv")
    assert sorted(welch["setting"].unique()) == [0.25, 0.5] and len(welch) == 20
    table1 = pd.read_csv(report / "table1.csv")
    assert sorted(table1["setting"].unique()) == [0.25, 0.5]


def test_prune_refuses_another_training_set(pruned, tiny_fashion_betons, tmp_path, capsys):
    scores_dir, _ = pruned
    argv = ["prune", "--scores", str(scores_dir), "--score", "grand", "--sparsity", "0.5",
            "--out", str(tmp_path / "p"), "--set", f"data.train_dataset={tiny_fashion_betons[1]}"]
    assert diet.main(argv) == 2
    assert "not the scored training set" in capsys.readouterr().err
    assert not (tmp_path / "p" / "keep_grand_0.5.npy").exists()


SHIPPED_SCORE_SWEEPS = [
    # (sweep file, betons it names under data/, score command arguments, score epoch,
    #  full epochs)
    ("diet_cifar10_resnet18_scores.yaml", ("cifar10_train", "cifar10_val"),
     ["--config-file", str(REPO / "rn50_configs/cifar10_resnet18.yaml"), "--epochs", "20",
      "--seeds", "10", "--out", "diet/cifar10_resnet18/scores"], 20, 200),
    ("diet_fashion_mnist_reference_scores.yaml",
     ("fashion-mnist-1k_train", "fashion-mnist_val"),
     ["--config-file", str(REPO / "rn50_configs/fashion_mnist_cpu.yaml"),
      "--data.train_dataset=data/fashion-mnist-1k_train.beton", "--data.num_workers=1",
      "--model.arch=resnet8", "--training.epochs=90", "--lr.lr_peak_epoch=18",
      "--logging.log_level=0", "--logging.progress=0", "--epochs", "9", "--seeds", "4",
      "--max-parallel", "2", "--also-init", "--quota-val-fraction", "0.2",
      "--out", "diet/fashion_mnist/scores"], 9, 90),
]


@pytest.mark.parametrize("sweep_file, beton_names, score_args, epoch, full_epochs",
                         SHIPPED_SCORE_SWEEPS)
def test_the_shipped_score_sweeps_and_the_score_command_agree_on_run_ids(
        tiny_fashion_betons, tmp_path, monkeypatch, sweep_file, beton_names, score_args,
        epoch, full_epochs):
    """Each shipped score sweep trains the runs the score command (as its header writes
    it) looks for: full-schedule runs keeping their epoch-k weights."""
    from ffcv_bias.sweep import load_sweep, plan
    (tmp_path / "data").mkdir()
    for source, name in zip(tiny_fashion_betons, beton_names):
        for suffix in ("", ".classes.json"):
            os.symlink(f"{source}{suffix}", tmp_path / "data" / f"{name}.beton{suffix}")
    monkeypatch.chdir(tmp_path)
    sweep_runs = plan(load_sweep(REPO / "rn50_configs/sweeps" / sweep_file))
    options, extra = diet.build_parser().parse_known_args(["score", *score_args])
    _, planned = diet.plan_score_runs(options, diet.parse_overrides(extra),
                                      diet.parse_seeds(options.seeds))
    assert [run.run_dir for run in sweep_runs] == [run.run_dir for run in planned]
    assert {run.config["training"]["epochs"] for run in planned} == {full_epochs}
    assert {tuple(run.config["training"]["save_weights_at"]) for run in planned} == {(epoch,)}
    assert f"--epochs {epoch} " in (REPO / "rn50_configs/sweeps" / sweep_file).read_text()


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


# --------------------------------------------------------------------------------------
# training.save_weights_at: the weights of epoch k of the normal schedule
# --------------------------------------------------------------------------------------

def test_save_weights_at_keeps_that_epochs_weights_and_changes_nothing(
        tiny_fashion_betons, tmp_path):
    """Two 2-epoch runs, one keeping its epoch-1 weights: same run_id, bit-identical
    logits; the kept weights are the epoch-1 model (they reproduce log.jsonl's epoch-1
    per-class accuracy on the val set)."""
    from ffcv_bias.train import launch
    from ffcv_bias.data.loaders import create_val_loader
    base = trainer_overrides(tiny_fashion_betons) + ["--validation.lr_tta=0"]
    folders = {name: tmp_path / name for name in ("plain", "kept")}
    assert launch.main(base + [f"--logging.folder={folders['plain']}"]) == 0
    assert launch.main(base + [f"--logging.folder={folders['kept']}",
                                "--training.save_weights_at=1"]) == 0
    (plain,), (kept,) = (list(folders[name].iterdir()) for name in ("plain", "kept"))
    assert plain.name == kept.name  # the option does not enter the run_id
    assert ((plain / runs.VAL_LOGITS_FILE).read_bytes()
            == (kept / runs.VAL_LOGITS_FILE).read_bytes())
    assert not (plain / "weights_epoch1.pt").exists()
    assert sorted(p.name for p in kept.glob("weights*.pt")) == ["weights.pt",
                                                                "weights_epoch1.pt"]
    nested = json.loads((kept / runs.CONFIG_FILE).read_text())
    assert nested["training"]["save_weights_at"] == [1]
    model = diet.build_model(nested, 10, kept / "weights_epoch1.pt", "cpu")
    loader = create_val_loader(tiny_fashion_betons[1], batch_size=100, resolution=16,
                               crop_ratio=1.0, num_workers=1)
    predictions, labels = diet.predict(model, loader, "cpu")
    first_epoch = json.loads((kept / runs.LOG_FILE).read_text().splitlines()[0])
    assert first_epoch["epoch"] == 0
    np.testing.assert_allclose(
        [np.mean(predictions[labels == c] == c) for c in range(10)],
        first_epoch["per_class_acc"], atol=1e-9)
    epoch1 = torch.load(kept / "weights_epoch1.pt", weights_only=True)
    final = torch.load(kept / runs.WEIGHTS_FILE, weights_only=True)
    assert any(not torch.equal(epoch1[name], final[name]) for name in final)


def test_save_weights_at_refuses_an_epoch_after_the_last(tiny_fashion_betons, tmp_path,
                                                         capsys):
    from ffcv_bias.train import launch
    argv = trainer_overrides(tiny_fashion_betons) + [f"--logging.folder={tmp_path}",
                                                      "--training.save_weights_at=1,3"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: training.save_weights_at=[1, 3] names an epoch after "
                   "training.epochs=2")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# Baselines and correlations
# --------------------------------------------------------------------------------------

def test_input_norm_is_the_norm_of_the_normalized_image(scored):
    """Recomputed from the decoded pixels with numpy: (x - mean) / std over the whole
    16 px image, L2 over all channels and pixels."""
    from ffcv_bias.data.loaders import IMAGENET_MEAN, IMAGENET_STD, create_val_loader
    betons, out = scored
    arrays, _ = diet.load_scores(out)
    loader = create_val_loader(betons[0], batch_size=128, resolution=16, crop_ratio=1.0,
                               num_workers=1)
    pixels = np.concatenate([images.numpy().astype(np.float64) for images, _ in loader])
    assert pixels.shape == (600, 3, 16, 16)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float64).reshape(1, 3, 1, 1)
    direct = np.sqrt((((pixels - mean) / std) ** 2).reshape(600, -1).sum(axis=1))
    np.testing.assert_allclose(arrays["input_norm"], direct, rtol=1e-5)


def test_spearman_matrix_on_known_vectors():
    x = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])
    ties = np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0])
    columns = np.column_stack([x, np.exp(x), -x, ties])
    matrix = diet.spearman_matrix(columns)
    assert matrix[0, 1] == pytest.approx(1.0)     # a monotone transform keeps the ranks
    assert matrix[0, 2] == pytest.approx(-1.0)    # reversed ranks
    # By hand: ranks of x are [4,1,5,2,6,8,3,7]; of ties [1.5,1.5,3.5,3.5,5.5,5.5,7.5,7.5].
    rx = np.array([4, 1, 5, 2, 6, 8, 3, 7], dtype=float)
    rt = np.array([1.5, 1.5, 3.5, 3.5, 5.5, 5.5, 7.5, 7.5])
    by_hand = (((rx - rx.mean()) * (rt - rt.mean())).sum()
               / np.sqrt(((rx - rx.mean()) ** 2).sum() * ((rt - rt.mean()) ** 2).sum()))
    assert matrix[0, 3] == pytest.approx(by_hand)
    np.testing.assert_allclose(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 1.0)


def test_also_init_adds_the_initial_networks_scores(scored, tmp_path, capsys):
    """--also-init beside the epoch-k scores: GraNd@init and EL2N@init of the same seeds,
    in the npz, the csv and the printed and saved correlations."""
    _, out = scored
    again = tmp_path / "again"
    again.mkdir()
    os.symlink(out / "runs", again / "runs")
    argv = score_argv(scored[0], again, "--no-train", "--also-init", "--grand-params", "last")
    assert diet.main(argv) == 0
    arrays, meta = diet.load_scores(again)
    assert meta["scores"] == ["el2n", "grand", "el2n_init", "grand_init", "input_norm",
                              "random"]
    assert arrays["grand_init_runs"].shape == (2, 600)
    printed = capsys.readouterr().out
    assert "GraNd@init" in printed and "n = 600 training images" in printed
    labels = list(pd.read_csv(again / "correlations.csv")["label"])
    assert labels == ["EL2N@1", "GraNd@1", "EL2N@init", "GraNd@init", "input norm", "random"]


def test_a_complete_run_without_the_epoch_weights_is_named(scored, tmp_path, capsys):
    """A finished run trained without training.save_weights_at cannot make the weights:
    one line, before any training."""
    import shutil
    betons, out = scored
    copy = tmp_path / "copy"
    shutil.copytree(out / "runs", copy / "runs", symlinks=True)
    _, meta = diet.load_scores(out)
    (copy / "runs" / meta["run_ids"][1] / "weights_epoch1.pt").unlink()
    assert diet.main(score_argv(betons, copy)) == 2
    err = capsys.readouterr().err.strip()
    assert "is complete but kept no weights_epoch1.pt" in err and len(err.splitlines()) == 1
    assert meta["run_ids"][1] in err


# --------------------------------------------------------------------------------------
# Class-quota pruning (DRoP)
# --------------------------------------------------------------------------------------

def test_class_quotas_are_proportional_with_redistribution():
    # weights N_k (1 - r_k) = 10, 50, 10: shares 14.3, 71.4, 14.3 of 100; class 2 holds
    # only 10, so 90 go to classes 0 and 1 in the ratio 10:50.
    np.testing.assert_array_equal(diet.class_quotas([100, 100, 10], [0.9, 0.5, 0.0], 100),
                                  [15, 75, 10])
    # Every class with errors full: the error-free classes share the rest by size.
    np.testing.assert_array_equal(diet.class_quotas([10, 10, 20, 40], [0.5, 0.5, 1.0, 1.0],
                                                    50), [10, 10, 10, 20])
    # Rounding: floors, then the largest remainders; always exactly the total.
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 50, size=7)
        recall = rng.random(7)
        total = int(rng.integers(1, sizes.sum() + 1))
        quotas = diet.class_quotas(sizes, recall, total)
        assert quotas.sum() == total and np.all(quotas <= sizes) and np.all(quotas >= 0)


def test_quota_keep_indices_hit_the_quotas_randomly_within_class():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), [100, 100, 10])
    random_scores = rng.random(len(labels))
    kept, quotas = diet.quota_keep_indices(labels, [0.9, 0.5, 0.0], random_scores, 100)
    np.testing.assert_array_equal(quotas, [15, 75, 10])
    np.testing.assert_array_equal(np.bincount(labels[kept], minlength=3), quotas)
    for class_id in range(3):  # within a class: the highest random scores
        members = np.flatnonzero(labels == class_id)
        kept_here = np.intersect1d(kept, members)
        dropped = np.setdiff1d(members, kept_here)
        if len(dropped):
            assert random_scores[kept_here].min() > random_scores[dropped].max()


def test_holdout_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), [10, 20, 30, 3])
    train, val = diet.holdout_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val]), [2, 4, 6, 1])
    again = diet.holdout_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(again[1], val)


def test_scores_record_the_held_out_recalls_of_the_training_split(scored):
    betons, out = scored
    _, meta = diet.load_scores(out)
    info = meta["class_quota"]
    val = np.load(out / "quota_val_indices.npy")
    train = np.load(out / "quota_train_indices.npy")
    assert info["n_val"] == len(val) == 120 and len(train) == 480  # 12 of each 60
    assert len(np.intersect1d(val, train)) == 0
    assert info["source"] == str(betons[0]) and len(info["recall"]) == 10
    holdout = out / "runs" / info["run_id"]
    config = json.loads((holdout / runs.CONFIG_FILE).read_text())
    assert config["data"]["keep_indices"] == str((out / "quota_train_indices.npy").resolve())
    assert config["data"]["score"] == "quota-holdout"
    table = pd.read_csv(out / "class_recall.csv")
    np.testing.assert_allclose(table["recall"], info["recall"], atol=1e-6)
    assert table["n_val"].sum() == 120


def test_class_quota_recalls_never_read_the_test_split(scored, tmp_path, monkeypatch):
    """Every loader the score command opens reads the training beton: a spy on the
    loaders while the recalls are recomputed."""
    from ffcv_bias.data import loaders
    betons, out = scored
    opened = []
    real = loaders.create_val_loader

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loaders, "create_val_loader", spy)
    monkeypatch.setattr(loaders, "create_train_loader", lambda *a, **k: pytest.fail("trained"))
    again = tmp_path / "again"
    again.mkdir()
    os.symlink(out / "runs", again / "runs")
    argv = score_argv(betons, again, "--no-train", "--quota-val-fraction", str(QUOTA_FRACTION))
    assert diet.main(argv) == 0
    assert opened and set(opened) == {str(betons[0])}
    _, first = diet.load_scores(out)
    _, second = diet.load_scores(again)
    assert second["class_quota"]["recall"] == first["class_quota"]["recall"]


def prune_at_half(scores_dir, out, policy):
    """`diet prune` of one policy at sparsity 0.5, one seed; (arrays, meta) of the scores."""
    assert diet.main(["prune", "--scores", str(scores_dir), "--score", policy,
                      "--sparsity", "0.5", "--out", str(out), "--seeds", "1",
                      "--set", "training.epochs=1"]) == 0
    return diet.load_scores(scores_dir)


def test_prune_class_quota_keeps_the_quotas_and_records_the_split(scored, tmp_path):
    _, scores_dir = scored
    out = tmp_path / "quota"
    arrays, meta = prune_at_half(scores_dir, out, "class-quota")
    kept = np.load(out / "keep_class-quota_0.5.npy")
    record = json.loads((out / "prune.json").read_text())
    expected = diet.class_quotas(np.bincount(arrays["labels"]), meta["class_quota"]["recall"],
                                 300)
    assert record["policy"] == "class-quota" and record["kept"] == {"0.5": 300}
    assert record["class_quota"]["quotas"]["0.5"] == expected.tolist()
    np.testing.assert_array_equal(np.bincount(arrays["labels"][kept], minlength=10), expected)
    assert record["class_quota"]["val_indices_file"] == str(
        (scores_dir / "quota_val_indices.npy").resolve())
    from ffcv_bias.sweep import load_sweep
    assert load_sweep(out / "sweep.yaml").points[1]["data.score"] == "class-quota"


def test_laplace_recall_gives_an_error_free_class_weight():
    # 0 errors of 20 -> error 1/22; 8 of 20 -> 9/22; 20 of 20 -> 21/22.
    np.testing.assert_allclose(diet.laplace_recall([1.0, 0.6, 0.0], [20, 20, 20]),
                               [1 - 1 / 22, 1 - 9 / 22, 1 - 21 / 22])
    # Literal DRoP prunes the error-free class away; the Laplace estimate keeps some of it.
    literal = diet.class_quotas([100, 100, 100], [1.0, 0.6, 0.6], 150)
    smoothed = diet.class_quotas([100, 100, 100],
                                 diet.laplace_recall([1.0, 0.6, 0.6], [20, 20, 20]), 150)
    assert literal[0] == 0 and smoothed[0] > 0 and smoothed.sum() == 150


def test_prune_class_quota_laplace_records_both_recalls(scored, tmp_path):
    _, scores_dir = scored
    out = tmp_path / "laplace"
    arrays, meta = prune_at_half(scores_dir, out, "class-quota-laplace")
    info = json.loads((out / "prune.json").read_text())["class_quota"]
    used = diet.laplace_recall(meta["class_quota"]["recall"], info["n_val_per_class"])
    np.testing.assert_allclose(info["recall_used"], used, atol=1e-6)
    assert info["recall"] == meta["class_quota"]["recall"] and "Laplace" in info["error_rate"]
    expected = diet.class_quotas(np.bincount(arrays["labels"]), used, 300)
    kept = np.load(out / "keep_class-quota-laplace_0.5.npy")
    np.testing.assert_array_equal(np.bincount(arrays["labels"][kept], minlength=10), expected)
    from ffcv_bias.sweep import load_sweep
    assert load_sweep(out / "sweep.yaml").points[1]["data.score"] == "class-quota-laplace"


def test_prune_class_quota_needs_the_recalls(tiny_fashion_betons, tmp_path, capsys):
    out = tmp_path / "init"
    argv = score_argv(tiny_fashion_betons, out, "--grand-params", "last")
    argv[argv.index("--epochs") + 1] = "0"
    assert diet.main(argv) == 0
    assert diet.main(["prune", "--scores", str(out), "--score", "class-quota",
                      "--sparsity", "0.5", "--out", str(tmp_path / "p")]) == 2
    assert "--quota-val-fraction" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------------------
# prune validates everything before writing anything (issue 18, item 7)
# --------------------------------------------------------------------------------------

def folder_bytes(folder):
    return {path.relative_to(folder): path.read_bytes()
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def test_a_refused_prune_leaves_a_valid_prune_byte_identical(pruned):
    """`--sparsity 0.999` keeps 1 image, fewer than one batch: exit 2, one line naming the
    final paths, and the folder holding the earlier prune is untouched (no temporaries)."""
    import subprocess
    import sys
    scores_dir, out = pruned
    before = folder_bytes(out)
    result = subprocess.run(
        [sys.executable, "-m", "ffcv_bias.studies.diet", "prune", "--scores", str(scores_dir),
         "--score", "el2n", "--sparsity", "0.999", "--out", str(out), "--seeds", "1",
         "--set", "training.epochs=1"], capture_output=True, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "fewer than one global batch" in err
    assert ".prune." not in err and str(out / "sweep.yaml") in err
    assert folder_bytes(out) == before


def test_a_refused_prune_into_a_new_folder_leaves_no_folder(pruned, tmp_path, capsys):
    scores_dir, _ = pruned
    fresh = tmp_path / "fresh"
    assert diet.main(["prune", "--scores", str(scores_dir), "--score", "el2n",
                      "--sparsity", "0.3,0.999", "--out", str(fresh), "--seeds", "1"]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    assert not fresh.exists()


def test_a_prune_into_a_full_disk_is_one_line_and_leaves_no_half_prune(
        tiny_fashion_betons, tmp_path, monkeypatch, capsys):
    """Issue 31 item 6: a full disk at any staged file (here keep_ratio.png, then the
    sweep.yaml naming the final paths): exit 1, one line naming OUT, no traceback; an
    earlier prune in OUT is left byte-identical, a new OUT is not created."""
    import errno
    from ffcv_bias.common import atomic
    scores_dir = tmp_path / "init"
    argv = score_argv(tiny_fashion_betons, scores_dir, "--grand-params", "last")
    argv[argv.index("--epochs") + 1] = "0"   # freshly initialised networks: no training
    assert diet.main(argv) == 0
    out, fresh = tmp_path / "p", tmp_path / "fresh"

    def prune(folder, sparsity):
        return diet.main(["prune", "--scores", str(scores_dir), "--score", "el2n",
                          "--sparsity", sparsity, "--out", str(folder), "--seeds", "1"])
    assert prune(out, "0.5") == 0
    before = folder_bytes(out)
    capsys.readouterr()
    fsync = atomic._fsync_file
    for folder, full_at, kept in ((out, "keep_ratio.png", "nothing written there (its "
                                   "earlier files are kept)"),
                                  (fresh, "sweep.yaml", "nothing written (the folder is not "
                                   "created)")):
        def full_disk(path, name=full_at):
            if Path(path).name.startswith(f".{name}."):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fsync(path)
        monkeypatch.setattr(atomic, "_fsync_file", full_disk)
        assert prune(folder, "0.25,0.5") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: no space left on device while writing the pruned sets into "
                       f"{folder}: {kept}; free space and rerun the prune"]
    assert folder_bytes(out) == before and not fresh.exists()
