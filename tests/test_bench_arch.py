"""bench/arch_throughput.py: a tiny CPU run end to end (table and JSON), the recipe and
default resolution of every architecture, what each mode really runs, and the one-line
errors. Nothing about speed is asserted (that is what the benchmark is for)."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffcv_bias.train.models import ARCHITECTURES, create_model, describe_weight_decay

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "arch_throughput.py"
# "arch  px  batch  fp32 NCHW img/s  bf16 CL img/s  (a)/(b)  fp32 peak MiB  bf16 peak MiB"
# (peak memory is CUDA's: n/a on the CPU)
ROW = re.compile(r"^(\w+) +(\d+) +(\d+) +([0-9]+\.[0-9]) +([0-9]+\.[0-9]) +([0-9]+\.[0-9]{2})"
                 r" +n/a +n/a$")


def load_bench():
    spec = importlib.util.spec_from_file_location("arch_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def run_script(*args, timeout):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def one_torch_thread():
    """As OMP_NUM_THREADS=1 for the subprocesses: on a busy 2-core machine two spinning
    OpenMP threads make these tiny steps 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_cpu_run_prints_the_table_and_writes_the_json(tmp_path, capsys, one_torch_thread):
    # In-process: the script's ffcv_bias.train import (ffcv, ~10 s) is then shared with the
    # rest of the suite; test_unknown_architecture_exits_2_with_one_line runs the script itself.
    json_path = tmp_path / "out" / "arch.json"
    args = ["--archs", "resnet8,vit_small", "--device", "cpu", "--batch-size", "4",
            "--resolution", "32", "--steps", "2", "--warmup", "1", "--json", str(json_path)]
    assert bench.main(args) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0] == "command: " + shlex.join(["python", "bench/arch_throughput.py", *args])
    assert any(line.startswith("device: cpu, ") for line in lines)
    rows = {match.group(1): match.groups()[1:] for match in map(ROW.match, lines) if match}
    assert list(rows) == ["resnet8", "vit_small"], stdout

    figures = json.loads(json_path.read_text())
    assert figures["complete"] is True and figures["device"] == "cpu"
    assert figures["command"] == lines[0].removeprefix("command: ")
    assert figures["settings"] == {"batch_size": 4, "steps": 2, "warmup": 1, "resolution": 32}
    assert [r["arch"] for r in figures["results"]] == ["resnet8", "vit_small"]
    for entry in figures["results"]:
        fp32, bf16 = entry["fp32_nchw"], entry["bf16_channels_last"]
        for mode in (fp32, bf16):
            assert mode["images_per_second"] == pytest.approx(2 * 4 / mode["seconds"])
            assert mode["peak_memory_bytes"] is None and mode["losses_finite"] is True
        assert entry["ratio_bf16_over_fp32"] == pytest.approx(
            bf16["images_per_second"] / fp32["images_per_second"])
        # The table shows the JSON's figures.
        assert rows[entry["arch"]] == (
            "32", "4", f"{fp32['images_per_second']:.1f}", f"{bf16['images_per_second']:.1f}",
            f"{entry['ratio_bf16_over_fp32']:.2f}")
        assert (entry["resolution"], entry["resolution_source"]) == (32, "--resolution")
        # The optimizer's weight-decay groups are the trainer's (param_groups.py).
        decayed, exempt = describe_weight_decay(create_model(entry["arch"],
                                                             entry["num_classes"]))
        assert entry["param_group_sizes"] == {"decay": len(decayed), "no_decay": len(exempt)}
    resnet8, vit = figures["results"]
    assert (resnet8["recipe"], resnet8["optimizer"], resnet8["weight_decay"],
            resnet8["num_classes"]) == ("fashion_mnist_cpu.yaml", "sgd", 5e-4, 10)
    assert (vit["recipe"], vit["optimizer"], vit["weight_decay"], vit["grad_clip_norm"],
            vit["drop_path"]) == ("vit_small_300_epochs.yaml", "adamw", 0.05, 1.0, 0.1)
    assert (vit["recipe_peak_lr"], vit["lr"]) == (0.001, pytest.approx(0.001 * bench.LR_FRACTION))
    assert any(line.startswith("  vit_small: 32 px (--resolution), batch 4, 1000 classes; "
                               "vit_small_300_epochs.yaml: adamw") for line in lines)


def test_unknown_architecture_exits_2_with_one_line():
    result = run_script("--archs", "resnet8,resnet9000", "--device", "cpu", timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: --archs: unknown architecture 'resnet9000'; known: " + ", ".join(ARCHITECTURES)]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["--batch-size", "many"], "argument --batch-size: 'many' is not an integer"),
    (["--warmup", "-1"], "argument --warmup: -1 must be >= 0"),
    (["--resolution", "0"], "argument --resolution: 0 must be >= 1"),
    (["--stepz", "3"], "unrecognized arguments: --stepz 3"),
    (["--archs", "resnet8,,vit_small"], "--archs 'resnet8,,vit_small': empty architecture"),
    (["--archs", "resnet8,resnet8"], "--archs: resnet8 listed more than once"),
    (["--device", "banana"], "--device 'banana': not a device"),
    (["--archs", "vit_small", "--resolution", "40"],
     "vit_small cannot take 40 px images (--resolution): ValueError: input 40x40 is not a "
     "multiple of the patch size 16"),
    (["--archs", "densenet121", "--resolution", "8"],
     "densenet121 cannot take 8 px images (--resolution): ValueError: input (8, 8) is too "
     "small for DenseNet"),
])
def test_bad_input_is_a_one_line_error(argv, message, capsys, one_torch_thread):
    assert bench.main(["--device", "cpu", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert message in err


def test_cuda_without_cuda_and_json_into_a_directory_are_errors(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--json", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == f"error: --json {tmp_path}: is a directory, expected a file path"


def test_every_architecture_has_a_recipe_and_a_default_resolution():
    assert set(bench.RECIPES) == set(ARCHITECTURES)
    resolutions = {}
    for arch in ARCHITECTURES:
        nested = bench.load_recipe(arch)
        assert nested["model"]["arch"] == arch
        resolutions[arch], _ = bench.default_resolution(nested, bench.RECIPES[arch])
    # ffcv-imagenet's 160 -> 192 px ramp for the ImageNet ResNets and DenseNet; 224 px for
    # ConvNeXt and ViT (a multiple of its 16 px patches); 32 px for the CIFAR stems.
    imagenet = {"resnet18": 176, "resnet50": 176, "densenet121": 176, "convnext_tiny": 224,
                "vit_small": 224}
    assert resolutions == {arch: imagenet.get(arch, 32) for arch in ARCHITECTURES}


@pytest.mark.parametrize("mode, dtype, layout", [
    (bench.FP32, torch.float32, torch.contiguous_format),
    (bench.BF16, torch.bfloat16, torch.channels_last)])
def test_each_mode_runs_in_its_dtype_and_layout(mode, dtype, layout, one_torch_thread):
    plan = bench.Plan("resnet8", bench.RECIPES["resnet8"], bench.load_recipe("resnet8"), 16,
                      "--resolution", summary={})
    model = bench.build_model(plan, torch.device("cpu"), mode.memory_format)
    images, labels = bench.synthetic_batch(plan, mode, torch.device("cpu"), 2)
    assert images.dtype == dtype and images.is_contiguous(memory_format=layout)
    assert model.conv1.weight.is_contiguous(memory_format=layout)
    seen = []
    model.conv1.register_forward_hook(lambda module, inputs, output: seen.append(output))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    loss = bench.training_step(model, optimizer, torch.nn.CrossEntropyLoss(), images, labels,
                               mode, torch.device("cpu"), grad_clip_norm=1.0)
    assert seen[0].dtype == dtype and torch.isfinite(loss)
    assert not torch.equal(model.fc.weight, before)  # the step updated the weights


def test_out_of_memory_in_one_mode_is_reported_and_the_run_goes_on(monkeypatch, capsys,
                                                                   one_torch_thread):
    real_run_steps = bench.run_steps

    def fp32_runs_out_of_memory(step, device, steps, warmup):
        if step[5] is bench.FP32:  # step = (model, optimizer, loss_fn, images, labels, mode, ...)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_run_steps(step, device, steps, warmup)

    monkeypatch.setattr(bench, "run_steps", fp32_runs_out_of_memory)
    assert bench.main(["--archs", "resnet8,resnet20", "--device", "cpu", "--batch-size", "2",
                       "--resolution", "16", "--steps", "1", "--warmup", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("resnet8 ", "resnet20 "))]
    assert [row[:4] + row[5:] for row in rows] == [
        [arch, "16", "2", "OOM", "n/a", "n/a", "n/a"] for arch in ("resnet8", "resnet20")]
    assert all(float(row[4]) > 0 for row in rows)  # bf16 was still measured
