"""Transfer with a frozen backbone: does the source's crop bias carry to a target task?

Balestriero, Bottou & LeCun 2022, Sec. 2.2 and Fig. 4: ResNet-50s pre-trained on ImageNet
with different crop lower bounds tau, each transferred to iNaturalist by training only a
linear classifier on frozen features; the target's per-class accuracy depends on tau.

    python -m ffcv_bias.studies.transfer --source-runs runs/rn50_crop \\
        --train data/inat_train.beton --val data/inat_val.beton --out runs/transfer_inat
    python -m ffcv_bias.analysis runs/transfer_inat --vary augment.min_scale --out report/

--source-runs takes run directories and/or folders holding many (a sweep folder); every
complete run with weights.pt is probed, others are listed and skipped. A probe whose
record is complete is not redone (relaunching resumes a stopped transfer).

For each source run:
1. the backbone: the source model (config.json: arch, dropout, BlurPool; weights.pt) in
   eval mode; its features are `model.forward_features(x)`, the pooled penultimate
   features that every architecture here feeds its final Linear (ResNets: after the global
   pool; DenseNet: after the last norm and pool; ConvNeXt: after the pooled LayerNorm;
   ViT: the class token after the final norm);
2. features of every target image, once, without augmentation: the image's centre crop of
   crop_ratio x its short side resized to --resolution (default: the source's
   validation.resolution and validation.crop_ratio), in beton order;
3. the probe (deterministic recipe): features standardized per dimension with the target
   train mean and std, then scaled by 1/sqrt(D) (mean squared norm 1, so one learning rate
   suits every width); a Linear layer initialized to zero; cross-entropy; SGD with
   Nesterov momentum 0.9, batch --batch-size (256), --epochs (30) epochs of a seeded
   shuffle (seed = the source's training.seed), learning rate --lr (1.0) on a per-step
   cosine schedule down to 0, L2 penalty --weight-decay (1e-5) on the weights;
4. the record, in OUT/<probe run_id>/ (a run record the analysis command reads):
     config.json    the source's config with data.train_dataset / data.val_dataset set to
                    the target betons and a `probe` section (the recipe above); also
                    "source_run" (the source's run_id) and "meta" (source_run_dir, git,
                    git_dirty, versions, host, start time: a trained run's provenance).
                    The run_id is runs.run_id(config): the
                    source's result-changing values (augment.min_scale, training.seed ...),
                    the target's file names and the probe recipe.
     log.jsonl      one line per probe epoch: epoch, lr, train_loss.
     weights.pt     the whole model with the probe as its classifier (the standardization
                    folded into it): create_model(arch, target classes) loads it, so the
                    preservation study runs on a probe too.
     val_logits.npy float16 [N_val, C_target]; val_preds.npy (their float32 argmax,
                    the source of top1 / per_class_acc); val_labels.npy int64 [N_val].
     summary.json   run_id, top1, top5, per_class_acc, n_val, epochs (probe epochs),
                    train_seconds (probe fit), feature_seconds, num_classes, val_dataset,
                    train_top1, source_run, source_top1: written last, atomically.

Runs on CUDA when available (channels_last, bf16 autocast for the backbone; the probe in
float32), otherwise on CPU. On CPU the whole study is deterministic.
"""
import argparse
import copy
import math
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ffcv_bias import record
from ffcv_bias.record import runs
from ffcv_bias.common import env
from ffcv_bias.common.errors import EXIT_OK, main_guard
from ffcv_bias.data.loaders import (DEFAULT_CROP_RATIO, BetonError, create_val_loader, normalize,
                                    read_labels)
from ffcv_bias.studies.trained import (StudyError, build_model, classifier_layer,
                                       default_workers, describe_run, inference_setup,
                                       model_from_info, pick_device, read_class_names)

PROBE_RECIPE = "linear probe on frozen forward_features; standardized / sqrt(D); zero init; " \
               "SGD nesterov 0.9; per-step cosine lr to 0; cross-entropy; L2 on weights"
DEFAULT_EPOCHS = 30
DEFAULT_LR = 1.0
DEFAULT_WEIGHT_DECAY = 1e-5
DEFAULT_BATCH_SIZE = 256


# ----------------------------------------------------------------------------------------
# Source runs
# ----------------------------------------------------------------------------------------

def find_source_runs(paths):
    """(usable run dirs, [(dir, reason) skipped]) under `paths` (run dirs or folders)."""
    from ffcv_bias.analysis.records import AnalysisError, find_run_dirs
    try:
        run_dirs = find_run_dirs(paths)
    except AnalysisError as error:
        raise StudyError(str(error)) from None
    usable, skipped = [], []
    for run_dir in run_dirs:
        if not runs.is_complete(run_dir):
            skipped.append((run_dir, f"not complete ({runs.run_state(run_dir)})"))
        elif not (run_dir / runs.WEIGHTS_FILE).is_file():
            skipped.append((run_dir, f"no {runs.WEIGHTS_FILE}"))
        elif "probe" in runs.read_json(run_dir / runs.CONFIG_FILE):
            skipped.append((run_dir, "a probe record, not a source run"))
        else:
            usable.append(run_dir)
    if not usable:
        raise StudyError("no complete source run with weights.pt under "
                         + ", ".join(str(p) for p in paths))
    return usable, skipped


def load_source(run_dir):
    """(backbone model on CPU in eval mode, run info) of one source run."""
    info = describe_run(run_dir)
    if not info["num_classes"]:
        raise StudyError(f"{run_dir}/summary.json has no num_classes")
    return model_from_info(info), info


# ----------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------

class FeatureLoaders:
    """The target sets' validation loaders, one per (beton, resolution, crop ratio), kept
    for every source run: a new ffcv Loader compiles its pipeline again (~1-2 s each, more
    than the features of a small target set take); a validation loader reads the same
    images in the same order on every pass."""

    def __init__(self, batch_size, num_workers):
        self.batch_size, self.num_workers = batch_size, num_workers
        self._loaders = {}

    def get(self, beton, resolution, crop_ratio):
        key = (str(beton), resolution, crop_ratio)
        if key not in self._loaders:
            self._loaders[key] = create_val_loader(
                beton, batch_size=self.batch_size, resolution=resolution,
                crop_ratio=crop_ratio, num_workers=self.num_workers)
        return self._loaders[key]


def extract_features(model, loader, *, device, autocast, desc):
    """float32 [N, D] penultimate features of every image `loader` reads, in its order."""
    rows = []
    with torch.inference_mode(), autocast():
        for images, _ in tqdm(loader, desc=desc, unit="batch", disable=None):
            inputs = normalize(images, device, channels_last=True)
            rows.append(model.forward_features(inputs).float())
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------
# The linear probe
# ----------------------------------------------------------------------------------------

def standardization(train_features):
    """(mean, scale): z = (x - mean) * scale, scale = 1 / (std * sqrt(D)); constant
    dimensions get scale 0 (they carry nothing)."""
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0, unbiased=False)
    dim = train_features.shape[1]
    scale = torch.where(std > 1e-12, 1.0 / (std.clamp_min(1e-12) * math.sqrt(dim)),
                        torch.zeros_like(std))
    return mean, scale


def cosine_lr(base_lr, step, total_steps):
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / total_steps))


def fit_linear_probe(train_features, train_labels, num_classes, *, epochs, lr, weight_decay,
                     batch_size, seed):
    """(weight [C, D], bias [C], mean, scale, epoch log) of the probe on standardized
    features; everything on the features' device, float32, deterministic given the seed."""
    device = train_features.device
    mean, scale = standardization(train_features)
    inputs = (train_features - mean) * scale
    labels = train_labels.to(device)
    probe = torch.nn.Linear(inputs.shape[1], num_classes).to(device)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.SGD([{"params": [probe.weight], "weight_decay": weight_decay},
                                 {"params": [probe.bias], "weight_decay": 0.0}],
                                lr=lr, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(int(seed))
    num_samples = len(inputs)
    steps_per_epoch = math.ceil(num_samples / batch_size)
    total_steps, step, log = epochs * steps_per_epoch, 0, []
    for epoch in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=None):
        order = torch.randperm(num_samples, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, num_samples, batch_size):
            batch = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total_steps)
            loss = F.cross_entropy(probe(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
            step += 1
        log.append({"epoch": epoch, "lr": cosine_lr(lr, step - 1, total_steps),
                    "train_loss": float(loss_sum) / num_samples})
        if not math.isfinite(log[-1]["train_loss"]):
            raise StudyError(f"the probe's loss is not finite at epoch {epoch} "
                             f"(lower --lr, now {lr})")
    return probe.weight.detach(), probe.bias.detach(), mean, scale, log


def fold_standardization(weight, bias, mean, scale):
    """The Linear on raw features equal to `weight`, `bias` on (x - mean) * scale."""
    folded_weight = weight * scale[None, :]
    folded_bias = bias - folded_weight @ mean
    return folded_weight, folded_bias


def linear_logits(features, weight, bias, argmax_only=False, rows_per_chunk=16384):
    """float32 logits [N, C] on the CPU (or their argmax), computed in row chunks: the
    full train logits of a 10,000-class target would not fit in GPU memory."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(features), rows_per_chunk):
            logits = features[start:start + rows_per_chunk] @ weight.T + bias
            parts.append((logits.argmax(dim=1) if argmax_only else logits).cpu())
    return torch.cat(parts).numpy()


def probe_model_state(backbone, info, num_classes, weight, bias):
    """state_dict of create_model(arch, num_classes) = the backbone + the probe."""
    classifier_name, _ = classifier_layer(backbone)
    state = {name: tensor.detach().cpu().clone() for name, tensor in backbone.state_dict().items()
             if not name.startswith(classifier_name + ".")}
    state[f"{classifier_name}.weight"] = weight.detach().float().cpu()
    state[f"{classifier_name}.bias"] = bias.detach().float().cpu()
    # Check it loads into the target-sized model (raises a one-line error if not).
    build_model(info["arch"], num_classes, state, dropout=info["dropout"],
                drop_path=info["drop_path"], use_blurpool=info["use_blurpool"],
                source="the probe's weights")
    return state


# ----------------------------------------------------------------------------------------
# Metrics and the record
# ----------------------------------------------------------------------------------------

def probe_config(source_config, source_id, target_train, target_val, probe):
    config = copy.deepcopy({k: v for k, v in source_config.items() if k != "meta"})
    config.setdefault("data", {})
    config["data"]["train_dataset"] = str(Path(target_train).resolve())
    config["data"]["val_dataset"] = str(Path(target_val).resolve())
    config["probe"] = probe
    config["source_run"] = source_id
    return config


def provenance(source_dir, command):
    """The probe's `meta` beyond its run_id: the same provenance as a trained run's."""
    commit, dirty = env.git_commit()
    return {"git": commit, "git_dirty": dirty, "versions": env.package_versions(),
            "host": socket.gethostname(), "source_run_dir": str(source_dir),
            "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command}


def write_probe_record(run_dir, config, log, state, val_logits, val_labels, summary_extra):
    """Everything but the summary, then summary.json last (its presence = complete): the
    trainer's record writer, so a probe's record reads like a trained run's."""
    record.write_config(run_dir, config)
    record.write_log(run_dir, log)
    num_classes = val_logits.shape[1]
    final = record.write_final(run_dir, state, val_logits, val_labels.astype(np.int64),
                               num_classes)
    summary = {"run_id": config["meta"]["run_id"], **final.accuracy,
               "n_val": int(len(final.logits)), "num_classes": num_classes,
               "val_dataset": config["data"]["val_dataset"], **summary_extra}
    record.write_summary(run_dir, summary)
    return summary


# ----------------------------------------------------------------------------------------
# One source run
# ----------------------------------------------------------------------------------------

def probe_recipe(epochs, lr, weight_decay, batch_size, resolution, crop_ratio):
    """The `probe` section of a probe's config (part of its run_id)."""
    return {"recipe": PROBE_RECIPE, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
            "batch_size": batch_size, "momentum": 0.9, "nesterov": True, "schedule": "cosine",
            "resolution": resolution, "crop_ratio": crop_ratio, "features": "forward_features"}


def train_probe(backbone, info, probe, *, target_train, target_val, num_classes, loaders,
                device):
    """Features of both target sets (`loaders`: a FeatureLoaders), the probe fitted on the
    train ones. Returns the epoch log, the val logits [N_val, C], the whole model's
    state_dict and summary extras."""
    model, autocast = inference_setup(backbone, device)
    started = time.time()
    features = {split: extract_features(model,
                                        loaders.get(path, probe["resolution"],
                                                    probe["crop_ratio"]),
                                        device=device, autocast=autocast,
                                        desc=f"{info['run_id']}: {split} features")
                for split, path in (("train", target_train), ("val", target_val))}
    feature_seconds = time.time() - started
    train_labels = torch.from_numpy(read_labels(target_train))
    seed = int(info["config"].get("training", {}).get("seed", 0))
    started = time.time()
    weight, bias, mean, scale, log = fit_linear_probe(
        features["train"], train_labels, num_classes, epochs=probe["epochs"], lr=probe["lr"],
        weight_decay=probe["weight_decay"], batch_size=probe["batch_size"], seed=seed)
    train_seconds = time.time() - started
    weight, bias = fold_standardization(weight, bias, mean, scale)
    val_logits = linear_logits(features["val"], weight, bias)
    train_predictions = linear_logits(features["train"], weight, bias, argmax_only=True)
    train_top1 = float((torch.from_numpy(train_predictions) == train_labels).float().mean())
    state = probe_model_state(backbone.cpu(), info, num_classes, weight, bias)
    extras = {"epochs": probe["epochs"], "train_seconds": round(train_seconds, 3),
              "feature_seconds": round(feature_seconds, 3), "train_top1": train_top1}
    return log, val_logits, state, extras


def probe_one_source(source_dir, *, target_train, target_val, out_dir, num_classes,
                     resolution, crop_ratio, epochs, lr, weight_decay, batch_size,
                     loaders, device, command):
    """Probe one source run; returns (probe run dir, summary or None when it was done)."""
    backbone, info = load_source(source_dir)
    probe = probe_recipe(epochs, lr, weight_decay, batch_size,
                         resolution=int(resolution or info["resolution"] or 224),
                         crop_ratio=float(crop_ratio or info["crop_ratio"] or DEFAULT_CROP_RATIO))
    config = probe_config(info["config"], info["run_id"], target_train, target_val, probe)
    probe_id = runs.run_id(config)
    run_dir = Path(out_dir) / probe_id
    if runs.is_complete(run_dir):
        print(f"probe {probe_id} of {info['run_id']} is already complete: {run_dir}")
        return run_dir, None
    with runs.run_lock(run_dir):
        config["meta"] = {"run_id": probe_id, **provenance(source_dir, command)}
        log, val_logits, state, extras = train_probe(
            backbone, info, probe, target_train=target_train, target_val=target_val,
            num_classes=num_classes, loaders=loaders, device=device)
        source_summary = runs.read_json(Path(source_dir) / runs.SUMMARY_FILE)
        extras.update(source_run=info["run_id"], source_top1=source_summary.get("top1"))
        summary = write_probe_record(run_dir, config, log, state, val_logits,
                                     read_labels(target_val), extras)
    return run_dir, summary


def run_transfer(source_paths, *, target_train, target_val, out_dir, resolution=None,
                 crop_ratio=None, epochs=DEFAULT_EPOCHS, lr=DEFAULT_LR,
                 weight_decay=DEFAULT_WEIGHT_DECAY, batch_size=DEFAULT_BATCH_SIZE,
                 feature_batch_size=256, num_workers=2, device=None, command=None):
    """Probe every source run under `source_paths`; returns [(probe run dir, summary)]."""
    if epochs < 1 or lr <= 0 or weight_decay < 0 or batch_size < 1:
        raise StudyError("need --epochs >= 1, --lr > 0, --weight-decay >= 0, --batch-size >= 1")
    class_names = read_class_names(target_train)
    if read_class_names(target_val) != class_names:
        raise StudyError(f"{target_train} and {target_val} list different classes")
    sources, skipped = find_source_runs(source_paths)
    for run_dir, reason in skipped:
        print(f"skipping {run_dir}: {reason}")
    device = device or pick_device()
    loaders = FeatureLoaders(feature_batch_size, num_workers)
    results = []
    for source_dir in sources:
        try:
            results.append(probe_one_source(
                source_dir, target_train=target_train, target_val=target_val, out_dir=out_dir,
                num_classes=len(class_names), resolution=resolution, crop_ratio=crop_ratio,
                epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                loaders=loaders, device=device, command=command))
        except runs.RunLockedError as error:  # another process probes it now
            print(f"skipping {source_dir}: {error}")
    return results


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ffcv_bias.studies.transfer",
        description="Linear probes on frozen source backbones, written as run records.")
    parser.add_argument("--source-runs", nargs="+", required=True, type=Path, metavar="DIR",
                        help="source run directories and/or folders holding them")
    parser.add_argument("--train", required=True, type=Path, help="target train beton")
    parser.add_argument("--val", required=True, type=Path, help="target val beton")
    parser.add_argument("--out", required=True, type=Path, help="probe records go here")
    parser.add_argument("--resolution", type=int,
                        help="image side (default: each source's validation.resolution)")
    parser.add_argument("--crop-ratio", type=float,
                        help="centre crop / short side (default: the source's "
                             "validation.crop_ratio)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="probe batch size")
    parser.add_argument("--feature-batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser


@main_guard(BetonError)
def main(argv=None):
    args = build_parser().parse_args(argv)
    command = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    results = run_transfer(
        args.source_runs, target_train=args.train, target_val=args.val, out_dir=args.out,
        resolution=args.resolution, crop_ratio=args.crop_ratio, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
        feature_batch_size=args.feature_batch_size, num_workers=args.workers,
        device=pick_device(args.device), command=command)
    for run_dir, summary in results:
        if summary is not None:
            print(f"probe {summary['run_id']} (source {summary['source_run']}): "
                  f"top1 {summary['top1']:.4f}  train top1 {summary['train_top1']:.4f}  "
                  f"{run_dir}")
    print(f"{len(results)} probe record(s) in {args.out}; next: python -m ffcv_bias.analysis "
          f"{args.out} --vary augment.min_scale --out REPORT_DIR")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
