"""The run record (docs/DESIGN.md, "The run record"): what the trainer and the transfer
probe write, and the one writer they share.

- `writer`  config.json, log.jsonl, weights.pt, the prediction files and summary.json,
            each atomically, summary.json last (its presence = complete).

Run ids, file names and locks are in ffcv_bias/runs.py; accuracies in ffcv_bias/metrics.py.
"""
from ffcv_bias.record.writer import FinalRecord, write_config, write_final, write_log, write_summary

__all__ = ["FinalRecord", "write_config", "write_final", "write_log", "write_summary"]
