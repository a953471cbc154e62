#!/usr/bin/env bash
# Proof that the device bundle is whole (issue 30): it installs and works in a fresh Python
# 3.12 environment that cannot see the Debian libraries it was built against.
#
#     bash bench/device_bundle_check.sh [--bundle DIR] [--python PYTHON3.12] [--torch]
#                                       [--gpu-check] [--keep-work]
#
#  1. outside: the bundle's wheels against its SHA256SUMS; a fresh Python 3.12 venv with
#     stand-ins for what the box has: numpy, numba, opencv-python-headless, pillow,
#     setuptools, tqdm (from PyPI). --torch adds torch==2.13.0 from PyPI (for 3.12 that is
#     the CUDA build: about 3 GB with its nvidia-* wheels; it runs on a CPU) and pandas,
#     scipy, matplotlib, pytest; without it, `torch` is a stand-in that answers attribute look-ups
#     only (ffcv imports torch at its top; no torch code runs in steps 4-6);
#  2. inside `unshare --mount`: an overlay over /usr/lib/x86_64-linux-gnu whites out the
#     Debian OpenCV, libturbojpeg and libjpeg files and every other library the bundle
#     carries a copy of (but libz, which Python's zlib and so pip need), and a new
#     ld.so.cache without them goes over /etc/ld.so.cache; shown by ls, ldconfig -p and
#     dlopen failing;
#  3. (--gpu-check, needs --torch) `bash bench/gpu_check.sh --device cpu --tiny` with
#     PYTHON set to the fresh venv (no ffcv): the check's own install path from the bundle;
#  4. `pip install --no-index --no-deps --target` of the bundle, then with the checkout
#     first on sys.path as bench/gpu_check.py runs: ffcv, ffcv._libffcv and
#     ffcv_bias.data.fast_decode import, the fast decoder is active (its self-check decodes
#     with the bundle's libjpeg and compares with ffcv's decode through the bundle's
#     libturbojpeg), ffcv's resize (the bundle's OpenCV) matches cv2's INTER_AREA;
#  5. `pip install --no-index --no-deps` of the bundle into the venv, the same imports and
#     checks from the installed packages only;
#  6. ldd of every shared object the bundle installed: each library resolves to a file of
#     the bundle or is glibc / libstdc++ / libgcc_s (bench/device_bundle.py,
#     ALLOWED_SYSTEM_LIBRARIES).
# Needs root (unshare, mount), PyPI for step 1, a bundle (bash bench/device_bundle.sh).
# Exit code: 0 whole, 1 a check failed, 2 a bad argument or a missing prerequisite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
LIBRARY_DIR=/usr/lib/x86_64-linux-gnu
# What the box does not have, named by the issue; the rest comes from the bundle's manifest.
HIDDEN_ALWAYS="libopencv_* libturbojpeg libjpeg"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "device_bundle_check.sh: $*" >&2; exit 2; }
say() { echo "device_bundle_check.sh: $*"; }

# ---------------------------------------------------------------- inside the namespace
if [ "${1:-}" = "--inside" ]; then
    # Arguments: WORK BUNDLE TORCH(0|1) GPU_CHECK(0|1); the venv is WORK/venv.
    work="$2"; bundle="$3"; torch="$4"; gpu_check="$5"
    py="$work/venv/bin/python"
    cd "$work"  # not the checkout: its ffcv_bias.egg-info would count as installed
    stand_in=(); [ "$torch" = 1 ] || stand_in=(--torch-stand-in)
    status=0

    say "2. hiding the system copies of the bundle's libraries"
    set -f  # the names are find patterns (libopencv_*), not the shell's
    names="$(printf '%s\n' $HIDDEN_ALWAYS $("$py" - "$bundle/manifest.json" <<'EOF'
import json, re, sys
manifest = json.load(open(sys.argv[1]))
names = {re.sub(r"-[0-9a-f]{8}\.so.*$", "", library)
         for wheel in manifest["wheels"] for library in wheel["grafted_libraries"]}
print(" ".join(sorted(names - {"libz"})))  # libz: Python's zlib module (pip) needs it
EOF
) | grep -vxE 'libopencv_(core|imgproc)' | sort -u | tr '\n' ' ')"
    whiteouts="$work/whiteouts"
    mkdir -p "$whiteouts"
    hidden=0
    for name in $names; do
        while IFS= read -r file; do
            relative="${file#"$LIBRARY_DIR"/}"
            mkdir -p "$whiteouts/$(dirname "$relative")"
            [ -e "$whiteouts/$relative" ] && continue
            mknod "$whiteouts/$relative" c 0 0
            hidden=$((hidden + 1))
        done < <(find "$LIBRARY_DIR" -maxdepth 2 \( -name "$name.so*" -o -name "$name.a" \) \
                      \( -type f -o -type l \))
    done
    set +f
    mount -t overlay overlay -o "lowerdir=$whiteouts:$LIBRARY_DIR" "$LIBRARY_DIR"
    ldconfig -X -C "$work/ld.so.cache" 2>/dev/null
    mount --bind "$work/ld.so.cache" /etc/ld.so.cache
    say "   $hidden files hidden (names: $names)"
    pattern='(libopencv_[a-z_]+|libturbojpeg|libjpeg|libtbb|liblapack|libX11)\.so'
    visible="$( (ldconfig -p | grep -E "$pattern") || true)"
    say "   ldconfig -p | grep -E '$pattern': ${visible:-(nothing)}"
    for stem in libopencv_core libturbojpeg libjpeg; do
        say "   ls $LIBRARY_DIR/$stem*: $(ls "$LIBRARY_DIR/$stem"* 2>&1 | head -n 1)"
    done
    "$py" - <<'EOF' || status=1
import ctypes
for name in ("libopencv_core.so.406", "libopencv_imgproc.so.406", "libturbojpeg.so.0",
             "libjpeg.so.62", "libtbb.so.12", "liblapack.so.3", "libX11.so.6"):
    try:
        ctypes.CDLL(name)
    except OSError as error:
        print(f"device_bundle_check.sh:    dlopen({name}): {error}")
    else:
        raise SystemExit(f"device_bundle_check.sh: {name} is still visible")
EOF
    [ -z "$visible" ] || { say "   FAIL: libraries still in the loader's cache"; status=1; }

    if [ "$gpu_check" = 1 ]; then
        say "3. bash bench/gpu_check.sh --device cpu --tiny, PYTHON=$py (no ffcv there)"
        started=$(date +%s)
        if PYTHON="$py" GPU_CHECK_BUNDLE="$bundle" bash "$repo/bench/gpu_check.sh" \
                --device cpu --tiny --out "$work/gpu_check_out" > "$work/gpu_check.log" 2>&1; then
            say "   passed in $(( $(date +%s) - started )) s:"
        else
            say "   FAILED (exit $?) after $(( $(date +%s) - started )) s:"; status=1
        fi
        grep -E "^gpu_check.sh:|ALL PASSED|FAILED|machine|loader" "$work/gpu_check.log" \
            | sed 's/^/       /' || true
        # fast_decode warns once per process when the fast decoder is not active.
        fallback="decoding every image the exact way"
        if grep -q "$fallback" "$work/gpu_check.log"; then
            say "   FAIL: the fast decoder was not active in the check:"
            grep "$fallback" "$work/gpu_check.log" | head -n 2 | sed 's/^/       /'
            status=1
        else
            say "   no '$fallback' warning: the fast decoder was active"
        fi
    fi

    say "4. pip install --no-index --no-deps --target, the checkout first on sys.path"
    "$py" -m pip install -q --no-index --no-deps --target "$work/target" "$bundle"/*.whl
    PYTHONPATH="$work/target" "$py" "$here/device_bundle.py" check-imports "${stand_in[@]}" \
        --checkout "$repo" --bundle-root "$work/target" | sed 's/^/    /' || status=1

    say "5. pip install --no-index --no-deps into the venv, the installed packages only"
    "$py" -m pip install -q --no-index --no-deps "$bundle"/*.whl
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$py" "$here/device_bundle.py" check-imports "${stand_in[@]}" --bundle-root "$site" \
        | sed 's/^/    /' || status=1

    say "6. ldd of every shared object the bundle installed"
    "$py" "$here/device_bundle.py" check-ldd "$site" --manifest "$bundle/manifest.json" \
        | sed 's/^/    /' || status=1
    exit "$status"
fi

# ---------------------------------------------------------------- outside
bundle="$repo/device_bundle"
python312="${PYTHON312:-}"
torch=0
gpu_check=0
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --bundle) [ $# -ge 2 ] || fail "--bundle needs a folder"; bundle="$2"; shift ;;
        --bundle=*) bundle="${1#--bundle=}" ;;
        --python) [ $# -ge 2 ] || fail "--python needs an interpreter"; python312="$2"; shift ;;
        --python=*) python312="${1#--python=}" ;;
        --torch) torch=1 ;;
        --gpu-check) gpu_check=1 ;;
        --keep-work) keep=1 ;;
        *) fail "unknown argument $1 (--help says which there are)" ;;
    esac
    shift
done
[ "$gpu_check" = 0 ] || [ "$torch" = 1 ] || fail "--gpu-check needs --torch (the check trains)"
bundle="$(cd "$bundle" 2>/dev/null && pwd)" && [ -f "$bundle/manifest.json" ] \
    && [ -f "$bundle/SHA256SUMS" ] \
    || fail "no bundle at ${bundle}: run \`bash bench/device_bundle.sh\` first"
[ "$(id -u)" = 0 ] || fail "needs root (unshare --mount, mount)"
command -v unshare >/dev/null 2>&1 || fail "needs unshare (util-linux)"

. "$(dirname "${BASH_SOURCE[0]}")/python312.sh"
[ -n "$python312" ] || python312="$(find_python312)" || exit 2
[ "$(python_version "$python312")" = 3.12 ] || fail "$python312 is not a Python 3.12"

started=$(date +%s)
work="$(mktemp -d -t device_bundle_check.XXXXXX)"
if [ "$keep" = 1 ]; then
    trap 'echo "device_bundle_check.sh: work folder kept: $work"' EXIT
else
    trap 'rm -rf "$work"' EXIT
fi

say "1. the bundle ($bundle, $(du -sh "$bundle" | cut -f1)) against its SHA256SUMS"
(cd "$bundle" && sha256sum --quiet -c SHA256SUMS) || { say "FAIL: a wheel differs"; exit 1; }
say "   a fresh venv ($python312) with the stand-ins for what the box has"
cd "$work"  # not the checkout: its ffcv_bias.egg-info would count as installed
"$python312" -m venv "$work/venv"
packages=(numpy numba opencv-python-headless pillow setuptools tqdm)
[ "$torch" = 0 ] || packages+=(torch==2.13.0 pandas scipy matplotlib pytest)
"$work/venv/bin/python" -m pip install -q "${packages[@]}" 2>&1 | grep -v "Location 'file:" || true
"$work/venv/bin/python" - <<'EOF'
from importlib import metadata
names = ("numpy", "numba", "opencv-python-headless", "pillow", "torch", "ffcv", "ffcv_bias")
print("device_bundle_check.sh:    " + ", ".join(
    f"{name} {metadata.version(name)}" if name in {d.metadata["Name"].lower() for d in
    metadata.distributions()} else f"{name} absent" for name in names))
EOF

code=0
unshare --mount --propagation private bash "$here/$(basename "${BASH_SOURCE[0]}")" \
    --inside "$work" "$bundle" "$torch" "$gpu_check" || code=$?
if [ "$code" = 0 ]; then
    say "WHOLE: every check passed in $(( $(date +%s) - started )) s"
else
    say "NOT WHOLE: a check failed (exit $code) after $(( $(date +%s) - started )) s"
fi
exit "$code"
