"""Test protocols: how the validation images are shown to a trained model.

A protocol is a resolution and a centre-crop ratio, written `RES@CROP_RATIO`: `40@1.0`
shows the whole image resized to 40 px, `32@0.875` the central 87.5% of its shorter side
resized to 32 px. `validation.protocols` lists extra protocols, comma-separated, in YAML
and on the command line alike (`--validation.protocols=40@1.0,32@0.875`; a YAML list of
such strings is accepted too). The main protocol stays `validation.resolution` /
`validation.crop_ratio`; every protocol uses `validation.lr_tta` as the main one does.

Why this exists: a random-resized crop zooms objects in during training, and the test
images are shown whole, so which arm "wins" can depend on the test protocol alone
(Touvron et al., "Fixing the train-test resolution discrepancy", 2019).

Extra protocols are NOT part of the run_id (runs.NON_RESULT_KEYS): they do not change the
training, and a finished run can gain protocols later (`python -m ffcv_bias.evaluate`).

This module imports neither torch nor ffcv (train/config.py and the analysis use it).
"""
from dataclasses import dataclass
from pathlib import Path

from ffcv_bias.record import runs
from ffcv_bias.record.metrics import protocol_file


class ProtocolError(ValueError):
    """A protocol string that cannot be read; the message is one line."""


@dataclass(frozen=True)
class Protocol:
    resolution: int
    crop_ratio: float

    @property
    def name(self):
        return f"{self.resolution}@{self.crop_ratio}"


def parse_protocol(text):
    """'40@1.0' -> Protocol(40, 1.0); ProtocolError names the bad part."""
    text = str(text).strip()
    resolution_text, at, ratio_text = text.partition("@")
    if not at:
        raise ProtocolError(f"{text!r} is not RESOLUTION@CROP_RATIO (e.g. 40@1.0)")
    try:
        resolution = int(resolution_text)
        crop_ratio = float(ratio_text)
    except ValueError:
        raise ProtocolError(f"{text!r} is not RESOLUTION@CROP_RATIO (e.g. 40@1.0)") from None
    if resolution <= 0:
        raise ProtocolError(f"{text!r}: the resolution must be > 0")
    if not 0 < crop_ratio <= 1:
        raise ProtocolError(f"{text!r}: the crop ratio must be in (0, 1]")
    return Protocol(resolution, crop_ratio)


def parse_protocols(value):
    """Protocols from a comma-separated string or a list of strings; duplicates dropped,
    order kept. '' or None -> ()."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    parsed = []
    for item in items:
        if str(item).strip() == "":
            continue
        protocol = parse_protocol(item)
        if protocol not in parsed:
            parsed.append(protocol)
    return tuple(parsed)


def canonical(value):
    """The config's stored form: 'RES@RATIO,RES@RATIO' ('' for none)."""
    return ",".join(protocol.name for protocol in parse_protocols(value))


def main_protocol(nested):
    """The protocol of val_logits.npy: validation.resolution @ validation.crop_ratio."""
    validation = nested.get("validation", {})
    return Protocol(int(validation["resolution"]), float(validation["crop_ratio"]))


def logits_file(name):
    return protocol_file(runs.VAL_LOGITS_FILE, name)


def preds_file(name):
    return protocol_file(runs.VAL_PREDS_FILE, name)


def missing_protocols(run_dir, nested):
    """Protocols the config asks for that the finished run's summary.json lacks."""
    wanted = parse_protocols(nested.get("validation", {}).get("protocols", ""))
    summary_path = Path(run_dir) / runs.SUMMARY_FILE
    try:
        have = runs.read_json(summary_path).get("protocols", {})
    except (OSError, ValueError):
        have = {}
    return [protocol for protocol in wanted if protocol.name not in have]


def complete_run_hint(run_dir, nested):
    """A line telling how to add the protocols a finished run lacks ('' when none)."""
    missing = missing_protocols(run_dir, nested)
    if not missing:
        return ""
    names = ",".join(protocol.name for protocol in missing)
    return (f"it lacks the test protocol(s) {names}: add them without retraining with "
            f"python -m ffcv_bias.evaluate {run_dir} --protocols {names}")
