#!/usr/bin/env bash
# The GPU acceptance check (issue 17), as one prepared command for a machine with one CUDA
# GPU (a CUDA torch and ffcv already installed there):
#
#     bash bench/gpu_check.sh [--out DIR] [more bench/gpu_check.py arguments]
#
# runs `bench/gpu_check.py --device cuda` under a hard timeout (GPU_CHECK_TIMEOUT seconds,
# default 460: under 8 minutes, whatever hangs), writes DIR/gpu_check.json (default DIR:
# gpu_check_out), prints where the JSON went and exits with the check's code (0: no check
# failed, 1: one failed, 2: a bad argument, 124: the timeout killed it).
# A later --device overrides cuda: `bash bench/gpu_check.sh --device cpu --tiny` is the
# same check end to end on a CPU (tests/test_gpu_check.py).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The interpreter with the CUDA torch: $PYTHON, else python (an activated environment),
# else python3.
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if command -v python >/dev/null 2>&1; then python=python; else python=python3; fi
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
trap 'rm -f "$started"' EXIT
# SIGTERM first, SIGKILL 15 s later (460 + 15 s: under 8 minutes in the worst case): the
# check's trainer children get the TERM too (same process group) and stop as a preempted
# run would.
timeout --kill-after=15 "$limit" "$python" "$here/gpu_check.py" --device cuda --out "$out" "$@"
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
