"""The device bundle (issue 30): cp312 wheels of what the GPU box lacks, and the checks that
the bundle is whole. bench/device_bundle.sh builds it, bench/device_bundle_check.sh proves
it; both call this file (standard library only, but `repair`, which needs auditwheel):

    python bench/device_bundle.py repair [--plat TAG] -w OUT WHEEL...
        auditwheel repair with a stricter allow-list: every library the wheel's extensions
        need is copied into the wheel, but those of ALLOWED_SYSTEM_LIBRARIES (glibc, libstdc++,
        libgcc_s). Plain auditwheel would also leave out what the manylinux policies allow
        (libX11, libz, libexpat, libGL, glib...), which a bare GPU box need not have: OpenCV's
        core links libGLX -> libX11.
    python bench/device_bundle.py manifest DIR [--max-mib 60] [--note KEY=VALUE]...
        DIR/manifest.json (each wheel: name, version, tag, bytes, sha256, the libraries
        grafted into it) and DIR/SHA256SUMS (for `sha256sum -c`); exit 1 over --max-mib.
    python bench/device_bundle.py check-ldd SITE --manifest DIR/manifest.json
        ldd of every shared object that the bundle's distributions installed into SITE (per
        their RECORD): each library must resolve to a file of the bundle or be one of
        ALLOWED_SYSTEM_LIBRARIES; exit 1 otherwise. `check-ldd --files SO...` checks files.
    python bench/device_bundle.py check-imports [--torch-stand-in] [--checkout REPO]
        imports ffcv, ffcv._libffcv, ffcv.libffcv, ffcv_bias.data.fast_decode, asserts the
        fast decoder is active (its self-check decodes a JPEG with the bundle's libjpeg and
        compares with ffcv's full decode through the bundle's libturbojpeg) and that ffcv's
        OpenCV resize matches cv2's INTER_AREA. --torch-stand-in: a stand-in `torch` module
        (attribute look-ups only) where no real torch is installed; --checkout REPO: REPO
        first on sys.path, as bench/gpu_check.py runs (the checkout's ffcv_bias shadows the
        installed one; fast_decode finds the bundle's _fastjpeg on sys.path).
"""
import argparse
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# What an extension of the bundle may take from the system it runs on: glibc (what every
# Python needs) and the C++ runtime (torch needs it too). Everything else is in the bundle.
GLIBC_LIBRARIES = ("linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6",
                   "libmvec.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
                   "libutil.so.1", "libanl.so.1", "libresolv.so.2")
CXX_RUNTIME_LIBRARIES = ("libstdc++.so.6", "libgcc_s.so.1")
ALLOWED_SYSTEM_LIBRARIES = frozenset(GLIBC_LIBRARIES + CXX_RUNTIME_LIBRARIES)
SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")
DEFAULT_MAX_MIB = 60
_SHARED_OBJECT = re.compile(r"\.so(\.\d+)*$")


# ----------------------------------------------------------------------------- repair

def repair(wheels, out, plat="auto"):
    """auditwheel repair of each wheel into `out`, grafting every library outside
    ALLOWED_SYSTEM_LIBRARIES (auditwheel's policies, narrowed for this process only)."""
    from importlib import metadata

    import auditwheel.main
    import auditwheel.policy as policy
    try:
        policy_files = policy._POLICY_JSON_MAP
        glibc = policy.Libc.GLIBC
        source = policy_files[glibc]
    except (AttributeError, KeyError) as error:
        raise SystemExit(f"device_bundle.py repair: auditwheel "
                         f"{metadata.version('auditwheel')} keeps its policies elsewhere "
                         f"({error!r}); bench/device_bundle.sh pins the version it was "
                         f"written for") from error
    policies = json.loads(Path(source).read_text())
    for entry in policies:
        entry["lib_whitelist"] = [name for name in entry["lib_whitelist"]
                                  if name in ALLOWED_SYSTEM_LIBRARIES]
    with tempfile.TemporaryDirectory() as scratch:
        narrowed = Path(scratch) / "manylinux-policy.json"
        narrowed.write_text(json.dumps(policies))
        policy_files[glibc] = narrowed
        for wheel in wheels:
            sys.argv = ["auditwheel", "repair", "--plat", plat, "-w", str(out), str(wheel)]
            code = auditwheel.main.main()
            if code:
                return code
    return 0


# ----------------------------------------------------------------------------- manifest

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_info(path):
    """Name, version, tag and grafted libraries (the files of its *.libs/ folders) of a
    wheel, read from inside it."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        dist_info = next(name.split("/")[0] for name in names
                         if name.split("/")[0].endswith(".dist-info"))
        fields = {}
        for line in archive.read(f"{dist_info}/METADATA").decode().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        tags = [line.partition(":")[2].strip()
                for line in archive.read(f"{dist_info}/WHEEL").decode().splitlines()
                if line.startswith("Tag:")]
    grafted = sorted(name.split("/", 1)[1] for name in names
                     if "/" in name and name.split("/")[0].endswith(".libs")
                     and not name.endswith("/"))
    extensions = sorted(name for name in names if _SHARED_OBJECT.search(name)
                        and not name.split("/")[0].endswith(".libs"))
    return {"name": fields["Name"], "version": fields["Version"], "tags": tags,
            "extensions": extensions, "grafted_libraries": grafted}


def write_manifest(directory, max_mib=DEFAULT_MAX_MIB, notes=None):
    """Writes directory/manifest.json and directory/SHA256SUMS for the wheels there and
    returns the manifest; raises BundleTooLarge past max_mib (the files are written first,
    so the sizes can be read)."""
    directory = Path(directory)
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {directory}")
    entries = []
    for wheel in wheels:
        entry = {"file": wheel.name, **wheel_info(wheel), "bytes": wheel.stat().st_size,
                 "sha256": sha256(wheel)}
        entries.append(entry)
    total = sum(entry["bytes"] for entry in entries)
    manifest = {"wheels": entries, "total_bytes": total,
                "total_mib": round(total / 2 ** 20, 2), "max_mib": max_mib,
                "allowed_system_libraries": sorted(ALLOWED_SYSTEM_LIBRARIES),
                **(notes or {})}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (directory / "SHA256SUMS").write_text(
        "".join(f"{entry['sha256']}  {entry['file']}\n" for entry in entries))
    if total > max_mib * 2 ** 20:
        raise BundleTooLarge(f"the bundle is {total / 2 ** 20:.1f} MiB, over {max_mib} MiB")
    return manifest


class BundleTooLarge(Exception):
    pass


# ----------------------------------------------------------------------------- ldd

def parse_ldd(text):
    """[(name, path or None)] of `ldd` output: path None for "not found" and for the vDSO
    (no file); [] for a statically linked object."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or "statically linked" in line:
            continue
        if "=>" in line:
            name, _, rest = (part.strip() for part in line.partition("=>"))
            if rest.startswith("not found"):
                entries.append((name, None))
            else:
                entries.append((name, rest.split(" (")[0].strip() or None))
        else:
            path = line.split(" (")[0].strip()
            if path.startswith("/"):
                entries.append((os.path.basename(path), path))
            else:
                entries.append((path, None))  # linux-vdso.so.1: in the kernel, no file
    return entries


def judge(entries, bundle_files):
    """[(name, path, verdict)]: 'bundle' (a file of the bundle), 'system' (an allowed system
    library), or a problem: 'NOT FOUND', 'SYSTEM, NOT ALLOWED', 'OUTSIDE THE BUNDLE'."""
    bundle_files = {os.path.realpath(path) for path in bundle_files}
    verdicts = []
    for name, path in entries:
        if path is None:
            verdict = "system" if name == "linux-vdso.so.1" else "NOT FOUND"
        elif os.path.realpath(path) in bundle_files:
            verdict = "bundle"
        elif name in ALLOWED_SYSTEM_LIBRARIES and path.startswith(SYSTEM_LIBRARY_DIRS):
            verdict = "system"
        elif path.startswith(SYSTEM_LIBRARY_DIRS):
            verdict = "SYSTEM, NOT ALLOWED"
        else:
            verdict = "OUTSIDE THE BUNDLE"
        verdicts.append((name, path, verdict))
    return verdicts


def check_files(files, bundle_files, out=None):
    """ldd of each file, judged; prints one line per file (and one per problem); returns
    the problems."""
    out = out or sys.stdout
    problems = []
    for path in files:
        result = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
        if result.returncode != 0 and "not a dynamic executable" not in result.stdout + \
                result.stderr:
            problems.append(f"{path}: ldd failed: {result.stderr.strip()}")
            continue
        verdicts = judge(parse_ldd(result.stdout), bundle_files)
        bad = [f"{name} => {where} ({verdict})" for name, where, verdict in verdicts
               if verdict not in ("bundle", "system")]
        from_bundle = sum(verdict == "bundle" for _, _, verdict in verdicts)
        system = sorted(name for name, _, verdict in verdicts if verdict == "system")
        print(f"{'FAIL' if bad else 'ok  '} {Path(path).name}: {from_bundle} from the bundle, "
              f"{len(system)} allowed system ({' '.join(system)})", file=out)
        for line in bad:
            print(f"       {line}", file=out)
        problems += [f"{path}: {line}" for line in bad]
    return problems


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_files(site, names):
    """{distribution name: [absolute paths of its files]} of the distributions `names`
    installed in `site`, from their RECORD."""
    site = Path(site)
    wanted = {canonical(name) for name in names}
    found = {}
    for dist_info in site.glob("*.dist-info"):
        metadata = (dist_info / "METADATA").read_text(errors="replace")
        name = re.search(r"^Name:\s*(\S+)", metadata, re.M).group(1)
        if canonical(name) not in wanted:
            continue
        with open(dist_info / "RECORD", newline="") as handle:
            found[name] = [os.path.normpath(site / row[0]) for row in csv.reader(handle)
                           if row]
    missing = wanted - {canonical(name) for name in found}
    if missing:
        raise FileNotFoundError(f"not installed in {site}: {', '.join(sorted(missing))}")
    return found


def check_installed(site, manifest_path, out=None):
    out = out or sys.stdout
    manifest = json.loads(Path(manifest_path).read_text())
    files = installed_files(site, [wheel["name"] for wheel in manifest["wheels"]])
    every_file = [path for paths in files.values() for path in paths]
    shared = sorted(path for path in every_file if _SHARED_OBJECT.search(path))
    print(f"ldd of the {len(shared)} shared objects of {len(files)} bundle distributions in "
          f"{site} (allowed from the system: {', '.join(sorted(ALLOWED_SYSTEM_LIBRARIES))})",
          file=out)
    problems = check_files(shared, every_file, out=out)
    expected = [name for wheel in manifest["wheels"] for name in wheel["extensions"]]
    if len(shared) < len(expected):
        problems.append(f"found {len(shared)} shared objects, the manifest lists "
                        f"{len(expected)} extensions")
    return problems


# ----------------------------------------------------------------------------- imports

def install_torch_stand_in():
    """A `torch` (and torch.*) whose every attribute is a class that takes any call,
    subscript or subclassing: enough for ffcv's modules to import where no real torch is
    installed. Nothing of torch runs: what the check runs is numpy, numba, cv2 and the
    bundle's own code and libraries."""
    import importlib.abc
    import importlib.machinery
    import types

    class Anything(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return cls

        def __call__(cls, *args, **kwargs):
            return cls

        def __getitem__(cls, key):
            return cls

        def __or__(cls, other):
            return cls

        __ror__ = __or__

    class Stub(metaclass=Anything):
        pass

    class StandInModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Stub

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torch" or fullname.startswith("torch."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StandInModule(spec.name)
            module.__path__ = []
            module.__version__ = "stand-in"
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def _under(path, folder):
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def check_imports(torch_stand_in=False, checkout=None, bundle_root=None, out=None):
    """Imports what the box imports, checks the fast decoder and ffcv's native code;
    returns the problems. bundle_root: where the bundle is installed; ffcv, its _libffcv
    and the _fastjpeg loaded must come from there (and ffcv_bias too, but with
    `checkout`, which must give ffcv_bias)."""
    out = out or sys.stdout
    if checkout:
        sys.path.insert(0, str(checkout))
    if torch_stand_in:
        install_torch_stand_in()
    started = time.perf_counter()
    problems = []
    import numpy as np
    import torch

    import ffcv
    import ffcv._libffcv
    import ffcv.libffcv
    from ffcv_bias.data import fast_decode
    print(f"python {sys.version.split()[0]} ({sys.executable})", file=out)
    print("torch: a stand-in (attribute look-ups only; no real torch here)" if torch_stand_in
          else f"torch {torch.__version__} ({torch.__file__})", file=out)
    for module in (ffcv, ffcv._libffcv, fast_decode):
        print(f"{module.__name__}: {module.__file__}", file=out)
    if fast_decode.region_decoder() is None:
        problems.append(f"fast decoder not active: {fast_decode.unavailable_reason()}")
    else:
        print(f"fast decoder active (self-check passed): "
              f"{fast_decode._library_state.get('path')}", file=out)
    expected = [(fast_decode.__file__, checkout or bundle_root)]
    if bundle_root:
        expected += [(ffcv.__file__, bundle_root), (ffcv._libffcv.__file__, bundle_root),
                     (fast_decode._library_state.get("path") or "(none)", bundle_root)]
    for path, folder in expected:
        if folder and not _under(path, folder):
            problems.append(f"{path} is not under {folder}")
    _, active = fast_decode.compile_crop_resizer("fast")
    if not active:
        problems.append("compile_crop_resizer('fast') says the fast path is not active")
    # OpenCV through ffcv (libopencv_imgproc of the bundle) against cv2's own INTER_AREA.
    import cv2
    rows, cols = np.mgrid[0:64, 0:96]
    image = np.ascontiguousarray(
        np.stack([rows * 3, cols * 2, (rows * cols) % 253], axis=-1).astype(np.uint8))
    resized = np.zeros((16, 24, 3), np.uint8)
    ffcv.libffcv.resize_crop(image, 8, 56, 12, 84, resized)
    reference = cv2.resize(image[8:56, 12:84], (24, 16), interpolation=cv2.INTER_AREA)
    difference = int(np.abs(resized.astype(int) - reference.astype(int)).max())
    print(f"ffcv resize_crop (bundle's OpenCV) vs cv2 INTER_AREA: max difference "
          f"{difference}", file=out)
    if difference > 1:
        problems.append(f"ffcv's resize_crop differs from cv2's INTER_AREA by {difference}")
    print(f"imports and checks: {time.perf_counter() - started:.1f} s", file=out)
    return problems


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("repair")
    command.add_argument("--plat", default="auto")
    command.add_argument("-w", "--wheel-dir", required=True)
    command.add_argument("wheels", nargs="+")
    command = commands.add_parser("manifest")
    command.add_argument("directory")
    command.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB)
    command.add_argument("--note", action="append", default=[], metavar="KEY=VALUE")
    command = commands.add_parser("check-ldd")
    command.add_argument("site", nargs="?")
    command.add_argument("--manifest")
    command.add_argument("--files", nargs="+")
    command = commands.add_parser("check-imports")
    command.add_argument("--torch-stand-in", action="store_true")
    command.add_argument("--checkout")
    command.add_argument("--bundle-root")
    args = parser.parse_args(argv)

    if args.command == "repair":
        return repair(args.wheels, args.wheel_dir, args.plat)
    if args.command == "manifest":
        notes = {}
        for note in args.note:
            key, separator, value = note.partition("=")
            if not separator:
                parser.error(f"--note {note!r}: KEY=VALUE expected")
            notes[key] = int(value) if value.isdigit() else value
        try:
            manifest = write_manifest(args.directory, args.max_mib, notes)
        except BundleTooLarge as error:
            print(f"device_bundle.py: {error}", file=sys.stderr)
            return 1
        for wheel in manifest["wheels"]:
            grafted = len(wheel["grafted_libraries"])
            print(f"{wheel['bytes'] / 2 ** 20:7.2f} MiB  {wheel['file']}"
                  + (f"  ({grafted} libraries grafted)" if grafted else ""))
        print(f"{manifest['total_mib']:7.2f} MiB  in all (limit {args.max_mib:g} MiB); "
              f"manifest.json and SHA256SUMS written")
        return 0
    if args.command == "check-ldd":
        if args.files:
            problems = check_files(args.files, bundle_files=args.files)
        elif args.site and args.manifest:
            problems = check_installed(args.site, args.manifest)
        else:
            parser.error("check-ldd: SITE --manifest FILE, or --files SO...")
    else:
        problems = check_imports(args.torch_stand_in, args.checkout, args.bundle_root)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print(f"device_bundle.py {args.command}: "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
