"""How close the training loop (loader + step) comes to a bare training step.

    python bench/train_step.py --config-file rn50_configs/fashion_mnist_cpu.yaml \
        [--section.key=value ...] [--bench.pairs=4]

Builds the real Trainer from a trainer config, trains one warm-up epoch (numba compiles
the loader's pipeline), then alternates, `bench.pairs` times:
  loop: Trainer.train_epoch, i.e. what a run does: loader, normalize, forward, backward,
        step, loss checks;
  bare: Trainer.train_step itself (normalize, autocast/bf16 on CUDA, forward, backward,
        step), as many steps as an epoch, on uint8 batches already decoded and on the
        device (at most bench.bare_batches of them, cycled: an ImageNet epoch would not
        fit), timed between two torch.cuda.synchronize() on a GPU.
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

from ffcv_bias.common.errors import EXIT_OK, main_guard
from ffcv_bias.train.config import declare_sections, resolve_config
from ffcv_bias.train.launch import trainer_in_this_process


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


def synchronize(device):
    """Wait for the GPU's queued work: CUDA calls return before the work is done, so a
    clock read without this measures the launches, not the steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_images_per_second(trainer, batches, lr, steps):
    """`steps` calls of Trainer.train_step (the loop's own step, same precision and memory
    format) over preloaded uint8 device batches, cycled; no loader."""
    trainer.ddp_model.train()
    synchronize(trainer.device)
    started = time.perf_counter()
    images = 0
    for step in range(steps):
        batch_images, batch_labels = batches[step % len(batches)]
        trainer.train_step(batch_images, batch_labels, lr)
        images += len(batch_labels)
    synchronize(trainer.device)
    return images / (time.perf_counter() - started)


def preload(loader, device, epoch, max_batches):
    """Up to `max_batches` of the epoch's batches as the loader yields them (uint8,
    channels-last), copied out of its reused buffers onto `device`."""
    loader.set_epoch(epoch)
    batches = []
    for images, labels in loader:
        batches.append((images.to(device).clone(), labels.to(device).clone()))
        if len(batches) == max_batches:
            break
    return batches


def parse(argv):
    declare_sections()
    if ("bench", "pairs") not in get_current_config().entries:
        Section("bench", "this benchmark").params(
            pairs=Param(int, "timed (loop epoch, bare epoch) pairs", default=4),
            bare_batches=Param(int, "uint8 batches preloaded on the device for the bare "
                                    "steps (cycled)", default=64))
    nested = resolve_config(argv)
    bench = nested.pop("bench")
    # The learning-rate schedule must cover the warm-up and the timed epochs.
    nested["training"]["epochs"] = max(nested["training"]["epochs"], 1 + bench["pairs"])
    return nested, bench


@main_guard()
def main(argv=None):
    nested, bench = parse(argv)  # a bad config: ConfigError, exit 2
    pairs, bare_batches = bench["pairs"], bench["bare_batches"]
    with tempfile.TemporaryDirectory() as run_dir, \
            trainer_in_this_process(nested, run_dir) as trainer:
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
            batches = preload(timed.loader, trainer.device, epoch, bare_batches)
            bare.append(bare_images_per_second(trainer, batches, trainer.lr_schedule[0],
                                               steps=len(timed)))
            print(f"pair {epoch}: loop {loop[-1]:7.1f} images/s   bare {bare[-1]:7.1f} "
                  f"images/s   loop/bare {loop[-1] / bare[-1]:.3f}", flush=True)
        ratios = [a / b for a, b in zip(loop, bare)]
        print(f"median loop/bare over {pairs} pairs: {statistics.median(ratios):.3f}  "
              f"(loop median {statistics.median(loop):.1f}, bare median "
              f"{statistics.median(bare):.1f} images/s)")
        print(f"loop time spent waiting for the loader: {timed.wait_seconds:.2f} s of "
              f"{loop_seconds:.1f} s ({100 * timed.wait_seconds / loop_seconds:.2f}%)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
