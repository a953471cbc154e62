"""Sweep files: read and check them, and expand them into the list of runs they describe.

A sweep file is YAML (the format is documented in `ffcv_bias/sweep/__init__.py`). Every
run of a sweep is one call of the trainer with the same `--config-file` and `--k=v`
arguments; its run_id is computed in-process by resolving exactly those arguments with
the trainer's own parser (`ffcv_bias.train.config.resolve_config`), so `plan` and the
trainer always agree on where a run lives.
"""
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ffcv_bias.record import runs
from ffcv_bias.common.errors import UserError
from ffcv_bias.common.yaml_files import YamlFileError, load_yaml_file

SEED_KEY = "training.seed"
FOLDER_KEY = "logging.folder"

SWEEP_KEYS = ("name", "base", "folder", "overrides", "grid", "points", "seeds", "max_parallel",
              "slurm")
SLURM_KEYS = ("partition", "account", "qos", "constraint", "nodes", "gpus_per_node",
              "cpus_per_task", "mem", "time", "mode", "runs_per_node", "max_timeouts",
              "signal_delay_s")
SLURM_MODES = ("pack", "ddp")
# sbatch --mem: a whole number with an optional unit (megabytes without one); 0 is SLURM's
# "all the node's memory".
SLURM_MEM = re.compile(r"[0-9]+[KMGT]?", re.IGNORECASE)
# Sections that a bare `grid:` line (nothing indented under it) would leave null: YAML
# reads that as "no section", so a grid whose lines were lost would run the base alone.
SECTION_KEYS = ("overrides", "grid", "points", "slurm")


class SweepError(UserError, ValueError):
    """A bad sweep file or sweep command: the message is one line naming the problem."""


@dataclass(frozen=True)
class SlurmSettings:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None          # sbatch --mem, e.g. "480G"
    time: Optional[int] = None         # minutes
    mode: str = "pack"                 # 'pack': k single-GPU runs per node; 'ddp': one run per node
    runs_per_node: Optional[int] = None  # pack mode; default: one run per GPU
    max_timeouts: int = 10             # requeues after hitting the time limit, per job
    signal_delay_s: int = 90           # SIGUSR2 this long before the time limit: checkpoint


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    folder: Optional[str]
    overrides: dict
    grid: dict
    seeds: list
    max_parallel: Optional[int]
    slurm: SlurmSettings
    points: list = field(default_factory=list)  # explicit settings, crossed with the grid


@dataclass
class PlannedRun:
    """One run of a sweep: the trainer's config arguments and where its record lives."""
    index: int
    values: dict                  # grid key -> value of this run
    seed: int
    config_args: list             # ['--config-file', base, '--a.b=v', ...] (no script)
    run_id: Optional[str] = None
    run_dir: Optional[Path] = None
    config_error: Optional[str] = None  # the trainer's parser refused these arguments
    config: dict = field(default_factory=dict, repr=False)


# ----------------------------------------------------------------------------------------
# Reading and checking a sweep file
# ----------------------------------------------------------------------------------------

def load_sweep(path):
    """Read and check a sweep file; raise SweepError (one line) on any problem."""
    path = Path(path)
    content = _read_yaml(path)
    unknown = [key for key in content if key not in SWEEP_KEYS]
    if unknown:
        raise SweepError(f"unknown key '{unknown[0]}' in sweep file {path} "
                         f"(known: {', '.join(SWEEP_KEYS)})")
    if "base" not in content:
        raise SweepError(f"sweep file {path} names no base config ('base: FILE.yaml')")
    for key in SECTION_KEYS:
        if key in content and content[key] is None:
            raise SweepError(f"'{key}' in {path} is empty: put its entries under it, "
                             f"indented ('{key}:' then '  section.key: ...' lines), or "
                             f"remove the line")
    overrides = _dotted_mapping(content.get("overrides") or {}, "overrides", path)
    grid = _dotted_mapping(content.get("grid") or {}, "grid", path)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid key '{key}' in {path} must be a non-empty list of values")
        for value in values:
            _check_scalar(value, f"grid value of '{key}'", path)
        if len(set(map(repr, values))) != len(values):
            raise SweepError(f"grid key '{key}' in {path} lists a value twice: {values}")
    for key, value in overrides.items():
        _check_scalar(value, f"override '{key}'", path)
    points = _parse_points(content.get("points"), path)
    _check_reserved_keys(overrides, grid, path)
    for point in points:
        _check_reserved_keys(overrides, {**grid, **point}, path)
        for key in set(point) & set(grid):
            raise SweepError(f"'{key}' is both a grid key and a points key in {path}")
    return Sweep(
        path=path,
        name=_optional_str(content, "name", path) or path.stem,
        base=resolve_base(content["base"], path),
        folder=_optional_str(content, "folder", path),
        overrides=overrides,
        grid=grid,
        points=points,
        seeds=_parse_seeds(content.get("seeds", 1), path),
        max_parallel=_positive_int(content.get("max_parallel"), "max_parallel", path),
        slurm=_parse_slurm(content.get("slurm") or {}, path),
    )


def _parse_points(points, path):
    """`points:` a list of settings, each a mapping of dotted keys set together.

    For values that must change in step (a sparsity level and its own index file), which a
    cartesian grid cannot express.
    """
    if points is None:
        return []
    if not isinstance(points, list) or not points:
        raise SweepError(f"'points' in {path} must be a non-empty list of mappings")
    parsed = [_dotted_mapping(point, "points", path) for point in points]
    for point in parsed:
        for key, value in point.items():
            _check_scalar(value, f"points value of '{key}'", path)
    if len({repr(sorted(point.items())) for point in parsed}) != len(parsed):
        raise SweepError(f"'points' in {path} lists a setting twice")
    return parsed


def _read_yaml(path):
    try:
        content = load_yaml_file(path, "sweep file")
    except FileNotFoundError:
        raise SweepError(f"sweep file not found: {path}") from None
    except IsADirectoryError:
        raise SweepError(f"sweep file {path} is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as error:  # unreadable, or a binary file
        raise SweepError(f"cannot read sweep file {path}: "
                         f"{getattr(error, 'strerror', None) or error}") from None
    except YamlFileError as error:  # FILE:LINE:COL: a syntax error or a key given twice
        raise SweepError(str(error)) from None
    if not isinstance(content, dict):
        raise SweepError(f"sweep file {path} must hold a mapping (base:, grid:, seeds:, ...)")
    return content


def resolve_base(base, sweep_path):
    """The base config: an absolute path, else relative to the sweep file, else to the cwd."""
    if not isinstance(base, str) or not base:
        raise SweepError(f"'base' in {sweep_path} must be a path to a config YAML file")
    base_path = Path(base)
    if base_path.is_absolute():
        candidates = [base_path]
    else:
        candidates = [sweep_path.parent / base_path, Path.cwd() / base_path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    for candidate in candidates:
        if candidate.is_dir():
            raise SweepError(f"base config '{base}' of {sweep_path} is a directory "
                             f"({os.path.normpath(candidate)}), not a config YAML file")
    tried = " or ".join(os.path.normpath(c) for c in candidates)
    raise SweepError(f"base config '{base}' of {sweep_path} not found (looked for {tried})")


def _dotted_mapping(value, what, path):
    """{'training': {'epochs': 1}} or {'training.epochs': 1} -> {'training.epochs': 1}."""
    if not isinstance(value, dict):
        raise SweepError(f"'{what}' in {path} must be a mapping of section.key: value")
    flat = _flatten(value, what=what, path=path)
    for key in flat:
        if "." not in key:
            raise SweepError(f"key '{key}' of '{what}' in {path} must be written section.key")
    return flat


def _flatten(mapping, prefix="", what=None, path=None):
    """{'a': {'b': 1}} -> {'a.b': 1}; a key given both nested and dotted is a SweepError."""
    flat = {}
    for key, item in mapping.items():
        dotted = f"{prefix}{key}"
        items = _flatten(item, dotted + ".", what, path) if isinstance(item, dict) else {
            dotted: item}
        for name in items:
            if name in flat:
                raise SweepError(f"key '{name}' of '{what}' in {path} is given twice (once "
                                 f"as section: key, once as section.key): give it once")
        flat.update(items)
    return flat


def _check_scalar(value, what, path):
    if value is None or not isinstance(value, (bool, int, float, str)):
        raise SweepError(f"{what} in {path} must be a number, a string or a boolean, "
                         f"not {value!r}")


def _check_reserved_keys(overrides, grid, path):
    for key in set(overrides) & set(grid):
        raise SweepError(f"'{key}' is both an override and a grid key in {path}")
    for key in list(overrides) + list(grid):
        if key == SEED_KEY:
            raise SweepError(f"set seeds with 'seeds:', not '{SEED_KEY}' (in {path})")
        if key == FOLDER_KEY:
            raise SweepError(f"set the run folder with 'folder:', not '{FOLDER_KEY}' (in {path})")


def _parse_seeds(seeds, path):
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise SweepError(f"'seeds' in {path} must be a count >= 1 or a list, not {seeds}")
        return list(range(seeds))
    if isinstance(seeds, list) and seeds:
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise SweepError(f"'seeds' in {path} must list non-negative integers: {seeds}")
        if len(set(seeds)) != len(seeds):
            raise SweepError(f"'seeds' in {path} lists a seed twice: {seeds}")
        return list(seeds)
    raise SweepError(f"'seeds' in {path} must be a count (N means 0..N-1) or a list of seeds")


def _optional_str(content, key, path):
    value = content.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise SweepError(f"'{key}' in {path} must be a non-empty string")
    return value


def _positive_int(value, what, path, minimum=1):
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SweepError(f"'{what}' in {path} must be an integer >= {minimum}, not {value!r}")
    return value


def _parse_slurm(section, path):
    if not isinstance(section, dict):
        raise SweepError(f"'slurm' in {path} must be a mapping ({', '.join(SLURM_KEYS)})")
    unknown = [key for key in section if key not in SLURM_KEYS]
    if unknown:
        raise SweepError(f"unknown key 'slurm.{unknown[0]}' in sweep file {path} "
                         f"(known: {', '.join(SLURM_KEYS)})")
    return slurm_settings(SlurmSettings(), section, str(path))


def slurm_settings(settings, changes, source):
    """`settings` with `changes` (from a sweep file or command-line flags) applied and checked."""
    values = dict(settings.__dict__)
    values.update({key: value for key, value in changes.items() if value is not None})
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if values[key] is not None:
            values[key] = str(values[key])
            if not values[key].strip():
                raise SweepError(f"'slurm.{key}' in {source} is empty: give a value, or leave "
                                 f"it out for SLURM's default")
    if values["mem"] is not None and not SLURM_MEM.fullmatch(values["mem"].strip()):
        raise SweepError(f"'slurm.mem' in {source} must be a memory size like 480G (a whole "
                         f"number with an optional K, M, G or T), not {values['mem']!r}")
    for key, minimum in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1),
                         ("time", 1), ("runs_per_node", 1), ("max_timeouts", 0),
                         ("signal_delay_s", 1)):
        values[key] = _positive_int(values[key], f"slurm.{key}", source, minimum)
    if values["mode"] not in SLURM_MODES:
        raise SweepError(f"'slurm.mode' in {source} must be one of {SLURM_MODES}, "
                         f"not {values['mode']!r}")
    if values["nodes"] != 1:
        # Each job is one node: 'pack' fills one node with single-GPU runs, and 'ddp' runs
        # one trainer that spawns one process per GPU of its node.
        raise SweepError(f"'slurm.nodes' in {source} must be 1: a sweep job uses one node "
                         "(use max_parallel to run many nodes at once)")
    if values["mode"] == "ddp" and values["gpus_per_node"] < 1:
        raise SweepError(f"'slurm.mode: ddp' in {source} needs gpus_per_node >= 1")
    if (values["mode"] == "pack" and values["runs_per_node"] is not None
            and values["gpus_per_node"] >= 1
            and values["runs_per_node"] > values["gpus_per_node"]):
        # pack pins each run to one GPU of the node: more runs than GPUs would stack
        # several trainers on one GPU, each sized for a whole one.
        raise SweepError(f"slurm.runs_per_node={values['runs_per_node']} is more than "
                         f"slurm.gpus_per_node={values['gpus_per_node']} (in {source}): mode "
                         f"pack trains one run per GPU of a node; give at most "
                         f"{values['gpus_per_node']}, or more GPUs per node")
    return SlurmSettings(**values)


# ----------------------------------------------------------------------------------------
# Expanding a sweep into runs
# ----------------------------------------------------------------------------------------

def format_value(value):
    """A YAML scalar as the trainer's command line wants it (booleans as 1/0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def grid_points(grid):
    """The cartesian product of the grid, keys in file order, values in listed order."""
    keys = list(grid)
    return [dict(zip(keys, combination))
            for combination in itertools.product(*(grid[key] for key in keys))]


def sweep_points(sweep):
    """Every setting of a sweep: each of its `points` crossed with the grid's product."""
    return [{**point, **grid_point}
            for point in (sweep.points or [{}]) for grid_point in grid_points(sweep.grid)]


def expand(sweep, folder=None):
    """The sweep's runs, seed-major: every grid point with seed s before any with s+1.

    Seed-major order means a sweep stopped half-way has whole seeds of every setting,
    which is what the per-class comparisons need first. `folder` (when given) replaces
    the sweep file's `folder`; a relative folder is relative to the current directory.
    """
    folder = folder or sweep.folder
    if folder:
        folder = os.path.expanduser(folder)  # `folder: ~/runs` as a shell would read it
    planned = []
    for seed in sweep.seeds:
        for point in sweep_points(sweep):
            args = ["--config-file", str(sweep.base)]
            args += [f"--{key}={format_value(value)}" for key, value in sweep.overrides.items()]
            args += [f"--{key}={format_value(value)}" for key, value in point.items()]
            args.append(f"--{SEED_KEY}={seed}")
            if folder:
                args.append(f"--{FOLDER_KEY}={os.path.abspath(folder)}")
            planned.append(PlannedRun(index=len(planned), values=point, seed=seed,
                                      config_args=args))
    return planned


def default_resolver():
    """The trainer's parser plus its checks of numbers (epochs >= 1, min_scale <=
    max_scale, ...), so `plan` and `launch` mark a run invalid before any job starts. Not
    the file checks: a login node may not see the betons the compute nodes will read."""
    # Imported here: the trainer's parser is the one source of truth for run ids, and
    # importing it must not pull torch into `plan` (train/config.py promises not to).
    from ffcv_bias.train.checks import check_numbers
    from ffcv_bias.train.config import resolve_config

    def resolve_and_check(args):
        config = resolve_config(args)
        check_numbers(config)
        return config
    return resolve_and_check


def resolve_runs(planned, resolve=None):
    """Give each run its run_id and run_dir by resolving its arguments in-process.

    A run whose arguments the trainer's parser refuses keeps `config_error` (the parser's
    one-line message) and no run_id. Two grid points that resolve to the same config
    (e.g. 1e-4 and 0.0001) are a SweepError: the sweep would silently lose a setting.
    """
    resolve = resolve or default_resolver()
    seen = {}
    for run in planned:
        try:
            config = resolve(list(run.config_args))
        except ValueError as error:  # ConfigError is a ValueError
            run.config_error = str(error).splitlines()[0] if str(error) else repr(error)
            continue
        folder = config.get("logging", {}).get("folder")
        if not folder:
            raise SweepError("no run folder: set 'folder:' in the sweep file or pass --folder")
        if not any(arg.startswith(f"--{FOLDER_KEY}=") for arg in run.config_args):
            # Pin the folder the config gave as an absolute path: jobs may start elsewhere.
            run.config_args.append(f"--{FOLDER_KEY}={os.path.abspath(folder)}")
        run.config = config
        run.run_id = runs.run_id(config)
        run.run_dir = Path(os.path.abspath(folder)) / run.run_id
        if run.run_id in seen:
            other = seen[run.run_id]
            raise SweepError(f"runs {describe(other)} and {describe(run)} resolve to the same "
                             f"config (run {run.run_id}): remove one of the grid values")
        seen[run.run_id] = run
    return planned


def plan(sweep, folder=None, resolve=None):
    """Expand and resolve: the sweep's runs with their run ids and directories."""
    return resolve_runs(expand(sweep, folder), resolve)


def world_size(run):
    """Processes (GPUs) the run trains with: the trainer's dist.world_size."""
    return int(run.config.get("dist", {}).get("world_size", 1))


def describe(run):
    values = ", ".join(f"{key}={format_value(value)}" for key, value in run.values.items())
    return f"[{values + ', ' if values else ''}seed={run.seed}]"
