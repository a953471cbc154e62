"""bench/gpu_check.sh, the one prepared command of the GPU acceptance check (issue 17).

The whole check runs end to end here on the CPU with tiny sizes (`--device cpu --tiny`):
every section runs, nothing fails, and exactly the checks that need CUDA say SKIP. The
wrapper's own duties are tested on their own (fast): it passes arguments through, says
where the JSON went (or that none was written), and exits with the check's code, also
when its hard timeout stops the check.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"

# What a CPU cannot measure: ffcv pins buffers and adds ToDevice only for CUDA, and the
# GPU backlog and the sync counter are CUDA calls.
CPU_SKIPS = {"buffers with a GPU backlog", "buffers pinned", "buffers ToDevice in the pipeline",
             "syncs per step"}
CPU_PASSES = {"SIGTERM -> exit 75", "SIGTERM -> resume -> same val_logits",
              "SIGUSR2 -> exit 75", "SIGUSR2 -> resume -> same val_logits",
              "1-process gloo DDP epoch"}


def expected_figures():
    """The INFO lines of a tiny CPU check (TINY: resnet8 at 32 and 40 px, batch 16, one
    loader thread on this 2-core machine, at most two)."""
    figures = {"machine", "betons", "buffers copy in the step (old), no backlog",
               "trainer resnet8 32 px batch 16"}
    for resolution in (32, 40):
        for variant in ("eager", "compiled (backend aot_eager)"):
            for optimizer in ("for-each", "fused"):
                figures.add(f"model resnet8 {resolution} px batch 16 fp32 channels-last, "
                            f"{variant}, {optimizer} SGD")
    return figures


def run_script(args, cwd, **env):
    environment = dict(os.environ, **{"PYTHON": sys.executable, **env})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.e2e
def test_tiny_cpu_check_runs_every_section_and_skips_only_what_needs_cuda(tmp_path,
                                                                         warm_python):
    out = tmp_path / "out"
    # The check and its trainer subprocesses start from conftest's warm python ($PYTHON is
    # one word for the script: a wrapper that runs the warm python's words).
    wrapper = tmp_path / "warm-python"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(warm_python)} "$@"\n')
    wrapper.chmod(0o755)
    result = run_script(["--device", "cpu", "--tiny", "--out", str(out)], tmp_path,
                        PYTHON=str(wrapper), FFCV_BIAS_PYTHON=shlex.join(warm_python))

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"gpu_check.sh: results in {out}/gpu_check.json" in result.stdout
    assert result.stdout.rstrip().endswith("gpu_check.sh: exit code 0")
    record = json.loads((out / "gpu_check.json").read_text())
    by_status = {}
    for entry in record["results"]:
        by_status.setdefault(entry["status"], set()).add(entry["name"])
    assert by_status.get("FAIL", set()) == set()
    assert by_status["SKIP"] == CPU_SKIPS
    assert by_status["PASS"] == CPU_PASSES
    loader_lines = {name for name in by_status["INFO"] if name.startswith("loader ")}
    assert by_status["INFO"] - loader_lines == expected_figures()
    assert loader_lines and all(name.startswith("loader 32 px, ") for name in loader_lines)
    assert record["device"] == "cpu" and record["complete"] is True
    assert set(record["section_seconds"]) == {"buffers", "resume", "trainer", "ddp", "loader",
                                              "model"}
    # Every figure is a number a reader can compare: img/s > 0 wherever one is reported.
    rates = [entry["images_per_second"] for entry in record["results"]
             if "images_per_second" in entry]
    assert len(rates) == 8 + 1 + len(loader_lines) and min(rates) > 0
    # The scratch folder (betons, runs) is removed; only the JSON stays.
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.json"]


def test_a_bad_argument_passes_through_with_its_exit_code(tmp_path):
    out = tmp_path / "out"
    result = run_script(["--device", "cpu", "--size", "wide", "--out", str(out)], tmp_path)

    assert result.returncode == 2, result.stderr
    assert "--size must be WIDTHxHEIGHT" in result.stderr
    assert "Traceback" not in result.stderr
    assert "no results written" in result.stderr
    assert result.stdout.rstrip().endswith("gpu_check.sh: exit code 2")
    assert not (out / "gpu_check.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_the_plain_command_on_a_machine_without_cuda_says_so(tmp_path):
    result = run_script([], tmp_path)

    assert result.returncode == 2, result.stderr
    assert "--device cuda: torch sees no CUDA GPU here" in result.stderr
    assert "use --device cpu for a dry run" in result.stderr
    assert not (tmp_path / "gpu_check_out" / "gpu_check.json").exists()


def test_the_hard_timeout_stops_the_check_and_says_so(tmp_path):
    # One second: the check is still importing torch when the timeout stops it.
    result = run_script(["--device", "cpu", "--tiny", "--out", str(tmp_path / "out")], tmp_path,
                        GPU_CHECK_TIMEOUT="1")

    assert result.returncode == 124, result.stderr
    assert "gpu_check.sh: stopped after 1 s (GPU_CHECK_TIMEOUT)" in result.stderr
    assert "no results written" in result.stderr
    assert result.stdout.rstrip().endswith("gpu_check.sh: exit code 124")


def test_an_earlier_json_is_not_taken_for_this_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "gpu_check.json"
    earlier.write_text('{"results": []}\n')
    os.utime(earlier, (1, 1))  # written long before this run
    result = run_script(["--device", "cpu", "--size", "wide", "--out", str(out)], tmp_path)

    assert result.returncode == 2
    assert "results in" not in result.stdout
    assert "no results written" in result.stderr
    assert earlier.read_text() == '{"results": []}\n'  # the wrapper never deletes it


def stand_in_python(tmp_path):
    """A `python` for the wrapper that writes a partial gpu_check.json into its --out
    folder, as the check does after each section, then hangs in the next section."""
    script = tmp_path / "python"
    script.write_text("""#!/usr/bin/env bash
while [ $# -gt 0 ]; do
    if [ "$1" = "--out" ]; then out="$2"; fi
    shift
done
mkdir -p "$out"
echo '{"complete": false, "results": []}' > "$out/gpu_check.json"
exec sleep 60
""")
    script.chmod(0o755)
    return str(script)


def test_a_check_stopped_by_the_timeout_keeps_its_partial_results(tmp_path):
    out = tmp_path / "out"
    result = run_script(["--out", str(out)], tmp_path, PYTHON=stand_in_python(tmp_path),
                        GPU_CHECK_TIMEOUT="2")

    assert result.returncode == 124, result.stderr
    assert f"partial results (the sections done before it stopped) in {out}/gpu_check.json" \
        in result.stdout
    assert result.stdout.rstrip().endswith("gpu_check.sh: exit code 124")
