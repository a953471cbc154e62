"""Plumbing shared by the trainer, the studies, the CLIs and the benchmarks, written once.

- `env`     the machine and the software: device, usable CPUs, git commit (and dirty
            flag), package versions, CPU model.
- `errors`  one UserError family, the exit codes, and the CLI wrapper that prints
            `error: <one line>` and exits with the error's code.
- `plots`   matplotlib, set up once (the Agg backend: no display is ever needed).
- `tables`  CSV tables written atomically.
- `yaml_files`  every YAML file read strictly: a key given twice is refused with both
            lines, a syntax error is one `FILE:LINE:COL:` line.

Nothing here imports torch, ffcv or matplotlib at import time: a CLI that fails on a bad
argument must not wait seconds for them.
"""
