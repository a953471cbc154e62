"""The run record (docs/DESIGN.md, "The run record"): what a run leaves, and how.

- `runs`    run_id, the record's file names, run locks, completeness (complete / corrupt /
            incomplete): shared by the trainer, the sweep launcher and the analysis;
            imports neither torch nor ffcv
- `writer`  config.json, log.jsonl, weights.pt, the prediction files and summary.json,
            each atomically, summary.json last (its presence = complete): the trainer's
            and the transfer probe's one writer
- `faults`  named crash points, armed only by FFCV_BIAS_CRASH_AT (the reliability tests)

Accuracies from predictions are in ffcv_bias/record/metrics.py. The writer's names are also
reachable here (`record.write_final`), imported on first use: importing `record.runs`
must not import the writer (which imports metrics, which imports runs).
"""
_WRITER_NAMES = ("FinalRecord", "write_config", "write_final", "write_log", "write_summary")

__all__ = list(_WRITER_NAMES)


def __getattr__(name):
    if name in _WRITER_NAMES:
        from ffcv_bias.record import writer
        return getattr(writer, name)
    raise AttributeError(f"module 'ffcv_bias.record' has no attribute {name!r}")
