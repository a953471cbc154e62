"""A beton's sidecar and its checks: `<beton>.classes.json` holds
`{"dataset", "split", "num_samples", "num_classes", "classes": [names in label order]}`
(written by data/writer.py). `read_classes` reads the sidecar; `inspect_beton` checks that
a beton file is whole; `check_beton` checks both agree (the trainer calls it before it
creates a run directory). No torch at import: the config checks and `sweep plan` use it.
"""
import json
from pathlib import Path

import numpy as np

from ffcv_bias.data.sources import SPLITS, DatasetError, one_line


def classes_path(beton_path):
    return Path(f"{beton_path}.classes.json")


def skipped_path(beton_path):
    return Path(f"{beton_path}.skipped.txt")


def read_classes(beton_path):
    """The sidecar of a beton: {"dataset", "split", "num_samples", "num_classes", "classes"}."""
    named = str(beton_path)
    if named.endswith("/"):  # `X.beton/`: Path() drops the slash, the sidecar name keeps it
        raise DatasetError(f"{named} ends with '/': a beton is a file; name it without the "
                           f"slash ({named.rstrip('/')})")
    if named.endswith(".classes.json"):
        raise DatasetError(f"{named} is a beton's class list; name the beton itself "
                           f"({named[:-len('.classes.json')]})")
    path = classes_path(beton_path)
    if not path.is_file():
        raise DatasetError(f"class list not found: {path} (write_datasets.py writes it "
                           f"beside each beton)")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"corrupt class list {path}: {one_line(error)}") from None
    problem = sidecar_problem(content)
    if problem:
        raise DatasetError(f"corrupt class list {path}: {problem}")
    return content


def sidecar_problem(content):
    """What is wrong with a sidecar's content, or None."""
    if not isinstance(content, dict):
        return "not a JSON object"
    types = {"dataset": str, "split": str, "num_samples": int, "num_classes": int,
             "classes": list}
    for key, expected in types.items():
        if not isinstance(content.get(key), expected) or isinstance(content.get(key), bool):
            return f"'{key}' missing or not a {expected.__name__}"
    if content["split"] not in SPLITS:
        return f"split {content['split']!r} is not train or val"
    if len(content["classes"]) != content["num_classes"]:
        return (f"num_classes is {content['num_classes']} but {len(content['classes'])} "
                f"class names are listed")
    if not all(isinstance(name, str) for name in content["classes"]):
        return "class names must be strings"
    return None


def inspect_beton(path, expected_samples=None):
    """Check that a beton file is whole; return its labels (int64 [num_samples]).

    Catches what a plain ffcv Reader lets through silently: a file cut short (the
    allocation table or image data missing), a write that never finished, a
    sample without its image data.
    """
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"beton not found: {path}")
    file_size = path.stat().st_size
    if file_size < HeaderType.itemsize:
        raise DatasetError(f"truncated beton {path}: {file_size} bytes, shorter than its header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise DatasetError(f"{path} is not an ffcv beton (format version "
                           f"{int(header['version'])}, expected {CURRENT_VERSION})")
    if int(header["num_samples"]) > file_size:  # every sample has metadata in the file
        raise DatasetError(f"corrupt beton {path}: its header claims {int(header['num_samples'])} "
                           f"samples in {file_size} bytes")
    table_start = int(header["alloc_table_ptr"])
    table_bytes = file_size - table_start
    if table_start == 0 or table_bytes < 0 or table_bytes % ALLOC_TABLE_TYPE.itemsize:
        raise DatasetError(f"truncated or unfinished beton {path}: its header puts the "
                           f"allocation table at byte {table_start}, the file has "
                           f"{file_size} bytes")
    try:
        reader = Reader(str(path))
    except Exception as error:
        raise DatasetError(f"corrupt beton {path}: ffcv cannot read it ({one_line(error)})") \
            from None
    num_samples = int(reader.num_samples)
    if len(reader.metadata) != num_samples:
        raise DatasetError(f"truncated beton {path}: metadata for {len(reader.metadata)} of "
                           f"{num_samples} samples")
    if not {"image", "label"} <= set(reader.field_names):
        raise DatasetError(f"beton {path} has fields {reader.field_names}, expected 'image' "
                           f"and 'label'")
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_start:
        raise DatasetError(f"corrupt beton {path}: image data runs past its allocation table")
    samples_with_data = len(np.unique(table["sample_id"]))
    if samples_with_data != num_samples:
        raise DatasetError(f"corrupt beton {path}: image data for {samples_with_data} of "
                           f"{num_samples} samples")
    if expected_samples is not None and num_samples != expected_samples:
        raise DatasetError(f"beton {path} holds {num_samples} samples, expected {expected_samples}")
    # the metadata's columns are unnamed (f0, f1, ...) in field order
    label_column = reader.metadata.dtype.names[reader.field_names.index("label")]
    return np.array(reader.metadata[label_column], dtype=np.int64)


def check_beton(beton_path):
    """Check a beton and its sidecar agree; return the sidecar dict (see read_classes)."""
    classes = read_classes(beton_path)
    labels = inspect_beton(beton_path)
    if len(labels) != classes["num_samples"]:
        raise DatasetError(f"beton {beton_path} holds {len(labels)} labels but "
                           f"{classes_path(beton_path).name} says {classes['num_samples']}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes["num_classes"]):
        raise DatasetError(f"beton {beton_path} has labels {labels.min()}..{labels.max()} but "
                           f"{classes_path(beton_path).name} lists {classes['num_classes']} "
                           f"classes")
    return classes
