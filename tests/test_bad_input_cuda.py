"""Bad input on the GPU and resume paths (issue 18, items 5 and 6), in tests/test_bad_input.py's
style: the command a user types, its exit code, one stderr line naming the problem, no
traceback, and nothing written or overwritten.

    a truncated checkpoint.pt in a run folder      truncated_checkpoint
    sweep launch --gpus on a machine without CUDA  gpus_without_cuda
    sweep launch --gpus with an id out of range    gpu_id_out_of_range

Then what the error offers works: `--training.restart=1` moves the unreadable checkpoint
aside (byte for byte) and trains the run from scratch.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from test_bad_input import COMMANDS, error_line, files_under
from test_train import run_dir_of, train_args, train_in_process
from ffcv_bias.record import runs
from ffcv_bias.common.errors import EXIT_FAILURE, EXIT_OK

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_MODULE_CLI_ERROR = 2


def run_command(command, argv, cwd, **env):
    """(exit code, stderr) of the real command line."""
    launcher, _ = COMMANDS[command]
    environment = dict(os.environ, OMP_NUM_THREADS="1", **env)
    for name, value in env.items():
        if value is None:
            environment.pop(name)
    result = subprocess.run([sys.executable, *launcher, *argv], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def assert_one_error_line(command, stderr, *needles):
    line = error_line(command, stderr)
    assert stderr.strip() == line, stderr  # the terminal shows the error and nothing else
    for needle in needles:
        assert needle in line, line
    return line


def assert_nothing_changed(before, after, may_change=()):
    assert sorted(set(after) - set(before)) == sorted(set(may_change) - set(before))
    assert [path for path in before if path not in may_change
            and after.get(path, b"gone") != before[path]] == []


# ----------------------------------------------------------------------------------------
# A truncated checkpoint.pt (issue 18, item 5)
# ----------------------------------------------------------------------------------------

def run_folder_with_truncated_checkpoint(args):
    """A started run as a crash during a copy leaves it: its config.json, and a
    checkpoint.pt cut to half its size (a real torch checkpoint, cut short)."""
    run_dir = run_dir_of(args)
    run_dir.mkdir(parents=True)
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps({"meta": {"run_id": run_dir.name}}))
    checkpoint = run_dir / runs.CHECKPOINT_FILE
    torch.save({"run_id": run_dir.name, "epoch": 1,
                "model": {"weight": torch.arange(40_000, dtype=torch.float32)}}, checkpoint)
    with open(checkpoint, "r+b") as handle:
        handle.truncate(checkpoint.stat().st_size // 2)
    return run_dir, checkpoint


def test_truncated_checkpoint_is_one_line_naming_it_and_the_restart_flag(
        tiny_fashion_betons, tmp_path):
    args = train_args(tiny_fashion_betons, tmp_path / "runs", "--training.epochs=1")
    run_dir, checkpoint = run_folder_with_truncated_checkpoint(args)
    before = files_under(tmp_path)

    code, stderr = run_command("train", args, tmp_path)

    assert code == EXIT_FAILURE, stderr
    assert_one_error_line("train", stderr, f"cannot read checkpoint {checkpoint} (truncated?)",
                          "--training.restart=1")
    # Only the lock file is taken (as for any refused run directory); no error.txt: the
    # choice of what to do with the checkpoint is the user's.
    assert_nothing_changed(before, files_under(tmp_path), [run_dir / runs.LOCK_FILE])


def test_restart_flag_moves_the_checkpoint_aside_and_trains_from_scratch(
        tiny_fashion_betons, tmp_path, capsys):
    args = train_args(tiny_fashion_betons, tmp_path / "runs", "--training.epochs=1")
    run_dir, checkpoint = run_folder_with_truncated_checkpoint(args)
    damaged = checkpoint.read_bytes()

    assert train_in_process(args + ["--training.restart=1"]) == EXIT_OK
    output = capsys.readouterr().out

    assert "moved the unreadable" in output and "training from scratch" in output
    aside = run_dir / (runs.CHECKPOINT_FILE + ".unreadable")
    assert aside.read_bytes() == damaged  # kept byte for byte, never deleted
    assert runs.is_complete(run_dir)
    # The flag is not part of the run: the same folder, and the plain command now finds
    # the run complete.
    assert run_dir_of(args + ["--training.restart=1"]) == run_dir
    assert train_in_process(args) == EXIT_OK
    assert "already complete" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# sweep launch --gpus (issue 18, item 6)
# ----------------------------------------------------------------------------------------

@pytest.fixture
def tiny_sweep(tiny_fashion_betons, tmp_path):
    train, val = tiny_fashion_betons
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"train_dataset": str(train), "val_dataset": str(val)},
        "model": {"arch": "resnet8"}, "training": {"epochs": 2, "batch_size": 32},
        "lr": {"lr_peak_epoch": 1}}))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(base), "folder": str(tmp_path / "runs"),
                                     "seeds": 2}))
    return sweep


def path_without_nvidia_smi(tmp_path):
    """PATH with only the python running the tests: no nvidia-smi can be found."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    return str(bin_dir)


def test_gpus_flag_without_cuda_is_refused(tiny_sweep, tmp_path):
    before = files_under(tmp_path)
    code, stderr = run_command("sweep", ["launch", str(tiny_sweep), "--gpus", "0,2"], tmp_path,
                               CUDA_VISIBLE_DEVICES=None, PATH=path_without_nvidia_smi(tmp_path))
    assert code == EXIT_MODULE_CLI_ERROR, stderr
    assert_one_error_line("sweep", stderr, "--gpus 0,2", "no CUDA GPU", "--gpus none")
    assert_nothing_changed(before, files_under(tmp_path), [tmp_path / "bin",
                                                           tmp_path / "bin" / "python"])


@pytest.mark.parametrize("flag, unknown", [("0,2", "2"), ("3", "2")])
def test_gpu_id_out_of_range_is_refused(tiny_sweep, tmp_path, flag, unknown):
    before = files_under(tmp_path)
    code, stderr = run_command("sweep", ["launch", str(tiny_sweep), "--gpus", flag], tmp_path,
                               CUDA_VISIBLE_DEVICES="0,1")
    assert code == EXIT_MODULE_CLI_ERROR, stderr
    assert_one_error_line("sweep", stderr, f"--gpus {flag}", f"GPU {unknown}",
                          "not one of this machine's GPUs (0,1)")
    assert_nothing_changed(before, files_under(tmp_path))


def test_gpus_none_still_trains_on_the_cpu_without_cuda(tiny_sweep, tmp_path):
    code, stderr = run_command("sweep", ["launch", str(tiny_sweep), "--gpus", "none",
                                         "--dry-run"], tmp_path, CUDA_VISIBLE_DEVICES=None,
                               PATH=path_without_nvidia_smi(tmp_path))
    assert code == 0, stderr
