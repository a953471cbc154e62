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

The trainer holds an `LrSchedule`: the same numbers, each computed when its step asks for
it (bit for bit those of `lr_per_iteration`'s array), so that nothing proportional to the
run's length (epochs x iterations) is built before the first step.
"""
import math
import operator

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


def check_schedule(schedule_type, *, epochs, iters_per_epoch, warmup_epochs):
    """The ValueErrors of a schedule that cannot be built (the config checks come first)."""
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    if schedule_type not in ("cyclic", "step", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule_type!r}")
    if warmup_epochs > 0:
        if schedule_type not in ("cosine", "step"):
            raise ValueError(f"warm-up is for the cosine and step schedules, not "
                             f"{schedule_type!r}")
        if not 0 < warmup_epochs < epochs:
            raise ValueError(f"warmup_epochs must be in (0, epochs={epochs}), got "
                             f"{warmup_epochs}")
        if schedule_type == "step" and not float(warmup_epochs).is_integer():
            # The step schedule is defined on whole epochs (it slides to 0 over the last one).
            raise ValueError(f"warm-up before the step schedule must last whole epochs, "
                             f"got {warmup_epochs}")


class LrSchedule:
    """The learning rate of every iteration of the run, computed on demand.

    `schedule[i]` (a numpy float64), `schedule[a:b]` (an array), `len(schedule)` =
    epochs * iters_per_epoch, and `np.asarray(schedule)` the whole array. Each value is
    computed with the same floating-point operations, in the same order, as the array the
    trainer used to precompute (kept as `lr_per_iteration`), so a run resumed across this
    change trains on the very same rates.
    """

    def __init__(self, schedule_type, *, lr, epochs, iters_per_epoch, lr_peak_epoch=2.0,
                 step_ratio=0.1, step_length=30, warmup_epochs=0.0, warmup_start_factor=0.0):
        check_schedule(schedule_type, epochs=epochs, iters_per_epoch=iters_per_epoch,
                       warmup_epochs=warmup_epochs)
        self.schedule_type, self.lr, self.epochs = schedule_type, lr, epochs
        self.iters_per_epoch, self.lr_peak_epoch = iters_per_epoch, lr_peak_epoch
        self.step_ratio, self.step_length = step_ratio, step_length
        self.warmup_epochs, self.warmup_start_factor = warmup_epochs, warmup_start_factor
        self._boundaries = None  # (epoch, rate at its start, rate at its end): one epoch cached
        self._after_warmup = None
        if warmup_epochs > 0 and schedule_type == "step":
            # After the warm-up, the step schedule runs as a run of epochs - W epochs; its
            # iteration 0 is the first iteration whose epoch i / n is not below W.
            self._after_warmup = LrSchedule("step", lr=lr, epochs=epochs - int(warmup_epochs),
                                            iters_per_epoch=iters_per_epoch,
                                            step_ratio=step_ratio, step_length=step_length)
            self._warmup_iterations = self._first_iteration_at(warmup_epochs)

    def __len__(self):
        return self.epochs * self.iters_per_epoch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.array([self._at(i) for i in range(*index.indices(len(self)))],
                            dtype=np.float64)
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"iteration {index} outside the schedule's {len(self)}")
        return np.float64(self._at(index))

    def __array__(self, dtype=None, copy=None):
        values = np.fromiter((self._at(i) for i in range(len(self))), dtype=np.float64,
                             count=len(self))
        return values if dtype is None else values.astype(dtype)

    def _first_iteration_at(self, epoch):
        iteration = max(int(math.ceil(epoch * self.iters_per_epoch)), 0)
        while iteration > 0 and (iteration - 1) / self.iters_per_epoch >= epoch:
            iteration -= 1
        while iteration / self.iters_per_epoch < epoch:
            iteration += 1
        return iteration

    def _at(self, i):
        lr, n = self.lr, self.iters_per_epoch
        if self.warmup_epochs > 0:
            epoch = i / n
            if epoch < self.warmup_epochs:
                start = self.warmup_start_factor
                return lr * (start + (1 - start) * (epoch / self.warmup_epochs))
            if self._after_warmup is not None:
                return self._after_warmup._at(i - self._warmup_iterations)
            return cosine_lr_at(epoch - self.warmup_epochs, lr=lr,
                                epochs=self.epochs - self.warmup_epochs, lr_peak_epoch=0)
        epoch, step = divmod(i, n)
        within = step / n
        if self.schedule_type == "cosine":
            return cosine_lr_at(epoch + within, lr=lr, epochs=self.epochs,
                                lr_peak_epoch=self.lr_peak_epoch)
        if self._boundaries is None or self._boundaries[0] != epoch:
            self._boundaries = (epoch, self._boundary(epoch), self._boundary(epoch + 1))
        _, start, end = self._boundaries
        return start + (end - start) * within

    def _boundary(self, epoch):
        """The rate at an epoch boundary, which the cyclic and step schedules interpolate."""
        if self.schedule_type == "cyclic":
            return cyclic_lr_at_epoch(epoch, lr=self.lr, epochs=self.epochs,
                                      lr_peak_epoch=self.lr_peak_epoch)
        return step_lr_at_epoch(epoch, lr=self.lr, epochs=self.epochs,
                                step_ratio=self.step_ratio, step_length=self.step_length)


def lr_per_iteration(schedule_type, *, lr, epochs, iters_per_epoch, lr_peak_epoch=2.0,
                     step_ratio=0.1, step_length=30, warmup_epochs=0.0,
                     warmup_start_factor=0.0):
    """The learning rate of every iteration of the run: float64 [epochs * iters_per_epoch]
    (the whole LrSchedule as one array, for plots and tests)."""
    return np.asarray(LrSchedule(schedule_type, lr=lr, epochs=epochs,
                                 iters_per_epoch=iters_per_epoch, lr_peak_epoch=lr_peak_epoch,
                                 step_ratio=step_ratio, step_length=step_length,
                                 warmup_epochs=warmup_epochs,
                                 warmup_start_factor=warmup_start_factor))


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
