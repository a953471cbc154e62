"""Writes tests/data/run_id_pins.json: the run_id of every run of every shipped sweep and config.

Run it only when a change is MEANT to rename runs (and say why in the commit): a finished
run whose run_id changes is trained again by the next `sweep launch`.

    python tests/data/make_run_id_pins.py
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
PINS = Path(__file__).with_name("run_id_pins.json")


def shipped_run_ids():
    """{"sweeps/NAME.yaml": [run_id or "config error: ..." per planned run], "NAME.yaml": run_id}."""
    from ffcv_bias.record import runs
    from ffcv_bias.sweep import spec
    from ffcv_bias.train.config import resolve_config

    configs = REPO / "rn50_configs"
    pins = {}
    for sweep_file in sorted((configs / "sweeps").glob("*.yaml")):
        planned = spec.plan(spec.load_sweep(sweep_file), folder="pinned-runs")
        pins[f"sweeps/{sweep_file.name}"] = [
            run.run_id or f"config error: {run.config_error}" for run in planned]
    # The ImageNet recipes leave the beton paths to the command line (only their names
    # enter the run_id): pin them with the names the README uses.
    betons = ["--data.train_dataset=data/train.beton", "--data.val_dataset=data/val.beton"]
    for config_file in sorted(configs.glob("*.yaml")):
        config = resolve_config(["--config-file", str(config_file)] + betons)
        pins[config_file.name] = runs.run_id(config)
    return pins


if __name__ == "__main__":
    PINS.write_text(json.dumps(shipped_run_ids(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINS}")
