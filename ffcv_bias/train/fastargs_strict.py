"""fastargs configuration with the two holes of fastargs 1.2.0 closed.

1. fastargs silently drops keys it does not know, in a YAML file and on the command line.
   A misspelt `--training.wieght_decay=0` would train with the default and nobody would
   know. Here every key of every config file and every `--section.key=value` argument is
   checked against the declared parameters; an unknown one is a `ConfigError` naming it.
2. fastargs parses a `bool` with Python's `bool(str)`, so `--x=0` is True. `StrictBool`
   accepts only 0/1/true/false/yes/no (any case).

Usage, in a CLI::

    Section('training', 'Training hyper-parameters').params(
        epochs=Param(int, 'number of epochs', default=16), ...)
    config = parse_config(description='Train one model')   # raises ConfigError
    nested = config_to_dict(config)    # {'training': {'epochs': 16, ...}, ...}
"""
import argparse
import sys

import yaml
from fastargs import get_current_config
from fastargs.validation import Checker

from ffcv_bias.common.errors import UserError


# libyaml's loader when present: a sweep resolves its base config once per run.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def flatten(nested, prefix=()):
    """{'a': {'b': 1}} -> {('a', 'b'): 1}."""
    flat = {}
    for key, value in nested.items():
        path = prefix + tuple(str(key).split("."))
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
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


def _read_config_file(path):
    try:
        with open(path) as handle:
            content = yaml.load(handle, Loader=_YAML_LOADER)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as error:  # unreadable, or a binary file
        raise ConfigError(f"cannot read config file {path}: "
                          f"{getattr(error, 'strerror', None) or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: "
                          f"{str(error).splitlines()[0]}") from None
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


def parse_config(argv=None, description=None, config_files=()):
    """Collect config files and `--section.key=value` overrides into fastargs' config.

    Later sources win: `config_files`, then each `--config-file` in order, then the
    command line. Every key is checked; every value is validated (a wrong type is a
    ConfigError naming the key). Returns the fastargs Config.
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
        file_values = flatten(_read_config_file(path))
        _check_known(file_values, config, path)
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
            config[path]
        except Exception:  # fastargs raises bare ValidationError/MissingValueError
            raw = config.content.get(path)
            checker = config.entries[path].checker.help()
            if raw is None:
                raise ConfigError(f"missing required config value '{dotted}' ({checker})") from None
            raise ConfigError(f"bad value for '{dotted}': {raw!r} is not {checker}") from None


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
