#!/usr/bin/env bash
# The GPU acceptance check (issue 17), as one prepared command for a machine with one CUDA
# GPU (a CUDA torch there; ffcv and the rest from the device bundle where they are missing):
#
#     bash bench/gpu_check.sh [--out DIR] [more bench/gpu_check.py arguments]
#
# runs `bench/gpu_check.py --device cuda` under a hard timeout (GPU_CHECK_TIMEOUT seconds,
# default 460: under 8 minutes, whatever hangs), writes DIR/gpu_check.json (default DIR:
# gpu_check_out), prints where the JSON went and exits with the check's code (0: no check
# failed, 1: one failed, 2: a bad argument or no usable interpreter / bundle, 124: the
# timeout killed it).
# A later --device overrides cuda: `bash bench/gpu_check.sh --device cpu --tiny` is the
# same check end to end on a CPU (tests/test_gpu_check.py).
#
# The interpreter: $PYTHON if set, else /opt/torch/.venv/bin/python3 (the GPU box's) if it
# exists, else the first of this checkout's .venv/bin/python, python3, python that imports
# torch. Where it lacks ffcv (or fastargs, terminaltables, yaml), bench/gpu_check_env.py
# installs the device bundle (device_bundle/, made by `bash bench/device_bundle.sh`; or
# $GPU_CHECK_BUNDLE) with `pip install --no-index --no-deps --target` into a temporary
# folder removed at exit, put first on PYTHONPATH: nothing global. GPU_CHECK_INSTALL=always
# installs it even where nothing is missing, =never never does.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x /opt/torch/.venv/bin/python3 ]; then
        python=/opt/torch/.venv/bin/python3
    else
        for candidate in "$repo/.venv/bin/python" python3 python; do
            if command -v "$candidate" >/dev/null 2>&1 \
                    && "$candidate" -c "import torch" >/dev/null 2>&1; then
                python="$candidate"
                break
            fi
        done
    fi
    if [ -z "$python" ]; then
        echo "gpu_check.sh: no interpreter with torch: not /opt/torch/.venv/bin/python3," \
             "$repo/.venv/bin/python (make setup), python3 nor python; set PYTHON" >&2
        echo "gpu_check.sh: exit code 2"
        exit 2
    fi
    echo "gpu_check.sh: interpreter $python (\$PYTHON not set)"
fi
limit="${GPU_CHECK_TIMEOUT:-460}"

# Find the out folder among the arguments (the check's own default otherwise) to say where
# the JSON went; every argument still goes to the check unchanged.
out="gpu_check_out"
previous=""
for argument in "$@"; do
    case "$argument" in
        --out=*) out="${argument#--out=}" ;;
    esac
    if [ "$previous" = "--out" ]; then out="$argument"; fi
    previous="$argument"
done

started="$(mktemp)"  # its time stamp tells this run's JSON from an earlier run's
target="$(mktemp -d)"  # where gpu_check_env.py installs the device bundle, if it must
trap 'rm -rf "$started" "$target"' EXIT
# SIGTERM first, SIGKILL 15 s later (460 + 15 s: under 8 minutes in the worst case): the
# check's trainer children get the TERM too (same process group) and stop as a preempted
# run would.
GPU_CHECK_TARGET="$target" timeout --kill-after=15 "$limit" \
    "$python" "$here/gpu_check_env.py" --device cuda --out "$out" "$@"
code=$?
if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    echo "gpu_check.sh: stopped after $limit s (GPU_CHECK_TIMEOUT); its scratch folder" \
         "(betons, runs: $out/tmp*) may be left behind" >&2
fi
if [ -f "$out/gpu_check.json" ] && [ "$out/gpu_check.json" -nt "$started" ]; then
    if grep -q '"complete": false' "$out/gpu_check.json"; then
        echo "gpu_check.sh: partial results (the sections done before it stopped) in" \
             "$out/gpu_check.json"
    else
        echo "gpu_check.sh: results in $out/gpu_check.json"
    fi
else
    echo "gpu_check.sh: no results written ($out/gpu_check.json is missing or from an" \
         "earlier run)" >&2
fi
echo "gpu_check.sh: exit code $code"
exit "$code"
