"""Plumbing shared by the trainer, the studies, the CLIs and the benchmarks, written once.

- `env`     the machine and the software: device, usable CPUs, git commit (and dirty
            flag), package versions, CPU model.
- `plots`   matplotlib, set up once (the Agg backend: no display is ever needed).
- `tables`  CSV tables written atomically.

Nothing here imports torch, ffcv or matplotlib at import time: a CLI that fails on a bad
argument must not wait seconds for them.
"""
