"""Train one model and write its run record: a thin CLI over ffcv_bias.train.

    python train_imagenet.py --config-file rn50_configs/fashion_mnist_cpu.yaml \
        [--section.key=value ...]
    torchrun --nproc_per_node=8 train_imagenet.py --config-file rn50_configs/rn50_88_epochs.yaml \
        --data.train_dataset=... --data.val_dataset=...
    python train_imagenet.py --config-file ... --dist.world_size=2   # spawns 2 processes
    python train_imagenet.py --help          # every key, its default and its meaning

Exit codes: 0 done (or already complete), 1 the run failed (error.txt in its directory),
2 bad configuration or input files (nothing started), 75 stopped by SIGTERM (rerun the
same command to resume).
"""
import sys

from ffcv_bias.train.checks import preflight


def main():
    # Config errors and complete runs are answered before torch and ffcv are imported.
    exit_code, nested = preflight()
    if exit_code is not None:
        return exit_code
    from ffcv_bias.train.launch import main as train
    return train(nested=nested)  # the config preflight resolved and checked: not twice


if __name__ == "__main__":
    sys.exit(main())
