"""The trainer end to end on 600 / 200 real Fashion-MNIST images, ResNet-8 at 28 px.

Most runs happen in this process (ffcv's pipeline is compiled once per process, so a
second run costs seconds, not tens of seconds); the 2-process DDP test needs its own
processes. Every run uses one torch thread (OMP_NUM_THREADS=1): on CPU, bit-identical
results need the same thread count. Kills, SIGTERM, a full disk and the run lock:
tests/test_faults.py.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcv_bias.record import runs
from ffcv_bias.common.errors import EXIT_OK
from ffcv_bias.train.config import resolve_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train_imagenet.py"
THREADS_ENV = {"OMP_NUM_THREADS": "1"}


def train_args(betons, folder, *extra):
    train, val = betons
    return [f"--data.train_dataset={train}", f"--data.val_dataset={val}",
            f"--logging.folder={folder}", "--logging.progress=0",
            "--model.arch=resnet8", "--training.epochs=2", "--training.batch_size=32",
            "--training.weight_decay=5e-4", "--lr.lr=0.2", "--lr.lr_peak_epoch=0.5",
            "--resolution.min_res=28", "--resolution.max_res=28",
            "--validation.resolution=28", "--validation.crop_ratio=1.0",
            "--validation.batch_size=64", "--augment.min_scale=0.35", "--data.num_workers=1",
            *extra]


def run_dir_of(args):
    nested = resolve_config(args)
    return Path(nested["logging"]["folder"]) / runs.run_id(nested)


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    for name, value in THREADS_ENV.items():
        monkeypatch.setenv(name, value)


def train_in_process(args):
    from ffcv_bias.train.launch import main
    return main(args)


def train_subprocess(args, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **THREADS_ENV)
    return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def finished_run(tiny_fashion_betons, tmp_path_factory):
    """(args, run_dir) of one complete 2-epoch run, trained in this process."""
    saved_env = {name: os.environ.get(name) for name in THREADS_ENV}
    os.environ.update(THREADS_ENV)
    try:
        args = train_args(tiny_fashion_betons, tmp_path_factory.mktemp("runs"))
        assert train_in_process(args) == EXIT_OK
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return args, run_dir_of(args)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / runs.LOG_FILE).read_text().splitlines()]


# --------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------

def test_a_run_writes_a_complete_consistent_record(finished_run):
    args, run_dir = finished_run
    nested = resolve_config(args)
    assert run_dir.name == runs.run_id(nested) and runs.is_complete(run_dir)
    assert not (run_dir / runs.ERROR_FILE).exists()

    config = runs.read_json(run_dir / runs.CONFIG_FILE)
    meta = config.pop("meta")
    assert config == json.loads(json.dumps(nested))  # exactly the resolved values
    assert meta["run_id"] == run_dir.name and meta["versions"]["torch"] == torch.__version__
    assert {"git", "host", "start_time", "command"} <= set(meta)

    logits = np.load(run_dir / runs.VAL_LOGITS_FILE)
    labels = np.load(run_dir / runs.VAL_LABELS_FILE)
    assert logits.dtype == np.float16 and logits.shape == (200, 10)
    assert labels.dtype == np.int64 and np.array_equal(np.bincount(labels), [20] * 10)

    summary = runs.read_json(run_dir / runs.SUMMARY_FILE)
    # Every accuracy comes from val_preds.npy, the argmax of the float32 logits (CPU: the
    # float16 logits round them, so they agree up to rare float16 ties).
    predictions = np.load(run_dir / runs.VAL_PREDS_FILE)
    assert predictions.dtype == np.int16 and predictions.shape == (200,)
    assert (predictions == logits.astype(np.float32).argmax(1)).mean() >= 0.99
    assert summary["top1"] == (predictions == labels).mean()
    assert summary["top1"] > 0.25  # chance is 0.1; 36 steps of SGD give about 0.3
    per_class = [(predictions[labels == c] == c).mean() for c in range(10)]
    np.testing.assert_allclose(summary["per_class_acc"], per_class)
    assert summary["n_val"] == 200 and summary["epochs"] == 2 and summary["num_classes"] == 10
    assert summary["run_id"] == run_dir.name and summary["train_seconds"] > 0
    assert 0 <= summary["top1"] <= summary["top5"] <= 1


def test_log_has_one_line_per_epoch_with_train_loss_and_per_class_accuracy(finished_run):
    _, run_dir = finished_run
    log = read_log(run_dir)
    assert [entry["epoch"] for entry in log] == [0, 1]
    for entry in log:
        assert np.isfinite(entry["train_loss"]) and entry["lr"] > 0
        assert len(entry["per_class_acc"]) == 10 and 0 <= entry["val_top1"] <= 1
        assert entry["epoch_seconds"] > 0 and entry["images_per_second"] > 0
        assert entry["resolution"] == 28
    assert log[-1]["val_top1"] == pytest.approx(runs.read_json(run_dir / runs.SUMMARY_FILE)["top1"])


def test_weights_load_into_a_fresh_model(finished_run):
    from ffcv_bias.train.models import create_model
    _, run_dir = finished_run
    model = create_model("resnet8", 10)
    model.load_state_dict(torch.load(run_dir / runs.WEIGHTS_FILE, weights_only=True))


def test_a_complete_run_is_not_trained_again(finished_run, capsys):
    args, run_dir = finished_run
    summary_before = (run_dir / runs.SUMMARY_FILE).read_bytes()
    assert train_in_process(args) == EXIT_OK
    assert f"run {run_dir.name} is already complete: {run_dir}" in capsys.readouterr().out
    assert (run_dir / runs.SUMMARY_FILE).read_bytes() == summary_before
    assert len(read_log(run_dir)) == 2


def test_same_config_gives_bit_identical_logits(finished_run, tmp_path):
    args, run_dir = finished_run
    again = args + [f"--logging.folder={tmp_path}"]
    assert train_in_process(again) == EXIT_OK
    rerun_dir = tmp_path / run_dir.name  # same config (the folder is not in the run_id)
    assert (rerun_dir / runs.VAL_LOGITS_FILE).read_bytes() == \
        (run_dir / runs.VAL_LOGITS_FILE).read_bytes()


# Bad configs, bad betons, a NaN loss and a run directory holding another run's config:
# tests/test_bad_input.py.


# --------------------------------------------------------------------------------------
# augment.decode=fast in the trainer (the decoder itself: tests/test_decode_fast.py)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jpeg_fashion_betons(tmp_path_factory):
    """(train.beton, val.beton) of 200 / 100 Fashion-MNIST images stored as JPEG."""
    from conftest import FASHION_DIR, _read_idx, _stratified_subset, write_tiny_beton
    if not FASHION_DIR.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (run `make setup`)")
    out = tmp_path_factory.mktemp("jpeg_fashion")
    paths = []
    for split, prefix, per_class in (("train", "train", 20), ("val", "t10k", 10)):
        images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        keep = _stratified_subset(labels, per_class)
        paths.append(write_tiny_beton(out / f"fashion-mnist_{split}.beton", images[keep],
                                      labels[keep], split, write_mode="jpg"))
    return tuple(paths)


def test_fast_decode_is_recorded_and_trains_like_exact_below_twice_the_output(
        jpeg_fashion_betons, tmp_path):
    exact_args = train_args(jpeg_fashion_betons, tmp_path / "exact")
    fast_args = train_args(jpeg_fashion_betons, tmp_path / "fast", "--augment.decode=fast")
    assert train_in_process(exact_args) == EXIT_OK
    assert train_in_process(fast_args) == EXIT_OK
    exact_dir, fast_dir = run_dir_of(exact_args), run_dir_of(fast_args)
    assert exact_dir.name != fast_dir.name  # 'fast' enters the run_id, 'exact' does not
    for run_dir, decode in ((exact_dir, "exact"), (fast_dir, "fast")):
        config = json.loads((run_dir / runs.CONFIG_FILE).read_text())
        assert config["augment"]["decode"] == decode
    assert all(line["fast_decode_active"] is True and line["decode_fallbacks"] == {}
               for line in read_log(fast_dir))
    assert "decode_fallbacks" not in read_log(exact_dir)[0]
    # 28 px images at 28 px: no crop reaches twice the output, so the fast path decodes
    # the exact path's pixels, and the two runs train and validate identically.
    assert (fast_dir / runs.VAL_LOGITS_FILE).read_bytes() == \
        (exact_dir / runs.VAL_LOGITS_FILE).read_bytes()


# --------------------------------------------------------------------------------------
# Weight decay groups as the trainer builds them
# --------------------------------------------------------------------------------------

def test_optimizer_keeps_weight_decay_off_every_batchnorm(tiny_fashion_betons, tmp_path):
    for bn_flag, bn_decays in (("--training.bn_wd=0", False), ("--training.bn_wd=1", True)):
        nested = resolve_config(train_args(tiny_fashion_betons, tmp_path, "--model.arch=resnet18",
                                           "--resolution.min_res=32", "--resolution.max_res=32",
                                           bn_flag))
        from ffcv_bias.train.launch import trainer_in_this_process
        with trainer_in_this_process(nested, tmp_path) as trainer:
            decay_of = {id(parameter): group["weight_decay"]
                        for group in trainer.optimizer.param_groups
                        for parameter in group["params"]}
            named = dict(trainer.model.named_parameters())
        # ffcv-imagenet's name filter ('bn' in name) decays this one; we do not.
        assert decay_of[id(named["layer2.0.downsample.1.weight"])] == (5e-4 if bn_decays else 0)
        assert decay_of[id(named["layer1.0.bn1.weight"])] == (5e-4 if bn_decays else 0)
        assert decay_of[id(named["layer2.0.downsample.0.weight"])] == 5e-4
        assert decay_of[id(named["fc.bias"])] == 0
        assert decay_of[id(named["fc.weight"])] == 5e-4


def test_the_trainer_reads_its_own_config_not_the_last_one_parsed(tiny_fashion_betons,
                                                                  tmp_path):
    """Trainer(run_config(nested)) trains `nested`, whatever config was parsed after it
    (fastargs keeps the last parsed one in global state, which the trainer once read)."""
    nested = resolve_config(train_args(tiny_fashion_betons, tmp_path, "--training.epochs=3"))
    resolve_config(train_args(tiny_fashion_betons, tmp_path, "--training.epochs=7",
                              "--resolution.min_res=32", "--resolution.max_res=32",
                              "--training.batch_size=64"))
    from ffcv_bias.train.launch import trainer_in_this_process
    with trainer_in_this_process(nested, tmp_path) as trainer:
        assert trainer.resolution(0) == 28 and trainer.train_loader.loader.batch_size == 32
        assert len(trainer.lr_schedule) == 3 * len(trainer.train_loader)
        assert trainer.run_id == runs.run_id(nested)


# --------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_write_a_complete_record_in_beton_order(tiny_fashion_betons,
                                                                   tmp_path):
    from ffcv_bias.data.loaders import create_val_loader, normalize
    from ffcv_bias.train.models import create_model
    args = train_args(tiny_fashion_betons, tmp_path, "--dist.world_size=2",
                      f"--dist.port={free_port()}", "--training.epochs=1",
                      "--training.batch_size=50", "--validation.batch_size=48")
    process = train_subprocess(args)
    out, err = process.communicate(timeout=600)
    assert process.returncode == EXIT_OK, err
    run_dir = run_dir_of(args)
    assert runs.is_complete(run_dir)
    config = runs.read_json(run_dir / runs.CONFIG_FILE)
    assert config["meta"]["world_size"] == 2
    log = read_log(run_dir)
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])

    # The gathered logits must be the single-process logits of the saved weights, row by
    # row: 200 images over 2 ranks in batches of 48 exercises the strided split.
    model = create_model("resnet8", 10)
    model.load_state_dict(torch.load(run_dir / runs.WEIGHTS_FILE, weights_only=True))
    model.eval()
    loader = create_val_loader(tiny_fashion_betons[1], batch_size=64, resolution=28,
                               crop_ratio=1.0, num_workers=1)
    with torch.no_grad():
        expected = torch.cat([(model(x) + model(torch.flip(x, dims=[3]))) / 2
                              for x in (normalize(images, "cpu") for images, _ in loader)])
    saved = np.load(run_dir / runs.VAL_LOGITS_FILE).astype(np.float32)
    np.testing.assert_allclose(saved, expected.numpy(), atol=1e-2, rtol=1e-2)
    assert (saved.argmax(1) == expected.numpy().argmax(1)).mean() >= 0.99


def test_gather_puts_rows_in_dataset_order_and_notices_missing_samples():
    from ffcv_bias.train import distributed
    info = distributed.DistInfo()
    rows = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    ordered = distributed.gather_rows_by_index(rows, np.array([2, 0, 3, 1]), 4, info)
    np.testing.assert_array_equal(ordered, [[2, 3], [6, 7], [0, 1], [4, 5]])
    with pytest.raises(RuntimeError, match="1 of 4 samples were not evaluated"):
        distributed.gather_rows_by_index(rows, np.array([2, 0, 3, 3]), 4, info)


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    from ffcv_bias.train.state import truncate_log
    log_path = tmp_path / runs.LOG_FILE
    log_path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n{"epo')
    truncate_log(log_path, 2)
    assert log_path.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'


@pytest.mark.timeout(300)   # ffcv alone would hang here
def test_a_failing_loader_thread_fails_the_run_in_one_line(tiny_fashion_betons, tmp_path,
                                                          monkeypatch, capsys):
    """data/ffcv_patches.py patch 7 in a run: exit 1, the one-line error, the thread's
    traceback in error.txt, no summary."""
    from ffcv_bias.common.errors import EXIT_FAILURE
    from ffcv_bias.data import ffcv_patches

    def decode_error(*args):
        raise ValueError("corrupt JPEG data: premature end of data segment")
    monkeypatch.setattr(ffcv_patches, "_ORIGINAL_RUN_PIPELINE", decode_error)
    args = train_args(tiny_fashion_betons, tmp_path)
    assert train_in_process(args) == EXIT_FAILURE
    message = ("ffcv's loader thread failed: ValueError: corrupt JPEG data: premature end "
               "of data segment")
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
    run_dir = run_dir_of(args)
    error_text = (run_dir / runs.ERROR_FILE).read_text()
    assert error_text.splitlines()[0] == message and "decode_error" in error_text
    assert not runs.is_complete(run_dir)


def copy_betons(betons, folder):
    """Copies of (train, val) with their sidecars in `folder`, for tests that change them."""
    import shutil
    copies = []
    for beton in betons:
        copy = Path(folder) / Path(beton).name
        shutil.copy(beton, copy)
        shutil.copy(f"{beton}.classes.json", f"{copy}.classes.json")
        copies.append(copy)
    return tuple(copies)


@pytest.mark.timeout(300)
def test_a_beton_replaced_during_the_run_fails_it_in_one_line(tiny_fashion_betons, tmp_path,
                                                             monkeypatch, capsys):
    """Issue 31 item 2: train.beton renamed over (as write_datasets rewrites it) after epoch
    0 of a data.in_memory=0 run, whose loader reopens the file by name each epoch: exit 1,
    one line naming the beton, error.txt, no summary.json, epoch 1 never checkpointed."""
    from ffcv_bias.common.errors import EXIT_FAILURE
    from ffcv_bias.train import loop
    train, val = copy_betons(tiny_fashion_betons, tmp_path)

    def rewrite_after_epoch_0(name, cut_file=None):
        if name == "epoch-logged" and not rewrite_after_epoch_0.done:
            rewrite_after_epoch_0.done = True
            os.link(val, f"{train}.new")   # other images, same classes: a new inode
            os.replace(f"{train}.new", train)
    rewrite_after_epoch_0.done = False
    monkeypatch.setattr(loop, "crash_point", rewrite_after_epoch_0)
    args = train_args((train, val), tmp_path / "runs", "--data.in_memory=0")
    assert train_in_process(args) == EXIT_FAILURE
    run_dir = run_dir_of(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: data.train_dataset {train} changed while run {run_dir.name} read it "
        f"(replaced by another file (inode "), err
    assert "now: 200 samples" in err[0] and "the run's: 600 samples" in err[0]
    assert err[0].endswith("the run is not recorded complete; restore the beton (then rerun "
                           "to resume from the last checkpoint) or train into another "
                           "folder (logging.folder)")
    assert (run_dir / runs.ERROR_FILE).read_text().splitlines()[0] == err[0][len("error: "):]
    assert not (run_dir / runs.SUMMARY_FILE).exists() and not runs.is_complete(run_dir)
    assert len(read_log(run_dir)) == 1   # epoch 0 only: epoch 1 read the new file


def test_beton_watch_sees_in_place_rewrites_touches_and_removal(tiny_fashion_betons,
                                                                 tmp_path):
    from ffcv_bias.train.beton_watch import BetonWatch
    train, val = copy_betons(tiny_fashion_betons, tmp_path)
    paths = {"train_dataset": train, "val_dataset": val}
    assert BetonWatch(paths, "r").change() is None
    watch = BetonWatch(paths, "r")
    data = bytearray(val.read_bytes())
    data[-1] ^= 1                          # the allocation table's last byte, in place
    val.write_bytes(bytes(data))
    change = watch.change()
    assert change.startswith(f"data.val_dataset {val} changed while run r read it "
                             "(rewritten in place (") and "now: 200 samples" in change
    watch = BetonWatch(paths, "r")
    os.utime(train, ns=(1, 1))             # same bytes, another mtime: cannot be vouched for
    assert "same header and tables, images unchecked" in watch.change()
    watch = BetonWatch(paths, "r")
    train.unlink()
    assert "(it is gone: No such file or directory)" in watch.change()
