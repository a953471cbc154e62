"""Bad input, the campaign of issue 31 (docs/bad_input_campaign.md): paths, empty values,
flag values and working directories as a careless user types them, for every command.

Each case drives the command a user types (its main() in this process, or the real command
in a subprocess where the entry point reads sys.argv) and checks what the user gets: the
exit code, one stderr line naming the problem, no traceback, and nothing written where it
should not be (in particular nothing in the working directory for an empty path, and no
beton replaced by a command that then fails).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fixtures_datasets import make_fashion_dir
from ffcv_bias.analysis import make_synthetic_runs

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VARY = "augment.min_scale"


def run_main(main, argv, capsys):
    """(exit code, stderr) of a CLI's main, argparse's SystemExit included."""
    try:
        code = main(list(map(str, argv)))
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def one_line(err, *needles):
    """The single stderr line; it names the problem (every needle) and is no traceback.
    Progress bars (tqdm's `NN%|` lines, redrawn with '\\r') are not lines of text."""
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def listing(root):
    return sorted(str(path.relative_to(root)) for path in Path(root).rglob("*"))


# --------------------------------------------------------------------------------------
# python -m ffcv_bias.sweep
# --------------------------------------------------------------------------------------

@pytest.fixture
def sweep_setup(tmp_path):
    """A base config (its betons need not exist: plan checks no file) and a sweep file."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"train_dataset": "train.beton", "val_dataset": "val.beton"},
        "model": {"arch": "resnet8"}, "training": {"epochs": 2, "batch_size": 32},
        "lr": {"lr_peak_epoch": 1}}))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {base}\nfolder: {tmp_path / 'runs'}\n"
                     f"grid:\n  augment.min_scale: [1.0, 0.5]\nseeds: 1\n")
    return tmp_path, sweep


def sweep_cli(argv, capsys):
    from ffcv_bias.sweep.cli import main
    return run_main(main, argv, capsys)


def test_plan_with_an_unknown_grid_key_says_so_on_stderr(sweep_setup, capsys):
    """It exited 1 with the problem only in the table on stdout, nothing on stderr."""
    root, _ = sweep_setup
    typo = root / "typo.yaml"
    typo.write_text(f"base: {root / 'base.yaml'}\nfolder: {root / 'runs'}\n"
                    f"grid:\n  training.wieght_decay: [0.0, 0.1]\nseeds: 1\n")
    code, err = sweep_cli(["plan", typo], capsys)
    assert code == 1
    one_line(err, "2 of 2 runs have a bad config", "unknown config key 'training.wieght_decay'",
             "launch refuses the sweep")


SLURM = ["--backend", "slurm", "--dry-run"]


@pytest.mark.parametrize("flags, needles", [
    # argparse's usage block before the error; now the error alone
    (["--time", "abc"], ["argument --time: 'abc' is not a whole number of minutes"]),
    (["--time", "10:00:00"], ["'10:00:00' is not a whole number of minutes"]),
    (["--time", "10", "--max-parallel", "abc"], ["argument --max-parallel: invalid int"]),
    # argparse took -5G for an option: "expected one argument"
    (["--time", "10", "--cpus-per-task", "8", "--mem", "-5G"], ["'slurm.mem'", "'-5G'"]),
    # passed --dry-run unchecked
    (["--time", "10", "--cpus-per-task", "8", "--mem", "lots"], ["'slurm.mem'", "'lots'"]),
    (["--time", "10", "--cpus-per-task", "8", "--mem", "8G", "--runs-per-node", "99",
      "--gpus-per-node", "2"], ["runs_per_node=99 is more than slurm.gpus_per_node=2"]),
    (["--time", "10", "--cpus-per-task", "8", "--mem", "8G", "--partition", ""],
     ["argument --partition: empty value ''"]),
])
def test_slurm_flags_are_checked_in_one_line(sweep_setup, capsys, flags, needles):
    root, sweep = sweep_setup
    code, err = sweep_cli(["launch", sweep, *SLURM, *flags], capsys)
    assert code == 2
    one_line(err, *needles)
    assert not (root / "runs").exists()


@pytest.mark.parametrize("command, flags, needle", [
    ("plan", ["--folder", ""], "argument --folder: empty path ''"),   # silently ignored
    ("launch", ["--gpus", "", "--dry-run"], "argument --gpus: empty value"),  # ditto
    ("launch", ["--train-script", "", "--dry-run", "--gpus", "none"],
     "argument --train-script: empty path"),                           # ditto
    ("launch", ["--train-script", "{root}", "--dry-run", "--gpus", "none"],
     "is a directory, not a Python script"),                # "train script not found"
])
def test_empty_sweep_flags_are_refused_not_ignored(sweep_setup, capsys, command, flags, needle):
    root, sweep = sweep_setup
    flags = [flag.format(root=root) for flag in flags]
    code, err = sweep_cli([command, sweep, *flags], capsys)
    assert code == 2
    one_line(err, needle)
    assert not (root / "runs").exists()


def test_an_empty_sweep_file_argument_is_named(capsys):
    """It was '.': "sweep file . is a directory, not a YAML file"."""
    code, err = sweep_cli(["plan", ""], capsys)
    assert code == 2
    one_line(err, "argument sweep_file: empty path ''")


def test_plan_and_status_refuse_a_folder_that_is_a_file(sweep_setup, capsys):
    """Both listed every run as 'missing' in a folder no run could be written to."""
    root, sweep = sweep_setup
    blocker = root / "notes.txt"
    blocker.write_text("x")
    for command in ("plan", "status"):
        code, err = sweep_cli([command, sweep, "--folder", blocker], capsys)
        assert code == 2
        one_line(err, f"cannot create {blocker}: it is a file, not a directory")


def test_status_of_a_folder_that_does_not_exist_says_so(sweep_setup, capsys):
    root, sweep = sweep_setup
    code, err = sweep_cli(["status", sweep, "--folder", root / "typo" / "runs"], capsys)
    assert code == 0
    one_line(err, "note: the run folder", "does not exist")
    assert not (root / "typo").exists()


def test_a_bare_grid_line_and_a_directory_as_base_are_named(sweep_setup, capsys):
    root, _ = sweep_setup
    bare = root / "bare.yaml"   # `grid:` whose lines were lost: it planned the base alone
    bare.write_text(f"base: {root / 'base.yaml'}\ngrid:\nseeds: 1\n")
    code, err = sweep_cli(["plan", bare], capsys)
    assert code == 2
    one_line(err, "'grid' in", "is empty")
    folder_base = root / "dirbase.yaml"  # "not found" of a path that exists
    folder_base.write_text(f"base: {root}\nseeds: 1\n")
    code, err = sweep_cli(["plan", folder_base], capsys)
    assert code == 2
    one_line(err, "is a directory", "not a config YAML file")
    mem = root / "mem.yaml"  # the sweep file's slurm section gets the same checks
    mem.write_text(f"base: {root / 'base.yaml'}\nslurm:\n  mem: lots\n")
    code, err = sweep_cli(["plan", mem], capsys)
    assert code == 2
    one_line(err, "'slurm.mem'", "'lots'")


def test_a_tilde_the_shell_left_alone_is_the_home_directory(sweep_setup, capsys, monkeypatch):
    """`--folder=~/runs` (no shell expands `~` after `=`) planned runs in ./~/runs."""
    from ffcv_bias.sweep.cli import main
    root, sweep = sweep_setup
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.chdir(root)
    assert main(["plan", str(sweep), "--folder=~/runs"]) == 0
    assert f"runs in {root / 'home' / 'runs'}\n" in capsys.readouterr().out
    assert not (root / "~").exists()


# --------------------------------------------------------------------------------------
# python -m ffcv_bias.analysis
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    make_synthetic_runs(root / "runs", [1.0, 0.3], range(2), num_classes=4, n_per_class=10,
                        seed=1)
    return root / "runs"


def analysis_cli(argv, capsys):
    from ffcv_bias.analysis.__main__ import main
    return run_main(main, argv, capsys)


@pytest.mark.parametrize("make_argv, needles", [
    # a section name: pandas' "All arrays must be of the same length", 30 lines
    (lambda runs, out: [runs, "--vary", "augment", "--out", out],
     ["--vary augment names a config section, not a key", "min_scale"]),
    (lambda runs, out: [runs, "--vary", "", "--out", out], ["--vary '' names no config key"]),
    (lambda runs, out: [runs, "--vary", VARY, "--ignore-key", "", "--out", out],
     ["--ignore-key '' names no config key"]),
    # '' was the current directory: it analysed whatever runs lay below it
    (lambda runs, out: ["", "--vary", VARY, "--out", out], ["argument RUNS_DIR: empty path"]),
    # '' was '.': ". holds files that are not an analysis report"
    (lambda runs, out: [runs, "--vary", VARY, "--out", ""], ["argument --out: empty path"]),
    (lambda runs, out: [runs / "synthetic_val.beton.classes.json", "--vary", VARY, "--out",
                        out], ["is a file: give the folder that holds the run directories"]),
    (lambda runs, out: [runs, "--vary", VARY, "--where", "foo.bar=1", "--out", out],
     ["--where foo.bar=1: no run's config has the key foo.bar"]),
    # an empty value shown as a double space: "--reference  is not a value ..."
    (lambda runs, out: [runs, "--vary", VARY, "--reference", "", "--out", out],
     ["--reference '' is not a value of the varied key"]),
    (lambda runs, out: [runs, "--vary", VARY, "--where", "", "--out", out],
     ["--where '': expected KEY=VALUE"]),
    (lambda runs, out: [runs, "--vary", VARY, "--top-k", "abc", "--out", out],
     ["argument --top-k: invalid int value: 'abc'"]),          # argparse's usage block
])
def test_analysis_arguments_as_typed(records, tmp_path, capsys, make_argv, needles):
    out = tmp_path / "report"
    code, err = analysis_cli([*make_argv(records, out), "--no-figures"], capsys)
    assert code == 2
    one_line(err, *needles)
    assert not out.exists()


def test_analysis_out_with_a_tilde_is_under_home(records, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, err = analysis_cli([records, "--vary", VARY, "--no-figures", "--out=~/report"],
                             capsys)
    assert code == 0, err
    assert (tmp_path / "home" / "report" / "index.html").is_file()
    assert not (tmp_path / "~").exists()


# --------------------------------------------------------------------------------------
# python -m ffcv_bias.evaluate
# --------------------------------------------------------------------------------------

def evaluate_cli(argv, capsys):
    from ffcv_bias.evaluate import main
    return run_main(main, argv, capsys)


@pytest.mark.parametrize("make_argv, code, needles", [
    # 0 was read as "not given", -4 ended in a torch traceback
    (lambda run: [run, "--protocols", "32@1.0", "--batch-size", "0"], 2,
     ["--batch-size must be >= 1, not 0"]),
    (lambda run: [run, "--protocols", "32@1.0", "--batch-size", "-4"], 2,
     ["--batch-size must be >= 1, not -4"]),
    # '' was '.': ". is not a run directory"
    (lambda run: ["", "--protocols", "32@1.0"], 2, ["argument RUN_DIR: empty path"]),
    # '' silently fell back to the config's val beton
    (lambda run: [run, "--protocols", "32@1.0", "--val-dataset", ""], 2,
     ["argument --val-dataset: empty path"]),
    (lambda run: [run, "--protocols", "32@1.0", "--val-dataset", run.parent], 2,
     ["is a directory, not a beton file"]),                    # "beton not found"
    (lambda run: [run.parent / "nope", "--protocols", "32@1.0"], 1,
     ["run directory not found"]),
    (lambda run: [run / "config.json", "--protocols", "32@1.0"], 1,
     ["config.json is a file, not a run directory"]),
    (lambda run: [run.parent, "--protocols", "32@1.0"], 1,
     ["is not a run directory but holds 4: name them"]),
    # torch's allocator traceback (3 TB asked)
    (lambda run: [run, "--protocols", "100000@1.0"], 2, ["100000@1.0", "GB of memory"]),
])
def test_evaluate_arguments_as_typed(records, capsys, make_argv, code, needles):
    run = sorted(path.parent for path in records.glob("*/summary.json"))[0]
    before = listing(records)
    got, err = evaluate_cli(make_argv(run), capsys)
    assert got == code
    one_line(err, *needles)
    assert listing(records) == before


# --------------------------------------------------------------------------------------
# python -m ffcv_bias.studies.diet, preservation, demo
# --------------------------------------------------------------------------------------

def diet_cli(argv, capsys):
    from ffcv_bias.studies.diet import main
    return run_main(main, argv, capsys)


PRUNE = ["prune", "--score", "el2n", "--sparsity", "0.5"]


@pytest.mark.parametrize("make_argv, needles", [
    # '' was '.': `score` wrote its scores into the working directory
    (lambda t: ["score", "-C", t / "c.yaml", "--epochs", "0", "--out", ""],
     ["argument --out: empty path"]),
    (lambda t: [*PRUNE, "--scores", t, "--out", ""], ["argument --out: empty path"]),
    (lambda t: [*PRUNE, "--scores", "", "--out", t / "p"], ["argument --scores: empty path"]),
    (lambda t: [*PRUNE, "--scores", t, "--folder", "", "--out", t / "p"],
     ["argument --folder: empty path"]),                        # silently OUT/runs
    (lambda t: [*PRUNE, "--scores", t, "--name", "", "--out", t / "p"],
     ["--name '' is empty"]),                                    # silently diet_el2n
    (lambda t: [*PRUNE, "--scores", t, "--max-parallel", "0", "--out", t / "p"],
     ["--max-parallel must be >= 1, not 0"]),                    # silently unset
    (lambda t: [*PRUNE, "--scores", t / "scores.npz", "--out", t / "p"],
     ["scores.npz is a file: give the score directory"]),        # "holds no scores"
    (lambda t: ["figures", "--runs", "", "--out", t / "f"], ["argument --runs: empty path"]),
    # "config file not found: " (an empty name)
    (lambda t: ["score", "-C", "", "--epochs", "0", "--out", t / "s"],
     ["argument --config-file/-C: empty path"]),
])
def test_diet_arguments_as_typed(tmp_path, capsys, monkeypatch, make_argv, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scores.npz").write_bytes(b"")
    before = listing(tmp_path)
    code, err = diet_cli(make_argv(tmp_path), capsys)
    assert code == 2
    one_line(err, *needles)
    assert listing(tmp_path) == before


def test_preservation_and_demo_arguments_as_typed(records, tmp_path, capsys, monkeypatch):
    from ffcv_bias.demo import main as demo_main
    from ffcv_bias.studies.preservation.cli import main as preservation_main
    monkeypatch.chdir(tmp_path)
    run = sorted(path.parent for path in records.glob("*/summary.json"))[0]
    sidecar = records / "synthetic_val.beton.classes.json"
    base = ["--weights", run, "--dataset", records / "synthetic_val.beton", "--device", "cpu"]
    cases = [
        # '' was '.': the tables were written into the working directory
        (preservation_main, [*base, "--out", ""], ["argument --out: empty path"]),
        # a ZeroDivisionError traceback after the model was loaded
        (preservation_main, [*base, "--batch-size", "0", "--out", tmp_path / "p"],
         ["--batch-size must be >= 1, got 0"]),
        # "class list not found: X.classes.json.classes.json"
        (preservation_main, ["--weights", run, "--dataset", sidecar, "--out", tmp_path / "p"],
         ["is a beton's class list; name the beton itself"]),
        # "class list not found: ..classes.json"
        (preservation_main, ["--weights", run, "--dataset", "", "--out", tmp_path / "p"],
         ["argument --dataset: empty path"]),
        (demo_main, ["--sweep", ""], ["argument --sweep: empty path"]),  # "not found: ."
    ]
    for main, argv, needles in cases:
        code, err = run_main(main, argv, capsys)
        assert code == 2, err
        one_line(err, *needles)
    # --report: checked only by the analysis at the end, after the betons and the sweeps
    for name in ("crop.yaml", "decay.yaml"):
        (tmp_path / name).write_text(f"base: {tmp_path / 'base.yaml'}\nseeds: 1\n")
    (tmp_path / "base.yaml").write_text("model: {arch: resnet8}\n")
    (tmp_path / "report.txt").write_text("x")
    code, err = run_main(demo_main, ["--sweep", "crop.yaml", "--decay-sweep", "decay.yaml",
                                     "--report", "report.txt"], capsys)
    assert code == 2
    one_line(err, "--report: cannot create report.txt: it is a file, not a directory")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "base.yaml", "crop.yaml", "decay.yaml", "report.txt"]


# --------------------------------------------------------------------------------------
# write_datasets.py, train_imagenet.py
# --------------------------------------------------------------------------------------

@pytest.fixture
def fashion(tmp_path):
    make_fashion_dir(tmp_path / "fashion")
    return tmp_path / "fashion"


def write_cli(argv, capsys):
    from write_datasets import main
    return run_main(main, argv, capsys)


WRITE_ERROR = "write_datasets.py: error: "


def test_both_splits_are_checked_before_either_is_written(fashion, tmp_path, capsys,
                                                          monkeypatch):
    """A missing val file, or a subset larger than the val split, failed only after the
    train beton had replaced the one at data/<dataset>_train.beton."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    kept = work / "data" / "fashion-mnist_train.beton"
    kept.write_bytes(b"an earlier beton")
    monkeypatch.chdir(work)
    code, err = write_cli([f"--cfg.data_dir={fashion}", "--cfg.subset=25"], capsys)
    assert code == 1
    one_line(err, WRITE_ERROR, "val split: subset of 25 images asked for, the split has 20",
             "nothing was written")
    (fashion / "t10k-images-idx3-ubyte.gz").unlink()
    code, err = write_cli([f"--cfg.data_dir={fashion}"], capsys)
    assert code == 1
    one_line(err, WRITE_ERROR, "t10k-images-idx3-ubyte(.gz) not found")
    assert kept.read_bytes() == b"an earlier beton" and listing(work / "data") == [kept.name]


@pytest.mark.parametrize("make_path, needles", [
    # the temporary named in "Is a directory: .../.betons.pid...tmp", and betons/.classes.json
    # left behind
    (lambda t: f"{t}/betons/", ["ends with '/'", "betons/NAME.beton"]),
    # replaced the sidecar with a beton, and wrote a .classes.json.classes.json
    (lambda t: f"{t}/x.beton.classes.json", ["names a beton's .classes.json file",
                                             "name the beton itself", "/x.beton)"]),
])
def test_write_path_must_name_a_beton(fashion, tmp_path, capsys, make_path, needles):
    (tmp_path / "x.beton.classes.json").write_text("{}")
    before = listing(tmp_path)
    code, err = write_cli(["--cfg.split=val", f"--cfg.data_dir={fashion}",
                           f"--cfg.write_path={make_path(tmp_path)}"], capsys)
    assert code == 1
    one_line(err, WRITE_ERROR, *needles)
    assert listing(tmp_path) == before
    assert (tmp_path / "x.beton.classes.json").read_text() == "{}"


def test_write_paths_as_typed(fashion, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    # the space is invisible at the end of "directory not found: DIR "
    code, err = write_cli(["--cfg.split=val", f"--cfg.data_dir={fashion} ",
                           "--cfg.write_path=out.beton"], capsys)
    assert code == 1
    one_line(err, WRITE_ERROR, f"--cfg.data_dir='{fashion} ' begins or ends with a space")
    # `--cfg.write_path=~/...` wrote ./~/betons/v.beton; a subset missing classes: no word
    code, err = write_cli(["--cfg.split=val", f"--cfg.data_dir={fashion}", "--cfg.subset=3",
                           "--cfg.write_path=~/betons/v.beton"], capsys)
    assert code == 0, err
    assert (tmp_path / "home" / "betons" / "v.beton").is_file()
    assert not (tmp_path / "~").exists()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the subset of 3 images has no image of 7 of the 10 classes "
                        "(a class-stratified subset needs at least one image per class): "
                        "their accuracy cannot be measured on this beton"]


def test_a_beton_named_with_a_trailing_slash(tmp_path):
    """The trainer looked for `X.beton/.classes.json`: "class list not found"."""
    beton = tmp_path / "v.beton"
    beton.write_bytes(b"\0" * 64)
    beton.with_name("v.beton.classes.json").write_text(json.dumps({
        "dataset": "x", "split": "val", "num_samples": 1, "num_classes": 1,
        "classes": ["a"]}))
    result = subprocess.run(
        [PYTHON, str(REPO / "train_imagenet.py"), f"--data.train_dataset={beton}",
         f"--data.val_dataset={beton}/", "--model.arch=resnet8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    one_line(result.stderr, f"data.val_dataset: {beton}/ ends with '/': a beton is a file")
    assert listing(tmp_path) == ["v.beton", "v.beton.classes.json"]
    assert np.fromfile(beton, dtype=np.uint8).sum() == 0


def test_an_empty_beton_path_is_named_empty_not_a_directory():
    """`--data.train_dataset=` (an unset shell variable) was read as '.': 'is a directory'."""
    from ffcv_bias.train import checks
    from ffcv_bias.train.fastargs_strict import ConfigError
    nested = {"data": {"train_dataset": "", "val_dataset": "b.beton"}}
    with pytest.raises(ConfigError, match="data.train_dataset is empty: name the beton file"):
        checks._check_datasets(nested)


def test_a_tilde_in_the_trainers_paths_is_the_home_directory():
    """`--logging.folder=~/runs_x` (no shell expands ~ after `=`) trained into ./~/runs_x."""
    import os
    from ffcv_bias.train.config import resolve_config
    nested = resolve_config(["--logging.folder=~/runs_x", "--data.train_dataset=~/a.beton",
                             "--data.val_dataset=b.beton"])
    home = os.path.expanduser("~")
    assert nested["logging"]["folder"] == os.path.join(home, "runs_x")
    assert nested["data"]["train_dataset"] == os.path.join(home, "a.beton")
    assert nested["data"]["val_dataset"] == "b.beton"
