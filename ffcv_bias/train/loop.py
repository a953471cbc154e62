"""The training loop: one run on one process (one rank), from its config to its record.

The shape is ffcv-imagenet's trainer (one class, one method per job), reading one frozen
run config (`Trainer(cfg)`, train/config.py `run_config`) instead of fastargs' global
state, with its gaps closed: weight decay is kept off every normalization layer whatever
its name, each run's data order and crops are seeded, the train loss is logged,
per-class validation accuracy is logged every epoch, and a run can be stopped at any
moment and resumed bit for bit (train/state.py). Processes, run directories and errors
are train/launch.py's; the record's files are docs/DESIGN.md's.
"""
import json
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ffcv_bias import evaluate, record
from ffcv_bias.common import atomic
from ffcv_bias.data.loaders import (create_train_loader, create_val_loader, normalize,
                                    read_labels)
from ffcv_bias.data.fingerprint import recorded_fingerprints
from ffcv_bias.record import metrics, runs
from ffcv_bias.record.faults import crash_point
from ffcv_bias.record.protocols import parse_protocols
from ffcv_bias.train import distributed
from ffcv_bias.train.batchnorm import batchnorm_layers, bn_mismatch, recompute_bn_statistics
from ffcv_bias.train.beton_watch import REMEDY, BetonChangedError, BetonWatch
from ffcv_bias.train.config import (bn_weight_decay, config_dict, read_class_min_scale,
                                    read_keep_indices, read_sidecar, wd_exempt)
from ffcv_bias.train.fastargs_strict import ConfigError
from ffcv_bias.train.models import create_model, eval_logits, weight_decay_groups
from ffcv_bias.train.optimizer import build_optimizer
from ffcv_bias.train.schedules import LrSchedule, resolution_at_epoch
from ffcv_bias.train.step_checks import StepChecks
from ffcv_bias.train.state import (CHECKPOINT_FORMAT, Preempted,
                                   RunError, choose_loader_threads, choose_torch_threads,
                                   rank_seed, read_checkpoint, rng_state, set_determinism,
                                   set_rng_state, truncate_log)

# How often (in steps) the GPU is asked whether the loss is finite (train/step_checks.py).
# Each check waits for the GPU to catch up; on CPU it costs nothing. Whether a rank was told
# to stop is agreed on after every step, on the host.
CUDA_CHECK_EVERY_STEPS = 25
CPU_CHECK_EVERY_STEPS = 1
# The end-of-run BatchNorm check: training batches it evaluates, and the top-1 gap between
# recomputed and running statistics above which it warns (a healthy run: a few points).
BN_CHECK_BATCHES = 4
BN_MISMATCH_WARNING = 0.15


# ---------------------------------------------------------------------------------------
# Metrics (top-1 from the float32 predictions, top-5 and loss from the saved logits)
# ---------------------------------------------------------------------------------------

def accuracy_metrics(logits, labels, num_classes, predictions=None):
    """metrics.accuracy_summary (top1, per_class_acc, top5) and the cross-entropy of
    `logits`."""
    return {**metrics.accuracy_summary(logits, labels, num_classes, predictions),
            "loss": cross_entropy(logits, labels)}


def cross_entropy(logits, labels):
    scores = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return float(F.cross_entropy(scores, torch.from_numpy(np.asarray(labels, dtype=np.int64))))


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------

class Trainer:
    """One run on one process (one rank). Rank 0 writes the record; every rank trains."""

    def __init__(self, cfg, run_dir, info, stop):
        """`cfg`: the run's frozen config (train/config.py `run_config`)."""
        self.cfg, self.run_dir, self.info, self.stop = cfg, Path(run_dir), info, stop
        self.device = info.device
        self.run_id = runs.run_id(config_dict(cfg))
        # Before anything reads the betons: a change from now on fails the run (check_betons).
        self.beton_watch = BetonWatch(
            {"train_dataset": cfg.data.train_dataset, "val_dataset": cfg.data.val_dataset},
            self.run_id,
            recorded_fingerprints(runs.read_json_object(self.run_dir / runs.CONFIG_FILE)))
        self.sidecar = read_sidecar(cfg.data.train_dataset, "data.train_dataset")
        self.num_classes = int(self.sidecar["num_classes"])
        self.setup_process()
        self.train_loader = self.create_train_loader()
        self.val_loader = self.create_val_loader()
        self.val_labels = read_labels(cfg.data.val_dataset)
        self.model, self.scaler = self.create_model_and_scaler()
        self.nonfinite_streak = None  # fp16: non-finite losses in a row (StepChecks)
        self.optimizer, self.train_loss_fn = self.create_optimizer()
        self.lr_schedule = self.create_lr_schedule()
        self.start_epoch, self.train_seconds = self.resume_from_checkpoint()
        self.ddp_model = self.wrap_distributed()

    # -- setup -----------------------------------------------------------------------

    def setup_process(self):
        seed = self.cfg.training.seed
        deterministic = self.cfg.training.deterministic
        torch.set_num_threads(choose_torch_threads(self.info.local_world_size))
        self.loader_threads = choose_loader_threads(self.cfg.data.num_workers,
                                                    self.info.local_world_size)
        set_determinism(self.device, deterministic)
        np.random.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)  # the model's initialization: the same on every rank

    def create_train_loader(self):
        data, augment = self.cfg.data, self.cfg.augment
        indices = None
        if data.keep_indices:
            indices = read_keep_indices(data.keep_indices, int(self.sidecar["num_samples"]))
        class_bounds = None
        if augment.class_min_scale:
            class_bounds = read_class_min_scale(augment.class_min_scale, self.num_classes)
        return create_train_loader(
            data.train_dataset, batch_size=self.cfg.training.batch_size,
            resolution=self.resolution(0), seed=self.cfg.training.seed,
            min_scale=augment.min_scale, max_scale=augment.max_scale, flip=augment.flip,
            class_min_scale=class_bounds, num_workers=self.loader_threads,
            distributed=self.info.group_running, indices=indices, in_memory=data.in_memory,
            device=self.device, decode=augment.decode)

    def create_val_loader(self):
        validation = self.cfg.validation
        return create_val_loader(self.cfg.data.val_dataset, batch_size=validation.batch_size,
                                 resolution=validation.resolution,
                                 crop_ratio=validation.crop_ratio,
                                 num_workers=self.loader_threads,
                                 distributed=self.info.group_running,
                                 in_memory=self.cfg.data.in_memory, device=self.device,
                                 decode=self.cfg.augment.decode)

    def create_model_and_scaler(self):
        arch, amp_dtype = self.cfg.model.arch, self.cfg.training.amp_dtype
        try:
            model = create_model(arch, self.num_classes, dropout=self.cfg.model.dropout,
                                 use_blurpool=self.cfg.training.use_blurpool,
                                 drop_path=self.cfg.model.drop_path)
        except ValueError as error:
            raise ConfigError(f"model.arch={arch}: {error}") from None
        model = model.to(self.device, memory_format=torch.channels_last)
        self.amp_dtype = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
        scaler = None
        if self.amp_dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
        return model, scaler

    def create_optimizer(self):
        optimizer = self.cfg.training.optimizer
        weight_decay = self.cfg.training.weight_decay
        label_smoothing = self.cfg.training.label_smoothing
        nested = config_dict(self.cfg)  # the helpers that also read old config.json files
        groups = weight_decay_groups(self.model, weight_decay,
                                     bn_weight_decay=bn_weight_decay(nested),
                                     exempt=wd_exempt(nested))
        training = nested["training"]
        if self.scaler is not None:
            # fp16: only the fused kernel takes the GradScaler's inf check on the device;
            # the for-each one makes scaler.step ask the host at every step (a GPU sync).
            training = {**training, "fused_optimizer": 1}
        return (build_optimizer(optimizer, groups, training),
                torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing))

    def create_lr_schedule(self):
        # Each step's rate computed when asked: nothing of the run's length is built here.
        lr = self.cfg.lr
        return LrSchedule(lr.lr_schedule_type, lr=lr.lr, epochs=self.cfg.training.epochs,
                          iters_per_epoch=len(self.train_loader),
                          lr_peak_epoch=lr.lr_peak_epoch, step_ratio=lr.step_ratio,
                          step_length=lr.step_length, warmup_epochs=lr.warmup_epochs,
                          warmup_start_factor=lr.warmup_start_factor)

    def resolution(self, epoch):
        ramp = self.cfg.resolution
        return resolution_at_epoch(epoch, min_res=ramp.min_res, max_res=ramp.max_res,
                                   start_ramp=ramp.start_ramp, end_ramp=ramp.end_ramp)

    def wrap_distributed(self):
        """The module the training step calls: DDP around the model when a group runs,
        then torch.compile when training.compile=1 (DDP first, so that dynamo splits the
        graph at DDP's buckets). Validation and the record use self.model, uncompiled:
        the training shapes alone are compiled, one graph per resolution of the ramp."""
        compile = self.cfg.training.compile
        wrapped = self.model
        if self.info.group_running:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # The gradients are views into DDP's all-reduce buckets; train_step keeps them
            # (zero_grad(set_to_none=False)) so that no step reallocates and copies them.
            wrapped = torch.nn.parallel.DistributedDataParallel(
                wrapped, device_ids=device_ids, gradient_as_bucket_view=True)
        if compile:
            wrapped = compile_for_resolutions(wrapped, self.training_resolutions())
        return wrapped

    def training_resolutions(self):
        epochs = self.cfg.training.epochs
        return sorted({self.resolution(epoch) for epoch in range(epochs)})

    # -- training --------------------------------------------------------------------

    def fit(self):
        """Train the remaining epochs, then write the record. Returns the summary.

        A failure while a beton changed under the run (a loader reading the old tables
        from a new file can fail in any way) is reported as that change."""
        try:
            return self.train_and_record()
        except (BetonChangedError, Preempted):
            raise
        except Exception as error:
            message = self.beton_watch.change()
            if message:
                raise BetonChangedError(message) from error
            raise

    def train_and_record(self):
        epochs = self.cfg.training.epochs
        checkpoint_every = self.cfg.training.checkpoint_every
        log_level = self.cfg.logging.log_level
        final_logits, validated_last_epoch = None, False
        for epoch in range(self.start_epoch, epochs):
            train_stats = self.train_epoch(epoch)
            last_epoch = epoch == epochs - 1
            if last_epoch:
                self.recompute_batchnorm()
            logits = self.validate() if (log_level > 0 or last_epoch) else None
            self.check_betons()  # before the epoch is logged or checkpointed
            self.log(epoch, train_stats, logits)
            # Before the checkpoint: a run resumed after epoch k has its weights_epoch<k>.pt.
            self.keep_epoch_weights(epoch + 1)
            stop_now = self.stop_requested()
            if last_epoch or stop_now or (epoch + 1) % checkpoint_every == 0:
                self.save_checkpoint(epoch + 1)
            if stop_now:
                raise Preempted()
            if last_epoch:
                final_logits, validated_last_epoch = logits, True
        if not validated_last_epoch:  # resumed after the last epoch, before the record
            final_logits = self.validate()
        return self.write_record(final_logits, self.record_extras())

    def train_step(self, images, labels, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)  # a numpy float would not load with weights_only=True
        inputs = normalize(images, self.device, channels_last=True,
                           dtype=self.amp_dtype or torch.float32)
        targets = labels.to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype else nullcontext())
        with autocast:
            loss = self.train_loss_fn(self.ddp_model(inputs), targets)
        # Under DDP the gradients are bucket views: zeroing them in place keeps the views
        # (set_to_none would drop them, and every step would allocate new gradients and
        # copy them into the buckets). Alone, None is cheapest. Same values either way.
        self.optimizer.zero_grad(set_to_none=not self.info.group_running)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.clip_gradients()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.clip_gradients()
            self.optimizer.step()
        return loss.detach()

    def clip_gradients(self):
        """Scale the gradients down to a global L2 norm of training.grad_clip_norm.

        After backward, so DDP has already averaged them over the ranks: every rank clips
        the same gradients alike. With a GradScaler the gradients are first unscaled (the
        limit is on the true gradient); scaler.step then does not unscale them twice, and
        still skips the step if they hold inf/NaN."""
        max_norm = self.cfg.training.grad_clip_norm
        if max_norm <= 0:
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def train_epoch(self, epoch):
        epochs = self.cfg.training.epochs
        progress = self.cfg.logging.progress
        self.ddp_model.train()
        loader = self.train_loader
        loader.set_epoch(epoch)
        loader.set_resolution(self.resolution(epoch))
        steps = len(loader)
        first_iteration = epoch * steps
        checks = StepChecks(steps, device=self.device, info=self.info, stop=self.stop,
                            check_every=(CUDA_CHECK_EVERY_STEPS if self.device.type == "cuda"
                                         else CPU_CHECK_EVERY_STEPS),
                            scaled=self.scaler is not None, streak=self.nonfinite_streak)
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not (progress and self.info.is_main), dynamic_ncols=True)
        started = time.perf_counter()
        for step, (images, labels) in enumerate(bar):
            checks.record(step, self.train_step(images, labels,
                                                self.lr_schedule[first_iteration + step]))
            crash_point("train-step")
            checks.after_step(step, epoch)  # every rank stops (or fails) after the same step
            if checks.is_check_step(step) and not bar.disable:
                bar.set_postfix(loss=f"{float(checks.losses[step]):.3f}", refresh=False)
        bar.close()
        self.nonfinite_streak = checks.streak
        mean_loss, skipped = checks.mean_loss()
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        images = steps * self.cfg.training.batch_size * self.info.world_size
        stats = {"lr": float(self.lr_schedule[first_iteration + steps - 1]),
                 "train_loss": mean_loss, "epoch_seconds": seconds,
                 "images_per_second": images / seconds, "resolution": loader.resolution}
        if skipped is not None:
            # fp16: steps the GradScaler skipped for a non-finite loss (not in train_loss).
            stats["nonfinite_loss_steps"] = skipped
        if self.cfg.augment.decode == "fast":
            # Images so far that the fast decoder handed to the exact one, by reason (this
            # rank's loader); the log says whether 'fast' really decoded the fast way.
            stats["decode_fallbacks"] = loader.decode_fallbacks
            stats["fast_decode_active"] = loader.fast_decode_active
        return stats

    def check_betons(self):
        """Fail the run, on every rank alike, if a beton changed since it started
        (train/beton_watch.py): an epoch read from a changed file is never checkpointed."""
        message = self.beton_watch.change()
        if distributed.stop_agreed(message is not None, self.info) and message is None:
            message = (f"a beton changed while run {self.run_id} read it (seen by another "
                       f"rank): {REMEDY}")
        if message:
            raise BetonChangedError(message)

    def stop_requested(self):
        flag = torch.tensor([1 if self.stop.requested else 0], device=self.device)
        return bool(distributed.all_reduce(flag, self.info, op=torch.distributed.ReduceOp.MAX))

    # -- validation ------------------------------------------------------------------

    def validate(self):
        """Logits of every validation image, in the beton's order (float32 numpy on rank 0,
        None elsewhere). Each rank evaluates its share; rank 0 puts the rows in order."""
        lr_tta = self.cfg.validation.lr_tta
        # Each rank updated its BatchNorm statistics on its own last batch: evaluate every
        # share of the validation set with rank 0's, the ones weights.pt will hold.
        distributed.broadcast_buffers(self.model, self.info)
        self.model.eval()
        order = self.val_loader.sample_order()
        rows = []
        with torch.no_grad():
            for images, _ in self.val_loader:
                inputs = normalize(images, self.device, channels_last=True,
                                   dtype=self.amp_dtype or torch.float32)
                # The classifier head runs in float32 (see models.eval_logits).
                logits = eval_logits(self.model, inputs, self.amp_dtype)
                if lr_tta:
                    flipped = torch.flip(inputs, dims=[3])
                    logits = (logits + eval_logits(self.model, flipped, self.amp_dtype)) / 2
                rows.append(logits)  # a new tensor: the loader's image buffer is not kept
        local = torch.cat(rows)
        return distributed.gather_rows_by_index(local, order, len(self.val_labels), self.info)

    # -- BatchNorm statistics (ffcv_bias/train/batchnorm.py) -----------------------------------

    def forked_rng(self):
        """Dropout draws made here must not move the run's random streams."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda"
                                     else [])

    def autocast(self):
        return (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                else nullcontext())

    def training_inputs(self, epoch, max_batches):
        """Up to `max_batches` normalized training batches of `epoch` (seeded crops), with
        their labels; copies, since the loader reuses its buffers."""
        loader = self.train_loader
        loader.set_epoch(epoch)
        batches = []
        for images, labels in loader:
            batches.append((normalize(images, self.device, channels_last=True,
                                      dtype=self.amp_dtype or torch.float32), labels))
            if len(batches) >= max_batches:
                break
        return batches

    def recompute_batchnorm(self):
        """training.bn_recompute_batches > 0: exact BatchNorm statistics of the final
        weights, on the batches of one more (seeded) epoch: every rank recomputes on its
        own shard, then the statistics are all-reduced (batchnorm.recompute_bn_statistics),
        so every rank holds those of all the ranks' batches, which validation (after
        broadcasting rank 0's) and weights.pt use."""
        bn_recompute_batches = self.cfg.training.bn_recompute_batches
        epochs = self.cfg.training.epochs
        if bn_recompute_batches <= 0:
            return
        batches = self.training_inputs(epochs, bn_recompute_batches)
        reduce = ((lambda tensor: distributed.all_reduce(tensor, self.info))
                  if self.info.group_running else None)
        with self.forked_rng(), self.autocast():
            recompute_bn_statistics(self.model, (inputs for inputs, _ in batches),
                                    all_reduce=reduce)

    def check_batchnorm(self):
        """Top-1 on a few training batches with the running BatchNorm statistics and with
        recomputed ones (on a copy: the model is unchanged). A large gap means the
        evaluated network is not the trained one: say why and what to set."""
        epochs = self.cfg.training.epochs
        bn_recompute_batches = self.cfg.training.bn_recompute_batches
        if not self.info.is_main or not batchnorm_layers(self.model):
            return None
        batches = self.training_inputs(epochs, BN_CHECK_BATCHES)
        with self.forked_rng(), self.autocast():
            running, recomputed = bn_mismatch(self.model, batches)
        check = {"train_top1_running_stats": running, "train_top1_recomputed_stats": recomputed,
                 "n_images": int(sum(len(labels) for _, labels in batches))}
        if recomputed - running > BN_MISMATCH_WARNING and bn_recompute_batches == 0:
            steps = epochs * len(self.train_loader)
            check["warning"] = (
                f"BatchNorm running statistics do not match the final weights: top-1 on "
                f"{check['n_images']} training images {running:.1%} with them, "
                f"{recomputed:.1%} with statistics recomputed under the final weights. The "
                f"run made {steps} SGD steps ({epochs} epochs x {len(self.train_loader)}), "
                f"too few for BatchNorm's running averages to follow the weights (and for "
                f"much learning): train more steps (a smaller --training.batch_size, more "
                f"epochs or images) and/or set --training.bn_recompute_batches=20")
            print(f"warning: {check['warning']}", file=sys.stderr, flush=True)
        return check

    def record_extras(self):
        """summary.json entries beyond the main metrics: the BatchNorm check and the extra
        test protocols."""
        extras = {"bn_check": self.check_batchnorm()}
        extras["protocols"] = self.evaluate_extra_protocols()
        return {key: value for key, value in extras.items() if value}

    def evaluate_extra_protocols(self):
        """validation.protocols on the final model (rank 0): their files, and the summary's
        `protocols` entry (ffcv_bias/evaluate.py; the same as evaluating weights.pt later)."""
        validation, data = self.cfg.validation, self.cfg.data
        if not validation.protocols or not self.info.is_main:
            return None
        return evaluate.evaluate_protocols(
            self.model, self.run_dir, parse_protocols(validation.protocols),
            val_dataset=data.val_dataset, labels=self.val_labels, num_classes=self.num_classes,
            batch_size=validation.batch_size, num_workers=data.num_workers,
            in_memory=data.in_memory, lr_tta=validation.lr_tta, device=self.device,
            amp_dtype=self.amp_dtype, decode=self.cfg.augment.decode)

    # -- the record ------------------------------------------------------------------

    def log(self, epoch, train_stats, logits):
        if not self.info.is_main:
            return
        entry = {"epoch": epoch, **train_stats, "val_top1": None, "val_top5": None,
                 "val_loss": None, "per_class_acc": None}
        if logits is not None:
            # As write_record computes them: predictions on float32, the rest on float16.
            epoch_metrics = accuracy_metrics(logits.astype(np.float16), self.val_labels,
                                             self.num_classes,
                                             metrics.predictions_from_logits(logits))
            entry.update(val_top1=epoch_metrics["top1"], val_top5=epoch_metrics["top5"],
                         val_loss=epoch_metrics["loss"],
                         per_class_acc=epoch_metrics["per_class_acc"])
        # Rewritten whole through a temporary file rather than appended: a kill mid-write
        # cannot leave half a line for a reader (a few kB per epoch: no cost worth saving).
        log_path = self.run_dir / runs.LOG_FILE
        previous = log_path.read_text() if log_path.is_file() else ""
        atomic.write_text(log_path, previous + json.dumps(entry) + "\n")
        crash_point("epoch-logged")
        top1 = "-" if entry["val_top1"] is None else f"{entry['val_top1']:.4f}"
        print(f"epoch {epoch + 1}/{self.cfg.training.epochs}  lr {entry['lr']:.4g}  "
              f"train_loss {entry['train_loss']:.4f}  val_top1 {top1}  "
              f"{entry['epoch_seconds']:.1f} s  {entry['images_per_second']:.0f} img/s",
              flush=True)

    def keep_epoch_weights(self, epochs_done):
        """weights_epoch<k>.pt after epoch k when training.save_weights_at lists k (the
        data-diet scores' early epoch of the normal schedule). The weights are only read,
        so the run goes on exactly as without it."""
        save_weights_at = self.cfg.training.save_weights_at
        if epochs_done not in save_weights_at or not self.info.is_main:
            return
        weights = {name: tensor.detach().cpu().contiguous()
                   for name, tensor in self.model.state_dict().items()}
        atomic.torch_save(self.run_dir / runs.epoch_weights_file(epochs_done), weights)

    def save_checkpoint(self, epochs_done):
        """Everything needed to continue bit for bit after `epochs_done` epochs.

        Every rank waits at a barrier until rank 0 has written the file: a preempted rank
        that exited at once would make the spawn join (or torchrun) kill rank 0 mid-write,
        and the epoch would be lost."""
        rng_states = distributed.all_gather_objects(rng_state(self.device), self.info)
        if self.info.is_main:
            atomic.torch_save(self.run_dir / runs.CHECKPOINT_FILE, {
                "format": CHECKPOINT_FORMAT, "run_id": self.run_id, "epoch": epochs_done,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_states, "train_seconds": self.train_seconds,
            })
        distributed.barrier(self.info)

    def resume_from_checkpoint(self):
        """(first epoch to train, training seconds so far), loading checkpoint.pt if any."""
        seed = self.cfg.training.seed
        restart = self.cfg.training.restart
        path = self.run_dir / runs.CHECKPOINT_FILE
        state = None
        if path.is_file():
            state = read_checkpoint(path, restart_allowed=bool(restart),
                                    move_aside=self.info.is_main)
        if state is None:
            if self.info.is_main:
                # A run killed after logging its first epoch, before checkpointing it,
                # restarts from scratch: that line is redone too.
                truncate_log(self.run_dir / runs.LOG_FILE, 0)
            torch.manual_seed(rank_seed(seed, self.info.rank))  # dropout streams per rank
            return 0, 0.0
        if state.get("run_id") != self.run_id:
            raise RunError(f"{path} belongs to run {state.get('run_id')}, not {self.run_id}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) != self.info.world_size:
            raise RunError(f"{path} was written by {len(state['rng'])} processes, "
                           f"this run has {self.info.world_size}")
        set_rng_state(state["rng"][self.info.rank], self.device)
        if self.info.is_main:
            truncate_log(self.run_dir / runs.LOG_FILE, state["epoch"])
            print(f"resuming {self.run_id} after epoch {state['epoch']}", flush=True)
        return state["epoch"], float(state["train_seconds"])

    def write_record(self, logits, extras):
        """weights, logits, predictions and labels, then summary.json last (its presence =
        complete). top1 / per_class_acc come from val_preds.npy (the float32 argmax).
        `extras`: further summary entries (record_extras: bn_check, protocols)."""
        epochs = self.cfg.training.epochs
        val_dataset = self.cfg.data.val_dataset
        if not self.info.is_main:
            return None
        # Everything the record holds is read by now (the extras too): the last look.
        self.beton_watch.check()
        final = record.write_final(self.run_dir, self.model.state_dict(), logits,
                                   self.val_labels, self.num_classes)
        summary = {"run_id": self.run_id, "top1": final.accuracy["top1"],
                   "top5": final.accuracy["top5"],
                   "per_class_acc": final.accuracy["per_class_acc"],
                   "n_val": int(len(final.logits)),
                   "epochs": epochs, "train_seconds": round(self.train_seconds, 3),
                   "num_classes": self.num_classes, "val_dataset": val_dataset,
                   "val_loss": cross_entropy(final.logits, final.labels),
                   "classes": self.sidecar.get("classes")}
        summary.update(extras or {})
        record.write_summary(self.run_dir, summary)
        return summary



def compile_for_resolutions(module, resolutions, backend="inductor"):
    """torch.compile(module) with room for one graph per training resolution.

    Each progressive-resizing resolution is a new input shape: with dynamic=False dynamo
    compiles one static graph per resolution (fast kernels, no shape guards in them) and
    must not hit its recompile limit (8 by default) half-way through the ramp, where it
    would fall back to eager silently. `backend` other than inductor: for checks of the
    compiled path on a CPU (bench/gpu_check.py --tiny: aot_eager traces the same graphs in
    seconds, where inductor's C++ code generation takes minutes)."""
    import torch._dynamo.config as dynamo_config
    needed = len(resolutions) + 2  # + margin for a guard failure (e.g. train/eval mode)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < needed:
            setattr(dynamo_config, name, needed)
    return torch.compile(module, dynamic=False, backend=backend)
