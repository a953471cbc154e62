"""Bad input and faults, third round (issue 31): images of other bit depths, Ctrl-C in
`evaluate` / `diet score` / the demo, a SIGKILLed beton writer (its workers, shared memory
and temporaries), outputs checked before the work (preservation, demo), class lists that
are legal but suspect, preservation's strength ranges, and `--help` into a file.

Each case drives the command a user types (its main() in this process, or the real
command in a subprocess) and checks what the user gets: the exit code, one stderr line
naming the problem, no traceback, and nothing half-written or stale left behind.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_datasets import make_inaturalist_tree, read_beton
from ffcv_bias.common import atomic
from write_datasets import main as write_main

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
WRITE_ERROR = "write_datasets.py: error: "


def last_line(text):
    return text.strip().splitlines()[-1]


def write_cli(capsys, *args):
    """write_datasets.py's main in this process: (exit code, stderr)."""
    code = write_main(list(args))
    return code, capsys.readouterr().err


def imagefolder_args(data_dir, write_path, *extra):
    return ["--cfg.dataset=imagefolder", "--cfg.split=train", f"--cfg.data_dir={data_dir}",
            f"--cfg.write_path={write_path}", "--cfg.num_workers=1", *extra]


def save_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# --------------------------------------------------------------------------------------
# Item 5: images of other bit depths
# --------------------------------------------------------------------------------------

def test_16_and_32_bit_images_are_scaled_to_8_bits_and_said_once(tmp_path, capsys):
    """A 16-bit PNG (PIL mode I;16) and an int32 TIFF (mode I) used to be clipped at 255 by
    PIL's convert("RGB"): 3-4 grey levels, or nearly all white. They keep their top 8 bits
    (v >> 8; int32: v >> 23), and stderr says so in one line."""
    rng = np.random.default_rng(0)
    deep16 = [rng.integers(0, 1 << 16, size=(12, 16), dtype=np.uint16) for _ in range(2)]
    deep32 = rng.integers(0, (1 << 31) - 1, size=(10, 14), dtype=np.int64).astype(np.int32)
    plain = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    root = tmp_path / "folder"
    for index, pixels in enumerate(deep16):
        save_png(root / "deep16" / f"{index}.png", pixels)
    (root / "deep32").mkdir(parents=True)
    Image.fromarray(deep32).save(root / "deep32" / "0.tif")
    save_png(root / "plain" / "0.png", plain)
    out = tmp_path / "out" / "deep.beton"
    code, stderr = write_cli(capsys, *imagefolder_args(root, out))
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if "more than 8 bits" in line]
    assert len(notes) == 1, stderr
    assert "3 of 4 images" in notes[0] and "mode I;16" in notes[0] and "mode I)" in notes[0]
    images, labels, _ = read_beton(out)
    assert labels.tolist() == [0, 0, 1, 2]
    expected = [(pixels >> 8).astype(np.uint8) for pixels in deep16] + [
        (deep32 >> 23).astype(np.uint8)]
    for image, grey in zip(images, expected):
        assert np.array_equal(image, np.repeat(grey[:, :, None], 3, axis=2))
        assert len(np.unique(image)) > 100  # not flattened to a few levels
    assert np.array_equal(images[3], plain)


@pytest.mark.parametrize("pixels, needle", [
    (np.random.default_rng(0).random((8, 8), dtype=np.float32), "(PIL mode F), which have no "
                                                                "defined 8-bit scale"),
    ((np.arange(64).reshape(8, 8) * 1000).astype(np.int32),  # 16-bit values in an int32 TIFF
     "(PIL mode I) run from 0 to 63000, a sliver of their range: in 8 bits they would all "
     "be 0"),
], ids=["float", "int32-holding-16-bit-values"])
def test_images_without_a_sound_8_bit_scale_are_refused_naming_file_and_mode(
        pixels, needle, tmp_path, capsys):
    """Float pixels (0..1? 0..255?) came back all black; an int32 TIFF of small values
    would, scaled by its type's range, be all 0: refused, not flattened."""
    root = tmp_path / "folder"
    save_png(root / "a" / "ok.png", np.zeros((8, 8, 3), np.uint8))
    (root / "b").mkdir(parents=True)
    image_file = root / "b" / "depth.tif"
    Image.fromarray(pixels).save(image_file)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, stderr = write_cli(capsys, *imagefolder_args(root, out_dir / "f.beton"))
    assert code == 1
    assert "Traceback" not in stderr
    line = last_line(stderr)
    assert line.startswith(WRITE_ERROR) and str(image_file) in line and needle in line, line
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------------------
# Half-handled: a class list with a repeated name, a one-class ImageFolder
# --------------------------------------------------------------------------------------

def test_a_class_name_given_twice_is_warned_about(tmp_path, capsys):
    root = tmp_path / "inat"
    make_inaturalist_tree(root, split="val")
    annotations = json.loads((root / "val.json").read_text())
    for category in annotations["categories"]:
        if category["id"] == 15:
            category["name"] = "Abies alba"  # also category 7's name
    (root / "val.json").write_text(json.dumps(annotations))
    out = tmp_path / "inat_val.beton"
    code, stderr = write_cli(capsys, "--cfg.dataset=inaturalist", "--cfg.split=val",
                             f"--cfg.data_dir={root}", f"--cfg.write_path={out}")
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, stderr
    assert "names 'Abies alba' twice (classes 0 and 1)" in warnings[0]
    assert out.is_file()


def test_a_one_class_image_folder_is_warned_about(tmp_path, capsys):
    root = tmp_path / "train"
    for index in range(2):
        save_png(root / "cats" / f"{index}.png", np.full((8, 8, 3), index, np.uint8))
    out = tmp_path / "one.beton"
    code, stderr = write_cli(capsys, *imagefolder_args(root, out))
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "has one class only ('cats')" in warnings[0], stderr
    assert out.is_file()


# --------------------------------------------------------------------------------------
# Item 7: Ctrl-C
# --------------------------------------------------------------------------------------

def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def ctrl_c_evaluate(monkeypatch, tmp_path):
    from ffcv_bias import evaluate
    monkeypatch.setattr(evaluate, "evaluate_run", interrupt)
    return evaluate.main, [str(tmp_path), "--protocols", "40@1.0"]


def ctrl_c_diet_score(monkeypatch, tmp_path):
    from ffcv_bias.studies.diet import cli
    monkeypatch.setattr(cli, "run_scores", interrupt)
    return cli.main, ["score", "--epochs", "1", "--out", str(tmp_path / "scores")]


def ctrl_c_demo(monkeypatch, tmp_path):
    from ffcv_bias import demo
    monkeypatch.setattr(demo, "check_sweeps", interrupt)
    return demo.main, []


@pytest.mark.parametrize("setup", [ctrl_c_evaluate, ctrl_c_diet_score, ctrl_c_demo],
                         ids=["evaluate", "diet-score", "demo"])
def test_ctrl_c_exits_130_with_one_line(setup, monkeypatch, tmp_path, capsys):
    main, argv = setup(monkeypatch, tmp_path)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left main() as a KeyboardInterrupt: a traceback for the user")
    err = capsys.readouterr().err
    assert code == 130
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: interrupted"), err
    assert "rerun the same command" in err


# --------------------------------------------------------------------------------------
# Item 10: SIGKILL of write_datasets.py
# --------------------------------------------------------------------------------------

STUCK_WRITER = '''
import os, sys, time
sys.path.insert(0, sys.argv[1])
marker = sys.argv[2]
import write_datasets
from ffcv_bias.data import writer  # first: it makes importing ffcv cheap (ffcv_import.py)
import ffcv.writer

prepare = ffcv.writer.DatasetWriter.prepare
def prepare_and_tell(self):
    prepare(self)
    with open(marker + ".shm", "w") as handle:
        handle.write(self.metadata_sm.name)
ffcv.writer.DatasetWriter.prepare = prepare_and_tell

def stuck(self, index):  # in an ffcv writer worker, inside its first image
    with open(marker, "a") as handle:
        handle.write(f"{os.getpid()}\\n")
    time.sleep(600)
writer.WriterSource.__getitem__ = stuck
sys.exit(write_datasets.main(sys.argv[3:]))
'''


def children_of(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid):
    """Alive and not a zombie (a dead orphan waits for a reaper that may never come)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"after {timeout} s: {what}")
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc: Linux")
def test_sigkill_of_the_writer_takes_its_workers_along_and_the_next_write_cleans_up(
        tmp_path, capsys):
    """write_datasets.py killed while its 2 ffcv workers write: the workers, the
    multiprocessing resource tracker and the /dev/shm segment go with it (they used to
    live on, holding the temporary beton); the temporary it leaves is removed by the next
    write of the same beton (they used to pile up)."""
    root = tmp_path / "folder"
    for label in "ab":
        for index in range(2):
            save_png(root / label / f"{index}.png", np.full((8, 8, 3), index, np.uint8))
    out = tmp_path / "out"
    beton = out / "x.beton"
    script = tmp_path / "stuck_writer.py"
    script.write_text(STUCK_WRITER)
    marker = tmp_path / "workers.txt"
    workers, tracker = [], []
    writer = subprocess.Popen(
        [PYTHON, str(script), str(REPO), str(marker),
         *imagefolder_args(root, beton)[:-1], "--cfg.num_workers=2", "--cfg.chunk_size=1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: marker.is_file() and len(marker.read_text().split()) == 2
                   or writer.poll() is not None, 120, "the writer's workers never started")
        assert writer.poll() is None, "the writer exited early"
        workers = [int(pid) for pid in marker.read_text().split()]
        tracker = [pid for pid in children_of(writer.pid) if pid not in workers]
        shm = Path("/dev/shm") / Path(f"{marker}.shm").read_text().lstrip("/")
        assert shm.exists() and all(running(pid) for pid in workers)
        leftovers = list(out.glob(".x.beton.*.tmp"))
        assert len(leftovers) == 1
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        wait_until(lambda: not any(running(pid) for pid in workers + tracker), 20,
                   "writer workers (or the resource tracker) outlived the killed writer")
        wait_until(lambda: not shm.exists(), 20, f"{shm} outlived the writer")
    finally:  # whatever failed, no process of this test outlives it
        children = children_of(writer.pid)
        for pid in [writer.pid] + workers + children:
            if running(pid) and pid not in tracker:
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):  # the tracker frees the segment, then exits
            wait_until(lambda: not any(running(pid) for pid in tracker), 10, "")
        for pid in tracker:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert [path.name for path in out.iterdir()] == [leftovers[0].name]
    code, stderr = write_cli(capsys, *imagefolder_args(root, beton))
    assert code == 0, stderr
    assert f"removed a temporary file left by a killed writer of {beton}: " \
        f"{leftovers[0].name}" in stderr
    assert sorted(path.name for path in out.iterdir()) == ["x.beton", "x.beton.classes.json"]


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_killed_prunes_staging_folder_is_removed_by_the_next_prune(tiny_fashion_betons,
                                                                      tmp_path, capsys):
    """`diet prune` stages its files in OUT/.prune.pid<PID>@<host>.*.tmp: a prune killed
    there left the folder for good. The next prune into OUT removes it (its PID is gone);
    a live prune's folder is left alone."""
    from ffcv_bias.data.loaders import read_labels
    from ffcv_bias.studies.diet import cli
    train, val = tiny_fashion_betons
    labels = read_labels(train)
    scores = tmp_path / "scores"
    scores.mkdir()
    rng = np.random.default_rng(0)
    np.savez(scores / "scores.npz", indices=np.arange(len(labels)), labels=labels,
             el2n=rng.random(len(labels)), random=rng.random(len(labels)))
    overrides = {"data.train_dataset": str(train), "data.val_dataset": str(val),
                 "model.arch": "resnet8", "training.epochs": "2", "lr.lr_peak_epoch": "0.5",
                 "training.batch_size": "100",
                 "resolution.min_res": "16", "resolution.max_res": "16",
                 "validation.resolution": "16", "validation.batch_size": "100",
                 "data.num_workers": "1"}
    (scores / "scores.json").write_text(json.dumps({
        "config_files": [], "overrides": overrides, "epochs": 1, "num_classes": 10}))
    out = tmp_path / "pruned"
    out.mkdir()
    own = atomic.owned_temp_prefix("prune")
    dead = out / (own.replace(f"pid{os.getpid()}@", f"pid{dead_pid()}@") + "k1ll3d.tmp")
    live = out / f"{own}l1v3.tmp"   # this process's: a prune still running
    for folder in (dead, live):
        folder.mkdir()
        (folder / "keep_el2n_0.5.npy").write_bytes(b"half-written")
    code = cli.main(["prune", "--scores", str(scores), "--score", "el2n", "--sparsity", "0.5",
                     "--out", str(out), "--seeds", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert not dead.exists() and live.is_dir()
    assert (out / "sweep.yaml").is_file() and (out / "keep_el2n_0.5.npy").is_file()
    assert not [path for path in out.iterdir()
                if path.name.startswith(".prune.") and path != live]


# --------------------------------------------------------------------------------------
# Item 11: outputs checked before the work; a child's error never in a traceback
# --------------------------------------------------------------------------------------

def test_preservation_out_an_existing_file_is_refused_before_the_work(tiny_fashion_betons,
                                                                       tmp_path, capsys):
    """It used to evaluate every transform (22 s on the demo's model) and then fail with a
    FileExistsError traceback."""
    import torch
    from ffcv_bias.studies.preservation import cli
    from ffcv_bias.train.models import create_model
    weights = tmp_path / "model.pt"
    torch.save(create_model("resnet8", 10).state_dict(), weights)
    out = tmp_path / "report"
    out.write_text("an earlier file")
    started = time.time()
    code = cli.main(["--weights", str(weights), "--arch", "resnet8", "--dataset",
                     str(tiny_fashion_betons[1]), "--draws", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: --out: cannot create {out}: it is a file, not a directory"
    assert out.read_text() == "an earlier file"
    assert time.time() - started < 10  # refused before any image was evaluated


def test_preservation_strengths_out_of_range_are_named(tmp_path, capsys):
    from ffcv_bias.studies.preservation import cli
    code = cli.main(["--weights", str(tmp_path / "w.pt"), "--dataset", str(tmp_path / "v"),
                     "--crop", "0,1.5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: crop strength 0 outside [0.01, 1] (--crop 0,1.5)"
    assert list(tmp_path.iterdir()) == []


def test_demo_with_a_missing_sweep_file_writes_nothing(tmp_path, monkeypatch, capsys):
    """It used to write the betons first, then wrap the sweep's own error line in a
    25-line CalledProcessError traceback."""
    from ffcv_bias import demo
    commands = []
    monkeypatch.setattr(demo, "run", commands.append)
    monkeypatch.chdir(tmp_path)
    code = demo.main(["--sweep", "missing.yaml",
                      "--decay-sweep", str(REPO / demo.DEFAULT_DECAY_SWEEP)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: sweep file not found: missing.yaml"
    assert commands == [] and list(tmp_path.iterdir()) == []


def test_a_failed_demo_step_is_one_line_with_its_exit_code(monkeypatch, capfd):
    from ffcv_bias import demo
    failing = [PYTHON, "-c", "import sys; print('error: the step\\'s own line', "
                             "file=sys.stderr); sys.exit(3)"]
    monkeypatch.setattr(demo, "ensure_betons", lambda: demo.run(failing))
    code = demo.main(["--sweep", str(REPO / demo.DEFAULT_SWEEP),
                      "--decay-sweep", str(REPO / demo.DEFAULT_DECAY_SWEEP)])
    err = capfd.readouterr().err
    assert code == 3
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-2] == "error: the step's own line"
    assert lines[-1].startswith("error: demo step failed: `") and \
        lines[-1].endswith("exited with 3 (its error is above)")


# --------------------------------------------------------------------------------------
# Half-handled: --help into a file
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["write_datasets.py"], ["train_imagenet.py"]])
def test_help_into_a_file_has_no_terminal_escape_codes(command, tmp_path):
    """fastargs drew its tables with VT100 line-drawing codes (ESC ( 0), kept as garbage
    in `--help > file`."""
    with open(tmp_path / "help.txt", "w") as handle:
        result = subprocess.run([PYTHON, *command, "--help"], cwd=REPO, stdout=handle,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    text = (tmp_path / "help.txt").read_text()
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in text
    assert "| Name" in text  # the tables are still there, in plain ASCII
