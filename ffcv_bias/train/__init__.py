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
