"""The studies on tiny real Fashion-MNIST runs: label preservation, transfer with a frozen
backbone, per-class crop bounds, and a run trained with them.

Three ResNet-8 runs (28 px, 600 training images) are trained once, in this process (ffcv
compiles its pipelines once per process): two sources that differ only in
augment.min_scale, and one with augment.class_min_scale. Every study command then runs
in-process through its `main`.
"""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from ffcv_bias.record import runs
from ffcv_bias.studies import class_bounds, trained, transfer
from ffcv_bias.studies.preservation import cli as preservation_cli
from ffcv_bias.studies.preservation import figures as preservation_figures
from ffcv_bias.studies.preservation import tables as preservation_tables
from ffcv_bias.studies.preservation import transforms as preservation_transforms

EPOCHS = 3


def train_args(betons, folder, *extra):
    train, val = betons
    return [f"--data.train_dataset={train}", f"--data.val_dataset={val}",
            f"--logging.folder={folder}", "--logging.progress=0",
            "--model.arch=resnet8", f"--training.epochs={EPOCHS}",
            "--training.batch_size=32", "--training.weight_decay=5e-4", "--lr.lr=0.2",
            "--lr.lr_peak_epoch=0.5", "--resolution.min_res=28", "--resolution.max_res=28",
            "--validation.resolution=28", "--validation.crop_ratio=1.0",
            "--validation.batch_size=64", "--validation.lr_tta=0", "--data.num_workers=1",
            *extra]


def train_in_process(args):
    """Train one run with one torch thread (as tests/test_train.py); its run directory."""
    from ffcv_bias.train.launch import main
    from ffcv_bias.train.config import resolve_config
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert main(args) == 0
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    nested = resolve_config(args)
    return runs.run_id(nested), nested


@pytest.fixture(scope="session")
def source_runs(tiny_fashion_betons, tmp_path_factory):
    """{min_scale: run dir} of two complete runs in one folder (a 'sweep folder')."""
    folder = tmp_path_factory.mktemp("source_runs")
    dirs = {}
    for min_scale in (1.0, 0.35):
        run_id, _ = train_in_process(train_args(tiny_fashion_betons, folder,
                                                f"--augment.min_scale={min_scale}"))
        dirs[min_scale] = folder / run_id
    return dirs


@pytest.fixture(scope="session")
def target_betons(tmp_path_factory):
    """Fashion-MNIST classes 5-9 relabelled 0-4: a 5-class target task (30 / 10 per class)."""
    from conftest import FASHION_CLASSES, FASHION_DIR, _read_idx, write_tiny_beton
    out = tmp_path_factory.mktemp("target")
    paths = []
    for split, prefix, per_class in (("train", "train", 30), ("val", "t10k", 10)):
        images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        rng = np.random.default_rng(7)
        keep = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
            for c in range(5, 10)]))
        path = write_tiny_beton(out / f"target_{split}.beton", images[keep], labels[keep] - 5,
                                split)
        sidecar = {"dataset": "fashion-mnist-5-9", "split": split,
                   "num_samples": int(len(keep)), "num_classes": 5,
                   "classes": FASHION_CLASSES[5:]}
        (out / f"target_{split}.beton.classes.json").write_text(json.dumps(sidecar))
        paths.append(path)
    return tuple(paths)


def plain_eval_per_class(model, val_beton, num_classes, batch_size=64):
    """Per-class accuracy with the validation loader (whole image, crop_ratio 1.0)."""
    from ffcv_bias.data.loaders import create_val_loader, normalize
    loader = create_val_loader(val_beton, batch_size=batch_size, resolution=28, crop_ratio=1.0,
                               num_workers=1)
    hits = np.zeros(num_classes)
    counts = np.zeros(num_classes)
    logits_rows = []
    with torch.inference_mode():
        for images, labels in loader:
            logits = model(normalize(images, "cpu"))
            logits_rows.append(logits.clone())
            correct = (logits.argmax(1) == labels).numpy()
            np.add.at(hits, labels.numpy(), correct)
            np.add.at(counts, labels.numpy(), 1)
    return hits / counts, torch.cat(logits_rows)


# ----------------------------------------------------------------------------------------
# Label preservation
# ----------------------------------------------------------------------------------------

PRESERVATION_SETTINGS = ["--crop", "1,0.5,0.08", "--cutout", "0,0.5", "--jitter", "0,0.8",
                         "--draws", "2", "--workers", "1", "--batch-size", "64"]


@pytest.fixture(scope="session")
def preservation_out(source_runs, tiny_fashion_betons, tmp_path_factory):
    train, val = tiny_fashion_betons
    out = tmp_path_factory.mktemp("preservation")
    code = preservation_cli.main(["--weights", str(source_runs[1.0]), "--dataset", str(val),
                              "--train-dataset", str(train), "--max-train-images", "100",
                              *PRESERVATION_SETTINGS, "--out", str(out)])
    assert code == 0
    return out


def test_preservation_writes_tables_and_figures(preservation_out):
    per_class = pd.read_csv(preservation_out / "per_class.csv")
    assert list(per_class.columns) == ["split", "transform", "setting", "class", "class_name",
                                       "n_runs", "mean_acc", "std_acc"]
    # 2 splits x (3 crop + 2 cutout + 2 jitter settings) x 10 classes
    assert len(per_class) == 2 * 7 * 10
    assert set(per_class["split"]) == {"val", "train"}
    identity = per_class["setting"].isin([1.0]) & (per_class["transform"] == "crop")
    assert set(per_class.loc[identity, "n_runs"]) == {1}
    assert set(per_class.loc[per_class["setting"] == 0.08, "n_runs"]) == {2}
    assert per_class["class_name"].iloc[1] == "Trouser"
    meta = json.loads((preservation_out / "preservation.json").read_text())
    assert meta["draws"] == 2 and meta["arch"] == "resnet8" and meta["resolution"] == 28
    for name in ("val_crop", "val_cutout", "val_jitter", "train_crop", "mean_curves"):
        png = preservation_out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mean = pd.read_csv(preservation_out / "mean.csv")
    assert len(mean) == 2 * 7


def test_whole_image_crop_equals_plain_validation(preservation_out, source_runs,
                                                  tiny_fashion_betons):
    """alpha = 100% is the whole image resized: the validation loader with crop_ratio 1.0."""
    model, info = preservation_cli.load_trained_model(source_runs[1.0])
    expected, _ = plain_eval_per_class(model, tiny_fashion_betons[1], info["num_classes"])
    per_class = pd.read_csv(preservation_out / "per_class.csv")
    rows = per_class[(per_class["split"] == "val") & (per_class["transform"] == "crop")
                     & (per_class["setting"] == 1.0)].sort_values("class")
    np.testing.assert_array_equal(rows["mean_acc"].to_numpy(), expected)
    # the identity is the same row under every transform
    for transform in ("cutout", "jitter"):
        other = per_class[(per_class["split"] == "val") & (per_class["transform"] == transform)
                          & (per_class["setting"] == 0.0)].sort_values("class")
        np.testing.assert_array_equal(other["mean_acc"].to_numpy(), expected)


def test_accuracy_falls_with_the_crop_area(preservation_out):
    mean = pd.read_csv(preservation_out / "mean.csv")
    for split in ("val", "train"):
        crop = mean[(mean["split"] == split) & (mean["transform"] == "crop")]
        acc = crop.set_index("setting")["mean_acc"]
        assert acc[0.08] < acc[1.0] - 0.05, acc


def test_label_loss_is_the_first_strength_below_the_threshold(preservation_out):
    per_class = pd.read_csv(preservation_out / "per_class.csv")
    loss = pd.read_csv(preservation_out / "label_loss.csv")
    assert len(loss) == 2 * 3 * 10
    for row in loss.itertuples():
        block = per_class[(per_class["split"] == row.split)
                          & (per_class["transform"] == row.transform)
                          & (per_class["class"] == row._3)]
        order = preservation_tables.mild_to_strong(row.transform, block["setting"].tolist())
        curve = block.set_index("setting").loc[order, "mean_acc"].to_numpy()
        assert row.clean_acc == curve[0]
        if curve[0] == 0:
            assert np.isnan(row.last_preserving_setting) and not row.lost
            continue
        below = np.flatnonzero(curve[1:] < 0.5 * curve[0])
        if len(below):
            assert row.lost and row.loss_setting == order[below[0] + 1]
            assert row.last_preserving_setting == order[below[0]]
        else:
            assert not row.lost and row.last_preserving_setting == order[-1]


def test_label_loss_table_by_hand():
    rows = []
    curves = {0: [0.8, 0.7, 0.3], 1: [0.9, 0.9, 0.8], 2: [0.0, 0.0, 0.0], 3: [0.6, 0.2, 0.5]}
    for class_index, curve in curves.items():
        for setting, acc in zip((1.0, 0.5, 0.1), curve):
            rows.append({"split": "val", "transform": "crop", "setting": setting,
                         "class": class_index, "class_name": f"c{class_index}",
                         "n_runs": 1, "mean_acc": acc, "std_acc": 0.0})
    table = preservation_tables.label_loss_table(pd.DataFrame(rows), 0.5).set_index("class")
    assert table.at[0, "loss_setting"] == 0.1 and table.at[0, "last_preserving_setting"] == 0.5
    assert not table.at[1, "lost"] and table.at[1, "last_preserving_setting"] == 0.1
    assert np.isnan(table.at[2, "last_preserving_setting"])
    # the FIRST strength below half the clean accuracy counts, even if it recovers later
    assert table.at[3, "loss_setting"] == 0.5 and table.at[3, "last_preserving_setting"] == 1.0


def test_preservation_from_a_bare_state_dict_is_reproducible(preservation_out, source_runs,
                                                             tiny_fashion_betons, tmp_path):
    """A DDP-wrapped state_dict file (--arch) gives the run directory's numbers exactly."""
    state = torch.load(source_runs[1.0] / runs.WEIGHTS_FILE, weights_only=True)
    bare = tmp_path / "model.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, bare)
    out = tmp_path / "bare"
    code = preservation_cli.main(["--weights", str(bare), "--arch", "resnet8", "--resolution", "28",
                              "--dataset", str(tiny_fashion_betons[1]), "--transforms", "crop",
                              "--crop", "1,0.5", "--draws", "2", "--workers", "1",
                              "--batch-size", "64", "--no-figures", "--out", str(out)])
    assert code == 0
    first = pd.read_csv(preservation_out / "per_class.csv")
    first = first[(first["split"] == "val") & (first["transform"] == "crop")
                  & first["setting"].isin([1.0, 0.5])].reset_index(drop=True)
    again = pd.read_csv(out / "per_class.csv")
    pd.testing.assert_frame_equal(again, first)


def test_preservation_errors_are_one_line(source_runs, tiny_fashion_betons, tmp_path, capsys):
    val = str(tiny_fashion_betons[1])
    weights = str(source_runs[1.0] / runs.WEIGHTS_FILE)
    assert preservation_cli.main(["--weights", weights, "--dataset", val,
                              "--out", str(tmp_path)]) == 2
    assert "pass --arch" in capsys.readouterr().err
    assert preservation_cli.main(["--weights", weights, "--arch", "resnet20", "--dataset", val,
                              "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "do not fit resnet20" in error and len(error.splitlines()) == 1
    assert preservation_cli.main(["--weights", str(source_runs[1.0]), "--dataset", val,
                              "--crop", "0.5,0.1", "--out", str(tmp_path)]) == 2
    assert "must include the identity" in capsys.readouterr().err


def test_transforms():
    draws = preservation_transforms._CUTOUT_DRAWS
    uniforms_of = preservation_transforms.per_image_uniforms
    images = torch.full((4, 3, 10, 10), 7.0)
    uniforms = uniforms_of(3, 0, np.arange(4), draws, 2, "cpu")
    again = uniforms_of(3, 0, np.arange(2, 4), draws, 2, "cpu")
    torch.testing.assert_close(uniforms[2:], again)   # a function of the image index only
    other_draw = uniforms_of(3, 1, np.arange(4), draws, 2, "cpu")
    assert not torch.equal(uniforms, other_draw)
    cut = preservation_transforms.cutout(images, 0.5, uniforms)
    assert ((cut == 0).sum(dim=(1, 2, 3)) == 3 * 5 * 5).all()
    assert torch.equal(preservation_transforms.cutout(images, 0.0, uniforms), images)
    raw = torch.rand(4, 3, 8, 8) * 255
    factors = torch.rand(4, 3)
    assert torch.allclose(preservation_transforms.color_jitter(raw, 0.0, factors), raw, atol=1e-3)
    jittered = preservation_transforms.color_jitter(raw, 0.9, factors)
    assert jittered.min() >= 0 and jittered.max() <= 255
    assert not torch.allclose(jittered, raw)
    grey = torch.full((1, 3, 4, 4), 100.0)
    darker = preservation_transforms.color_jitter(grey, 0.5, torch.tensor([[0.0, 0.5, 0.5]]))
    torch.testing.assert_close(darker, torch.full_like(grey, 50.0))  # brightness 0.5 only


# ----------------------------------------------------------------------------------------
# Transfer
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def transfer_out(source_runs, target_betons, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    folder = source_runs[1.0].parent
    code = transfer.main(["--source-runs", str(folder), "--train", str(target_betons[0]),
                          "--val", str(target_betons[1]), "--out", str(out), "--epochs", "40",
                          "--batch-size", "32", "--workers", "1"])
    assert code == 0
    return out


def test_transfer_writes_probe_run_records(transfer_out, source_runs, target_betons):
    probe_dirs = sorted(p for p in transfer_out.iterdir() if p.is_dir())
    assert len(probe_dirs) == 2
    sources = {runs.read_json(d / runs.SUMMARY_FILE)["run_id"]: d for d in source_runs.values()}
    for probe_dir in probe_dirs:
        config = runs.read_json(probe_dir / runs.CONFIG_FILE)
        summary = runs.read_json(probe_dir / runs.SUMMARY_FILE)
        source_config = runs.read_json(sources[config["source_run"]] / runs.CONFIG_FILE)
        assert config["augment"] == source_config["augment"]
        assert config["training"]["seed"] == source_config["training"]["seed"]
        assert config["data"]["val_dataset"] == str(target_betons[1].resolve())
        assert config["probe"]["epochs"] == 40 and config["probe"]["resolution"] == 28
        assert summary["run_id"] == probe_dir.name == runs.run_id(config)
        # A trained run's provenance (common/env): the commit, whether it was dirty, versions.
        meta = config["meta"]
        assert {"git", "git_dirty", "host", "start_time", "source_run_dir"} <= set(meta)
        assert set(meta["versions"]) == {"python", "torch", "ffcv", "numpy", "numba"}
        logits = np.load(probe_dir / runs.VAL_LOGITS_FILE)
        labels = np.load(probe_dir / runs.VAL_LABELS_FILE)
        assert logits.dtype == np.float16 and logits.shape == (50, 5)
        per_class = [float((logits[labels == c].argmax(1) == c).mean()) for c in range(5)]
        np.testing.assert_allclose(summary["per_class_acc"], per_class)
        assert summary["num_classes"] == 5 and summary["n_val"] == 50
        assert summary["top1"] > 0.4   # 5 classes: chance is 0.2
        assert len((probe_dir / runs.LOG_FILE).read_text().splitlines()) == 40


def test_probe_weights_are_a_whole_model(transfer_out, target_betons):
    """weights.pt = backbone + probe: create_model(arch, 5 classes) reproduces the logits."""
    probe_dir = sorted(p for p in transfer_out.iterdir() if p.is_dir())[0]
    model, info = preservation_cli.load_trained_model(probe_dir)
    assert info["num_classes"] == 5
    _, logits = plain_eval_per_class(model, target_betons[1], 5)
    saved = np.load(probe_dir / runs.VAL_LOGITS_FILE).astype(np.float32)
    np.testing.assert_allclose(logits.numpy(), saved, rtol=2e-3, atol=2e-2)


def test_transfer_records_pass_the_analysis(transfer_out, tmp_path):
    from ffcv_bias.analysis import run_analysis
    frames = run_analysis(transfer_out, vary="augment.min_scale", out_dir=tmp_path / "report",
                          make_plots=False)
    per_class = frames["per_class"]
    assert sorted(per_class["setting"].unique()) == [0.35, 1.0]
    assert list(per_class["class_name"][:5]) == ["Sandal", "Shirt", "Sneaker", "Bag",
                                                 "Ankle boot"]
    assert (tmp_path / "report" / "per_class.csv").is_file()


def test_transfer_skips_complete_probes(transfer_out, source_runs, target_betons, capsys):
    summaries = {p: (p / runs.SUMMARY_FILE).stat().st_mtime_ns
                 for p in transfer_out.iterdir() if p.is_dir()}
    code = transfer.main(["--source-runs", str(source_runs[1.0]), "--train",
                          str(target_betons[0]), "--val", str(target_betons[1]),
                          "--out", str(transfer_out), "--epochs", "40", "--batch-size", "32",
                          "--workers", "1"])
    assert code == 0 and "already complete" in capsys.readouterr().out
    assert summaries == {p: (p / runs.SUMMARY_FILE).stat().st_mtime_ns for p in summaries}


def test_a_probe_made_after_another_source_equals_one_made_alone(
        transfer_out, source_runs, target_betons, tmp_path):
    """run_transfer reads the target sets through one loader per set for every source
    (FeatureLoaders): the second source's features, hence its probe, are the same as
    from loaders made for it alone."""
    second = max(source_runs.values(), key=lambda run: run.name)
    alone = tmp_path / "alone"
    code = transfer.main(["--source-runs", str(second), "--train", str(target_betons[0]),
                          "--val", str(target_betons[1]), "--out", str(alone), "--epochs", "40",
                          "--batch-size", "32", "--workers", "1"])
    assert code == 0
    (probe_dir,) = [p for p in alone.iterdir() if p.is_dir()]
    assert (probe_dir / runs.VAL_LOGITS_FILE).read_bytes() == \
        (transfer_out / probe_dir.name / runs.VAL_LOGITS_FILE).read_bytes()
    loaders = transfer.FeatureLoaders(batch_size=32, num_workers=1)
    assert loaders.get(target_betons[1], 28, 1.0) is loaders.get(target_betons[1], 28, 1.0)
    assert loaders.get(target_betons[1], 28, 1.0) is not loaders.get(target_betons[1], 24, 1.0)


def test_probe_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(90, 6, generator=generator)
    labels = torch.arange(90) % 3
    features[:, 0] += labels * 6.0        # a well-separated direction
    first = transfer.fit_linear_probe(features, labels, 3, epochs=20, lr=1.0,
                                      weight_decay=1e-5, batch_size=16, seed=4)
    second = transfer.fit_linear_probe(features, labels, 3, epochs=20, lr=1.0,
                                       weight_decay=1e-5, batch_size=16, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first[:4], second[:4]))
    weight, bias = transfer.fold_standardization(*first[:4])
    accuracy = ((features @ weight.T + bias).argmax(1) == labels).float().mean()
    assert accuracy > 0.9


def test_transfer_errors(tmp_path, target_betons, capsys):
    (tmp_path / "empty").mkdir()
    assert transfer.main(["--source-runs", str(tmp_path / "empty"), "--train",
                          str(target_betons[0]), "--val", str(target_betons[1]),
                          "--out", str(tmp_path / "out")]) == 2
    assert "no complete source run with weights.pt" in capsys.readouterr().err
    assert transfer.main(["--source-runs", str(tmp_path / "absent"), "--train",
                          str(target_betons[0]), "--val", str(target_betons[1]),
                          "--out", str(tmp_path / "out")]) == 2
    assert "runs directory not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Per-class bounds
# ----------------------------------------------------------------------------------------

def write_welch(path, settings=(0.5, 0.08)):
    """A welch.csv as the analysis writes it: 4 classes; class 1 hurt at 0.08 (p 0.01),
    class 2 borderline (p 0.04, q 0.08), class 3 a little lower but not significant."""
    rows = []
    for setting in settings:
        p_values = [0.9, 0.01, 0.04, 0.3] if setting == 0.08 else [0.9, 0.2, 0.5, 0.6]
        q_values = [0.9, 0.04, 0.08, 0.4] if setting == 0.08 else [0.9, 0.6, 0.6, 0.6]
        diffs = [0.02, -0.1, -0.05, -0.01] if setting == 0.08 else [0.01, 0.0, 0.01, 0.02]
        for c in range(4):
            rows.append({"setting": setting, "class": c, "class_name": f"class {c}",
                         "n_ref": 5, "n": 5, "mean_ref": 0.8, "mean": 0.8 + diffs[c],
                         "diff": diffs[c], "hedges_g": 0.0, "t": 0.0, "df": 8.0,
                         "p_less": p_values[c], "q_less": q_values[c], "degenerate": ""})
    pd.DataFrame(rows).to_csv(path / "welch.csv", index=False)


def test_bounds_from_a_welch_table(tmp_path):
    write_welch(tmp_path)
    out = tmp_path / "bounds.json"
    assert class_bounds.main(["from-analysis", str(tmp_path), "--tau", "0.08",
                              "--out", str(out)]) == 0
    content = json.loads(out.read_text())
    assert content["min_scale"] == [0.08, 1.0, 1.0, 0.08]
    assert content["classes"] == [f"class {c}" for c in range(4)]
    assert content["source"]["spared_classes"] == ["class 1", "class 2"]
    from ffcv_bias.train.config import read_class_min_scale
    np.testing.assert_array_equal(read_class_min_scale(out, 4), content["min_scale"])

    # 99% confidence spares only class 1; BH q-values at 95% too
    for extra in (["--confidence", "99"], ["--correction", "bh"]):
        assert class_bounds.main(["from-analysis", str(tmp_path), "--tau", "0.08", *extra,
                                  "--out", str(out)]) == 0
        assert json.loads(out.read_text())["min_scale"] == [0.08, 1.0, 0.08, 0.08]
    # the paper's wording: crop only where the mean rose
    assert class_bounds.main(["from-analysis", str(tmp_path), "--tau", "0.08", "--criterion",
                              "mean", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["min_scale"] == [0.08, 1.0, 1.0, 1.0]


def test_bounds_for_several_taus_share_the_selection(tmp_path):
    write_welch(tmp_path)
    template = str(tmp_path / "cd_tau{tau}.json")
    assert class_bounds.main(["from-analysis", str(tmp_path), "--setting", "0.08", "--tau",
                              "1.0", "0.5", "0.08", "--out", template]) == 0
    assert json.loads((tmp_path / "cd_tau1.json").read_text())["min_scale"] == [1.0] * 4
    assert json.loads((tmp_path / "cd_tau0.5.json").read_text())["min_scale"] == \
        [0.5, 1.0, 1.0, 0.5]
    # without --setting each tau is selected at its own setting: 0.5 hurts nobody
    assert class_bounds.main(["from-analysis", str(tmp_path), "--tau", "0.5",
                              "--out", str(tmp_path / "own.json")]) == 0
    assert json.loads((tmp_path / "own.json").read_text())["min_scale"] == [0.5] * 4


def test_bounds_errors(tmp_path, capsys):
    write_welch(tmp_path)
    cases = [
        (["--tau", "0.3"], "has no setting 0.3"),
        (["--tau", "1.0", "0.5"], "{tau} placeholder"),
        (["--tau", "1.5"], "must be in (0, 1]"),
    ]
    for extra, message in cases:
        code = class_bounds.main(["from-analysis", str(tmp_path), *extra,
                                  "--out", str(tmp_path / "b.json")])
        error = capsys.readouterr().err
        assert code == 2 and message in error and len(error.strip().splitlines()) == 1
    frame = pd.read_csv(tmp_path / "welch.csv")
    frame.loc[0, "p_less"] = np.nan
    frame.insert(0, "training.weight_decay", 0.0)
    two_key = tmp_path / "two_key"
    two_key.mkdir()
    frame.to_csv(two_key / "welch.csv", index=False)
    assert class_bounds.main(["from-analysis", str(two_key), "--tau", "0.08",
                              "--out", str(tmp_path / "b.json")]) == 2
    assert "two-key analysis" in capsys.readouterr().err
    frame.drop(columns="training.weight_decay").to_csv(tmp_path / "welch.csv", index=False)
    assert class_bounds.main(["from-analysis", str(tmp_path), "--tau", "0.5",
                              "--out", str(tmp_path / "b.json")]) == 2
    assert "no Welch test" in capsys.readouterr().err


def test_bounds_from_preservation(preservation_out, tmp_path):
    out = tmp_path / "preserving.json"
    assert class_bounds.main(["from-preservation", str(preservation_out), "--split", "val",
                              "--out", str(out)]) == 0
    content = json.loads(out.read_text())
    loss = pd.read_csv(preservation_out / "label_loss.csv")
    crop = loss[(loss["split"] == "val") & (loss["transform"] == "crop")].sort_values("class")
    expected = crop["last_preserving_setting"].fillna(1.0).tolist()
    assert content["min_scale"] == expected
    assert content["source"]["split"] == "val" and content["source"]["loss_threshold"] == 0.5
    assert len(content["classes"]) == 10
    assert set(content["min_scale"]) <= {1.0, 0.5, 0.08}


# ----------------------------------------------------------------------------------------
# A run with per-class bounds, and the sweep files
# ----------------------------------------------------------------------------------------

def test_a_run_with_class_min_scale_trains(tiny_fashion_betons, tmp_path):
    bounds = tmp_path / "bounds.json"
    bounds.write_text(json.dumps({"min_scale": [1.0, 1.0] + [0.35] * 8,
                                  "classes": [str(c) for c in range(10)], "source": {}}))
    args = train_args(tiny_fashion_betons, tmp_path / "runs",
                      f"--augment.class_min_scale={bounds}", "--training.epochs=1")
    run_id, nested = train_in_process(args)
    run_dir = tmp_path / "runs" / run_id
    summary = runs.read_json(run_dir / runs.SUMMARY_FILE)
    assert len(summary["per_class_acc"]) == 10
    config = runs.read_json(run_dir / runs.CONFIG_FILE)
    assert config["augment"]["class_min_scale"] == str(bounds)
    # the bounds file's content is part of the run_id
    without = dict(nested, augment=dict(nested["augment"], class_min_scale=""))
    assert runs.run_id(without) != run_id


SWEEPS = ("rn50_class_dependent_crop.yaml", "rn50_preservation_bounds.yaml",
          "fashion_mnist_class_dependent_crop_small.yaml",
          "fashion_mnist_preservation_bounds_small.yaml")


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_files_plan(name, tmp_path):
    from pathlib import Path

    from ffcv_bias.sweep.spec import load_sweep, plan
    repo = Path(__file__).resolve().parents[1]
    sweep = load_sweep(repo / "rn50_configs" / "sweeps" / name)
    planned = plan(sweep, folder=str(tmp_path))
    assert not any(run.config_error for run in planned), planned[0].config_error
    values = sweep.grid["augment.class_min_scale"]
    assert len(planned) == len(values) * len(sweep.seeds) and len(sweep.seeds) >= 3
    assert len({run.run_id for run in planned}) == len(planned)
    if "class_dependent" in name:
        # one bounds file per tau, the no-crop file first (the analysis reference)
        assert values[0].endswith("_tau1.json") and len(values) >= 3
    else:
        assert values[0] == "" and values[1].endswith(".json")


def test_class_bounds_imports_no_torch():
    """class_bounds runs where only the analysis can (no torch, no ffcv)."""
    import subprocess
    import sys
    code = ("import sys; import ffcv_bias.studies.class_bounds; "
            "sys.exit(1 if 'torch' in sys.modules or 'ffcv' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_figures_name_the_extreme_classes_when_there_are_many(tmp_path):
    """Beyond 12 classes the figure names the 5 least and 5 most robust ones."""
    rng = np.random.default_rng(0)
    rows, mean_rows = [], []
    for setting in (1.0, 0.5, 0.1):
        accuracies = rng.uniform(0.2, 0.9, size=30) * (setting + 0.2)
        for class_index, acc in enumerate(accuracies):
            rows.append({"split": "val", "transform": "crop", "setting": setting,
                         "class": class_index, "class_name": f"class {class_index}",
                         "n_runs": 2, "mean_acc": acc, "std_acc": 0.01})
        mean_rows.append({"split": "val", "transform": "crop", "setting": setting,
                          "n_runs": 2, "mean_acc": accuracies.mean(), "std_acc": 0.0})
    per_class = pd.DataFrame(rows)
    curves = per_class.pivot(index="class", columns="setting", values="mean_acc")[[1.0, 0.5, 0.1]]
    named = preservation_figures._named_classes(curves)
    robustness = curves.mean(axis=1) / curves[1.0]
    assert len(named) == 10
    assert set(named) == set(robustness.nsmallest(5).index) | set(robustness.nlargest(5).index)
    written = preservation_figures.make_figures(per_class, pd.DataFrame(mean_rows), tmp_path,
                                                "model")
    assert [p.name for p in written] == ["val_crop.png", "mean_curves.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_one_loader_builds_every_study_s_model(tmp_path):
    """studies/trained.py: the options a config sets, a seeded fresh init, strict loading
    with a one-line error, and the same model for preservation, transfer and diet."""
    from ffcv_bias.studies import diet
    config = {"model": {"arch": "resnet8", "dropout": 0.25}, "training": {"use_blurpool": 1}}
    assert trained.model_options(config) == {"dropout": 0.25, "drop_path": 0.0,
                                             "use_blurpool": True}
    options = trained.model_options(config)
    first = trained.build_model("resnet8", 10, seed=3, **options)
    again = trained.build_model("resnet8", 10, seed=3, **options)
    assert not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))
    torch.save({"module." + k: v for k, v in first.state_dict().items()}, tmp_path / "ddp.pt")
    state = trained.read_state_dict(tmp_path / "ddp.pt")          # the DDP prefix goes
    nested = {**config, "model": {**config["model"], "drop_path": 0.0}}
    loaded = diet.build_model(nested, 10, tmp_path / "ddp.pt", "cpu")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 loaded.state_dict().values()))
    with pytest.raises(trained.StudyError, match="do not fit resnet8 with 7 classes and "
                                                 "BlurPool: fc.bias is \\(10,\\)") as error:
        trained.build_model("resnet8", 7, state, **options)
    assert len(str(error.value).splitlines()) == 1
    assert preservation_cli.load_trained_model is trained.load_trained_model
