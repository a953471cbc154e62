"""The run_ids of the shipped sweeps and configs never change by accident.

A run_id names a finished run's directory: if a refactor or a new config key changed it,
the next `sweep launch` would silently train every finished run again (and the analysis
would see two copies). New keys go into runs.LATER_KEY_DEFAULTS with the default that
reproduces the old behaviour; a change that is meant to rename runs regenerates the pins
with `python tests/data/make_run_id_pins.py` and says why in its commit.
"""
import json

import pytest

from data.make_run_id_pins import PINS, shipped_run_ids


@pytest.fixture(scope="module")
def current(monkeypatch_module):
    return shipped_run_ids()


@pytest.fixture(scope="module")
def monkeypatch_module():
    # Under torchrun the world size enters the config: pin the single-process ids.
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            patch.delenv(name, raising=False)
        yield patch


def test_every_shipped_file_is_pinned(current):
    pinned = json.loads(PINS.read_text())
    assert sorted(current) == sorted(pinned), (
        "a sweep or config was added or removed: regenerate tests/data/run_id_pins.json")


@pytest.mark.parametrize("name", sorted(json.loads(PINS.read_text())))
def test_run_ids_unchanged(current, name):
    pinned = json.loads(PINS.read_text())[name]
    assert current.get(name) == pinned, (
        f"run_ids of rn50_configs/{name} changed: finished runs would be trained again")


def test_pins_cover_many_runs():
    pinned = json.loads(PINS.read_text())
    planned = sum(len(ids) for name, ids in pinned.items() if name.startswith("sweeps/"))
    assert planned > 500 and all(isinstance(v, str) for v in pinned.values() if not isinstance(v, list))
