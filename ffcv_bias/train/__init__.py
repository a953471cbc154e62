"""Stage 2: train one model and write its run record.

- `config`           the fastargs sections, the config resolved to one nested dict, small
                     input files; imports neither torch nor ffcv (the sweep resolves
                     hundreds of configs with it)
- `checks`           the cross-field checks, the checks before anything is written, and
                     `preflight` (the CLI's answer before torch is imported); torch-free
- `fastargs_strict`  fastargs with unknown keys and sloppy booleans refused
- `launch`           one run from the CLI: run directory, lock, single / spawned /
                     torchrun processes, exit codes
- `loop`             the Trainer: loaders, model, optimizer, epochs, validation, record
- `state`            stop signals, seeds and RNG streams, determinism, the checkpoint
- `schedules`, `param_groups`, `optimizer`, `batchnorm`, `distributed`, `models/`

The contract of what a run writes: docs/DESIGN.md.
"""

# fastargs' --help tables: plain ASCII when stdout is not a terminal (no escape codes in
# `--help > file`); every fastargs parser (trainer, write_datasets.py) imports this package.
from ffcv_bias.common import plain_tables as _plain_tables

_plain_tables.install()
