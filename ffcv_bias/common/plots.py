"""matplotlib, set up once: the Agg backend, and PNGs written atomically.

Figures are files here, never windows: Agg needs no display, so a study run over SSH, in
a SLURM job or in a test draws the same PNG. pyplot is imported on first use only
(a second or more at import), so the commands that draw nothing never pay for it.
"""
from ffcv_bias.common.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(figure, path, dpi, **savefig_options):
    """`figure` as a PNG at `path` (atomically: a reader never sees half a file), then
    closed (pyplot keeps every open figure alive until then)."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, **savefig_options)
    pyplot().close(figure)
