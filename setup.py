import os
import shlex
import subprocess

from setuptools import Extension, find_packages, setup


def pkgconfig(package):
    """Compiler and linker flags of `package` from pkg-config, as ffcv finds its libraries.

    Without pkg-config (or without the .pc file), plain -ljpeg plus the conda prefix's
    include and lib folders when there is one: what a conda libjpeg-turbo provides."""
    try:
        output = subprocess.run(["pkg-config", "--cflags", "--libs", package], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        output = "-ljpeg"
        prefix = os.environ.get("CONDA_PREFIX")
        if prefix:
            output += f" -I{prefix}/include -L{prefix}/lib"
    flags = {"include_dirs": [], "library_dirs": [], "runtime_library_dirs": [],
             "libraries": [], "extra_link_args": []}
    for flag in shlex.split(output):
        if flag.startswith("-I"):
            flags["include_dirs"].append(flag[2:])
        elif flag.startswith("-L"):
            # Also searched at run time: the libjpeg linked against (a conda one, say) is
            # then the one loaded, not whichever the system's loader finds first.
            flags["library_dirs"].append(flag[2:])
            flags["runtime_library_dirs"].append(flag[2:])
        elif flag.startswith("-l"):
            flags["libraries"].append(flag[2:])
        else:
            flags["extra_link_args"].append(flag)
    return flags


# Region + DCT-scaled JPEG decoding (augment.decode=fast), loaded through ctypes.
# optional: without libjpeg's headers the install still succeeds, and the fast decoder
# falls back to the exact one with a warning (ffcv_bias/data/fast_decode.py).
fastjpeg = Extension("ffcv_bias.data._fastjpeg", sources=["ffcv_bias/data/_fastjpeg.c"],
                     extra_compile_args=["-O3"], optional=True, **pkgconfig("libjpeg"))

setup(
    name="ffcv_bias",
    version="0.1.0",
    description="How regularization and data pruning help some classes and hurt others: "
                "FFCV training, sweeps and per-class analysis.",
    packages=find_packages(include=["ffcv_bias", "ffcv_bias.*"]),
    py_modules=["write_datasets", "train_imagenet"],
    ext_modules=[fastjpeg],
    python_requires=">=3.9",
    install_requires=[
        "torch",
        "ffcv",
        "numba",
        "numpy",
        "pandas",
        "scipy",
        "matplotlib",
        "fastargs",
        "pyyaml",          # fastargs reads YAML config files with it but does not declare it
        "terminaltables",  # fastargs' --help tables
        "pillow",          # ffcv imports PIL but does not declare it
        "opencv-python",
        "tqdm",
    ],
    extras_require={
        "cluster": ["submitit"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "submitit"],
    },
)
