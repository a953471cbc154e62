"""Sweeps: expansion, local launch, the submitit submission, failures.

Most launcher tests run a stand-in trainer (FAKE_TRAINER below): it uses the real config
parser, run_id, run lock, exit codes and record file names, but an "epoch" is a short
sleep, so a crash or a preemption can be staged in a second. `test_local_launch_real_
trainer` runs the real train_imagenet.py on tiny Fashion-MNIST betons. Killed launchers
and trainers, SIGTERM, requeue and two launchers at once: tests/test_faults.py.
"""
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ffcv_bias.common import env
from ffcv_bias.record import runs
from ffcv_bias.sweep import cli, slurm, spec
from ffcv_bias.sweep.runner import START_MARKER, TRAIN_LOG_FILE, parse_gpus
from ffcv_bias.sweep.spec import SweepError, load_sweep, plan
from ffcv_bias.sweep.status import run_state

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

FAKE_TRAINER = textwrap.dedent('''
    """Stand-in for train_imagenet.py: real config, run_id, lock and exit codes; sleeps."""
    import json, os, signal, sys, time
    from pathlib import Path
    from ffcv_bias.record import runs
    from ffcv_bias.common.atomic import write_json
    from ffcv_bias.train.fastargs_strict import ConfigError
    from ffcv_bias.common.errors import EXIT_PREEMPTED
    from ffcv_bias.train.config import resolve_config

    def train(config, run_dir):
        if runs.is_complete(run_dir):
            return 0
        dataset = config["data"]["train_dataset"]
        if not Path(dataset).is_file():
            message = f"data.train_dataset: no such file {dataset}"
            (run_dir / runs.ERROR_FILE).write_text(message + "\\n")
            print(f"error: {message}", file=sys.stderr)
            return 1
        checkpoint = run_dir / runs.CHECKPOINT_FILE
        start = json.loads(checkpoint.read_text())["epoch"] + 1 if checkpoint.is_file() else 0
        log = run_dir / runs.LOG_FILE  # as the real trainer: keep the checkpointed epochs' lines
        kept = log.read_text().splitlines(keepends=True)[:start] if log.is_file() else []
        log.write_text("".join(kept))
        with open(run_dir / "trainings.txt", "a") as handle:
            handle.write(f"start {start}\\n")
        stop = []
        signal.signal(signal.SIGTERM, lambda *args: stop.append(True))
        for epoch in range(start, config["training"]["epochs"]):
            time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0.05")))
            with open(log, "a") as handle:  # the log line, then the checkpoint (as train/loop.py)
                handle.write(json.dumps({"epoch": epoch}) + "\\n")
            write_json(checkpoint, {"epoch": epoch})
            if stop:
                return EXIT_PREEMPTED
        write_json(run_dir / runs.SUMMARY_FILE, {"run_id": run_dir.name, "top1": 0.5})
        with open(run_dir / "trainings.txt", "a") as handle:
            handle.write("complete\\n")
        return 0

    def main():
        try:
            config = resolve_config(sys.argv[1:])
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        run_dir = Path(config["logging"]["folder"]) / runs.run_id(config)
        try:
            with runs.run_lock(run_dir):
                return train(config, run_dir)
        except runs.RunLockedError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    sys.exit(main())
''')


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

@pytest.fixture
def fake_setup(tmp_path):
    """A base config for the stand-in trainer, its script, and dummy dataset files."""
    for name in ("train.beton", "val.beton"):
        (tmp_path / name).write_bytes(b"x")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"train_dataset": str(tmp_path / "train.beton"),
                 "val_dataset": str(tmp_path / "val.beton")},
        "training": {"epochs": 3, "batch_size": 8},
        "model": {"arch": "resnet8"},
        "logging": {"folder": str(tmp_path / "default_runs")},
    }))
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)
    return {"dir": tmp_path, "base": base, "script": script}


def write_sweep(path, **content):
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def sweep_cli(*args, env=None, python=(PYTHON,), **kwargs):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([*python, "-m", "ffcv_bias.sweep", *map(str, args)],
                          capture_output=True, text=True, env=full_env, cwd=REPO, **kwargs)


def read_lines(path):
    return path.read_text().splitlines() if path.is_file() else []


def epochs_logged(run_dir):
    return [json.loads(line)["epoch"] for line in read_lines(run_dir / runs.LOG_FILE)]


def launch_starts(run_dir):
    """How many times a launcher started the trainer on this run."""
    return sum(line.startswith(START_MARKER) for line in read_lines(run_dir / TRAIN_LOG_FILE))


# ----------------------------------------------------------------------------------------
# plan: expansion, determinism, errors
# ----------------------------------------------------------------------------------------

def test_plan_expands_grid_seed_major_with_overrides(fake_setup, tmp_path):
    sweep_file = write_sweep(
        tmp_path / "sweep.yaml", base="base.yaml", folder=str(tmp_path / "runs"),
        overrides={"training.epochs": 5, "augment": {"flip": False}},
        grid={"augment.min_scale": [1.0, 0.5, 0.25], "training.weight_decay": [0.0, 1.0e-4]},
        seeds=2)
    planned = plan(load_sweep(sweep_file))

    assert len(planned) == 3 * 2 * 2
    assert [run.seed for run in planned] == [0] * 6 + [1] * 6  # seed-major
    assert [run.values for run in planned[:3]] == [
        {"augment.min_scale": 1.0, "training.weight_decay": 0.0},
        {"augment.min_scale": 1.0, "training.weight_decay": 1.0e-4},
        {"augment.min_scale": 0.5, "training.weight_decay": 0.0}]
    for run in planned:
        assert run.config["training"]["epochs"] == 5
        assert run.config["augment"]["flip"] is False
        assert run.config["augment"]["min_scale"] == run.values["augment.min_scale"]
        assert run.config["training"]["weight_decay"] == run.values["training.weight_decay"]
        assert run.config["training"]["seed"] == run.seed
        assert run.run_dir == tmp_path / "runs" / run.run_id
        assert run.run_id == runs.run_id(run.config)
    assert len({run.run_id for run in planned}) == 12


def test_seeds_as_count_or_list_and_folder_flag(fake_setup, tmp_path):
    counted = write_sweep(tmp_path / "a.yaml", base=str(fake_setup["base"]), seeds=3)
    listed = write_sweep(tmp_path / "b.yaml", base=str(fake_setup["base"]), seeds=[4, 9])
    assert [run.seed for run in plan(load_sweep(counted))] == [0, 1, 2]
    listed_runs = plan(load_sweep(listed), folder=str(tmp_path / "elsewhere"))
    assert [run.config["training"]["seed"] for run in listed_runs] == [4, 9]
    assert all(run.run_dir.parent == tmp_path / "elsewhere" for run in listed_runs)
    # No folder given anywhere: the base config's logging.folder, made absolute.
    assert plan(load_sweep(counted))[0].run_dir.parent == tmp_path / "default_runs"


def test_run_ids_are_the_same_in_other_processes(fake_setup, tmp_path):
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(tmp_path / "r"),
                             grid={"augment.min_scale": [1.0, 0.3]}, seeds=2)
    in_process = [run.run_id for run in plan(load_sweep(sweep_file))]
    for hash_seed in ("1", "2"):
        result = sweep_cli("plan", sweep_file, env={"PYTHONHASHSEED": hash_seed})
        assert result.returncode == 0, result.stderr
        rows = [line.split() for line in result.stdout.splitlines()]
        listed = [row[1] for row in rows if len(row) > 1 and row[1].startswith("resnet8_")]
        assert listed == in_process


@pytest.mark.parametrize("content, message", [
    ({"grids": {"augment.min_scale": [1.0]}}, "unknown key 'grids'"),
    ({"slurm": {"partitions": "x"}}, "unknown key 'slurm.partitions'"),
    ({"grid": {"augment.min_scale": 0.5}}, "must be a non-empty list"),
    ({"grid": {"min_scale": [0.5]}}, "must be written section.key"),
    ({"overrides": {"training.seed": 3}}, "set seeds with 'seeds:'"),
    ({"seeds": 0}, "'seeds'"),
    ({"seeds": [1, 1]}, "lists a seed twice"),
    ({"slurm": {"mode": "spread"}}, "slurm.mode"),
])
def test_bad_sweep_files_are_one_line_errors(fake_setup, tmp_path, content, message):
    sweep_file = write_sweep(tmp_path / "bad.yaml", base="base.yaml", **content)
    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        load_sweep(sweep_file)
    result = sweep_cli("plan", sweep_file)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_missing_base_and_unknown_config_key(fake_setup, tmp_path):
    missing = write_sweep(tmp_path / "m.yaml", base="nowhere.yaml")
    with pytest.raises(SweepError, match="base config 'nowhere.yaml'"):
        load_sweep(missing)
    typo = write_sweep(tmp_path / "t.yaml", base="base.yaml",
                       grid={"training.wieght_decay": [0.0, 1.0e-4]})
    planned = plan(load_sweep(typo))
    assert all("training.wieght_decay" in run.config_error for run in planned)


def test_bad_grid_value_is_invalid_and_launch_refuses(fake_setup, tmp_path):
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(tmp_path / "r"),
                             grid={"augment.min_scale": [0.5, 1.5]}, seeds=1)
    result = sweep_cli("plan", sweep_file)
    assert result.returncode == 1
    assert "invalid: bad value for 'augment.min_scale'" in result.stdout
    result = sweep_cli("launch", sweep_file, "--train-script", fake_setup["script"])
    assert result.returncode == 2 and "augment.min_scale" in result.stderr
    assert not (tmp_path / "r").exists()  # nothing ran


def test_grid_values_resolving_to_the_same_run_are_an_error(fake_setup, tmp_path):
    sweep_file = tmp_path / "s.yaml"
    # YAML reads 1e-4 (no dot) as a string and 0.0001 as a float: the trainer reads both
    # as 0.0001, one run.
    sweep_file.write_text("base: base.yaml\ngrid:\n  training.weight_decay: [1e-4, 0.0001]\n")
    with pytest.raises(SweepError, match="resolve to the same config"):
        plan(load_sweep(sweep_file))


def test_shipped_sweeps_plan(tmp_path):
    expected = {"rn50_crop.yaml": ("augment.min_scale", 11),
                "rn50_weight_decay.yaml": ("training.weight_decay", 7),
                "rn50_dropout.yaml": ("model.dropout", 6)}
    grids = {}
    for name, (key, count) in expected.items():
        sweep = load_sweep(REPO / "rn50_configs" / "sweeps" / name)
        planned = plan(sweep, folder=str(tmp_path))
        assert len(planned) == count * 20 and not any(run.config_error for run in planned)
        assert {run.config["training"]["epochs"] for run in planned} == {88}
        # ddp layout: one run per 8-GPU node, matching the recipe's world size
        assert len(slurm.job_layout(planned, sweep.slurm)) == count * 20
        section, param = key.split(".")
        grids[key] = sorted({run.config[section][param] for run in planned})
    assert grids["augment.min_scale"] == [0.08, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert grids["training.weight_decay"][0] == 0.0
    assert grids["model.dropout"][0] == 0.0


def test_shipped_small_cpu_sweeps_plan(tmp_path):
    for name, key in (("fashion_mnist_crop_small.yaml", "augment.min_scale"),
                      ("fashion_mnist_weight_decay_small.yaml", "training.weight_decay")):
        sweep = load_sweep(REPO / "rn50_configs" / "sweeps" / name)
        assert sweep.base == REPO / "rn50_configs" / "fashion_mnist_cpu.yaml"
        planned = plan(sweep, folder=str(tmp_path))
        assert not any(run.config_error for run in planned)
        assert len(sweep.grid[key]) >= 3 and len(sweep.seeds) >= 3
        assert len(planned) == len(sweep.grid[key]) * len(sweep.seeds)
        assert {spec.world_size(run) for run in planned} == {1}


def test_parse_gpus_and_squeue_ids():
    assert parse_gpus("none") == [] and parse_gpus("2") == ["0", "1"]
    assert parse_gpus("0,3") == ["0", "3"]
    assert slurm.parse_squeue_ids("12 34_5 56_[0-2,7%4]\n") == {
        "12", "34_5", "56_0", "56_1", "56_2", "56_7"}


# ----------------------------------------------------------------------------------------
# local launch (stand-in trainer)
# ----------------------------------------------------------------------------------------

def test_failing_run_is_reported_while_others_finish(fake_setup, tmp_path):
    folder = tmp_path / "runs"
    missing = tmp_path / "no_such_train.beton"
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(folder),
                             grid={"data.train_dataset": [str(missing),
                                                          str(tmp_path / "train.beton")]},
                             seeds=2)
    result = sweep_cli("launch", sweep_file, "--max-parallel", "2", "--gpus", "none",
                       "--train-script", fake_setup["script"])
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "no such file" in result.stderr
    planned = plan(load_sweep(sweep_file))
    states = [run_state(run) for run in planned]
    assert states == ["failed", "complete", "failed", "complete"]
    status = sweep_cli("status", sweep_file)
    assert status.returncode == 0
    assert "4 runs: 2 complete, 2 failed" in status.stdout
    assert f"data.train_dataset: no such file {missing}" in status.stdout
    # the trainer's stderr is kept in train.log
    log = (planned[0].run_dir / TRAIN_LOG_FILE).read_text()
    assert "no such file" in log and "exit code 1" in log


def test_launcher_writes_error_txt_when_the_trainer_cannot(fake_setup, tmp_path):
    crashing = tmp_path / "crash.py"
    crashing.write_text("import sys\nprint('step 1', flush=True)\n"
                        "sys.exit('RuntimeError: CUDA error: an illegal memory access')\n")
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(tmp_path / "r"),
                             seeds=1)
    result = sweep_cli("launch", sweep_file, "--gpus", "none", "--train-script", crashing)
    assert result.returncode == 1
    run = plan(load_sweep(sweep_file))[0]
    error = (run.run_dir / runs.ERROR_FILE).read_text().splitlines()
    assert error[0] == "RuntimeError: CUDA error: an illegal memory access"
    assert "trainer exited with code 1; the last lines of its stderr:" in error
    assert "step 1" in (run.run_dir / TRAIN_LOG_FILE).read_text()
    # a later successful launch clears the stale error
    result = sweep_cli("launch", sweep_file, "--gpus", "none", "--train-script",
                       fake_setup["script"])
    assert result.returncode == 0 and run_state(run) == "complete"
    assert not (run.run_dir / runs.ERROR_FILE).exists()


def test_local_dry_run_prints_commands(fake_setup, tmp_path):
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", folder=str(tmp_path / "r"),
                             grid={"model.dropout": [0.0, 0.5]}, seeds=1)
    # --gpus is checked against the machine's GPUs: stand in for a 2-GPU node.
    result = sweep_cli("launch", sweep_file, "--dry-run", "--gpus", "0,1",
                       "--train-script", fake_setup["script"],
                       env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "fake_train.py" in line]
    assert len(commands) == 2 and "--model.dropout=0.5" in commands[1]
    assert "GPUs 0,1 round-robin" in result.stdout
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------
# SLURM path: submitit's LocalExecutor, and sbatch files through a stand-in sbatch
# ----------------------------------------------------------------------------------------

def test_slurm_submission_writes_sbatch_array(fake_setup, tmp_path, monkeypatch):
    """The SLURM submission through stand-in srun/sbatch/squeue: parameters and job ids."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '4242_1'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    folder = tmp_path / "runs"
    sweep_file = write_sweep(
        tmp_path / "s.yaml", base="base.yaml", folder=str(folder),
        grid={"augment.min_scale": [1.0, 0.5, 0.2]}, seeds=1, max_parallel=3,
        slurm={"partition": "learnlab", "account": "bias", "gpus_per_node": 2,
               "cpus_per_task": 20, "mem": "100G", "time": 120, "constraint": "volta32gb"})
    result = sweep_cli("launch", sweep_file, "--backend", "slurm", "--time", "240",
                       "--train-script", fake_setup["script"], env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    sbatch = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --partition=learnlab", "#SBATCH --account=bias",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=20",
                 "#SBATCH --mem=100G", "#SBATCH --time=240", "#SBATCH --array=0-1%2",
                 "#SBATCH --constraint=volta32gb", "#SBATCH --signal=USR2@90"):
        assert line in sbatch
    record = json.loads((folder / ".sweep" / "jobs.json").read_text())
    assert [job["job_id"] for job in record["submissions"][0]["jobs"]] == ["4242_0", "4242_1"]
    # squeue lists 4242_1: its run is queued, and a relaunch does not submit it again
    planned = plan(load_sweep(sweep_file))
    status = sweep_cli("status", sweep_file, env={"PATH": os.environ["PATH"]})
    assert "3 runs: 0 complete, 1 queued, 2 missing" in status.stdout
    dry = sweep_cli("launch", sweep_file, "--backend", "slurm", "--dry-run",
                    "--train-script", fake_setup["script"], env={"PATH": os.environ["PATH"]})
    assert "2 to launch" in dry.stdout
    assert planned[2].run_id not in dry.stdout.split("jobs (")[1]


def test_slurm_layout_checks_world_size(fake_setup, tmp_path):
    sweep_file = write_sweep(tmp_path / "s.yaml", base="base.yaml", seeds=3,
                             overrides={"dist.world_size": 4},
                             slurm={"mode": "ddp", "gpus_per_node": 8})
    sweep = load_sweep(sweep_file)
    planned = plan(sweep)
    with pytest.raises(SweepError, match="dist.world_size=4"):
        slurm.job_layout(planned, sweep.slurm)
    ddp4 = spec.slurm_settings(sweep.slurm, {"gpus_per_node": 4}, "test")
    assert len(slurm.job_layout(planned, ddp4)) == 3
    pack = spec.slurm_settings(sweep.slurm, {"mode": "pack"}, "test")
    with pytest.raises(SweepError, match="mode pack trains single-GPU runs"):
        slurm.job_layout(planned, pack)
    assert cli.main(["launch", str(sweep_file), "--backend", "slurm", "--dry-run",
                     "--train-script", str(fake_setup["script"])]) == 2


# ----------------------------------------------------------------------------------------
# the real trainer
# ----------------------------------------------------------------------------------------

def test_local_launch_real_trainer(tiny_fashion_betons, tmp_path, warm_python):
    """2 tau x 2 seeds through train_imagenet.py, two at a time; a relaunch trains nothing.
    The launcher and its trainers start from the warm python (tests/warm_python.py)."""
    train_beton, val_beton = tiny_fashion_betons
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"train_dataset": str(train_beton), "val_dataset": str(val_beton),
                 "num_workers": 1},
        "training": {"epochs": 1, "batch_size": 100},
        "lr": {"lr": 0.1, "lr_peak_epoch": 0},
        "model": {"arch": "resnet8"},
        "resolution": {"min_res": 28, "max_res": 28},
        "validation": {"resolution": 28, "batch_size": 200},
        "logging": {"progress": 0},
    }))
    folder = tmp_path / "runs"
    sweep_file = write_sweep(tmp_path / "crop.yaml", base="tiny.yaml", folder=str(folder),
                             grid={"augment.min_scale": [1.0, 0.5]}, seeds=2)
    warm = {"python": warm_python, "env": {env.PYTHON_ENV_VAR: shlex.join(warm_python)}}
    result = sweep_cli("launch", sweep_file, "--max-parallel", "2", "--gpus", "none",
                       timeout=600, **warm)
    assert result.returncode == 0, result.stdout + result.stderr
    planned = plan(load_sweep(sweep_file))
    for run in planned:
        summary = json.loads((run.run_dir / runs.SUMMARY_FILE).read_text())
        assert summary["run_id"] == run.run_id and len(summary["per_class_acc"]) == 10
        config = json.loads((run.run_dir / runs.CONFIG_FILE).read_text())
        assert config["augment"]["min_scale"] == run.values["augment.min_scale"]
        assert config["training"]["seed"] == run.seed
        assert launch_starts(run.run_dir) == 1
    relaunch = sweep_cli("launch", sweep_file, "--gpus", "none", **warm)
    assert relaunch.returncode == 0 and "0 to launch" in relaunch.stdout
    assert all(launch_starts(run.run_dir) == 1 for run in planned)

    assert "4 runs: 4 complete" in sweep_cli("status", sweep_file).stdout


def test_points_pair_values_and_cross_the_grid_and_seeds(tmp_path):
    from ffcv_bias.sweep.spec import expand, load_sweep, sweep_points
    from ffcv_bias.sweep.status import plan_table
    base = tmp_path / "base.yaml"
    base.write_text("training:\n  epochs: 1\n")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        "base: base.yaml\n"
        "grid: {augment.min_scale: [1.0, 0.5]}\n"
        "points:\n"
        "  - {data.sparsity: 0.0}\n"
        "  - {data.sparsity: 0.5, data.keep_indices: keep_0.5.npy}\n"
        "seeds: 2\n")
    sweep = load_sweep(sweep_file)
    points = sweep_points(sweep)
    assert len(points) == 4
    assert {"data.sparsity": 0.5, "data.keep_indices": "keep_0.5.npy",
            "augment.min_scale": 1.0} in points
    planned = expand(sweep, folder=str(tmp_path / "runs"))
    assert len(planned) == 8
    assert any("--data.keep_indices=keep_0.5.npy" in run.config_args for run in planned)
    assert "-" in plan_table(planned, ["missing"] * len(planned))  # dense point: no file

    sweep_file.write_text("base: base.yaml\ngrid: {data.sparsity: [0.1]}\n"
                          "points: [{data.sparsity: 0.5}]\nseeds: 1\n")
    with pytest.raises(SweepError, match="both a grid key and a points key"):
        load_sweep(sweep_file)
