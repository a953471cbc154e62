"""The device bundle's recipe (issue 30), without building the bundle (about a minute and
PyPI: `bash bench/device_bundle.sh`) nor proving it (`bash bench/device_bundle_check.sh`,
root and a mount namespace): what CI can check in a few seconds, offline.

- bench/device_bundle.py: the manifest (names, versions, tags, grafted libraries, sha256
  that `sha256sum -c` accepts, the size limit), the ldd parser and judge, the allow-list
  checker on real shared objects (the interpreter's own `math` extension: glibc only; the
  checkout's _fastjpeg: the system libjpeg, refused unless it is a file of the bundle), the
  RECORD reader that finds what a bundle installed;
- the scripts' argument handling (--help, a bad argument, a missing interpreter or bundle);
- bench/gpu_check.sh's install path (bench/gpu_check_env.py) with a one-wheel bundle and a
  stand-in gpu_check.py: verified against SHA256SUMS, installed into a temporary --target
  put on PYTHONPATH and removed at exit, nothing installed globally; a damaged wheel, a
  missing bundle and a bundle for another Python are refused with exit 2;
- gpu_check.sh's choice of interpreter when $PYTHON is not set;
- fast_decode finding the extension in an ffcv_bias/data/ folder of another sys.path entry
  (the bundle's, when the checkout's ffcv_bias shadows it).
"""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

spec = importlib.util.spec_from_file_location("device_bundle", BENCH / "device_bundle.py")
device_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_bundle)

needs_ldd = pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd on this machine")


def make_wheel(folder, name, version, tag, files):
    """A wheel file with a dist-info (METADATA, WHEEL, RECORD) and `files` {path: bytes}."""
    python, abi, platform = tag.split("-")
    path = Path(folder) / f"{name}-{version}-{tag}.whl"
    dist_info = f"{name}-{version}.dist-info"
    contents = dict(files)
    contents[f"{dist_info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: "
                                         f"{version}\n\nA test wheel.\n").encode()
    contents[f"{dist_info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                      f"{'true' if platform == 'any' else 'false'}\n"
                                      f"Tag: {tag}\n").encode()
    record = "".join(f"{member},,\n" for member in contents) + f"{dist_info}/RECORD,,\n"
    contents[f"{dist_info}/RECORD"] = record.encode()
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in contents.items():
            archive.writestr(member, data)
    return path


def write_bundle(folder, wheels):
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        shutil.copy(wheel, folder)
    (folder / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}\n" for w in wheels))
    return folder


# --------------------------------------------------------------------------- the manifest

def test_the_manifest_lists_each_wheel_and_sha256sum_accepts_its_sums(tmp_path):
    make_wheel(tmp_path, "ffcv", "1.0.2", "cp312-cp312-manylinux_2_35_x86_64",
               {"ffcv/__init__.py": b"", "ffcv/_libffcv.cpython-312-x86_64-linux-gnu.so": b"x",
                "ffcv.libs/libopencv_core-5be06549.so.4.6.0": b"y" * 1000,
                "ffcv.libs/libz-7e2a72b4.so.1.2.13": b"z"})
    make_wheel(tmp_path, "fastargs", "1.2.0", "py3-none-any", {"fastargs/__init__.py": b""})
    manifest = device_bundle.write_manifest(tmp_path, notes={"build_seconds": "49"})

    by_name = {wheel["name"]: wheel for wheel in manifest["wheels"]}
    assert set(by_name) == {"ffcv", "fastargs"}
    ffcv = by_name["ffcv"]
    assert ffcv["version"] == "1.0.2" and ffcv["tags"] == ["cp312-cp312-manylinux_2_35_x86_64"]
    assert ffcv["extensions"] == ["ffcv/_libffcv.cpython-312-x86_64-linux-gnu.so"]
    assert ffcv["grafted_libraries"] == ["libopencv_core-5be06549.so.4.6.0",
                                         "libz-7e2a72b4.so.1.2.13"]
    wheel_file = tmp_path / ffcv["file"]
    assert ffcv["sha256"] == hashlib.sha256(wheel_file.read_bytes()).hexdigest()
    assert ffcv["bytes"] == wheel_file.stat().st_size
    assert by_name["fastargs"]["extensions"] == by_name["fastargs"]["grafted_libraries"] == []
    assert manifest["total_bytes"] == sum(w["bytes"] for w in manifest["wheels"])
    assert manifest["build_seconds"] == "49"
    assert "libc.so.6" in manifest["allowed_system_libraries"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=tmp_path,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(wheel_file, "ab") as handle:
            handle.write(b"damage")
        check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=tmp_path,
                               capture_output=True, text=True)
        assert check.returncode == 1 and ffcv["file"] in check.stdout


def test_a_bundle_over_the_limit_is_refused_with_exit_1(tmp_path, capsys):
    make_wheel(tmp_path, "big", "1.0", "py3-none-any", {"big/data.bin": os.urandom(300_000)})
    with pytest.raises(device_bundle.BundleTooLarge, match="over 0.1 MiB"):
        device_bundle.write_manifest(tmp_path, max_mib=0.1)
    assert (tmp_path / "manifest.json").exists()  # written first: the sizes can be read
    assert device_bundle.main(["manifest", str(tmp_path), "--max-mib", "0.1"]) == 1
    assert "over 0.1 MiB" in capsys.readouterr().err
    assert device_bundle.main(["manifest", str(tmp_path), "--note", "build_seconds=3"]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["build_seconds"] == 3


def test_the_manifest_needs_wheels(tmp_path):
    with pytest.raises(FileNotFoundError):
        device_bundle.write_manifest(tmp_path)


# --------------------------------------------------------------------------- ldd

LDD_OUTPUT = """\tlinux-vdso.so.1 (0x00007ffd2a5f0000)
\tlibopencv_core-5be06549.so.4.6.0 => /site/ffcv/../ffcv.libs/libopencv_core-5be06549.so.4.6.0 (0x00007f0)
\tlibturbojpeg.so.0 => /lib/x86_64-linux-gnu/libturbojpeg.so.0 (0x00007f1)
\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f2)
\tlibGLX.so.0 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3)
\tlibfoo.so.1 => /opt/other/libfoo.so.1 (0x00007f4)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f5)
"""


def test_ldd_output_is_parsed_and_judged_against_the_bundle_and_the_allow_list():
    entries = device_bundle.parse_ldd(LDD_OUTPUT)
    assert entries == [
        ("linux-vdso.so.1", None),
        ("libopencv_core-5be06549.so.4.6.0",
         "/site/ffcv/../ffcv.libs/libopencv_core-5be06549.so.4.6.0"),
        ("libturbojpeg.so.0", "/lib/x86_64-linux-gnu/libturbojpeg.so.0"),
        ("libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6"),
        ("libGLX.so.0", None),
        ("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
        ("libfoo.so.1", "/opt/other/libfoo.so.1"),
        ("ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2")]
    verdicts = {name: verdict for name, _, verdict in device_bundle.judge(
        entries, {"/site/ffcv.libs/libopencv_core-5be06549.so.4.6.0"})}
    assert verdicts == {"linux-vdso.so.1": "system",
                        "libopencv_core-5be06549.so.4.6.0": "bundle",
                        "libturbojpeg.so.0": "SYSTEM, NOT ALLOWED",
                        "libstdc++.so.6": "system",
                        "libGLX.so.0": "NOT FOUND",
                        "libc.so.6": "system",
                        "libfoo.so.1": "OUTSIDE THE BUNDLE",
                        "ld-linux-x86-64.so.2": "system"}
    assert device_bundle.parse_ldd("\tstatically linked\n") == []


@needs_ldd
def test_the_allow_list_checker_on_real_shared_objects(capsys):
    import math
    math_file = getattr(math, "__file__", None)
    if math_file:  # built as an extension here: libm and libc only
        assert device_bundle.check_files([math_file], bundle_files=[]) == []
    # The checkout's _fastjpeg (make setup builds it) links the system libjpeg: refused,
    # unless that libjpeg is a file of the bundle.
    fastjpeg = sorted((REPO / "ffcv_bias" / "data").glob("_fastjpeg*.so"))
    if not fastjpeg:
        pytest.skip("no _fastjpeg built in this checkout (libjpeg headers missing?)")
    problems = device_bundle.check_files(fastjpeg[:1], bundle_files=[])
    assert len(problems) == 1 and "libjpeg" in problems[0] and "NOT ALLOWED" in problems[0]
    libjpeg = next(path for name, path in device_bundle.parse_ldd(subprocess.run(
        ["ldd", str(fastjpeg[0])], capture_output=True, text=True).stdout)
        if name.startswith("libjpeg"))
    assert device_bundle.check_files(fastjpeg[:1], bundle_files=[libjpeg]) == []
    assert "FAIL _fastjpeg" in capsys.readouterr().out


def test_what_a_bundle_installed_is_read_from_the_records(tmp_path):
    site = tmp_path / "site"
    wheel = make_wheel(tmp_path, "ffcv", "1.0.2", "cp312-cp312-manylinux_2_35_x86_64",
                       {"ffcv/_libffcv.so": b"x", "ffcv.libs/libz-1.so.1": b"z"})
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    files = device_bundle.installed_files(site, ["FFCV"])
    assert sorted(Path(path).relative_to(site).as_posix() for path in files["ffcv"]) == [
        "ffcv-1.0.2.dist-info/METADATA", "ffcv-1.0.2.dist-info/RECORD",
        "ffcv-1.0.2.dist-info/WHEEL", "ffcv.libs/libz-1.so.1", "ffcv/_libffcv.so"]
    with pytest.raises(FileNotFoundError, match="fastargs"):
        device_bundle.installed_files(site, ["ffcv", "fastargs"])


# --------------------------------------------------------------------------- the scripts

def run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("script", ["device_bundle.sh", "device_bundle_check.sh"])
def test_the_scripts_say_their_usage_and_refuse_a_bad_argument(script):
    usage = run(["bash", str(BENCH / script), "--help"])
    assert usage.returncode == 0 and f"bash bench/{script}" in usage.stdout
    assert usage.stdout.lstrip().startswith(("The device bundle", "Proof that"))
    bad = run(["bash", str(BENCH / script), "--bogus"])
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr


def test_the_build_needs_a_python_3_12():
    result = run(["bash", str(BENCH / "device_bundle.sh"), "--python", "/nonexistent/python"])
    assert result.returncode == 2 and "does not run" in result.stderr
    result = run(["bash", str(BENCH / "device_bundle.sh"), "--python", sys.executable])
    if sys.version_info[:2] != (3, 12):
        assert result.returncode == 2 and "the box's is 3.12" in result.stderr


def test_the_proof_needs_a_bundle_and_gpu_check_needs_torch(tmp_path):
    result = run(["bash", str(BENCH / "device_bundle_check.sh"), "--bundle", str(tmp_path)])
    assert result.returncode == 2 and "run `bash bench/device_bundle.sh` first" in result.stderr
    result = run(["bash", str(BENCH / "device_bundle_check.sh"), "--gpu-check"])
    assert result.returncode == 2 and "--gpu-check needs --torch" in result.stderr


def test_the_makefile_has_the_bundle_target_and_git_ignores_the_bundle():
    assert "device-bundle:" in (REPO / "Makefile").read_text()
    ignored = run(["git", "-C", str(REPO), "check-ignore", "-q", "device_bundle/x.whl"])
    if ignored.returncode != 128:  # 128: not a git checkout
        assert ignored.returncode == 0


# --------------------------------------------------------------------------- gpu_check.sh

STAND_IN_CHECK = """import os, sys
import gcb_probe
print("stand-in check", sys.argv[1:], "probe from", gcb_probe.__file__)
print("PYTHONPATH", os.environ.get("PYTHONPATH"))
sys.exit(0)
"""


def fake_checkout(tmp_path, bundle_wheels=None):
    """tmp_path/checkout: bench/gpu_check.sh and gpu_check_env.py as they are, a stand-in
    gpu_check.py, and (bundle_wheels) device_bundle/ with those wheels and SHA256SUMS."""
    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_check_env.py"):
        shutil.copy(BENCH / name, checkout / "bench" / name)
    (checkout / "bench" / "gpu_check.py").write_text(STAND_IN_CHECK)
    if bundle_wheels is not None:
        write_bundle(checkout / "device_bundle", bundle_wheels)
    return checkout


def probe_wheel(tmp_path, tag="py3-none-any"):
    (tmp_path / "wheels").mkdir(exist_ok=True)
    return make_wheel(tmp_path / "wheels", "gcb_probe", "1.0", tag,
                      {"gcb_probe.py": b"VALUE = 1\n"})


def run_check(checkout, tmp_path, **env):
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("GPU_CHECK_")}
    environment.update({"PYTHON": sys.executable, "TMPDIR": str(tmp_path / "tmp"), **env})
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return run(["bash", str(checkout / "bench" / "gpu_check.sh"), "--device", "cpu",
                "--out", str(tmp_path / "out")], cwd=tmp_path, env=environment)


def test_gpu_check_installs_the_bundle_into_a_temporary_target_only(tmp_path):
    checkout = fake_checkout(tmp_path, [probe_wheel(tmp_path)])
    result = run_check(checkout, tmp_path, GPU_CHECK_INSTALL="always")

    assert result.returncode == 0, result.stdout + result.stderr
    installed = [line for line in result.stdout.splitlines() if "installed the device" in line]
    assert len(installed) == 1 and "GPU_CHECK_INSTALL=always" in installed[0]
    assert f"(1 wheels, 0.0 MiB, {checkout / 'device_bundle'})" in installed[0]
    target = installed[0].split(" into ")[1].split(" in ")[0]
    assert Path(target).parent == tmp_path / "tmp"
    assert f"probe from {target}/gcb_probe.py" in result.stdout
    assert f"PYTHONPATH {target}" in result.stdout  # the trainers it starts find it too
    assert "['--device', 'cuda', '--out'" in result.stdout  # the arguments pass through
    assert not Path(target).exists()  # removed at exit
    assert importlib.util.find_spec("gcb_probe") is None  # nothing installed globally


def test_gpu_check_unpacks_the_bundle_where_the_interpreter_has_no_pip(tmp_path):
    checkout = fake_checkout(tmp_path, [probe_wheel(tmp_path)])
    no_site = tmp_path / "python-without-site"  # -S: no site-packages, so no pip, no ffcv
    no_site.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    no_site.chmod(0o755)
    result = run_check(checkout, tmp_path, PYTHON=str(no_site))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ffcv, fastargs, terminaltables, yaml missing for" in result.stdout
    target = result.stdout.split(" into ")[1].split(" in ")[0]
    assert f"probe from {target}/gcb_probe.py" in result.stdout
    assert not Path(target).exists()


def test_gpu_check_refuses_a_damaged_missing_or_foreign_bundle(tmp_path):
    wheel = probe_wheel(tmp_path)
    checkout = fake_checkout(tmp_path, [wheel])
    with open(checkout / "device_bundle" / wheel.name, "ab") as handle:
        handle.write(b"damage")
    result = run_check(checkout, tmp_path, GPU_CHECK_INSTALL="always")
    assert result.returncode == 2 and "is damaged: sha256" in result.stderr
    assert "stand-in check" not in result.stdout

    result = run_check(checkout, tmp_path, GPU_CHECK_INSTALL="always",
                       GPU_CHECK_BUNDLE=str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "bash bench/device_bundle.sh" in result.stderr

    foreign = write_bundle(tmp_path / "foreign", [probe_wheel(
        tmp_path, "cp27-cp27mu-manylinux1_x86_64")])
    result = run_check(checkout, tmp_path, GPU_CHECK_INSTALL="always",
                       GPU_CHECK_BUNDLE=str(foreign))
    assert result.returncode == 2 and "built for another Python" in result.stderr
    assert result.stdout.rstrip().endswith("gpu_check.sh: exit code 2")


def test_gpu_check_installs_nothing_where_nothing_is_missing(tmp_path):
    # This venv has ffcv, fastargs, terminaltables, yaml: no bundle needed (none here).
    checkout = fake_checkout(tmp_path, bundle_wheels=None)
    (checkout / "bench" / "gpu_check.py").write_text("print('stand-in check ran')\n")
    result = run_check(checkout, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "stand-in check ran" in result.stdout and "installed" not in result.stdout


def fake_python(path, imports_torch):
    """A `python` that answers `-c "import torch"` as told and runs the rest with this
    interpreter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!/bin/sh
if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit {0 if imports_torch else 1}; fi
echo "run by {path}"
exec {sys.executable} "$@"
""")
    path.chmod(0o755)
    return path


@pytest.mark.skipif(os.path.exists("/opt/torch/.venv/bin/python3"),
                    reason="/opt/torch/.venv/bin/python3 exists: gpu_check.sh takes it first")
def test_gpu_check_picks_the_first_interpreter_that_imports_torch(tmp_path):
    checkout = fake_checkout(tmp_path)
    (checkout / "bench" / "gpu_check.py").write_text("print('stand-in check ran')\n")
    fake_bin = tmp_path / "bin"
    fake_python(fake_bin / "python3", imports_torch=False)
    fake_python(fake_bin / "python", imports_torch=True)
    path = f"{fake_bin}:/usr/bin:/bin"

    # No .venv in the checkout: python3 has no torch, python has.
    result = run_check(checkout, tmp_path, PYTHON="", PATH=path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu_check.sh: interpreter python ($PYTHON not set)" in result.stdout
    assert f"run by {fake_bin / 'python'}" in result.stdout

    # The checkout's .venv/bin/python comes first (make setup, no activated environment).
    venv_python = fake_python(checkout / ".venv" / "bin" / "python", imports_torch=True)
    result = run_check(checkout, tmp_path, PYTHON="", PATH=path)
    assert result.returncode == 0 and f"interpreter {venv_python} " in result.stdout

    # None has torch: exit 2, with what was tried.
    fake_python(venv_python, imports_torch=False)
    fake_python(fake_bin / "python", imports_torch=False)
    result = run_check(checkout, tmp_path, PYTHON="", PATH=path)
    assert result.returncode == 2 and "no interpreter with torch" in result.stderr
    assert result.stdout.rstrip().endswith("gpu_check.sh: exit code 2")


# --------------------------------------------------------------------------- fast_decode

def test_the_fast_decoder_finds_its_extension_on_another_sys_path_entry(tmp_path, monkeypatch):
    fastjpeg = sorted((REPO / "ffcv_bias" / "data").glob("_fastjpeg*.so"))
    if not fastjpeg:
        pytest.skip("no _fastjpeg built in this checkout (libjpeg headers missing?)")
    from ffcv_bias.data.fastjpeg_file import fastjpeg_file
    # The checkout's extension cannot be imported (as on the box: the checkout has none for
    # 3.12), the bundle's --target folder on sys.path has one. (Its self-check, once found:
    # tests/test_decode_fast.py; found in a real bundle: bench/device_bundle_check.sh.)
    target = tmp_path / "target" / "ffcv_bias" / "data"
    target.mkdir(parents=True)
    shutil.copy(fastjpeg[0], target / fastjpeg[0].name)
    monkeypatch.setitem(sys.modules, "ffcv_bias.data._fastjpeg", None)  # ImportError
    # Neither the checkout ('' or REPO on sys.path: its own extension) nor anything else.
    others = [entry for entry in sys.path if entry not in ("", str(REPO))]
    monkeypatch.setattr(sys, "path", [*others, str(tmp_path / "target")])
    assert fastjpeg_file() == str(target / fastjpeg[0].name)

    monkeypatch.setattr(sys, "path", others)
    with pytest.raises(ImportError):
        fastjpeg_file()
