"""One tie rule for every accuracy: predictions (metrics.py), the trainer's summary, the
record writer's summary (the transfer probe's), the analysis fallback on old records, and
the float32 head."""
import json

import numpy as np
import pytest
import torch

from ffcv_bias import record
from ffcv_bias.record import metrics
from ffcv_bias.record import runs
from ffcv_bias.analysis.records import accuracy_from_logits, load_runs
from ffcv_bias.train.models import ARCHITECTURES, create_model, eval_logits, final_linear
from ffcv_bias.train.loop import accuracy_metrics

NUM_CLASSES = 6


def tied_logits():
    """bf16-like logits (small multiples of 1/4, exact in float16) where every row's top-2
    are exactly tied, the label on the lower class in half the rows and on the higher one
    in the other half: the lowest-index rule scores exactly the first half as correct."""
    rng = np.random.default_rng(0)
    rows = 400
    logits = np.round(rng.uniform(-4, 0, (rows, NUM_CLASSES)) * 4) / 4
    low = rng.integers(0, NUM_CLASSES - 1, rows)
    high = low + 1 + rng.integers(0, NUM_CLASSES - 1 - low)
    logits[np.arange(rows), low] = logits[np.arange(rows), high] = 2.5
    labels = np.where(np.arange(rows) < rows // 2, low, high).astype(np.int64)
    return logits.astype(np.float32), labels


def expected_accuracy(logits, labels):
    predictions = logits.argmax(axis=1)   # numpy's rule: the first (lowest) maximum
    per_class = [float(np.mean(predictions[labels == c] == c)) for c in range(NUM_CLASSES)]
    return float(np.mean(predictions == labels)), per_class


def write_old_record(run_dir, logits, labels):
    """A record as written before val_preds.npy: float16 logits, no per_class_acc."""
    run_dir.mkdir(parents=True)
    (run_dir / runs.CONFIG_FILE).write_text(json.dumps(
        {"model": {"arch": "resnet8"}, "training": {"seed": 0}}))
    np.save(run_dir / runs.VAL_LOGITS_FILE, logits.astype(np.float16))
    np.save(run_dir / runs.VAL_LABELS_FILE, labels)
    (run_dir / runs.SUMMARY_FILE).write_text(json.dumps(
        {"run_id": run_dir.name, "top1": -1.0, "n_val": len(labels),
         "num_classes": NUM_CLASSES}))


def test_top2_ties_give_one_top1_everywhere(tmp_path):
    logits, labels = tied_logits()
    top1, per_class = expected_accuracy(logits, labels)
    assert top1 == 0.5  # the fixture is what it says: only the lower class of a tie wins

    trainer = accuracy_metrics(logits.astype(np.float16), labels, NUM_CLASSES,
                               metrics.predictions_from_logits(logits))
    summary = metrics.accuracy_summary(logits.astype(np.float16), labels, NUM_CLASSES)
    # The record writer decides on the float32 logits, then scores the saved float16 ones.
    written = record.write_final(tmp_path / "new", {}, logits, labels, NUM_CLASSES)
    write_old_record(tmp_path / "runs" / "old", logits, labels)
    fallback, fallback_top1, fallback_top5, _ = accuracy_from_logits(
        tmp_path / "runs" / "old", need_top5=True)
    loaded = load_runs([tmp_path / "runs"])

    for result in (trainer, summary, written.accuracy):
        assert result["top1"] == top1 and result["per_class_acc"] == pytest.approx(per_class)
    assert fallback_top1 == top1 and fallback.tolist() == pytest.approx(per_class)
    assert loaded.per_class_acc[0].tolist() == pytest.approx(per_class)
    # top-5 ranks with the same rule: with 6 classes only the 6th-ranked label misses.
    assert trainer["top5"] == summary["top5"] == written.accuracy["top5"] == fallback_top5 \
        == loaded.top5[0]


def test_write_predictions_then_read_back(tmp_path):
    logits, labels = tied_logits()
    written = metrics.write_predictions(tmp_path, logits, labels)
    assert written.dtype == np.int16
    np.testing.assert_array_equal(np.load(tmp_path / runs.VAL_PREDS_FILE), logits.argmax(1))
    assert np.load(tmp_path / runs.VAL_LOGITS_FILE).dtype == np.float16
    np.testing.assert_array_equal(metrics.read_predictions(tmp_path), written)
    # A record without val_preds.npy: derived from the float16 logits with the same rule.
    (tmp_path / runs.VAL_PREDS_FILE).unlink()
    np.testing.assert_array_equal(metrics.read_predictions(tmp_path), written)
    # Extra protocols get their own files.
    metrics.write_predictions(tmp_path, logits, protocol="center")
    assert (tmp_path / "val_preds.center.npy").is_file()
    assert (tmp_path / "val_logits.center.npy").is_file()


def test_predictions_come_from_float32_not_the_rounded_logits(tmp_path):
    # 1.0001 > 1.0 in float32, equal in float16: the stored predictions keep the float32
    # winner (class 1) while a reader of the float16 logits would pick class 0.
    logits = np.array([[1.0, 1.0001, 0.0]], dtype=np.float32)
    metrics.write_predictions(tmp_path, logits, np.array([1]))
    assert np.load(tmp_path / runs.VAL_PREDS_FILE).tolist() == [1]
    assert metrics.predictions_from_logits(logits.astype(np.float16)).tolist() == [0]


def test_prediction_dtype_and_chunking():
    assert metrics.prediction_dtype(32767) == np.int16
    assert metrics.prediction_dtype(32768) == np.int16     # indices 0..32767 still fit
    assert metrics.prediction_dtype(32769) == np.int32
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((101, 13)).astype(np.float16)
    np.testing.assert_array_equal(metrics.predictions_from_logits(logits, chunk_elements=13),
                                  logits.argmax(1))
    labels = rng.integers(0, 13, 101)
    ranks = metrics.label_ranks(logits, labels, chunk_elements=26)
    order = np.argsort(-logits.astype(np.float32), axis=1, kind="stable")
    np.testing.assert_array_equal(ranks, np.argmax(order == labels[:, None], axis=1))
    with pytest.raises(ValueError, match="must be"):
        metrics.per_class_accuracy(np.zeros(3), np.zeros(4), 2)


def test_a_class_without_images_is_nan_in_arrays_and_none_in_summaries():
    per_class = metrics.per_class_accuracy(np.array([0, 0]), np.array([0, 1]), 3)
    assert per_class[0] == 1.0 and per_class[1] == 0.0 and np.isnan(per_class[2])
    assert metrics.per_class_list(per_class) == [1.0, 0.0, None]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_eval_logits_is_the_model_with_a_float32_head(arch):
    size = 32
    model = create_model(arch, 10).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(eval_logits(model, images), model(images))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model(images)
        fp32_head = eval_logits(model, images, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.forward_features(images)
        expected = final_linear(model)(features.float())
    assert rounded.dtype == torch.bfloat16 and fp32_head.dtype == torch.float32
    torch.testing.assert_close(fp32_head, expected, rtol=0, atol=0)
