"""ffcv_bias: how regularization and data pruning help some classes and hurt others.

Stages (each its own module, data flowing one way through files):
    datasets  -> *.beton (+ .classes.json)
    augment / loaders -> seeded FFCV pipelines
    train     -> runs/<run_id>/ (the run record)
    sweep     -> many runs, locally or on SLURM
    analysis  -> tables, figures, report
"""
__version__ = "0.1.0"
