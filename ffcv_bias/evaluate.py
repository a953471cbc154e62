"""Evaluate a trained model under extra test protocols (see ffcv_bias/record/protocols.py).

    python -m ffcv_bias.evaluate RUN_DIR [RUN_DIR ...] --protocols 40@1.0,32@0.875

For each finished run (summary.json present) this loads weights.pt, evaluates it on the
run's validation beton under each protocol the summary does not have yet (all of them with
--force), and writes, beside the main val_logits.npy (which it never touches):

    val_logits.<P>.npy   float16 [N, C], the (mirror-averaged with lr_tta) logits
    val_preds.<P>.npy    argmax of the float32 logits (ties to the lowest class index),
                         int16 when C <= 32767, else int32

then adds summary.json's `protocols` entry: {P: {resolution, crop_ratio, lr_tta, n_val,
top1, top5, per_class_acc, logits_file, preds_file}}, computed from those float32 logits
(top1 and per_class_acc from the preds file exactly). Each file is written atomically,
summary.json last, under the run's lock. Old runs work too: only weights.pt, config.json,
summary.json and val_labels.npy are needed.

The trainer calls `evaluate_protocols` on its final model, so a run with
`validation.protocols` set gets the same files and entry when it finishes.
"""
import sys
from pathlib import Path

import numpy as np
import torch

from ffcv_bias.common import atomic
from ffcv_bias.record import metrics
from ffcv_bias.record import runs
from ffcv_bias.common import env
from ffcv_bias.common.errors import (EXIT_FAILURE, EXIT_OK, OneLineArgumentParser, UserError,
                                     main_guard)
from ffcv_bias.common.output_paths import path_arg, path_text
from ffcv_bias.data.loaders import BetonError, create_val_loader, normalize, read_labels
from ffcv_bias.train.models import create_model, eval_logits
from ffcv_bias.record.protocols import (ProtocolError, logits_file, parse_protocols,
                                        preds_file)
from ffcv_bias.studies.trained import model_options



class EvaluateError(UserError, RuntimeError):
    """A run that cannot be evaluated; the message is one line (exit 1)."""
    exit_code = EXIT_FAILURE


def protocol_logits(model, val_dataset, protocol, *, batch_size, num_workers=1,
                    in_memory=True, lr_tta=True, device=torch.device("cpu"), amp_dtype=None,
                    decode="exact"):
    """float32 [N, C] logits of `model` on every image of `val_dataset` (beton order),
    shown as `protocol` says; the same computation as the trainer's validation (`decode`:
    the run's augment.decode)."""
    loader = create_val_loader(val_dataset, batch_size=batch_size,
                               resolution=protocol.resolution, crop_ratio=protocol.crop_ratio,
                               num_workers=num_workers, in_memory=in_memory, decode=decode)
    model.eval()
    rows = []
    with torch.no_grad():
        for images, _ in loader:
            inputs = normalize(images, device, channels_last=True,
                               dtype=amp_dtype or torch.float32)
            logits = eval_logits(model, inputs, amp_dtype)   # the head in float32
            if lr_tta:
                logits = (logits + eval_logits(model, torch.flip(inputs, dims=[3]),
                                               amp_dtype)) / 2
            rows.append(logits.cpu())
    return torch.cat(rows).numpy()


def write_protocol_files(run_dir, protocol, logits, labels, num_classes, lr_tta):
    """Both files of one protocol (atomically, metrics.write_predictions: the same rules as
    the main files); returns its summary entry."""
    preds = metrics.write_predictions(run_dir, logits, protocol=protocol.name)
    return {"resolution": protocol.resolution, "crop_ratio": protocol.crop_ratio,
            "lr_tta": bool(lr_tta), "n_val": int(len(labels)),
            **metrics.accuracy_from_predictions(preds, labels, num_classes),
            "top5": metrics.topk_accuracy(np.asarray(logits).astype(np.float16), labels),
            "logits_file": logits_file(protocol.name), "preds_file": preds_file(protocol.name)}


def evaluate_protocols(model, run_dir, protocols, *, val_dataset, labels, num_classes,
                       batch_size, num_workers=1, in_memory=True, lr_tta=True,
                       device=torch.device("cpu"), amp_dtype=None, progress=print,
                       decode="exact"):
    """Evaluate `model` under each protocol, write its files; {name: summary entry}."""
    entries = {}
    for protocol in protocols:
        logits = protocol_logits(model, val_dataset, protocol, batch_size=batch_size,
                                 num_workers=num_workers, in_memory=in_memory, lr_tta=lr_tta,
                                 device=device, amp_dtype=amp_dtype, decode=decode)
        if len(logits) != len(labels):
            raise EvaluateError(f"{val_dataset} gave {len(logits)} images, the run's "
                                f"val_labels.npy has {len(labels)}")
        entries[protocol.name] = write_protocol_files(Path(run_dir), protocol, logits, labels,
                                                      num_classes, lr_tta)
        if progress:
            progress(f"  protocol {protocol.name}: top1 {entries[protocol.name]['top1']:.4f}"
                     f"  ({len(labels)} images)")
    return entries


# ---------------------------------------------------------------------------------------
# A finished run's record -> model, val set
# ---------------------------------------------------------------------------------------

def load_run_model(run_dir, config, summary, device):
    """The run's architecture with weights.pt loaded, on `device`, in eval mode."""
    weights_path = run_dir / runs.WEIGHTS_FILE
    if not weights_path.is_file():
        raise EvaluateError(f"{run_dir}: no {runs.WEIGHTS_FILE} (nothing to evaluate)")
    model_config = config.get("model", {})
    model = create_model(model_config["arch"], int(summary["num_classes"]),
                         **model_options(config))
    try:
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    except Exception as error:
        raise EvaluateError(f"{weights_path} cannot be loaded into {model_config['arch']}: "
                            f"{str(error).splitlines()[0]}") from None
    return model.to(device, memory_format=torch.channels_last).eval()


def run_val_labels(run_dir, val_dataset):
    """The run's val_labels.npy, checked against the beton: the same images, same order."""
    labels_path = run_dir / runs.VAL_LABELS_FILE
    if not labels_path.is_file():
        raise EvaluateError(f"{run_dir}: no {runs.VAL_LABELS_FILE}")
    labels = metrics.read_labels_file(labels_path)
    try:
        beton_labels = read_labels(val_dataset)
    except BetonError as error:
        raise EvaluateError(f"{error} (pass --val-dataset if it moved)") from None
    if not np.array_equal(labels, beton_labels):
        raise EvaluateError(f"{val_dataset} does not hold the images {run_dir} was validated "
                            f"on (its labels differ from {runs.VAL_LABELS_FILE})")
    return labels


def read_finished_run(run_dir):
    """(config, summary) of a complete run, or EvaluateError saying why not."""
    if not run_dir.exists():
        raise EvaluateError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise EvaluateError(f"{run_dir} is a file, not a run directory")
    if not (run_dir / runs.CONFIG_FILE).is_file():
        held = sum(1 for child in run_dir.iterdir() if (child / runs.CONFIG_FILE).is_file())
        if held:
            raise EvaluateError(f"{run_dir} is not a run directory but holds {held}: name "
                                f"them (e.g. {run_dir}/*)")
        raise EvaluateError(f"{run_dir} is not a run directory (no {runs.CONFIG_FILE})")
    if not runs.is_complete(run_dir):
        raise EvaluateError(f"{run_dir} is not finished (no {runs.SUMMARY_FILE}): train it "
                            f"first")
    try:
        return runs.read_json(run_dir / runs.CONFIG_FILE), runs.read_json(
            run_dir / runs.SUMMARY_FILE)
    except (OSError, ValueError) as error:
        raise EvaluateError(f"{run_dir}: unreadable record: {error}") from None


def evaluate_run(run_dir, protocols, *, val_dataset=None, force=False, batch_size=None,
                 device=None):
    """Add `protocols` to one finished run. Returns the names evaluated (skips those the
    summary already has unless `force`)."""
    run_dir = Path(run_dir)
    config, summary = read_finished_run(run_dir)
    todo = [p for p in protocols if force or p.name not in summary.get("protocols", {})]
    if not todo:
        print(f"{run_dir.name}: already has {', '.join(p.name for p in protocols)}")
        return []
    device = device or env.default_device()
    validation = config.get("validation", {})
    val_dataset = val_dataset or config["data"]["val_dataset"]
    batch_size = batch_size or int(validation.get("batch_size", 512))
    check_protocol_memory(todo, batch_size)
    with runs.run_lock(run_dir):
        names = [logits_file(p.name) for p in todo] + [preds_file(p.name) for p in todo]
        atomic.remove_stale_temp_files(run_dir, names + [runs.SUMMARY_FILE])
        labels = run_val_labels(run_dir, val_dataset)
        model = load_run_model(run_dir, config, summary, device)
        amp_dtype = None
        if device.type == "cuda":
            amp_dtype = (torch.bfloat16 if config.get("training", {}).get("amp_dtype", "bf16")
                         == "bf16" else torch.float16)
        print(f"{run_dir.name}: evaluating {', '.join(p.name for p in todo)}", flush=True)
        entries = evaluate_protocols(
            model, run_dir, todo, val_dataset=val_dataset, labels=labels,
            num_classes=int(summary["num_classes"]),
            batch_size=batch_size,
            lr_tta=bool(validation.get("lr_tta", 1)), device=device, amp_dtype=amp_dtype,
            decode=config.get("augment", {}).get("decode", "exact"))
        # Read again under the lock: another evaluation may have added entries meanwhile.
        summary = runs.read_json(run_dir / runs.SUMMARY_FILE)
        summary["protocols"] = {**summary.get("protocols", {}), **entries}
        atomic.write_json(run_dir / runs.SUMMARY_FILE, summary)
    return [p.name for p in todo]


def check_protocol_memory(protocols, batch_size):
    """A protocol's image side times the batch must fit this machine's memory (the
    trainer's own bound, train/checks.py): `100000@1.0` would ask torch for terabytes and
    end in its allocator's traceback."""
    from ffcv_bias.train.checks import batch_memory_bytes, physical_memory_bytes
    available = physical_memory_bytes()
    for protocol in protocols:
        needed = batch_memory_bytes(batch_size, protocol.resolution)
        if available and needed > available:
            raise UserError(f"--protocols {protocol.name} with batch size {batch_size}: the "
                            f"loader's batches need about {needed / 1e9:,.0f} GB of memory, "
                            f"this machine has {available / 1e9:,.0f} GB; lower the "
                            f"resolution or --batch-size")


def build_parser():
    parser = OneLineArgumentParser(
        prog="python -m ffcv_bias.evaluate",
        description="Evaluate finished runs' weights.pt under extra test protocols "
                    "(no retraining); adds val_logits.<P>.npy, val_preds.<P>.npy and "
                    "summary.json's protocols entry.")
    parser.add_argument("run_dirs", nargs="+", type=path_arg, metavar="RUN_DIR")
    parser.add_argument("--protocols", required=True,
                        help="comma-separated RESOLUTION@CROP_RATIO, e.g. 40@1.0,32@0.875")
    parser.add_argument("--val-dataset", default=None, type=path_text,
                        help="the validation beton, if it is no longer at the config's path")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the run's validation.batch_size")
    parser.add_argument("--force", action="store_true",
                        help="re-evaluate protocols the summary already has")
    return parser


@main_guard(metrics.RecordFileError, failures=(runs.RunLockedError, atomic.NoRoomError),
            interrupted="interrupted; each run keeps the protocols its summary.json lists "
                        "(no file is half-written): rerun the same command to evaluate the "
                        "rest")
def main(argv=None):
    """Exit 0, 1 (a run could not be evaluated), 2 (bad --protocols) or 130 (Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        protocols = parse_protocols(args.protocols)
    except ProtocolError as error:
        raise UserError(f"--protocols: {error}") from None
    if not protocols:
        raise UserError("--protocols: no protocol given")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, not {args.batch_size}")
    if args.val_dataset is not None and Path(args.val_dataset).is_dir():
        raise UserError(f"--val-dataset {args.val_dataset} is a directory, not a beton file")
    for run_dir in args.run_dirs:
        evaluate_run(run_dir, protocols, val_dataset=args.val_dataset, force=args.force,
                     batch_size=args.batch_size)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
