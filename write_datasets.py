"""Write image datasets to FFCV .beton files (fields `image`, `label`) + classes.json.

    python write_datasets.py
        both splits of the embedded default (Fashion-MNIST from Debian's
        dataset-fashion-mnist) -> data/fashion-mnist_train.beton, data/fashion-mnist_val.beton

    python write_datasets.py --cfg.dataset=imagefolder --cfg.split=train \\
        --cfg.data_dir=/datasets/imagenet/train --cfg.write_path=/betons/imagenet_train.beton \\
        --cfg.max_resolution=256 --cfg.write_mode=proportion --cfg.compress_probability=0.5 \\
        --cfg.jpeg_quality=90 --cfg.num_workers=16

The flags are ffcv-imagenet's (`--cfg.*`, or a YAML file with `-C`); unknown keys are an
error. A failed write leaves nothing at write_path. The work is in ffcv_bias/datasets.py.
"""
import contextlib
import os
import sys
from pathlib import Path

from fastargs import Param, Section
from fastargs.config import Config
from fastargs.state import get_current_config, set_current_config

from ffcv_bias.train.fastargs_strict import (ConfigError, FloatInRange, OneOf, StrictBool,
                                             config_to_dict, parse_config)
from ffcv_bias.common.output_paths import creation_problem
from ffcv_bias.data.sources import (DEFAULT_SMART_THRESHOLD, FASHION_MNIST_DIR, SOURCES,
                                    WRITE_MODES, DatasetError, read_source,
                                    stratified_subset)
from ffcv_bias.data.writer import convert

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def declare_config():
    Section("cfg", "what to write, from where, and how").params(
        dataset=Param(OneOf(*SOURCES), "source format: " + ", ".join(SOURCES),
                      default="fashion-mnist"),
        split=Param(OneOf("train", "val", "both"),
                    "split to write; 'both' writes train and val (not for imagefolder, whose "
                    "data_dir is one split's folder)", default="both"),
        data_dir=Param(str, "where the source lies (default: Debian's Fashion-MNIST for "
                            "fashion-mnist; required for the others)", default=""),
        write_path=Param(str, "the .beton to write (default: data/<dataset>_<split>.beton)",
                         default=""),
        max_resolution=Param(int, "longest image side stored; larger images are shrunk "
                                  "(-1: keep every image's size)", default=-1),
        write_mode=Param(OneOf(*WRITE_MODES), "raw pixels, jpg, smart (jpg above "
                         "smart_threshold bytes) or proportion (jpg with "
                         "compress_probability)", default="raw"),
        compress_probability=Param(FloatInRange(0, 1, low_inclusive=True),
                                   "fraction of images stored as JPEG in 'proportion' mode",
                                   default=0.5),
        smart_threshold=Param(int, "'smart' mode stores an image as JPEG when its raw pixels "
                                   "take more bytes than this", default=DEFAULT_SMART_THRESHOLD),
        jpeg_quality=Param(int, "JPEG quality (1-100) for jpg/smart/proportion", default=90),
        num_workers=Param(int, "processes that decode and write; 1 gives byte-identical "
                               "files run to run", default=1),
        chunk_size=Param(int, "images handed to a writer process at a time", default=100),
        subset=Param(int, "write a deterministic class-stratified subset of this many images "
                          "(-1: all)", default=-1),
        skip_corrupt=Param(StrictBool(), "1: skip unreadable images, listing them in "
                                         "<write_path>.skipped.txt; 0: stop at the first",
                           default=False),
    )


@contextlib.contextmanager
def private_config():
    """Declare the cfg section in a config of its own: fastargs sections are process-wide,
    and the trainer's config (and its run_id) must never see these keys."""
    previous = get_current_config()
    set_current_config(Config())
    try:
        declare_config()
        yield
    finally:
        set_current_config(previous)


def read_options(argv):
    with private_config():
        return config_to_dict(parse_config(argv, description=__doc__.splitlines()[0]))["cfg"]


def check_ranges(cfg):
    """Range checks fastargs cannot express; ConfigError names the key."""
    rules = [
        ("num_workers", cfg["num_workers"] >= 1, "at least 1"),
        ("chunk_size", cfg["chunk_size"] >= 1, "at least 1"),
        ("jpeg_quality", 1 <= cfg["jpeg_quality"] <= 100, "between 1 and 100"),
        ("subset", cfg["subset"] == -1 or cfg["subset"] >= 1, "-1 (all) or at least 1"),
        ("max_resolution", cfg["max_resolution"] == -1 or cfg["max_resolution"] >= 1,
         "-1 (keep sizes) or at least 1"),
        ("smart_threshold", cfg["smart_threshold"] >= 0, "at least 0"),
    ]
    for key, is_valid, expected in rules:
        if not is_valid:
            raise ConfigError(f"bad value for 'cfg.{key}': {cfg[key]!r} is not {expected}")


def user_path(cfg, key):
    """cfg.<key> as a path, as users type it: `--cfg.write_path=~/x.beton` is the home
    directory (the shell leaves a `~` after `=` alone; a folder named `~` is never meant),
    and a path that begins or ends with a space is refused (the error would show the
    space invisibly)."""
    text = cfg[key]
    if text != text.strip():
        raise ConfigError(f"--cfg.{key}={text!r} begins or ends with a space: remove it")
    return os.path.expanduser(text)


def check_write_path(write_path):
    """A write path must name a beton file: not a folder (a trailing '/') and not a
    beton's own sidecar, which the write would replace with a beton (and then write a
    sidecar of the sidecar)."""
    if write_path.endswith(("/", os.sep)):
        raise ConfigError(f"--cfg.write_path={write_path} ends with '/': name the beton file "
                          f"itself, e.g. {write_path.rstrip('/')}/NAME.beton")
    for suffix in (".classes.json", ".skipped.txt"):
        if write_path.endswith(suffix):
            raise ConfigError(f"--cfg.write_path={write_path} names a beton's {suffix} "
                              f"file, not a beton: name the beton itself "
                              f"({write_path[:-len(suffix)]})")


def plan_jobs(cfg):
    """[(split, data_dir, write_path)] for the splits to write."""
    cfg = {**cfg, "data_dir": user_path(cfg, "data_dir"),
           "write_path": user_path(cfg, "write_path")}
    if cfg["write_path"]:
        check_write_path(cfg["write_path"])
    dataset = cfg["dataset"]
    splits = ["train", "val"] if cfg["split"] == "both" else [cfg["split"]]
    if len(splits) == 2 and cfg["write_path"]:
        raise ConfigError("--cfg.write_path names one file: give --cfg.split=train or val too")
    if len(splits) == 2 and dataset == "imagefolder":
        raise ConfigError("imagefolder reads one split's folder (data_dir/<class>/<image>): "
                          "give --cfg.split=train or val")
    data_dir = cfg["data_dir"]
    if not data_dir:
        if dataset != "fashion-mnist":
            raise ConfigError(f"--cfg.data_dir is required for {dataset}")
        if not FASHION_MNIST_DIR.is_dir():
            raise DatasetError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (install "
                               f"Debian's dataset-fashion-mnist or give --cfg.data_dir)")
        data_dir = str(FASHION_MNIST_DIR)
    return [(split, data_dir, cfg["write_path"] or f"data/{dataset}_{split}.beton")
            for split in splits]


def check_later_splits(cfg, jobs):
    """With cfg.split=both, the val split is read (and its subset drawn) before the train
    beton is written: a missing val file or a subset larger than the val split used to
    fail only after train.beton had replaced the one at its path."""
    for split, data_dir, _ in jobs[1:]:
        dataset, _ = read_source(cfg["dataset"], data_dir, split)
        if cfg["subset"] != -1:
            try:
                stratified_subset(dataset.labels, cfg["subset"])
            except DatasetError as error:
                raise DatasetError(f"{split} split: {error}; nothing was written") from None


def check_write_folders(jobs):
    """Each beton's folder can be written, asked before minutes of reading images; the
    error names the write path (the atomic writer's temporary name means nothing to a user)."""
    for _, _, write_path in jobs:
        problem = creation_problem(Path(write_path).parent)
        if problem:
            raise ConfigError(f"cannot create {write_path}: {problem}")


def main(argv=None):
    try:
        cfg = read_options(argv)
        check_ranges(cfg)
        jobs = plan_jobs(cfg)
        check_write_folders(jobs)
        check_later_splits(cfg, jobs)
        for split, data_dir, write_path in jobs:
            convert(cfg["dataset"], split, data_dir, write_path,
                    subset=cfg["subset"], skip_corrupt=cfg["skip_corrupt"],
                    num_workers=cfg["num_workers"], chunk_size=cfg["chunk_size"],
                    write_mode=cfg["write_mode"], max_resolution=cfg["max_resolution"],
                    jpeg_quality=cfg["jpeg_quality"],
                    compress_probability=cfg["compress_probability"],
                    smart_threshold=cfg["smart_threshold"])
    except (DatasetError, ConfigError) as error:
        print(f"write_datasets.py: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # cannot create data/, disk full, permission denied
        print(f"write_datasets.py: error: {error.strerror or error}: {error.filename}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("write_datasets.py: interrupted; nothing left at the write path",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def exit_now_if_interrupted(code):
    """After Ctrl-C, leave without the interpreter's shutdown: ffcv's writer feeds its
    workers through a multiprocessing queue whose feeder thread, blocked on a pipe the
    dead workers no longer read, would make the exit wait forever. Everything to clean
    (the temporary beton, the workers, shared memory) is cleaned by then."""
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(exit_now_if_interrupted(main()))
