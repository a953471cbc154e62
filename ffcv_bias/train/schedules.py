"""Per-iteration learning rates and per-epoch resolutions, precomputed (as in DINO).

The 'cyclic' and 'step' schedules reproduce ffcv-imagenet exactly: a value per epoch
boundary, linearly interpolated over the iterations of each epoch. So in the step
schedule the learning rate slides down to the next level during the epoch *before* a
step, and the last epoch slides down to 0. 'cosine' is evaluated at the fractional epoch
of every iteration.

Warm-up in front (`warmup_epochs` W > 0, for 'cosine' and 'step'; torchvision's
`--lr-warmup-epochs` with SequentialLR, and the ConvNeXt / DeiT recipes): for the first W
epochs the rate rises linearly from `warmup_start_factor * lr` to lr (evaluated at the
fractional epoch of every iteration); from epoch W on, the base schedule runs as if the
run were `epochs - W` epochs long and had started at W. So the cosine decays over the
epochs after the warm-up, and the step schedule counts its steps from the warm-up's end.
With W = 0 the arrays are exactly those without warm-up. ('cosine' with lr_peak_epoch=W
is the same as warmup_epochs=W, warmup_start_factor=1e-4, lr_peak_epoch=0.)
"""
import math

import numpy as np

# ffcv-imagenet's cyclic schedule starts at this fraction of the peak, not at 0.
CYCLIC_START_FRACTION = 1e-4


def cyclic_lr_at_epoch(epoch, *, lr, epochs, lr_peak_epoch):
    """Triangle: lr * 1e-4 at epoch 0, lr at lr_peak_epoch, 0 at `epochs`."""
    if lr_peak_epoch <= 0:  # no warm-up: np.interp would be ambiguous at x = 0
        return float(np.interp(epoch, [0, epochs], [lr, 0.0]))
    return float(np.interp(epoch, [0, lr_peak_epoch, epochs],
                           [CYCLIC_START_FRACTION * lr, lr, 0.0]))


def step_lr_at_epoch(epoch, *, lr, epochs, step_ratio, step_length):
    """lr * step_ratio ** (epoch // step_length), and 0 once training is over."""
    if epoch >= epochs:
        return 0.0
    return lr * step_ratio ** (epoch // step_length)


def cosine_lr_at(epoch, *, lr, epochs, lr_peak_epoch):
    """Linear warm-up (from lr * 1e-4) until lr_peak_epoch, then half a cosine to 0."""
    if epoch < lr_peak_epoch:
        start = CYCLIC_START_FRACTION * lr
        return start + (lr - start) * epoch / lr_peak_epoch
    progress = (epoch - lr_peak_epoch) / (epochs - lr_peak_epoch)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_then_lr_per_iteration(schedule_type, *, lr, epochs, iters_per_epoch,
                                 warmup_epochs, warmup_start_factor, step_ratio, step_length):
    """Linear warm-up over warmup_epochs, then the base schedule over the epochs after it."""
    if schedule_type not in ("cosine", "step"):
        raise ValueError(f"warm-up is for the cosine and step schedules, not {schedule_type!r}")
    if not 0 < warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be in (0, epochs={epochs}), got {warmup_epochs}")
    epoch_of_iter = np.arange(epochs * iters_per_epoch) / iters_per_epoch
    warming = epoch_of_iter < warmup_epochs
    factors = warmup_start_factor + (1 - warmup_start_factor) * (
        epoch_of_iter[warming] / warmup_epochs)
    if schedule_type == "step":
        # The step schedule is defined on whole epochs (it slides to 0 over the last one).
        if not float(warmup_epochs).is_integer():
            raise ValueError(f"warm-up before the step schedule must last whole epochs, "
                             f"got {warmup_epochs}")
        after = lr_per_iteration("step", lr=lr, epochs=epochs - int(warmup_epochs),
                                 iters_per_epoch=iters_per_epoch, step_ratio=step_ratio,
                                 step_length=step_length)
    else:
        after = np.array([cosine_lr_at(epoch - warmup_epochs, lr=lr,
                                       epochs=epochs - warmup_epochs, lr_peak_epoch=0)
                          for epoch in epoch_of_iter[~warming]])
    return np.concatenate([lr * factors, after])


def lr_per_iteration(schedule_type, *, lr, epochs, iters_per_epoch, lr_peak_epoch=2.0,
                     step_ratio=0.1, step_length=30, warmup_epochs=0.0,
                     warmup_start_factor=0.0):
    """The learning rate of every iteration of the run: float64 [epochs * iters_per_epoch]."""
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    if warmup_epochs > 0:
        return warmup_then_lr_per_iteration(
            schedule_type, lr=lr, epochs=epochs, iters_per_epoch=iters_per_epoch,
            warmup_epochs=warmup_epochs, warmup_start_factor=warmup_start_factor,
            step_ratio=step_ratio, step_length=step_length)
    within_epoch = np.arange(iters_per_epoch) / iters_per_epoch
    if schedule_type == "cosine":
        epoch_of_iter = (np.arange(epochs)[:, None] + within_epoch[None, :]).ravel()
        return np.array([cosine_lr_at(t, lr=lr, epochs=epochs, lr_peak_epoch=lr_peak_epoch)
                         for t in epoch_of_iter])
    if schedule_type == "cyclic":
        boundaries = [cyclic_lr_at_epoch(e, lr=lr, epochs=epochs, lr_peak_epoch=lr_peak_epoch)
                      for e in range(epochs + 1)]
    elif schedule_type == "step":
        boundaries = [step_lr_at_epoch(e, lr=lr, epochs=epochs, step_ratio=step_ratio,
                                       step_length=step_length) for e in range(epochs + 1)]
    else:
        raise ValueError(f"unknown lr schedule {schedule_type!r}")
    start, end = np.array(boundaries[:-1]), np.array(boundaries[1:])
    return (start[:, None] + (end - start)[:, None] * within_epoch[None, :]).ravel()


def resolution_at_epoch(epoch, *, min_res, max_res, start_ramp, end_ramp):
    """ffcv-imagenet's progressive resizing: min_res until start_ramp, max_res from
    end_ramp, linear in between rounded to a multiple of 32."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interpolated = np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interpolated / 32)) * 32


def resolution_per_epoch(epochs, **resolution):
    """[resolution of epoch 0, ..., resolution of epoch epochs-1]."""
    return [resolution_at_epoch(epoch, **resolution) for epoch in range(epochs)]
