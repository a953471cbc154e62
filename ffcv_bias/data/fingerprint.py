"""A cheap fingerprint of a beton, so a finished run is never reused for other data.

A run_id names its betons by file name only (moving a data directory must not orphan
finished runs), so rewriting `data/x_train.beton` with other images, or editing its
`.classes.json`, would otherwise let the trainer and the sweep launcher take the old run
for the new data. config.json's `meta.betons` records each beton's fingerprint at the
run's first start (meta is outside the run_id: finished runs keep their ids), and the
trainer, the launcher and the analysis compare it (see DESIGN.md, "The run record").

The fingerprint reads only the small parts of the file, never the images (an ImageNet
beton is 300 GB), in the layout of ffcv's Reader (ffcv/reader.py, ffcv/types.py):

    [header][field descriptors][metadata: one row per sample] ... image pages ...
    [allocation table: (sample_id, ptr, size) per stored chunk, to the end of the file]

It hashes the bytes before the first image chunk (header, descriptors, metadata: labels,
image sizes and modes) and the allocation table (where every image lives and how many
bytes it has), plus the file size, the sample count and the sidecar's class list. Any
re-encoding, subset or relabelling changes it; copying the file elsewhere does not.
Records without `meta.betons` (written before this existed) are not checked.

No ffcv import (it imports torch): the two dtypes are copied from ffcv/types.py, and
tests/test_bad_input.py checks them against ffcv's.
"""
import functools
import hashlib
import json
import os

import numpy as np

from ffcv_bias.data.sources import DatasetError
from ffcv_bias.data.sidecar import read_classes

HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
DATASET_KEYS = ("train_dataset", "val_dataset")
CHUNK_BYTES = 1 << 22


def _hash_range(handle, digest, start, stop):
    handle.seek(start)
    remaining = max(0, stop - start)
    while remaining:
        chunk = handle.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)


def _table_hash(path, size):
    """(num_samples from the header, sha256 of the metadata region and allocation table)."""
    digest = hashlib.sha256()
    if size < HEADER_TYPE.itemsize:  # not a beton; inspect_beton says so, here just hash it
        with open(path, "rb") as handle:
            digest.update(handle.read())
        return 0, digest.hexdigest()[:16]
    header = np.fromfile(path, dtype=HEADER_TYPE, count=1)[0]
    table_start = min(int(header["alloc_table_ptr"]), size)
    table_rows = (size - table_start) // ALLOC_TABLE_TYPE.itemsize
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, count=table_rows, offset=table_start)
    first_chunk = int(table["ptr"].min()) if len(table) else table_start
    with open(path, "rb") as handle:
        _hash_range(handle, digest, 0, min(first_chunk, table_start))
        _hash_range(handle, digest, table_start, size)
    return int(header["num_samples"]), digest.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _cached_fingerprint(path, size, mtime_ns, inode, sidecar_mtime_ns):
    # Keyed by the file's stat: a sweep asks about the same two betons for every run.
    num_samples, tables = _table_hash(path, size)
    classes = read_classes(path)["classes"]
    return {"size": size, "num_samples": num_samples, "num_classes": len(classes),
            "classes_sha256": hashlib.sha256(json.dumps(classes).encode()).hexdigest()[:16],
            "tables_sha256": tables}


def fingerprint(path):
    """The fingerprint dict of the beton at `path` (DatasetError if it or its sidecar is
    missing or unreadable)."""
    path = str(path)
    try:
        stat = os.stat(path)
        sidecar_stat = os.stat(f"{path}.classes.json")
    except OSError as error:
        raise DatasetError(f"cannot read {error.filename}: {error.strerror}") from None
    return dict(_cached_fingerprint(path, stat.st_size, stat.st_mtime_ns, stat.st_ino,
                                    sidecar_stat.st_mtime_ns))


def current_fingerprints(nested):
    """{"train_dataset": fingerprint, "val_dataset": fingerprint} of the betons a config names."""
    return {key: fingerprint(nested["data"][key]) for key in DATASET_KEYS}


def describe(fp):
    return (f"{fp['num_samples']} samples, {fp['num_classes']} classes, {fp['size']} bytes, "
            f"tables {fp['tables_sha256'][:8]}, class list {fp['classes_sha256'][:8]}")


def recorded_fingerprints(config):
    """meta.betons of a run's config.json, or {} for a record written before it existed."""
    meta = config.get("meta") if isinstance(config, dict) else None
    betons = (meta or {}).get("betons")
    return betons if isinstance(betons, dict) else {}


def first_change(recorded, current):
    """(key, recorded, current) of the first dataset whose fingerprint differs, or None."""
    for key in DATASET_KEYS:
        if key in recorded and key in current and recorded[key] != current[key]:
            return key, recorded[key], current[key]
    return None


def change_message(run_dir, nested, change, remedy):
    """One line naming the beton, both fingerprints and what to do."""
    key, recorded, current = change
    return (f"data.{key} {nested['data'][key]} is not the beton run {run_dir.name} was "
            f"trained on (now: {describe(current)}; the run's: {describe(recorded)}): "
            f"{remedy}")
