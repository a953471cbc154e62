"""Studies beyond training sweeps: what a trained model tells about class-dependent bias.

Each study is a command (`python -m ffcv_bias.studies.<name> --help`), documented in its
module's docstring:

- `preservation`  label preservation (Balestriero et al. 2022, Sec. 3.2, Figs. 5-6): per-class
                  accuracy of a trained model on test (and train) images cropped to alpha of
                  their area, cut out, or colour-jittered, and the strength at which each
                  class loses its label.
- `transfer`      transfer with a frozen backbone (Sec. 2.2, Fig. 4): a linear probe on a
                  target dataset for each source run, written as run records the analysis
                  command reads (`--vary augment.min_scale` = the source's tau).
- `class_bounds`  per-class crop lower bounds for class-dependent augmentation (Sec. 3.4,
                  Fig. 7) from an analysis (Welch test) or a preservation study; the file
                  `augment.class_min_scale` reads.
- `diet`          data-diet scores (EL2N, GraNd) and pruned training sets (Pote et al.).
- `trained`       not a command: a run's (or a state_dict file's) model, loaded once for all
                  of them (and for bench/arch_throughput.py).

This package file imports nothing heavy: `class_bounds` runs without torch or ffcv.
"""
