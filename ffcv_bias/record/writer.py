"""One writer for every run record: the trainer's and the transfer probe's.

The order is the contract (docs/DESIGN.md, "The run record"): config.json first, the
final files next, summary.json last, so a record with a summary is complete. Each file is
written to a temporary name and renamed (ffcv_bias/common/atomic.py): a reader never sees half a
file. The summary's accuracies are computed from the files as written (float16 logits,
float32-decided predictions), so they agree exactly with what the analysis reads later.
"""
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ffcv_bias.common import atomic
from ffcv_bias.record import metrics
from ffcv_bias.record import runs


class FinalRecord(NamedTuple):
    """What write_final wrote, read back: the accuracy summary entries and the arrays."""
    accuracy: dict          # top1, per_class_acc (None: a class without images), top5
    logits: np.ndarray      # float16 [n_val, C], as val_logits.npy holds them
    labels: np.ndarray      # [n_val], as val_labels.npy holds them


def write_config(run_dir, config):
    """config.json: every resolved value plus `meta` (run_id and provenance)."""
    atomic.write_json(Path(run_dir) / runs.CONFIG_FILE, config)


def write_log(run_dir, rows):
    """log.jsonl, whole: one JSON object per epoch."""
    atomic.write_text(Path(run_dir) / runs.LOG_FILE,
                      "".join(json.dumps(row) + "\n" for row in rows))


def write_final(run_dir, state_dict, logits, labels, num_classes):
    """weights.pt (CPU tensors), val_logits.npy (float16), val_preds.npy (decided on
    `logits` as given: the float32 ones), val_labels.npy; then the accuracy of the files
    as written."""
    run_dir = Path(run_dir)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    atomic.torch_save(run_dir / runs.WEIGHTS_FILE, weights)
    metrics.write_predictions(run_dir, logits, labels)
    # Read back what analysis will read, so the summary agrees with the files exactly.
    saved_logits = np.load(run_dir / runs.VAL_LOGITS_FILE)
    saved_labels = np.load(run_dir / runs.VAL_LABELS_FILE)
    accuracy = metrics.accuracy_summary(saved_logits, saved_labels, num_classes,
                                        np.load(run_dir / runs.VAL_PREDS_FILE))
    return FinalRecord(accuracy, saved_logits, saved_labels)


def write_summary(run_dir, summary):
    """summary.json, last: from now on the record is complete."""
    atomic.write_json(Path(run_dir) / runs.SUMMARY_FILE, summary)
