# Sourced by bench/device_bundle.sh and bench/device_bundle_check.sh: the Python 3.12 they
# build and prove with (the GPU box's version). Needs the caller's `fail` function.

python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

# Prints the first interpreter that runs as 3.12: python3.12 on PATH, else pyenv's newest
# 3.12 (a pyenv shim on PATH may not run: no version selected).
find_python312() {
    local candidate
    for candidate in "$(command -v python3.12 || true)" \
                     $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
                       2>/dev/null | sort -rV); do
        if [ -n "$candidate" ] && [ "$(python_version "$candidate")" = 3.12 ]; then
            echo "$candidate"; return 0
        fi
    done
    fail "no Python 3.12 found: pass --python or set PYTHON312"
}
