"""How close the training loop (loader + step) comes to a bare training step.

    python bench/train_step.py --config-file rn50_configs/fashion_mnist_cpu.yaml \
        [--section.key=value ...] [--bench.pairs=4]

Builds the real Trainer from a trainer config, trains one warm-up epoch (numba compiles
the loader's pipeline), then alternates, `bench.pairs` times:
  loop: Trainer.train_epoch, i.e. what a run does: loader, normalize, forward, backward,
        step, loss checks;
  bare: the same model, optimizer, batch size and resolution on batches already decoded,
        normalized and in memory: forward, backward, step only.
Prints images/second of each, loop/bare per pair and its median (goal: >= 0.90), and the
share of the loop's time spent waiting for the loader (the loop's own overhead, immune to
other processes slowing both measurements). Nothing is written outside a temporary
directory. Use data.keep_indices to time a subset (a few thousand images is plenty).
"""
import statistics
import sys
import tempfile
import time

import torch
from fastargs import Param, Section, get_current_config

from ffcv_bias import distributed
from ffcv_bias.config import ConfigError
from ffcv_bias.loaders import normalize
from ffcv_bias.train import StopRequest, Trainer, load_into_fastargs
from ffcv_bias.train_config import declare_sections, resolve_config


class TimedLoader:
    """The trainer's loader, counting the seconds the loop waits for each batch."""

    def __init__(self, loader):
        self.loader, self.wait_seconds = loader, 0.0

    def __getattr__(self, name):  # set_epoch, set_resolution, resolution, ...
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - started
            yield batch


def bare_images_per_second(trainer, batches, lr):
    """forward/backward/step over preloaded, normalized batches (no loader)."""
    model, optimizer, loss_fn = trainer.ddp_model, trainer.optimizer, trainer.train_loss_fn
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
    started = time.perf_counter()
    for inputs, targets in batches:
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sum(len(t) for _, t in batches) / (time.perf_counter() - started)


def preload(loader, device, epoch):
    loader.set_epoch(epoch)
    return [(normalize(images, device).clone(), labels.to(device)) for images, labels in loader]


def parse(argv):
    declare_sections()
    if ("bench", "pairs") not in get_current_config().entries:
        Section("bench", "this benchmark").params(
            pairs=Param(int, "timed (loop epoch, bare epoch) pairs", default=4))
    nested = resolve_config(argv)
    pairs = nested.pop("bench")["pairs"]
    # The learning-rate schedule must cover the warm-up and the timed epochs.
    nested["training"]["epochs"] = max(nested["training"]["epochs"], 1 + pairs)
    load_into_fastargs(nested)
    return nested, pairs


def main(argv=None):
    try:
        nested, pairs = parse(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as run_dir, StopRequest() as stop:
        trainer = Trainer(nested, run_dir, distributed.setup(0, 1, 0, 1, start_group=False),
                          stop)
        print(f"{nested['model']['arch']}, batch {nested['training']['batch_size']}, "
              f"{trainer.resolution(0)} px, {len(trainer.train_loader)} steps/epoch, "
              f"{torch.get_num_threads()} torch threads, "
              f"{nested['data']['num_workers']} loader threads, device {trainer.device}",
              flush=True)
        trainer.train_epoch(0)  # warm-up: numba compilation, allocator
        timed = trainer.train_loader = TimedLoader(trainer.train_loader)
        loop, bare, loop_seconds = [], [], 0.0
        for epoch in range(1, 1 + pairs):
            stats = trainer.train_epoch(epoch)
            loop.append(stats["images_per_second"])
            loop_seconds += stats["epoch_seconds"]
            batches = preload(timed.loader, trainer.device, epoch)
            bare.append(bare_images_per_second(trainer, batches, trainer.lr_schedule[0]))
            print(f"pair {epoch}: loop {loop[-1]:7.1f} images/s   bare {bare[-1]:7.1f} "
                  f"images/s   loop/bare {loop[-1] / bare[-1]:.3f}", flush=True)
        ratios = [a / b for a, b in zip(loop, bare)]
        print(f"median loop/bare over {pairs} pairs: {statistics.median(ratios):.3f}  "
              f"(loop median {statistics.median(loop):.1f}, bare median "
              f"{statistics.median(bare):.1f} images/s)")
        print(f"loop time spent waiting for the loader: {timed.wait_seconds:.2f} s of "
              f"{loop_seconds:.1f} s ({100 * timed.wait_seconds / loop_seconds:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
