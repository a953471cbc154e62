"""fastargs configuration with the two holes of fastargs 1.2.0 closed.

1. fastargs silently drops keys it does not know, in a YAML file and on the command line.
   A misspelt `--training.wieght_decay=0` would train with the default and nobody would
   know. Here every key of every config file and every `--section.key=value` argument is
   checked against the declared parameters; an unknown one is a `ConfigError` naming it.
2. fastargs parses a `bool` with Python's `bool(str)`, so `--x=0` is True. `StrictBool`
   accepts only 0/1/true/false/yes/no (any case).

Also refused, each in one line naming the key: a YAML key given twice (with both lines)
or a syntax error (`FILE:LINE:COL:`, ffcv_bias/common/yaml_files.py), a section that is
not a mapping (`training:` left empty, or a list), a key left empty (`epochs:` or
`epochs: null`, which fastargs would silently replace by the default), and a float key
set to inf or nan. `ignored_file_keys` names undeclared keys a config file may carry (the
trainer: those of ffcv-imagenet's own YAML files): dropped with a note on stderr.

Usage, in a CLI::

    Section('training', 'Training hyper-parameters').params(
        epochs=Param(int, 'number of epochs', default=16), ...)
    config = parse_config(description='Train one model')   # raises ConfigError
    nested = config_to_dict(config)    # {'training': {'epochs': 16, ...}, ...}
"""
import argparse
import math
import sys

from fastargs import get_current_config
from fastargs.validation import Checker

from ffcv_bias.common.errors import UserError
from ffcv_bias.common.yaml_files import YamlFileError, load_yaml_file


class ConfigError(UserError, ValueError):
    """A bad configuration: the message is one line that names the offending key."""


class StrictBool(Checker):
    """A boolean that means what it says: '0', 'false', 'no' are False."""
    TRUE = {"1", "true", "yes", "on"}
    FALSE = {"0", "false", "no", "off"}

    def check(self, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        text = str(value).strip().lower()
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        raise ValueError(f"not a boolean: {value!r}")

    def help(self):
        return "a boolean (0/1/true/false)"


class OneOf(Checker):
    """A string from a fixed set of choices."""

    def __init__(self, *choices):
        self.choices = tuple(choices)

    def check(self, value):
        if value in self.choices:
            return value
        raise ValueError(f"{value!r} is not one of {self.choices}")

    def help(self):
        return "one of " + ", ".join(map(str, self.choices))


class FloatInRange(Checker):
    """A float in (low, high] (or [low, high] with low_inclusive)."""

    def __init__(self, low, high, low_inclusive=False):
        self.low, self.high, self.low_inclusive = low, high, low_inclusive

    def check(self, value):
        number = float(value)
        above_low = number >= self.low if self.low_inclusive else number > self.low
        if above_low and number <= self.high:
            return number
        raise ValueError(f"{number} outside {self.help()}")

    def help(self):
        bracket = "[" if self.low_inclusive else "("
        return f"a float in {bracket}{self.low}, {self.high}]"


class EpochList(Checker):
    """Epoch numbers (>= 1), distinct, ascending: 20, "20,60", "[20, 60]" or a YAML list;
    empty = none. The result is a list of ints, so config.json holds a JSON list."""

    def check(self, value):
        if isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            parts = [part for part in str(value).strip().strip("[]").split(",") if part.strip()]
        epochs = []
        for part in parts:
            if isinstance(part, bool) or not str(part).strip().isdigit():
                raise ValueError(f"not an epoch number: {part!r}")
            epochs.append(int(str(part).strip()))
        if any(epoch < 1 for epoch in epochs) or len(set(epochs)) != len(epochs):
            raise ValueError(f"epochs must be distinct and >= 1: {value!r}")
        return sorted(epochs)

    def help(self):
        return "a list of distinct epoch numbers >= 1 (e.g. 20 or 20,60; empty = none)"


def flatten(nested, prefix=(), source=None):
    """{'a': {'b': 1}} -> {('a', 'b'): 1}. A key given both nested and dotted
    (`training: {epochs: 2}` and `training.epochs: 3`) is a ConfigError naming `source`."""
    flat = {}
    for key, value in nested.items():
        path = prefix + tuple(str(key).split("."))
        items = flatten(value, path, source) if isinstance(value, dict) else {path: value}
        for item in items:
            if item in flat:
                raise ConfigError(f"config key '{'.'.join(item)}' is given twice in "
                                  f"{source or 'the config'} (once as section: key, once "
                                  f"as section.key): give it once")
        flat.update(items)
    return flat


def _check_known(paths, config, source):
    known_sections = {path[0] for path in config.entries}
    for path in paths:
        if tuple(path) in config.entries:
            continue
        dotted = ".".join(path)
        if path[0] not in known_sections:
            raise ConfigError(f"unknown config section '{path[0]}' (in {dotted}, from {source})")
        raise ConfigError(f"unknown config key '{dotted}' (from {source})")


def _check_sections(content, config, source):
    """A known section must be a mapping of keys: `training:` left empty or holding a
    list is said to be so (not reported as an unknown key 'training')."""
    known_sections = {path[0] for path in config.entries}
    for name, value in content.items():
        name = str(name)
        if name not in known_sections or isinstance(value, dict):
            continue  # a dotted key (training.epochs: 3), or an unknown section
        if value is None:
            raise ConfigError(f"config section '{name}' in {source} is empty: put its keys "
                              f"under it, indented ('{name}:' then '  key: value' lines), "
                              f"or remove the line")
        raise ConfigError(f"config section '{name}' in {source} must be a mapping of keys "
                          f"('{name}:' then '  key: value' lines), got "
                          f"{_kind(value)}")


def _kind(value):
    if isinstance(value, list):
        return "a list"
    return f"the {type(value).__name__} {value!r}"


def _check_not_empty(file_values, source):
    """`epochs:` or `epochs: null`: fastargs would silently keep the earlier value."""
    for path, value in file_values.items():
        if value is None:
            raise ConfigError(f"config key '{'.'.join(path)}' in {source} has no value "
                              f"(empty or null): give one (\"\" for an empty text) or "
                              f"remove the line")


# The undeclared keys already noted in this process: a sweep resolves one base config
# once per run, and says so once.
_NOTED = set()


def _drop_ignored(file_values, config, source, ignored_file_keys):
    kept = {}
    for path, value in file_values.items():
        if path in (ignored_file_keys or {}) and path not in config.entries:
            if (str(source), path) not in _NOTED:
                _NOTED.add((str(source), path))
                print(f"note: {source}: ignoring {'.'.join(path)}: {value!r} "
                      f"({ignored_file_keys[path]})", file=sys.stderr)
            continue
        kept[path] = value
    return kept


def _read_config_file(path):
    try:
        content = load_yaml_file(path, "config file")
    except YamlFileError as error:  # FILE:LINE:COL: a syntax error or a key given twice
        raise ConfigError(str(error)) from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as error:  # unreadable, or a binary file
        raise ConfigError(f"cannot read config file {path}: "
                          f"{getattr(error, 'strerror', None) or error}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return content


def _parse_cli_overrides(extra_args):
    """['--a.b=1', '--c.d', '2'] -> {('a','b'): '1', ('c','d'): '2'}."""
    overrides, index = {}, 0
    while index < len(extra_args):
        arg = extra_args[index]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}' (expected --section.key=value)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif index + 1 < len(extra_args) and not extra_args[index + 1].startswith("--"):
            index += 1
            value = extra_args[index]
        else:
            raise ConfigError(f"no value given for --{key}")
        overrides[tuple(key.split("."))] = value
        index += 1
    return overrides


def parse_config(argv=None, description=None, config_files=(), ignored_file_keys=None):
    """Collect config files and `--section.key=value` overrides into fastargs' config.

    Later sources win: `config_files`, then each `--config-file` in order, then the
    command line. Every key is checked; every value is validated (a wrong type is a
    ConfigError naming the key). `ignored_file_keys`: {('section', 'key'): why} of
    undeclared keys a config file may hold; they are dropped, with a note on stderr.
    Returns the fastargs Config.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = get_current_config()
    config.content = {}  # values of an earlier parse (same process, e.g. tests) must not leak
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config-file", "-C", action="append", default=[],
                        help="YAML config file (can be repeated; later files win)")
    if "-h" in argv or "--help" in argv:
        help_parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
        config.augment_argparse(help_parser)  # lists every parameter; adds --config-file itself
        help_parser.parse_args(["--help"])
    known, extra = parser.parse_known_args(argv)

    for path in list(config_files) + known.config_file:
        content = _read_config_file(path)
        _check_sections(content, config, path)
        file_values = _drop_ignored(flatten(content, source=path), config, path,
                                    ignored_file_keys)
        _check_known(file_values, config, path)
        _check_not_empty(file_values, path)
        config.collect({".".join(p): v for p, v in file_values.items()})
    overrides = _parse_cli_overrides(extra)
    _check_known(overrides, config, "command line")
    config.collect({".".join(p): v for p, v in overrides.items()})
    validate_all(config)
    return config


def validate_all(config):
    """Validate every declared value; raise ConfigError naming the first bad key."""
    for path in config.entries:
        dotted = ".".join(path)
        try:
            value = config[path]
        except Exception:  # fastargs raises bare ValidationError/MissingValueError
            raw = config.content.get(path)
            checker = config.entries[path].checker.help()
            if raw is None:
                raise ConfigError(f"missing required config value '{dotted}' ({checker})") from None
            raise ConfigError(f"bad value for '{dotted}': {raw!r} is not {checker}") from None
        if isinstance(value, float) and not math.isfinite(value):
            # float('inf'), float('nan') and YAML's .inf / .nan parse: no key means them.
            raise ConfigError(f"bad value for '{dotted}': {config.content.get(path)!r} is "
                              f"not a finite number")


def config_to_dict(config):
    """The resolved config, nested by section: {'training': {'seed': 0, ...}, ...}."""
    nested = {}
    for path in sorted(config.entries):
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = config[path]
    return nested


def reset_config():
    """A fresh, empty fastargs config (sections must be declared again). For tests."""
    from fastargs.state import set_current_config
    from fastargs.config import Config
    set_current_config(Config())
