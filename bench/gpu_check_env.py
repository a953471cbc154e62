"""What bench/gpu_check.sh runs: the device bundle installed where it is needed, then
bench/gpu_check.py in this same process (its arguments unchanged).

    python bench/gpu_check_env.py [bench/gpu_check.py arguments]

Where this interpreter lacks one of BUNDLED_MODULES (the GPU box: ffcv, fastargs,
terminaltables, yaml), the wheels of the device bundle (bench/device_bundle.sh; default
folder: device_bundle/ at the repository root, else $GPU_CHECK_BUNDLE) are checked against
their SHA256SUMS and installed with `pip install --no-index --no-deps --target
$GPU_CHECK_TARGET` (an empty temporary folder that gpu_check.sh makes and removes; nothing
global; unpacked without pip where this interpreter has none), which goes first on
sys.path and on PYTHONPATH for the trainers the check starts. The checkout's ffcv_bias
still comes first (gpu_check.py puts the repository first on sys.path); the 3.12 build of
its _fastjpeg is found in the target folder (ffcv_bias/data/fastjpeg_file.py).
GPU_CHECK_INSTALL=always installs even where nothing is missing (a dry run of the box's
path), =never never does.

Exit code 2, with the reason, when an install is needed and cannot be done; otherwise the
check's own. gpu_check.py runs in this process (runpy), not in a new one: a warm python
(tests/warm_python.py) stays warm, and gpu_check.sh's timeout signals reach the check itself.
"""
import hashlib
import importlib.util
import os
import runpy
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUNDLED_MODULES = ("ffcv", "fastargs", "terminaltables", "yaml")


def missing_modules():
    return [name for name in BUNDLED_MODULES if importlib.util.find_spec(name) is None]


def fail(message):
    print(f"gpu_check.sh: {message}", file=sys.stderr)
    raise SystemExit(2)


def verified_wheels(bundle):
    """The bundle's wheels, each checked against SHA256SUMS; exits 2 on a missing bundle,
    a wheel not listed, a listed wheel missing, a digest that differs or a wheel built for
    another Python."""
    sums = bundle / "SHA256SUMS"
    if not sums.is_file():
        fail(f"no device bundle at {bundle} (no SHA256SUMS): build it with `bash "
             f"bench/device_bundle.sh` (or `make device-bundle`) on the build machine and "
             f"carry device_bundle/ with the working tree, or set GPU_CHECK_BUNDLE")
    expected = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name:
            expected[name] = digest
    wheels = sorted(bundle.glob("*.whl"))
    unlisted = sorted({wheel.name for wheel in wheels} - set(expected))
    absent = sorted(set(expected) - {wheel.name for wheel in wheels})
    if unlisted or absent:
        fail(f"the device bundle at {bundle} does not match its SHA256SUMS (not listed: "
             f"{', '.join(unlisted) or 'none'}; missing: {', '.join(absent) or 'none'})")
    for wheel in wheels:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != expected[wheel.name]:
            fail(f"{wheel} is damaged: sha256 {digest}, SHA256SUMS says {expected[wheel.name]}")
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    foreign = [wheel.name for wheel in wheels
               if "-cp" in wheel.name and f"-{ours}-" not in wheel.name]
    if foreign:
        fail(f"the device bundle is built for another Python than {sys.executable} "
             f"({ours}): {', '.join(foreign)}")
    return wheels


def install_bundle(bundle, target):
    wheels = verified_wheels(bundle)
    started = time.perf_counter()
    if importlib.util.find_spec("pip") is None:
        # No pip in this interpreter: a wheel is a zip of what --target would hold (these
        # have no scripts or data folders), so unpack them.
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
        size = sum(wheel.stat().st_size for wheel in wheels) / 2 ** 20
        return len(wheels), size, time.perf_counter() - started
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                             "--quiet", "--disable-pip-version-check", "--target",
                             str(target), *map(str, wheels)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        fail(f"pip could not install the device bundle into {target}:\n{result.stdout}")
    size = sum(wheel.stat().st_size for wheel in wheels) / 2 ** 20
    return len(wheels), size, time.perf_counter() - started


def main(argv):
    mode = os.environ.get("GPU_CHECK_INSTALL", "auto")
    if mode not in ("auto", "always", "never"):
        fail(f"GPU_CHECK_INSTALL={mode}: auto, always or never")
    missing = missing_modules()
    if mode == "always" or (missing and mode == "auto"):
        target = os.environ.get("GPU_CHECK_TARGET")
        if not target or not Path(target).is_dir():
            fail("GPU_CHECK_TARGET must name an existing empty folder (gpu_check.sh makes one)")
        bundle = Path(os.environ.get("GPU_CHECK_BUNDLE") or REPO / "device_bundle")
        count, size, seconds = install_bundle(bundle, Path(target))
        why = f"{', '.join(missing)} missing" if missing else "GPU_CHECK_INSTALL=always"
        print(f"gpu_check.sh: {why} for {sys.executable}: installed the device bundle "
              f"({count} wheels, {size:.1f} MiB, {bundle}) into {target} in {seconds:.1f} s",
              flush=True)
        sys.path.insert(0, target)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [target, os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()
    elif missing:
        fail(f"{', '.join(missing)} missing for {sys.executable} (GPU_CHECK_INSTALL=never)")
    script = HERE / "gpu_check.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
