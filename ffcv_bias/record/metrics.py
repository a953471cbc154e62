"""Every accuracy of the project, from predictions with one tie rule (numpy only, no torch).

A prediction is the argmax of a row of logits; among equal maxima the LOWEST class index
wins (numpy's and torch's argmax rule). The trainer decides predictions on the float32
logits and stores them as val_preds.npy beside the float16 val_logits.npy: the float16
(or, on CUDA, bfloat16) rounding creates exact top-2 ties that float32 does not have, and
a prediction must not depend on which reader broke them. Top-1 and per-class accuracy
come from predictions only; top-5 comes from the logits with the same tie rule (a label
ranks after every larger logit and every equal logit of a lower class), so the top-1 of
that ranking is the prediction.

    predictions = predictions_from_logits(logits)          # int16 / int32 [N]
    top1 = top1_accuracy(predictions, labels)
    per_class = per_class_accuracy(predictions, labels, num_classes)   # NaN: no image
"""
from pathlib import Path

import numpy as np

from ffcv_bias.common import atomic

# Rows of logits handled at once (bounds the temporary [rows, C] arrays of the top-k rank).
from ffcv_bias.record import runs
CHUNK_ELEMENTS = 2 ** 22


def prediction_dtype(num_classes):
    """int16 while every class index fits (<= 32767 classes), else int32."""
    return np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32


def _float16_order_key(chunk):
    """An int16 key that orders float16 values exactly like the floats (argmax ~3x faster).

    An IEEE half's bits read as int16 order non-negative values correctly and negative
    ones backwards; flipping the 15 magnitude bits of negatives (x ^ 0x7FFF) fixes that,
    and adding 1 to them maps -0 onto +0's key 0 (the floats are equal, so the tie must go
    to the lower column as np.argmax does). No key overflows: the smallest is -32767.
    """
    bits = chunk.view(np.int16)
    sign = bits >> 15          # -1 where negative, 0 elsewhere (arithmetic shift)
    key = sign & 0x7FFF
    key ^= bits
    key -= sign
    return key


def predictions_from_logits(logits, chunk_elements=CHUNK_ELEMENTS):
    """argmax of each row of `logits` [N, C] (ties: lowest class), as prediction_dtype(C).

    Reads in row chunks, so a memory-mapped array is never loaded whole. The logits are
    expected finite: a row holding NaN has no meaningful prediction.
    """
    logits = np.asarray(logits)  # a memory map stays one (no copy)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, C] with C >= 1, got shape {logits.shape}")
    n_rows, num_classes = logits.shape
    predictions = np.empty(n_rows, dtype=prediction_dtype(num_classes))
    rows_per_chunk = max(1, chunk_elements // num_classes)
    for start in range(0, n_rows, rows_per_chunk):
        chunk = np.asarray(logits[start:start + rows_per_chunk])
        if chunk.dtype == np.float16:
            chunk = _float16_order_key(chunk)
        predictions[start:start + len(chunk)] = chunk.argmax(axis=1)
    return predictions


def _check_pair(predictions, labels):
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be "
                         "1-D of the same length")
    return predictions, labels


def top1_accuracy(predictions, labels):
    predictions, labels = _check_pair(predictions, labels)
    return float(np.mean(predictions == labels)) if len(labels) else float("nan")


def per_class_accuracy(predictions, labels, num_classes):
    """float64 [num_classes]: share of each class's images predicted as it (NaN: none)."""
    predictions, labels = _check_pair(predictions, labels)
    labels = labels.astype(np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=predictions == labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / counts


def per_class_list(per_class):
    """per_class_accuracy as summary.json stores it: None for a class without images."""
    return [None if np.isnan(value) else float(value) for value in per_class]


def label_ranks(logits, labels, chunk_elements=CHUNK_ELEMENTS):
    """Rank of each image's true label among its logits (0 = the prediction), ties to the
    lower class: #(larger logits) + #(equal logits of a lower class)."""
    n_rows, num_classes = logits.shape
    labels = np.asarray(labels, dtype=np.int64)
    ranks = np.empty(n_rows, dtype=np.int64)
    classes = np.arange(num_classes)
    rows_per_chunk = max(1, chunk_elements // num_classes)
    for start in range(0, n_rows, rows_per_chunk):
        chunk = np.asarray(logits[start:start + rows_per_chunk])
        chunk_labels = labels[start:start + len(chunk)]
        own = chunk[np.arange(len(chunk)), chunk_labels][:, None]
        ahead = (chunk > own) | ((chunk == own) & (classes < chunk_labels[:, None]))
        ranks[start:start + len(chunk)] = ahead.sum(axis=1)
    return ranks


def topk_accuracy(logits, labels, k=5):
    """Share of images whose label is among the k first classes (k capped at C)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(label_ranks(logits, labels) < min(k, logits.shape[1])))


def accuracy_from_predictions(predictions, labels, num_classes):
    """{"top1", "per_class_acc" (list, None for a class without images)}."""
    return {"top1": top1_accuracy(predictions, labels),
            "per_class_acc": per_class_list(per_class_accuracy(predictions, labels,
                                                               num_classes))}


def accuracy_summary(logits, labels, num_classes, predictions=None):
    """A summary's accuracies: top1 and per_class_acc from `predictions` (default: decided
    on `logits` as given), top5 from `logits`; the trainer's and the probe's, alike."""
    if predictions is None:
        predictions = predictions_from_logits(logits)
    return {**accuracy_from_predictions(predictions, labels, num_classes),
            "top5": topk_accuracy(logits, labels, k=5)}


# ----------------------------------------------------------------------------------------
# The record's prediction files
# ----------------------------------------------------------------------------------------

def protocol_file(name, protocol=None):
    """`val_logits.npy` -> `val_logits.<protocol>.npy` for an extra test protocol."""
    if not protocol:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{protocol}.{suffix}"


def write_predictions(run_dir, logits, labels=None, protocol=None):
    """Write val_logits (float16) and val_preds (decided on `logits` as given, i.e. float32
    from the trainer), then val_labels if given, each atomically. Returns the predictions."""
    run_dir = Path(run_dir)
    predictions = predictions_from_logits(np.asarray(logits, dtype=np.float32))
    atomic.save_npy(run_dir / protocol_file(runs.VAL_LOGITS_FILE, protocol),
                    np.asarray(logits).astype(np.float16))
    atomic.save_npy(run_dir / protocol_file(runs.VAL_PREDS_FILE, protocol), predictions)
    if labels is not None:
        atomic.save_npy(run_dir / runs.VAL_LABELS_FILE, np.asarray(labels))
    return predictions


class RecordFileError(ValueError):
    """A run record's .npy file that is not what the record contract says (a hand edit, a
    foreign tool, a disk error); str() is one line naming the file and the problem."""


def load_record_array(path, ndim, integer, mmap_mode=None):
    """np.load of a record's array, checked: `ndim` dimensions, integer or floating
    values, no pickled objects. Raises RecordFileError instead of numpy's errors."""
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RecordFileError(f"{path}: not a numpy array file this record can hold ({reason});"
                              f" the record is corrupt: move it aside or retrain the run") from None
    kind = np.integer if integer else np.floating
    if not isinstance(array, np.ndarray) or array.ndim != ndim \
            or not np.issubdtype(array.dtype, kind):
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", type(array).__name__)
        wanted = f"{ndim}-d {'integer' if integer else 'floating'}"
        raise RecordFileError(f"{path}: a {dtype} array of shape {shape} where the record holds "
                              f"a {wanted} array; the record is corrupt: move it aside or "
                              f"retrain the run")
    return array


def read_labels_file(path):
    """val_labels.npy: 1-d integer class indices (RecordFileError otherwise)."""
    return load_record_array(path, 1, integer=True).astype(np.int64)


def read_predictions(run_dir, protocol=None):
    """One run's predictions: val_preds.npy, or for a record written before it existed,
    the argmax of val_logits.npy with the same tie rule. None when neither file exists;
    RecordFileError when one is not an array of the record's shape."""
    run_dir = Path(run_dir)
    preds_path = run_dir / protocol_file(runs.VAL_PREDS_FILE, protocol)
    if preds_path.is_file():
        return load_record_array(preds_path, 1, integer=True)
    logits_path = run_dir / protocol_file(runs.VAL_LOGITS_FILE, protocol)
    if logits_path.is_file():
        return predictions_from_logits(load_record_array(logits_path, 2, integer=False,
                                                         mmap_mode="r"))
    return None
