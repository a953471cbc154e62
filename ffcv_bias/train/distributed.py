"""Distributed helpers: launch, process group, and the few collectives the trainer needs.

Two ways to start N processes, both supported:
- `torchrun --nproc_per_node=N train_imagenet.py ...` (or SLURM + torchrun across nodes):
  RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT come from the environment (env://);
- `python train_imagenet.py --dist.world_size=N ...`: this module spawns N processes
  (torch.multiprocessing, start method 'spawn') meeting at dist.address:dist.port. The
  default port `auto` is a free port picked by the parent and passed down, so that two
  spawned runs on one node (a shared node, a local run beside a sweep) neither collide
  ("address in use") nor join each other's group.

NCCL on GPUs, gloo on CPU. Every helper also works in a single, non-distributed process,
so the trainer has one code path.

Collectives time out after `dist.timeout` seconds (default DEFAULT_TIMEOUT_S, 30 minutes):
torch's NCCL default of 10 minutes can expire while eight ranks compile their graphs with
inductor at the start and again at each new resolution of the ramp, the first rank done
waiting in the next all-reduce for the slowest. Under NCCL a second, gloo group
(`DistInfo.control_group`) carries the per-step stop vote (`stop_agreed`) on the host, so
that agreeing on a stop asks nothing of the GPU.
"""
import datetime
import os
import signal
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from ffcv_bias.train.config import DIST_TIMEOUT_DEFAULT_S

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
AUTO_PORT = "auto"
DEFAULT_TIMEOUT_S = DIST_TIMEOUT_DEFAULT_S  # dist.timeout's default (train/config.py)
# Signals the spawning parent passes on to its workers: SIGTERM (preemption, scancel) and
# SIGUSR2 (submitit's warning before the time limit), which would otherwise kill the
# parent and leave the workers to be torn down mid-checkpoint.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def rendezvous_port(configured, address="localhost"):
    """dist.port as a port number: `auto` picks one the OS reports free on `address`.

    The port is released again before the workers bind it (rank 0's TCP store), so another
    process could take it in between; the OS hands out ephemeral ports in rotation, which
    makes that unlikely, unlike a fixed port that every run of the node shares."""
    text = str(configured).strip()
    if text != AUTO_PORT:
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ValueError(f"dist.port={configured!r} must be 'auto' or a port in 1..65535")
        return text
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address if address not in ("localhost", "") else "127.0.0.1", 0))
        return str(probe.getsockname()[1])


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world, its device, whether a group runs."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    group_running: bool = False
    # The group of the host-side stop vote: a gloo group beside NCCL; None = the default
    # group (gloo already, on CPU).
    control_group: object = None

    @property
    def is_main(self):
        return self.rank == 0


def launched_by_torchrun():
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def torchrun_ranks():
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment."""
    world_size = int(os.environ["WORLD_SIZE"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return (int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"]),
            local_world_size)


def pick_device(local_rank):
    """This process's GPU, or the CPU when there is none."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"process {local_rank} on this node has no GPU: only "
                           f"{torch.cuda.device_count()} visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(rank, world_size, local_rank, local_world_size, *, start_group, address="localhost",
          port=AUTO_PORT, timeout_s=DEFAULT_TIMEOUT_S):
    """Pick the device and, when `start_group`, join the process group, whose collectives
    give up after `timeout_s` seconds (dist.timeout)."""
    device = pick_device(local_rank)
    control_group = None
    if start_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(timeout_s))
        if launched_by_torchrun():
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            port = rendezvous_port(port, address)  # a single process may still say auto
            dist.init_process_group(backend, init_method=f"tcp://{address}:{port}",
                                    rank=rank, world_size=world_size, timeout=timeout)
        if backend != "gloo":
            control_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank, world_size, local_rank, local_world_size, device, start_group,
                    control_group)


def cleanup(info):
    if info.group_running and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info):
    if info.group_running:
        dist.barrier()


def all_reduce(tensor, info, op=dist.ReduceOp.SUM):
    """In place across ranks; a no-op in a single process. `tensor` must be on info.device."""
    if info.group_running:
        dist.all_reduce(tensor, op=op)
    return tensor


def stop_agreed(requested, info):
    """True on every rank when any rank was told to stop (`requested`: this rank's
    StopRequest flag), the same answer on all of them: a MAX all-reduce of one CPU integer
    on the host-side group (gloo), which waits for the other ranks' hosts but never for a
    GPU. Alone: `requested` itself."""
    if not info.group_running:
        return bool(requested)
    flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=info.control_group)
    return bool(flag[0])


def all_gather_objects(obj, info):
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects only)."""
    if not info.group_running:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, info, source=0):
    if not info.group_running:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def broadcast_buffers(module, info, source=0):
    """Copy `source`'s buffers (BatchNorm running statistics) into every rank's module."""
    if info.group_running:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=source)


def gather_rows_by_index(rows, indices, total, info):
    """Put every rank's rows into one [total, ...] array, row i = dataset sample i.

    `rows` (a tensor on info.device) are this rank's results for the dataset samples
    `indices` (numpy, same length). A distributed sampler pads the dataset so every rank
    gets the same number of samples; a padded sample appears twice and is written twice.
    Returns the numpy array on rank 0 and None elsewhere; raises if a sample is missing.
    """
    if len(rows) != len(indices):
        raise RuntimeError(f"{len(rows)} result rows for {len(indices)} sample indices")
    index_tensor = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=rows.device)
    if info.group_running:
        rows, index_tensor = _all_gather_padded(rows, info), _all_gather_padded(index_tensor, info)
    if not info.is_main:
        return None
    rows, index_tensor = rows.cpu().numpy(), index_tensor.cpu().numpy()
    valid = index_tensor >= 0
    if valid.any() and (index_tensor[valid].max() >= total):
        raise RuntimeError(f"sample index {index_tensor[valid].max()} >= dataset size {total}")
    result = np.zeros((total,) + rows.shape[1:], dtype=rows.dtype)
    seen = np.zeros(total, dtype=bool)
    result[index_tensor[valid]] = rows[valid]
    seen[index_tensor[valid]] = True
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {total} samples were not evaluated "
                           f"(first: {int(np.flatnonzero(~seen)[0])})")
    return result


def _all_gather_padded(tensor, info):
    """Concatenate every rank's tensor (lengths may differ) on every rank; index padding = -1."""
    length = torch.tensor([len(tensor)], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(info.world_size)]
    dist.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    padded = torch.full((max(lengths),) + tuple(tensor.shape[1:]), -1, dtype=tensor.dtype,
                        device=tensor.device)
    padded[:len(tensor)] = tensor
    pieces = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, lengths)])


def spawn(worker, world_size, args):
    """Run `worker(rank, *args)` in `world_size` new processes and wait for all of them.

    A SIGTERM or SIGUSR2 sent to this (parent) process is passed on to the workers, so
    `kill <pid>` stops them the way SLURM preemption (which signals every process) does. Raises
    torch.multiprocessing's ProcessRaisedException / ProcessExitedException on a failure.
    """
    context = torch_mp.start_processes(worker, args=args, nprocs=world_size, join=False,
                                       start_method="spawn")

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {number: signal.signal(number, forward) for number in FORWARDED_SIGNALS}
    try:
        while not context.join():
            pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
