"""How close the training loop (loader + step) comes to a bare training step.

    python bench/train_step.py --config-file rn50_configs/fashion_mnist_cpu.yaml \
        [--section.key=value ...] [--bench.epochs=2]

Builds the real Trainer from a trainer config, trains one warm-up epoch (numba compiles
the loader's pipeline), then times:
  loop: Trainer.train_epoch, i.e. what a run does: loader, normalize, forward, backward, step;
  bare: the same model, optimizer, batch size and resolution on batches already decoded,
        normalized and in memory: forward, backward, step only.
Prints images/second of each and loop/bare (goal: >= 0.90). Nothing is written outside a
temporary directory.
"""
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


def bare_images_per_second(trainer, batches, lr):
    """forward/backward/step over preloaded, normalized batches (no loader)."""
    model, optimizer, loss_fn = trainer.ddp_model, trainer.optimizer, trainer.train_loss_fn
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr
    started = time.perf_counter()
    for inputs, targets in batches:
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sum(len(t) for _, t in batches) / (time.perf_counter() - started)


def preload(trainer, epoch, count):
    loader = trainer.train_loader
    loader.set_epoch(epoch)
    batches = []
    for images, labels in loader:
        batches.append((normalize(images, trainer.device).clone(), labels.to(trainer.device)))
        if len(batches) == count:
            break
    return batches


def main(argv=None):
    declare_sections()
    if ("bench", "epochs") not in get_current_config().entries:
        Section("bench", "this benchmark").params(
            epochs=Param(int, "timed epochs of each kind", default=2))
    try:
        nested = resolve_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    timed_epochs = nested.pop("bench")["epochs"]
    load_into_fastargs(nested)
    with tempfile.TemporaryDirectory() as run_dir, StopRequest() as stop:
        trainer = Trainer(nested, run_dir, distributed.setup(0, 1, 0, 1, start_group=False),
                          stop)
        print(f"{nested['model']['arch']}, batch {nested['training']['batch_size']}, "
              f"{trainer.resolution(0)} px, {len(trainer.train_loader)} steps/epoch, "
              f"{torch.get_num_threads()} torch threads, "
              f"{nested['data']['num_workers']} loader threads, device {trainer.device}")
        trainer.train_epoch(0)  # warm-up: numba compilation, allocator
        loop, bare = [], []
        for epoch in range(1, 1 + timed_epochs):
            loop.append(trainer.train_epoch(epoch)["images_per_second"])
            batches = preload(trainer, epoch, len(trainer.train_loader))
            bare.append(bare_images_per_second(trainer, batches, trainer.lr_schedule[0]))
        best_loop, best_bare = max(loop), max(bare)
        print(f"loop (loader + step): {best_loop:8.1f} images/s  (epochs: "
              f"{', '.join(f'{v:.1f}' for v in loop)})")
        print(f"bare step:            {best_bare:8.1f} images/s  (epochs: "
              f"{', '.join(f'{v:.1f}' for v in bare)})")
        print(f"loop / bare: {best_loop / best_bare:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
