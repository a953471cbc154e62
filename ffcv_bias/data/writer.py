"""Datasets -> FFCV .beton files with a classes.json sidecar (`convert` does one split):

    read_source / stratified_subset / check_images   (data/sources.py)
    write_beton(dataset, class_names, ...)  ffcv's DatasetWriter into a temporary file, the
                                            sidecar, then a rename onto write_path

Every beton has the fields `image` (RGBImageField) and `label` (IntField), as in
ffcv-imagenet. ffcv's writer hangs when a worker dies; data/ffcv_patches.py holds the
watchdog that turns that into an error.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ffcv_bias.common.atomic import (NO_ROOM_ERRNOS, atomic_path, remove_orphaned_temps,
                                    write_json, write_text)
from ffcv_bias.data.sidecar import classes_path, inspect_beton, skipped_path
from ffcv_bias.data.sources import (DEFAULT_SMART_THRESHOLD, WRITE_MODES, DatasetError,
                                    ImageFiles, check_images, check_label_range,
                                    class_list_warnings, one_line, read_source,
                                    stratified_subset)


class WriterSource:
    """What ffcv's writer workers index: the dataset, made reproducible and failure-safe.

    - In 'proportion' mode ffcv draws np.random.rand() for each image to decide JPEG or raw.
      Seeding numpy from the sample index just before ffcv encodes the sample makes that
      decision a function of the index alone, whichever worker writes it.
    - A sample that fails to load is logged to `error_log` and replaced by a 1x1 black
      image: ffcv's writer waits forever for a worker that raised, so raising is not an
      option. write_beton reads the log afterwards and discards the file.
    """

    def __init__(self, dataset, error_log, seed_per_sample):
        self.dataset = dataset
        self.error_log = str(error_log)
        self.seed_per_sample = seed_per_sample

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if self.seed_per_sample:
            np.random.seed(index)
        try:
            return self.dataset[index]
        except Exception as error:
            with open(self.error_log, "a") as log:
                log.write(f"{self.dataset.describe(index)}\t{one_line(error)}\n")
            return np.zeros((1, 1, 3), dtype=np.uint8), 0


def run_writer(writer, source, chunk_size):
    from ffcv_bias.data.ffcv_patches import (WriterWorkerDied, release_shared_memory,
                                             watching_workers)
    with watching_workers() as watchdog:
        try:
            writer.from_indexed_dataset(source, chunksize=chunk_size)
        except BaseException as error:
            watchdog.stop()
            watchdog.terminate_workers()
            release_shared_memory(writer)
            for progress_bar in list(getattr(tqdm, "_instances", ())):  # ffcv's bar, left open
                progress_bar.close()
            if isinstance(error, WriterWorkerDied) and error.args[0] in NO_ROOM_ERRNOS:
                # atomic_path turns it into "no space left on device while writing <beton>"
                raise OSError(error.args[0], os.strerror(error.args[0])) from None
            if isinstance(error, WriterWorkerDied):
                raise DatasetError(f"an ffcv writer worker died (exit code {error.args[0]}; "
                                   f"its error is printed above, e.g. disk full)") from None
            raise


def choose_page_size(largest_image_bytes):
    """ffcv's default page (8 MiB), doubled until the largest image fits twice over
    (a JPEG can be larger than raw pixels for tiny or noisy images)."""
    from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE
    page_size = 4 * MIN_PAGE_SIZE
    while page_size < 2 * largest_image_bytes + (1 << 16):
        page_size *= 2
    if page_size >= MAX_PAGE_SIZE:
        raise DatasetError(f"an image of {largest_image_bytes} bytes is too large for an ffcv "
                           f"page; set max_resolution")
    return page_size


def read_failures(error_log):
    if not error_log.is_file():
        return []
    return [line.split("\t", 1) for line in error_log.read_text().splitlines() if line]


def remove_orphaned_betons(write_path):
    """Remove the temporary betons (and their error logs) that killed writers of
    `write_path` left beside it (`.NAME.beton.pid<PID>@<host>.*.tmp`, the writer gone)."""
    write_path = Path(write_path)
    removed = remove_orphaned_temps(write_path.parent, write_path.name)
    if removed:
        files = "a temporary file" if len(removed) == 1 else f"{len(removed)} temporary files"
        print(f"removed {files} left by a killed writer of {write_path}: {removed[0].name}"
              f"{' ...' if len(removed) > 1 else ''}", file=sys.stderr)


def write_beton(dataset, class_names, write_path, *, dataset_name, split, write_mode="raw",
                max_resolution=None, jpeg_quality=90, compress_probability=0.5,
                smart_threshold=DEFAULT_SMART_THRESHOLD, num_workers=1, chunk_size=100):
    """Write `dataset` to `write_path` (fields image, label) plus its classes.json sidecar.

    The beton is written under a temporary name and renamed at the end: a failure leaves
    nothing at write_path; a writer killed meanwhile leaves its temporary, which the next
    write of the same path removes. With num_workers=1 the same input gives the same
    bytes; with more workers the samples are the same but ffcv's page order depends on
    timing.
    Returns the sidecar dict.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in WRITE_MODES:
        raise DatasetError(f"unknown write mode {write_mode!r}: expected one of "
                           f"{', '.join(WRITE_MODES)}")
    if len(dataset) == 0:
        raise DatasetError(f"no images to write to {write_path}")
    if Path(write_path).is_dir():
        raise DatasetError(f"write path {write_path} is a directory, not a .beton file name")
    check_label_range(dataset.labels, len(class_names), f"the {dataset_name} {split} split")
    max_resolution = max_resolution if max_resolution and max_resolution > 0 else None
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    page_size = choose_page_size(dataset.largest_image_bytes(max_resolution))
    sidecar = {"dataset": dataset_name, "split": split, "num_samples": len(dataset),
               "num_classes": len(class_names), "classes": list(class_names)}
    remove_orphaned_betons(write_path)
    with atomic_path(write_path, owned=True) as tmp_path:
        error_log = Path(f"{tmp_path}.errors")
        try:
            source = WriterSource(dataset, error_log, seed_per_sample=write_mode == "proportion")
            writer = DatasetWriter(str(tmp_path), fields, page_size=page_size,
                                   num_workers=num_workers)
            run_writer(writer, source, chunk_size)
            failures = read_failures(error_log)
        finally:
            error_log.unlink(missing_ok=True)
        if failures:
            path, reason = failures[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise DatasetError(f"cannot read image {path}: {reason}{more}")
        inspect_beton(tmp_path, expected_samples=len(dataset))
        write_json(classes_path(write_path), sidecar)
    return sidecar


# ---------------------------------------------------------------------------------------
# One split, end to end
# ---------------------------------------------------------------------------------------

def drop_unreadable(dataset, unreadable, skip_corrupt):
    """Raise on unreadable images, or (skip_corrupt) list them on stderr and drop them.

    Returns (dataset to write, lines "path<TAB>reason" of the skipped files)."""
    if not unreadable:
        return dataset, []
    first_index, first_reason = unreadable[0]
    if not skip_corrupt:
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise DatasetError(f"cannot read image {dataset.describe(first_index)}: {first_reason}"
                           f"{more}; skip_corrupt=1 skips unreadable images")
    skipped = {index for index, _ in unreadable}
    keep = np.array([i for i in range(len(dataset)) if i not in skipped], dtype=np.int64)
    lines = [f"{dataset.describe(index)}\t{reason}" for index, reason in unreadable]
    print(f"skipping {len(lines)} unreadable images:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    return dataset.subset(keep), lines


def convert(dataset_name, split, data_dir, write_path, *, subset=-1, skip_corrupt=False,
            num_workers=1, chunk_size=100, **image_options):
    """Read one split of a source, check it, and write it to `write_path`.

    image_options: write_mode, max_resolution, jpeg_quality, compress_probability,
    smart_threshold (see write_beton). Skipped files (skip_corrupt) are listed in
    <write_path>.skipped.txt. Returns the sidecar dict.
    """
    started = time.time()
    dataset, class_names = read_source(dataset_name, data_dir, split)
    for line in class_list_warnings(class_names, f"{dataset_name} {split} ({data_dir})"):
        print(line, file=sys.stderr)
    if subset != -1:
        dataset = dataset.subset(stratified_subset(dataset.labels, subset))
        present = len(set(int(label) for label in dataset.labels))
        if present < len(class_names):
            print(f"warning: the subset of {subset} images has no image of "
                  f"{len(class_names) - present} of the {len(class_names)} classes (a "
                  f"class-stratified subset needs at least one image per class): their "
                  f"accuracy cannot be measured on this beton", file=sys.stderr)
    skipped_lines = []
    if isinstance(dataset, ImageFiles):
        unreadable = check_images(dataset, num_workers)
        dataset, skipped_lines = drop_unreadable(dataset, unreadable, skip_corrupt)
    print(f"writing {len(dataset)} images of {dataset_name} {split} to {write_path}",
          file=sys.stderr)
    sidecar = write_beton(dataset, class_names, write_path, dataset_name=dataset_name,
                          split=split, num_workers=num_workers, chunk_size=chunk_size,
                          **image_options)
    if skipped_lines:
        write_text(skipped_path(write_path), "\n".join(skipped_lines) + "\n")
        print(f"skipped files listed in {skipped_path(write_path)}", file=sys.stderr)
    else:
        skipped_path(write_path).unlink(missing_ok=True)  # a stale list would mislead
    megabytes = Path(write_path).stat().st_size / 1e6
    print(f"wrote {write_path}: {sidecar['num_samples']} images, {sidecar['num_classes']} "
          f"classes, {megabytes:.1f} MB in {time.time() - started:.1f} s")
    return sidecar
