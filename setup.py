from setuptools import find_packages, setup

setup(
    name="ffcv_bias",
    version="0.1.0",
    description="How regularization and data pruning help some classes and hurt others: "
                "FFCV training, sweeps and per-class analysis.",
    packages=find_packages(include=["ffcv_bias", "ffcv_bias.*"]),
    py_modules=["write_datasets", "train_imagenet"],
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
        "test": ["pytest", "pytest-timeout", "submitit"],
    },
)
