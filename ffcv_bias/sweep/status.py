"""What state each run of a sweep is in, read from the run directories, and the tables.

States, in the order they are decided:
    invalid   the trainer's parser refused the run's arguments (nothing can run)
    changed   its config.json records other betons than the ones named now (a file
              rewritten under the same name): launch refuses the sweep, see
              train/checks.py CHANGED_BETON_REMEDY
    complete  summary.json parses and names the run (runs.completeness)
    corrupt   summary.json (or config.json) is there but cut short or of another run:
              launch retrains it, the trainer moving the corrupt files aside
    running   some process holds the run's lock (training now, here or on another node)
    queued    a submitted SLURM job that will train it is still in the queue
    failed    error.txt exists (and no summary): the last attempt failed
    started   a checkpoint or config.json exists, nobody trains it: a relaunch resumes it
    missing   nothing yet
"""
from collections import Counter

from ffcv_bias.record import runs
from ffcv_bias.sweep.spec import format_value

STATES = ("complete", "running", "queued", "corrupt", "failed", "started", "missing",
          "changed", "invalid")
TODO_STATES = ("corrupt", "failed", "started", "missing")


def run_state(run, queued_ids=frozenset()):
    if run.config_error:
        return "invalid"
    if beton_change_message(run):
        return "changed"
    if runs.is_complete(run.run_dir, run.run_id):
        return "complete"
    if runs.is_locked(run.run_dir):
        return "running"
    if run.run_id in queued_ids:
        return "queued"
    return runs.run_state(run.run_dir, run.run_id)  # corrupt / failed / started / missing


def beton_change_message(run):
    """The trainer's refusal when the run's recorded betons differ from the named ones."""
    from ffcv_bias.train.checks import check_recorded_betons
    from ffcv_bias.train.config import ConfigError
    try:
        check_recorded_betons(run.run_dir, run.config)
    except ConfigError as error:
        return str(error)
    return None


def error_line(run):
    """Why a run cannot be counted: the config error, the changed beton, the corrupt
    record, or the first line of error.txt (the one-line error; details follow)."""
    if run.config_error:
        return run.config_error
    change = beton_change_message(run)
    if change:
        return change
    if runs.completeness(run.run_dir, run.run_id) == "corrupt":
        return "summary.json or config.json is cut short or of another run: launch retrains it"
    path = run.run_dir / runs.ERROR_FILE
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except FileNotFoundError:
        return ""
    lines = [line for line in lines if line]
    return lines[0] if lines else "(empty error.txt)"


def count_states(states):
    counts = Counter(states)
    return {state: counts.get(state, 0) for state in STATES}


def format_table(headers, rows):
    """Plain fixed-width columns; the last column is not padded."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), ["-" * w for w in widths]] + rows:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths[:-1])]
        lines.append("  ".join(padded + [row[-1]]).rstrip())
    return "\n".join(lines)


def setting_keys(planned):
    """Every key a run's setting names, in first-seen order (points may name different keys)."""
    return list(dict.fromkeys(key for run in planned for key in run.values))


def setting_cells(run, keys):
    return [format_value(run.values[key]) if key in run.values else "-" for key in keys]


def plan_table(planned, states):
    grid_keys = setting_keys(planned)
    headers = ["#", "run_id"] + grid_keys + ["seed", "state"]
    rows = []
    for run, state in zip(planned, states):
        values = setting_cells(run, grid_keys)
        shown_state = state if state != "invalid" else f"invalid: {run.config_error}"
        rows.append([run.index, run.run_id or "-"] + values + [run.seed, shown_state])
    return format_table(headers, rows)


def counts_line(counts):
    shown = [f"{counts[state]} {state}" for state in STATES if counts[state] or state in
             ("complete", "missing")]
    return f"{sum(counts.values())} runs: " + ", ".join(shown)


def settings_table(planned, states):
    """One row per grid point: how many of its seeds are complete, running, failed."""
    grid_keys = setting_keys(planned)
    groups = {}
    for run, state in zip(planned, states):
        key = tuple(setting_cells(run, grid_keys))
        groups.setdefault(key, []).append(state)
    rows = [list(key) + [f"{group.count('complete')}/{len(group)}", group.count("running"),
                         group.count("failed")]
            for key, group in groups.items()]
    return format_table(grid_keys + ["complete", "running", "failed"], rows)


def status_report(planned, states):
    """Counts per state, then per grid point, then each failed run with its error line."""
    counts = count_states(states)
    lines = [format_table(["state", "runs"], [[s, counts[s]] for s in STATES]),
             "", counts_line(counts)]
    if planned and planned[0].values:
        lines += ["", settings_table(planned, states)]
    broken = [(run, state) for run, state in zip(planned, states)
              if state in ("failed", "invalid", "corrupt", "changed")]
    if broken:
        lines += ["", "failed runs:"]
        rows = [[run.run_id or "-", _values_text(run), state, error_line(run)]
                for run, state in broken]
        lines.append(format_table(["run_id", "values", "state", "error"], rows))
    return "\n".join(lines)


def _values_text(run):
    parts = [f"{key}={format_value(value)}" for key, value in run.values.items()]
    return " ".join(parts + [f"seed={run.seed}"])
