"""What the training loop asks after each step, without making the GPU wait at every step.

- **Stop** (SIGTERM, SIGUSR2): asked after every step, on the host. Alone, the StopRequest
  flag; in a process group, `distributed.stop_agreed`, a MAX all-reduce of one CPU integer
  on a gloo group (beside NCCL on GPUs), which waits for the other ranks' hosts, never for
  a GPU. Every rank gets the same answer after the same step, so all of them stop after
  the current step together, whatever the cadence of the loss checks below.
- **Loss**: checked every `check_every` steps (on a GPU, CUDA_CHECK_EVERY_STEPS: each check
  makes the host wait for the GPU) and at the epoch's last step, in one MIN all-reduce and
  one device-to-host copy of two integers (the first bad step, whether a rank was told to
  stop). Without a GradScaler a non-finite loss ends the run (NonFiniteLossError). With one
  (training.amp_dtype=fp16) an overflow is the scaler's business: it skips the step whose
  gradients hold inf/NaN and lowers its scale. A non-finite *loss* is such a step too; the
  run ends only when the loss stayed non-finite NONFINITE_LOSS_STEPS steps in a row
  (counted across checks and epochs), a model that diverged and that no scale repairs. The
  epoch's mean loss is then the mean of its finite losses, with the count of the others.
"""
import torch

from ffcv_bias.train import distributed
from ffcv_bias.train.state import NonFiniteLossError, Preempted

# With a GradScaler: non-finite losses in a row that end the run (each one a skipped step,
# the scale halved each time: 2**-25 of where it was).
NONFINITE_LOSS_STEPS = 25
_NONE = 2 ** 31  # "no bad step" in the MIN all-reduce


class StepChecks:
    """One epoch's step losses (on the device) and the checks made after each step."""

    def __init__(self, steps, *, device, info, stop, check_every, scaled=False, streak=None):
        """`scaled`: a GradScaler trains (fp16). `streak`: the non-finite losses in a row
        that ended the previous epoch (a device scalar; the `streak` attribute after this
        epoch's checks)."""
        self.steps, self.device, self.info, self.stop = steps, device, info, stop
        self.check_every, self.scaled = max(1, int(check_every)), scaled
        self.losses = torch.zeros(steps, device=device)
        self.checked = 0
        self.streak = (streak if streak is not None
                       else torch.zeros((), dtype=torch.int64, device=device))

    def record(self, step, loss):
        self.losses[step] = loss

    def is_check_step(self, step):
        end = step + 1
        return end % self.check_every == 0 or end == self.steps

    def after_step(self, step, epoch):
        """Raise NonFiniteLossError or Preempted, on every rank alike, or return."""
        if self.is_check_step(step):
            self.check(step + 1, epoch)
        elif distributed.stop_agreed(self.stop.requested, self.info):
            raise Preempted()

    def check(self, end, epoch):
        start, self.checked = self.checked, end
        finite = torch.isfinite(self.losses[start:end])
        bad = self.scaled_bad_step(finite, start) if self.scaled else (
            (start + torch.argmin(finite.int())).masked_fill(finite.all(), _NONE))
        # [first bad step (_NONE if none), -1 if this rank was told to stop]: one MIN, one
        # copy to the host (built on the device: a tensor made from a host list would be a
        # blocking copy, i.e. one more wait for the GPU).
        flags = torch.zeros(2, dtype=torch.int64, device=self.device)
        flags[0] = bad
        flags[1].fill_(-1 if self.stop.requested else 0)
        distributed.all_reduce(flags, self.info, op=torch.distributed.ReduceOp.MIN)
        first_bad, stop = flags.tolist()
        if first_bad < _NONE:
            if self.scaled:
                raise NonFiniteLossError(
                    f"non-finite loss on {NONFINITE_LOSS_STEPS} steps in a row, up to epoch "
                    f"{epoch} step {first_bad} (training.amp_dtype=fp16: the GradScaler "
                    f"skipped them; the model diverged)")
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {first_bad}")
        if stop < 0:
            raise Preempted()

    def scaled_bad_step(self, finite, start):
        """The step at which the non-finite losses in a row (those before `start` included)
        reached NONFINITE_LOSS_STEPS, _NONE if they did not (a device scalar); updates the
        streak. On the device: no wait for the GPU."""
        index = torch.arange(len(finite), device=finite.device)
        last_finite = torch.cummax(torch.where(finite, index, torch.full_like(index, -1)),
                                   dim=0).values
        in_a_row = torch.where(last_finite >= 0, index - last_finite, index + 1 + self.streak)
        reached = in_a_row >= NONFINITE_LOSS_STEPS
        self.streak = in_a_row[-1]
        return (start + torch.argmax(reached.int())).masked_fill(~reached.any(), _NONE)

    def mean_loss(self):
        """(the epoch's mean training loss over every rank, non-finite losses skipped by the
        GradScaler or None without one), as Python numbers."""
        world = self.info.world_size
        if not self.scaled:
            return float(distributed.all_reduce(self.losses.sum(), self.info)
                         / (self.steps * world)), None
        finite = torch.isfinite(self.losses)
        sums = torch.stack([torch.where(finite, self.losses, torch.zeros_like(self.losses)).sum(),
                            finite.sum().to(self.losses.dtype)])
        total, counted = distributed.all_reduce(sums, self.info).tolist()
        return total / max(counted, 1.0), int(self.steps * world - counted)
